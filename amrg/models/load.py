"""Rebuild trained models from their stage outputs (architecture spec + safetensors), and the generator-side
vision encoder (``generator_vision``) from the params, the pre-training outputs or a trained run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io import load_tensors, read_json
from ..layout import MissingArtifacts
from .classifier import ClassifierSpec, DiseaseClassifier
from .features import VISION_WEIGHTS, VisionTower, vision_tower
from .generator import VisionSpec

if TYPE_CHECKING:
    from ..config import GeneratorVision
    from ..layout import Layout
    from .generator import GeneratorSpec

ENCODER_KEYS = ("name", "kwargs", "image_size")  # what encoder.json must give (pretrain_contrastive writes it)


def load_classifier(out_dir: str | Path, device: torch.device) -> DiseaseClassifier:
    out_dir = Path(out_dir)
    if not (out_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"no trained classifier in {out_dir}: run `dvc repro train_classifier`")
    spec = ClassifierSpec(**read_json(out_dir / "config.json")["spec"])
    model = DiseaseClassifier(spec)
    model.load_state_dict(load_tensors(out_dir / "model.safetensors"))
    return model.to(device).eval()


def generator_vision_files(gv: "GeneratorVision", layout: "Layout") -> list[Path]:
    """The files the generator-side encoder is built from (the fingerprint's inputs): the pre-trained
    encoder's weights and ``encoder.json``, a timm ``checkpoint``, or nothing (classifier, fresh timm)."""
    if gv.source == "pretrained":
        return list(layout.pretrained_encoder())
    return [Path(gv.checkpoint)] if gv.source == "timm" and gv.checkpoint else []


def generator_vision_spec(gv: "GeneratorVision", layout: "Layout",
                          image_size: int) -> tuple[VisionSpec, Path | None] | None:
    """(:class:`~amrg.models.generator.VisionSpec`, the weights to start from) of ``generator_vision``; None for
    ``source: classifier`` (F is the classifier's). ``timm``: ``name``/``kwargs`` at the preprocessed
    ``image_size`` (or ``kwargs.img_size``), from ``checkpoint`` (or a fresh init); ``pretrained``: name, kwargs and image size from the
    end of seed 002's pre-training chain (:meth:`amrg.layout.Layout.pretrained_encoder`), which must exist."""
    if gv.source == "classifier":
        return None
    if gv.source == "timm":  # kwargs.img_size, when given, is the size it reads (the views are resized to it)
        kwargs = dict(gv.kwargs)
        size = int(kwargs.pop("img_size", image_size))
        return VisionSpec("timm", gv.name, kwargs, size, gv.trainable), Path(gv.checkpoint) if gv.checkpoint else None
    weights, meta = layout.pretrained_encoder()
    missing = [p for p in (weights, meta) if not p.is_file()]
    if missing:
        raise MissingArtifacts(
            f"generator_vision.source=pretrained reads the pre-trained encoder, but {missing[0]} is absent: set "
            "pretrain_vision.objective: arm and/or pretrain_contrastive.enabled: true in params.yaml and run "
            "`dvc repro pretrain_contrastive` (or choose generator_vision.source classifier or timm)")
    enc = read_json(meta)
    if not isinstance(enc, dict) or any(k not in enc for k in ENCODER_KEYS):
        raise ValueError(f"{meta} must give {', '.join(ENCODER_KEYS)} of the pre-trained encoder (got "
                         f"{sorted(enc) if isinstance(enc, dict) else type(enc).__name__}): rerun "
                         "`dvc repro pretrain_contrastive`")
    return VisionSpec("pretrained", str(enc["name"]), dict(enc["kwargs"]), int(enc["image_size"]), gv.trainable), \
        weights


def build_generator_vision(gv: "GeneratorVision", layout: "Layout", image_size: int, pool: int, views: str,
                           seed: int) -> tuple[VisionSpec, VisionTower] | None:
    """The generator-side encoder of a training run, (its spec, its
    :class:`~amrg.models.features.VisionTower`), or None (``source: classifier``: nothing is built, no RNG is
    drawn). Built under a forked RNG seeded with ``seed``, so the generator's own initialisation and the
    training RNG stream are those of a run without it."""
    resolved = generator_vision_spec(gv, layout, image_size)
    if resolved is None:
        return None
    spec, weights = resolved
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec, vision_tower(spec, pool, views, weights)


def load_generator_vision(spec: "GeneratorSpec", generator_dir: str | Path, device: torch.device) -> VisionTower | None:
    """A trained run's generator-side encoder (None when F is the classifier's): rebuilt from the spec, its
    weights from ``generator_dir/vision.safetensors`` (strict), frozen, in eval mode."""
    if spec.vision is None:
        return None
    path = Path(generator_dir) / VISION_WEIGHTS
    if not path.is_file():
        raise MissingArtifacts(f"{path} not found: the generator was trained with generator_vision.source="
                               f"{spec.vision.source}, whose weights it holds. Run `dvc repro train_generator`")
    tower = vision_tower(dataclasses.replace(spec.vision, trainable=False), spec.visual_pool, spec.views)
    tower.encoder.load_state_dict(load_tensors(path))
    return tower.to(device).eval()
