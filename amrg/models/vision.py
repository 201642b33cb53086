"""Vision encoder: any timm model name -> tokens ``(B, N, C)`` and a token grid ``(H, W)``.

Whatever the family's native layout (Swin's channels-last ``(B, H, W, C)``, ViT's ``(B, 1+N, C)``, a
CNN's ``(B, C, H, W)``), features pass through :attr:`VisionEncoder.feature_map`, an identity module
that always sees ``(B, C, H, W)``: it is the GradCAM target layer for every family, so CAM needs no
per-family reshape. Input is uint8 grayscale ``(B, H, W)``; scaling, channel replication and the
model's own normalisation happen on the device. amrg's Vision-Mamba presets (:mod:`amrg.models.vim`:
``amrg_vim_tiny_pz16``, ``_base_``, ``_large_``) are timm names like any other.
"""

from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
from torch import nn

from ..io import load_tensors
from . import vim  # noqa: F401  (registers the amrg_vim_*_pz16 names with timm)


class VisionEncoder(nn.Module):
    def __init__(self, name: str, pretrained: bool = False, checkpoint: str | None = None,
                 img_size: int = 224, **kwargs):
        super().__init__()
        try:
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, img_size=img_size, **kwargs)
        except TypeError:  # families without an img_size argument (CNNs)
            self.model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        if checkpoint:
            load_backbone_weights(self.model, checkpoint)
        cfg = self.model.pretrained_cfg or {}
        mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
        self.in_chans = getattr(self.model, "in_chans", 3) if hasattr(self.model, "in_chans") else 3
        self.register_buffer("mean", torch.tensor(mean[: self.in_chans]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std[: self.in_chans]).view(1, -1, 1, 1), persistent=False)
        self.feature_map = nn.Identity()
        self.num_features = self.model.num_features
        self.num_prefix = getattr(self.model, "num_prefix_tokens", 0)
        self.channels_last = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        with torch.no_grad():
            self.grid = tuple(self.feature_grid(torch.zeros(1, img_size, img_size, dtype=torch.uint8)).shape[-2:])

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.mean.dtype).unsqueeze(1) / 255.0
        x = x.expand(-1, self.mean.shape[1], -1, -1)
        return (x - self.mean) / self.std

    def feature_grid(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features as ``(B, C, H, W)`` after :attr:`feature_map` (the CAM target layer)."""
        f = self.model.forward_features(self.normalise(pixels))
        if f.ndim == 4:
            f = f.permute(0, 3, 1, 2) if self.channels_last else f
        elif f.ndim == 3:
            f = f[:, self.num_prefix:]
            side = math.isqrt(f.shape[1])
            if side * side != f.shape[1]:
                raise ValueError(f"cannot arrange {f.shape[1]} tokens into a square grid")
            f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
        else:
            raise ValueError(f"unsupported feature shape {tuple(f.shape)}")
        return self.feature_map(f)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W)`` -> tokens ``(B, N, C)`` (row-major over the grid)."""
        return self.feature_grid(pixels).flatten(2).transpose(1, 2)


def load_backbone_weights(model: nn.Module, checkpoint: str) -> None:
    """Load a local weights file (safetensors, or a torch state dict read with weights_only=True)."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"vision.checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state = load_tensors(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing:
        raise ValueError(f"vision.checkpoint {path} lacks {len(missing)} weights, e.g. {missing[:5]}")
