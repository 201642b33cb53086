"""Stage pretrain_contrastive: seed 002's stage #2 (CXPMRG-Bench eq. 3, issue 17), image-report contrastive
pre-training of the Vision-Mamba encoder, the end of the pre-training chain (what
``generator_vision.source: pretrained`` reads).

The encoder is ``pretrain_vision.name`` in MambaXray-VL's fine-tune form (:data:`amrg.models.vim.VARIANTS`
``finetune``; stage #1's own architecture overrides kept, then ``pretrain_contrastive.vision_kwargs``) at
``pretrain_contrastive.image_size``, started from stage #1's backbone converted by
:func:`amrg.models.vim_forms.finetune_from_pretrain` when stage #1 wrote one, else random.

``enabled: false``: stage #1's backbone, converted to the fine-tune form, is passed through
(``backbone.safetensors`` + ``encoder.json``); without one the directory holds only ``config.json``
``{"enabled": false}``.

``enabled: true``: :class:`amrg.models.contrastive.ImageReportCLIP` on the train-split studies (their
reports only; the validation studies give the validation loss and retrieval R@1/5/10 both ways), two
views per study (token mean per view, then view mean), the text encoder ``text_encoder`` (HF id, local
dir or ``pkg:``, loaded as the report bank loads its encoder) truncated to ``max_length``, pooled by
``text_pool``, trained when ``text_trainable``; projections to ``proj_dim``; a learnable temperature.
:func:`amrg.train.fit` keeps the epoch of the best ``select`` (the release keeps the lowest train loss).

Outputs (``artifacts/pretrain/contrastive``): ``backbone.safetensors`` (the vision encoder only),
``encoder.json`` (``"form": "finetune"``), ``metrics.json``, ``dvclive/``, ``params.json``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from amrg.data.store import load_images, load_studies
from amrg.io import autocast, load_tensors, read_json, save_tensors, setup_runtime, write_json
from amrg.models.contrastive import ImageReportCLIP, clip_loss, recall_at_k
from amrg.models.text_encoder import SentenceEncoder
from amrg.models.vim import PATCH, VARIANTS
from amrg.models.vim_forms import finetune_from_pretrain
from amrg.models.vision import VisionEncoder
from amrg.train import LoopConfig, Selection, fit

from .common import Timer, clear_stage_dir, fingerprint, log_history, start, write_resolved

STAGE = "pretrain_contrastive"
VIEWS = 2  # views per study (the release pairs a study's images with its report)


def finetune_kwargs(pretrain_kwargs: dict, overrides: dict) -> dict:
    """The fine-tune form's VisionMamba overrides: stage #1's architecture keys (not its form), the
    ``finetune`` variant (without its size), then ``overrides``."""
    arch = {k: v for k, v in pretrain_kwargs.items() if k not in VARIANTS["pretrain"] and k != "img_size"}
    form = {k: v for k, v in VARIANTS["finetune"].items() if k != "img_size"}
    return {**arch, **form, **{k: v for k, v in overrides.items() if k != "img_size"}}


def converted_backbone(layout, pc) -> tuple[str, dict, dict[str, torch.Tensor]] | None:
    """Stage #1's encoder in the fine-tune form: (name, kwargs, state dict), or None when it wrote none."""
    weights, spec_path = layout.pretrained_encoder("pretrain_vision")
    if not weights.is_file():
        return None
    spec = read_json(spec_path)
    kwargs = finetune_kwargs(spec["kwargs"], pc.vision_kwargs)
    side = pc.image_size // PATCH
    state = finetune_from_pretrain(load_tensors(weights), (side, side), kwargs["scan"], kwargs["cls_position"],
                                   kwargs["final_norm"])
    return spec["name"], kwargs, state


def tokenize(tokenizer, texts: list[str], max_length: int, device) -> dict[str, torch.Tensor]:
    """Right-padded, truncated token ids and attention mask of ``texts`` on ``device``."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def write_encoder(out, name: str, kwargs: dict, image_size: int, state: dict[str, torch.Tensor]) -> None:
    save_tensors(out / "backbone.safetensors", {k: v.contiguous() for k, v in state.items()})
    write_json(out / "encoder.json", {"name": name, "kwargs": kwargs, "image_size": image_size, "form": "finetune"})


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start(STAGE, argv)
    pc, pv, out = params.pretrain_contrastive, params.pretrain_vision, layout.stage_dir(STAGE)
    clear_stage_dir(out)
    source = converted_backbone(layout, pc)
    if not pc.enabled:
        if source is None:
            write_json(out / "config.json", {"enabled": False})
            log.info("pretrain_contrastive disabled and no stage #1 backbone: nothing to pass through")
        else:
            write_encoder(out, *source[:2], pc.image_size, source[2])
            log.info("pretrain_contrastive disabled: stage #1's backbone passed through (fine-tune form)")
        return

    timer, device = Timer(), setup_runtime(params.runtime)
    if source is not None and source[0] != pv.name:
        raise ValueError(f"stage #1's backbone is {source[0]!r} but pretrain_vision.name is {pv.name!r}: rerun pretrain_vision")
    name, kwargs = pv.name, source[1] if source else finetune_kwargs(pv.kwargs, pc.vision_kwargs)
    vision = VisionEncoder(name, img_size=pc.image_size, **kwargs)
    if source is not None:
        vision.model.load_state_dict(source[2], strict=True)
    text = SentenceEncoder(pc.text_encoder, device, pc.max_length, pc.text_pool)
    text.model.requires_grad_(pc.text_trainable)
    model = ImageReportCLIP(vision, text.model, text.dim, pc.proj_dim, pc.text_pool, pc.temperature_init,
                            pc.learn_temperature).to(device)

    studies, images = load_studies(layout.studies), load_images(layout.images, layout.pixels)
    train, val = studies.rows("train"), studies.rows("val")
    if not len(train):
        raise ValueError("pretrain_contrastive: no train-split study")
    reports = {int(i): studies.reports[i] for i in np.concatenate([train, val])}  # never the test reports
    views = images.study_views(studies.ids, VIEWS)
    pixels, precision = images.pixels, params.runtime.precision

    def study_pixels(rows: np.ndarray) -> torch.Tensor:
        """float ``(B, VIEWS, size, size)`` in 0..255 of the studies ``rows``, resized on the device."""
        x = pixels[views[rows].reshape(-1)].to(device).float().unsqueeze(1)
        x = F.interpolate(x, size=(pc.image_size, pc.image_size), mode="bilinear", align_corners=False)
        return x.view(len(rows), VIEWS, pc.image_size, pc.image_size)

    def batch_loss(module, idx: torch.Tensor) -> torch.Tensor:
        rows = train[idx.numpy()]
        enc = tokenize(text.tokenizer, [reports[int(r)] for r in rows], pc.max_length, device)
        with autocast(device, precision):
            return module(study_pixels(rows), enc["input_ids"], enc["attention_mask"])

    @torch.no_grad()
    def validate() -> dict[str, float]:
        if not len(val):
            return {}
        model.eval()
        img, txt, loss = [], [], 0.0
        for s in range(0, len(val), pc.batch_size):
            rows = val[s:s + pc.batch_size]
            enc = tokenize(text.tokenizer, [reports[int(r)] for r in rows], pc.max_length, device)
            with autocast(device, precision):
                i, t = model.image_features(study_pixels(rows)), model.text_features(**enc)
            loss += float(clip_loss(i, t, model.logit_scale())) * len(rows)
            img.append(i.float()), txt.append(t.float())
        model.train()
        recalls = recall_at_k(torch.cat(img), torch.cat(txt))
        return {"val_loss": loss / len(val), **{f"val_{k}": v for k, v in recalls.items()}}

    loop = LoopConfig(pc.epochs, pc.batch_size, pc.lr, pc.weight_decay, 0, 1, pc.checkpoint_every, params.runtime.seed)
    weights, _ = layout.pretrained_encoder("pretrain_vision")
    fp = fingerprint(pc, pv.name, params.runtime, layout.studies, layout.images, layout.pixels,
                     *([weights] if weights.is_file() else []))
    select = pc.select if len(val) else "train_loss"
    fitted = fit(model, len(train), batch_loss, validate, loop, layout.checkpoint(STAGE), fp, Selection.of(select))
    model.load_state_dict(fitted.best_state, strict=False)
    seconds = timer()

    write_encoder(out, name, kwargs, pc.image_size, vision.model.state_dict())
    best = fitted.best
    write_json(out / "metrics.json", {
        "phantom_images": layout.is_phantom(), "init": "pretrain_vision" if source else "random",
        "train_loss": best["train_loss"], "val_loss": best.get("val_loss"),
        **{k: v for k, v in best.items() if k.startswith("val_") and k != "val_loss"},
        "temperature": float(1.0 / model.logit_scale().detach()), "epochs": len(fitted.history), "best_epoch": best["epoch"],
        "select": select, "train_studies": len(train), "val_studies": len(val), "seconds": seconds})
    log_history(out, fitted.history)
    write_resolved(out, pretrain_contrastive=pc, pretrain_vision=pv, runtime=params.runtime)
    log.info("contrastive pre-training (init %s): kept epoch %d, val loss %s, %.0fs",
             "pretrain_vision" if source else "random", best["epoch"], best.get("val_loss"), seconds)


if __name__ == "__main__":
    main()
