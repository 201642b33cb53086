"""Pixel targets of seed 002's autoregressive pre-training (ARM; CXPMRG-Bench stage #1, issue 17).

:func:`patchify` / :func:`unpatchify` are MAE's (He et al. 2022, ``models_mae.py``, as ARM's
``models_pretrain.py`` copies it): an image ``(B, C, H, W)`` <-> ``(B, L, p*p*C)`` row-major patches, each
flattened in ``(row in patch, column in patch, channel)`` order. :func:`norm_pix` is MAE's ``norm_pix_loss``
target, which the ARM release always applies (``if True:``): every patch minus its mean, divided by
``sqrt(var + eps)`` with the unbiased variance (``torch.var``'s default) and ``eps = 1e-6``.
"""

from __future__ import annotations

import torch

NORM_PIX_EPS = 1e-6  # MAE / ARM: (var + 1e-6) ** 0.5


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)(W/p), p*p*C)``, patches row-major, pixels ``(p, q, c)`` inside."""
    if imgs.ndim != 4 or imgs.shape[2] % patch or imgs.shape[3] % patch:
        raise ValueError(f"patchify needs (B, C, H, W) with H, W multiples of {patch}; got {tuple(imgs.shape)}")
    b, c, h, w = imgs.shape
    x = imgs.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(x: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, h*w, p*p*C)`` on a ``grid`` of ``(h, w)`` patches -> ``(B, C, h p, w p)``."""
    h, w = grid
    if x.ndim != 3 or x.shape[1] != h * w or x.shape[2] != patch * patch * channels:
        raise ValueError(f"unpatchify: {tuple(x.shape)} is not (B, {h * w}, {patch * patch * channels})")
    x = x.reshape(x.shape[0], h, w, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], channels, h * patch, w * patch)


def norm_pix(patches: torch.Tensor, eps: float = NORM_PIX_EPS) -> torch.Tensor:
    """Per-patch normalised targets ``(x - mean) / sqrt(var + eps)`` over the last dim (MAE's norm_pix_loss)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5
