"""Disease-aware region mining (paper III-B, eq. 1) with the pytorch-grad-cam methods.

For an (image, disease) pair the CAM method gives an activation map M in [0, 1] at image size (each
map min-max normalised by the library). :func:`patch_mask` averages M over each ``patch x patch``
block r_k and keeps the block iff its mean exceeds τ, optionally only the ``max_patches`` highest such
blocks (IV-E: "the top six regions exhibiting the highest activation scores"; the released code keeps at
most 6); :func:`apply_mask` zeroes every pixel outside the kept blocks (eq. 1). The CAM target layer is
the encoder's ``feature_map`` (``(B, C, H, W)`` for every timm family), so no per-family reshape is needed.

GradCAM also has a native implementation (issue 19, ``cam.backend``), :func:`native_gradcam`: the same map
as pytorch-grad-cam's (Selvaraju et al. 2017: channel weights w_c = mean over the grid of ∂y_d/∂A_c,
:func:`gradcam_map` = relu(Σ_c w_c A_c), then :func:`upsample_and_scale` as the library's
``scale_cam_image``), with the gradient taken only down to A (no encoder backward, no parameter
gradients), one encoder forward per distinct image whatever the number of its target diseases, all
targets in one backward, under bf16 autocast on CUDA when asked.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torch.nn import functional as F

from .io import autocast

CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "eigencam": EigenCAM,
               "hirescam": HiResCAM, "layercam": LayerCAM, "scorecam": ScoreCAM}


def patch_mask(cam: np.ndarray, patch: int, tau: float, max_patches: int = 0) -> np.ndarray:
    """Eq. 1 selection: ``(B, H, W)`` maps -> ``(B, H/patch, W/patch)`` bool, True where the patch mean > τ.

    ``max_patches`` k > 0 (IV-E's top six): of the patches above τ keep only the k with the highest mean;
    equal means rank in row-major order (the first patch wins), so the mask is deterministic. 0: all of them.
    """
    b, h, w = cam.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of cam.patch={patch}")
    if max_patches < 0:
        raise ValueError(f"cam.max_patches must be >= 0 (0: no cap), got {max_patches}")
    means = cam.reshape(b, h // patch, patch, w // patch, patch).mean(axis=(2, 4))
    keep = means > tau
    n = (h // patch) * (w // patch)
    if 0 < max_patches < n:
        order = np.argsort(-means.reshape(b, n), axis=1, kind="stable")  # highest first, ties row-major
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(n), order.shape), axis=1)
        keep &= rank.reshape(keep.shape) < max_patches
    return keep


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


# --- native GradCAM (issue 19): the library's map, the gradient taken only to the target layer
SCALE_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image: (cam - min) / (SCALE_EPS + max)
CAM_BACKENDS = ("auto", "native", "library")


def head_from_feature_map(classifier: nn.Module, feature_map: torch.Tensor) -> torch.Tensor:
    """The classifier after its CAM target layer: ``(B, C, h, w)`` feature map -> logits ``(B, 14)``
    (the tokens of :meth:`VisionEncoder.forward`, row-major over the grid, through the Q-Former and head)."""
    return classifier.head(classifier.qformer(feature_map.flatten(2).transpose(1, 2)))


def gradcam_map(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """GradCAM at the target layer: w_c = mean_{ij} ∂y/∂A_cij, ``relu(Σ_c w_c A_c)``; ``(K, C, h, w)`` x 2
    -> ``(K, h, w)`` float32."""
    weights = gradients.float().mean(dim=(2, 3))
    return torch.relu((weights[:, :, None, None] * activations.float()).sum(1))


def min_max_scale(maps: torch.Tensor) -> torch.Tensor:
    """Per map ``(K, H, W)``: ``(m - min) / (SCALE_EPS + max(m - min))``, a blank map stays 0."""
    flat = maps.flatten(1)
    shifted = flat - flat.min(1, keepdim=True).values
    return (shifted / (SCALE_EPS + shifted.max(1, keepdim=True).values)).view_as(maps)


def upsample_and_scale(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pytorch-grad-cam's post-processing of one target layer's maps ``(K, h, w)`` -> ``(K, H, W)``:
    min-max scale, resize (cv2 INTER_LINEAR = bilinear with half-pixel centres, ``align_corners=False``),
    then the multi-layer aggregation's relu and min-max scale again."""
    up = F.interpolate(min_max_scale(cam).unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    return min_max_scale(torch.relu(up))


def native_gradcam(classifier: nn.Module, pixels: torch.Tensor, diseases: list[int],
                   precision: str = "fp32") -> np.ndarray:
    """GradCAM maps ``(K, H, W)`` float32 in [0, 1] of uint8 ``pixels (K, H, W)``, target ``diseases[k]``
    for image k: pytorch-grad-cam's GradCAM map at ``classifier.encoder.feature_map``.

    Equal images are encoded once: the encoder runs without a graph up to the feature map A of each
    distinct image; each target gets its own copy of its image's A as a leaf, the Q-Former and head run
    over the K targets (they mix nothing across the batch) and one backward of ``Σ_k y_k[d_k]`` gives each
    target its own ∂y/∂A; no encoder parameter gets a gradient. ``precision="bf16"`` autocasts the forward
    on CUDA (the maps are computed in float32). The classifier should be in eval mode (BatchNorm, dropout).
    """
    if len(diseases) != len(pixels):
        raise ValueError(f"{len(pixels)} images but {len(diseases)} target diseases")
    if len(pixels) == 0:
        return np.zeros((0, *pixels.shape[1:]), np.float32)
    device = pixels.device
    distinct, image_of = torch.unique(pixels.flatten(1), dim=0, return_inverse=True)
    with autocast(device, precision):
        with torch.no_grad():
            a = classifier.encoder.feature_grid(distinct.view(-1, *pixels.shape[1:]))
        leaf = a[image_of].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = head_from_feature_map(classifier, leaf)
            target = torch.as_tensor(diseases, dtype=torch.long, device=logits.device)
            selected = logits.gather(1, target[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, leaf)
    with torch.no_grad():
        cam = upsample_and_scale(gradcam_map(leaf.detach(), grad), tuple(pixels.shape[1:]))
    return cam.cpu().numpy().astype(np.float32)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class CamMiner:
    """CAMs of ``method`` at the encoder's ``feature_map``. ``backend`` (``cam.backend``): GradCAM by
    :func:`native_gradcam` (``native``, or ``auto`` with the classifier on CUDA) under ``precision``
    (``runtime.precision``), or by pytorch-grad-cam (``library``, ``auto`` on CPU, and every other method)."""

    def __init__(self, classifier: nn.Module, method: str, backend: str = "library", precision: str = "fp32"):
        if method not in CAM_METHODS:
            raise ValueError(f"unknown cam.method {method!r}; choose from {sorted(CAM_METHODS)}")
        if backend not in CAM_BACKENDS:
            raise ValueError(f"unknown cam.backend {backend!r}; choose from {list(CAM_BACKENDS)}")
        self.model = _PixelsModel(classifier).eval()
        self.precision = precision
        self.native = method == "gradcam" and (backend == "native" or (backend == "auto" and
                                                                       _device(classifier).type == "cuda"))
        self.backend = "native" if self.native else "library"
        self.cam = None if self.native else CAM_METHODS[method](model=self.model,
                                                                target_layers=[classifier.encoder.feature_map])

    def __call__(self, pixels: torch.Tensor, diseases: list[int]) -> np.ndarray:
        """CAMs ``(B, H, W)`` in [0, 1] for a batch of images, one target disease per image."""
        if self.native:
            return native_gradcam(self.model.classifier, pixels, [int(d) for d in diseases], self.precision)
        x = pixels.float().unsqueeze(1)
        return self.cam(input_tensor=x, targets=[ClassifierOutputTarget(int(d)) for d in diseases])

    def close(self) -> None:
        if self.cam is not None:
            self.cam.activations_and_grads.release()


# --- for people: a CAM drawn over its image, and where it points in words
def heat_overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """uint8 ``(H, W)`` image + ``(H, W)`` CAM in [0, 1] -> uint8 RGB ``(H, W, 3)``: a jet-like heat map
    blended in proportion to the activation, so weak activations leave the radiograph visible."""
    c = np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0)[..., None]
    heat = np.clip(1.5 - np.abs(4 * c - np.array([3.0, 2.0, 1.0], np.float32)), 0.0, 1.0) * 255.0
    gray = np.repeat(np.asarray(image, dtype=np.float32)[..., None], 3, axis=2)
    a = alpha * c
    return (gray * (1 - a) + heat * a).round().clip(0, 255).astype(np.uint8)


def overlay_strip(image: np.ndarray, cam: np.ndarray, masked: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``[image | heat_overlay(image, cam) | masked image]`` side by side: uint8 RGB ``(H, 3 W, 3)``.

    ``image`` and ``masked`` (the eq. 1 masked pixels of :func:`apply_mask`) are uint8 ``(H, W)``,
    ``cam`` ``(H, W)`` in [0, 1]. The heat map is the one of every other overlay (:func:`heat_overlay`)."""
    image, masked = np.asarray(image, dtype=np.uint8), np.asarray(masked, dtype=np.uint8)
    if image.ndim != 2 or image.shape != np.shape(cam) or image.shape != masked.shape:
        raise ValueError(f"image {image.shape}, cam {np.shape(cam)} and masked {masked.shape} must be one (H, W) shape")
    gray = np.repeat(image[..., None], 3, axis=2)
    return np.concatenate([gray, heat_overlay(image, cam, alpha), np.repeat(masked[..., None], 3, axis=2)], axis=1)


def overlay_strip_png(image: np.ndarray, cam: np.ndarray, masked: np.ndarray, alpha: float = 0.6) -> bytes:
    """:func:`overlay_strip` as PNG bytes (the ``cam/overlays/*.png`` files)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(overlay_strip(image, cam, masked, alpha)).save(buf, format="PNG")
    return buf.getvalue()


_ROWS, _COLS = ("upper", "middle", "lower"), ("left", "centre", "right")


def cam_location(cam: np.ndarray, patch: int, tau: float) -> dict:
    """Where a ``(H, W)`` CAM points, in image coordinates (the viewer's left/right, not the patient's):

    ``peak`` (x, y) of the maximum (the centre of its plateau) as fractions of width/height, ``where`` the peak's third of the image
    ("lower left"), ``kept`` the share of ``patch`` blocks eq. 1 keeps at ``tau`` and ``box`` their bounding
    box ``[x0, y0, x1, y1]`` in fractions (None when no block is kept).
    """
    cam = np.asarray(cam, dtype=np.float64)
    h, w = cam.shape
    ys, xs = np.nonzero(cam >= cam.max() - 1e-6)  # the maximum is often a plateau: its centre
    px, py = float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h
    where = f"{_ROWS[min(int(py * 3), 2)]} {_COLS[min(int(px * 3), 2)]}".replace("middle centre", "centre")
    mask = patch_mask(cam[None], patch, tau)[0]
    box = None
    if mask.any():
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        gh, gw = mask.shape
        box = [round(float(v), 3) for v in (cols[0] / gw, rows[0] / gh, (cols[-1] + 1) / gw, (rows[-1] + 1) / gh)]
    return {"peak": [round(px, 3), round(py, 3)], "where": where, "kept": round(float(mask.mean()), 3), "box": box}


# --- localisation scores: a CAM against a ground-truth region (e.g. :func:`amrg.data.phantoms.phantom_regions`)
def _check_pair(cam: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    cam, region = np.asarray(cam, dtype=np.float64), np.asarray(region, dtype=bool)
    if cam.ndim != 2 or cam.shape != region.shape:
        raise ValueError(f"cam {cam.shape} and region {region.shape} must be the same (H, W) shape")
    if not region.any():
        raise ValueError("region is empty: nothing to localise")
    if not np.isfinite(cam).all() or (cam < 0).any():
        raise ValueError("cam must be finite and non-negative")
    return cam, region


def cam_hit(cam: np.ndarray, region: np.ndarray) -> dict[str, float | bool]:
    """How much of a CAM's mass falls inside a ground-truth region, relative to chance.

    ``cam``: ``(H, W)`` non-negative map (the [0, 1] maps of :class:`CamMiner`); ``region``: ``(H, W)``
    bool, non-empty. Returns

    * ``mass_in``: ``sum(cam[region]) / sum(cam)``, the share of the activation inside the region;
    * ``area``: ``region.mean()``, the share a map spread uniformly would put there (chance);
    * ``lift``: ``mass_in / area``; 1 is chance (a uniform map), > 1 better than chance, at most ``1 / area``;
    * ``hit``: ``lift > 1``.

    A blank map (all zero: the CAM found no positive evidence) carries no localisation and counts as a
    miss: ``mass_in = lift = 0``, ``hit = False``.
    """
    cam, region = _check_pair(cam, region)
    area, total = float(region.mean()), float(cam.sum())
    mass_in = float(cam[region].sum()) / total if total > 0 else 0.0
    lift = mass_in / area
    return {"mass_in": mass_in, "area": area, "lift": lift, "hit": bool(lift > 1.0)}


def pointing_game(cam: np.ndarray, region: np.ndarray, tolerance: float = 0.0) -> bool:
    """Pointing game (Zhang et al., 2016): does the CAM's maximum fall inside the region?

    The maximum is often a small plateau (bilinear upsampling of a coarse token grid ties 2 x 2 pixels),
    so the hit counts when at least half of the pixels where ``cam`` reaches its maximum lie within
    ``tolerance`` pixels (Euclidean) of the region (``tolerance=0``: inside it; the original uses 15 px).
    A constant map (no maximum) is a miss.
    """
    cam, region = _check_pair(cam, region)
    top = cam.max()
    if top <= cam.min():
        return False
    peak = cam >= top
    if tolerance > 0:
        region = _dilate(region, tolerance)
    return bool(2 * (peak & region).sum() >= peak.sum())


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` grown by a Euclidean disk of ``radius`` pixels (OR of shifted copies)."""
    r = int(np.floor(radius))
    h, w = mask.shape
    pad = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= pad[r + dy:r + dy + h, r + dx:r + dx + w]
    return out
