"""Disease-aware region mining (paper III-B, eq. 1) with the pytorch-grad-cam methods.

For an (image, disease) pair the CAM method gives an activation map M in [0, 1] at image size (each
map min-max normalised by the library). :func:`patch_mask` averages M over each ``patch x patch``
block r_k and keeps the block iff its mean exceeds τ; :func:`apply_mask` zeroes every pixel outside
the kept blocks (eq. 1). The CAM target layer is the encoder's ``feature_map`` (``(B, C, H, W)`` for
every timm family), so no per-family reshape is needed.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "eigencam": EigenCAM,
               "hirescam": HiResCAM, "layercam": LayerCAM, "scorecam": ScoreCAM}


def patch_mask(cam: np.ndarray, patch: int, tau: float) -> np.ndarray:
    """Eq. 1 selection: ``(B, H, W)`` maps -> ``(B, H/patch, W/patch)`` bool, True where the patch mean > τ."""
    b, h, w = cam.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of cam.patch={patch}")
    return cam.reshape(b, h // patch, patch, w // patch, patch).mean(axis=(2, 4)) > tau


def apply_mask(images: np.ndarray, mask: np.ndarray, patch: int) -> np.ndarray:
    """Eq. 1 masking: keep pixels of kept patches, zero the rest. uint8 ``(B, H, W)``."""
    return images * np.repeat(np.repeat(mask, patch, axis=1), patch, axis=2).astype(images.dtype)


class _PixelsModel(nn.Module):
    """Adapter: grad-cam passes ``(B, 1, H, W)`` float pixels; the classifier takes ``(B, H, W)``."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x[:, 0])


class CamMiner:
    def __init__(self, classifier: nn.Module, method: str):
        if method not in CAM_METHODS:
            raise ValueError(f"unknown cam.method {method!r}; choose from {sorted(CAM_METHODS)}")
        self.model = _PixelsModel(classifier).eval()
        self.cam = CAM_METHODS[method](model=self.model, target_layers=[classifier.encoder.feature_map])

    def __call__(self, pixels: torch.Tensor, diseases: list[int]) -> np.ndarray:
        """CAMs ``(B, H, W)`` in [0, 1] for a batch of images, one target disease per image."""
        x = pixels.float().unsqueeze(1)
        return self.cam(input_tensor=x, targets=[ClassifierOutputTarget(int(d)) for d in diseases])

    def close(self) -> None:
        self.cam.activations_and_grads.release()
