"""Rebuild trained models from their stage outputs (architecture spec + safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io import load_tensors, read_json
from .classifier import ClassifierSpec, DiseaseClassifier


def load_classifier(out_dir: str | Path, device: torch.device) -> DiseaseClassifier:
    out_dir = Path(out_dir)
    if not (out_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"no trained classifier in {out_dir}: run `dvc repro train_classifier`")
    spec = ClassifierSpec(**read_json(out_dir / "config.json")["spec"])
    model = DiseaseClassifier(spec)
    model.load_state_dict(load_tensors(out_dir / "model.safetensors"))
    return model.to(device).eval()
