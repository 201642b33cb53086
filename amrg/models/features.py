"""Per-study inputs of the generator from the frozen stage-1 classifier.

For each study the first two views (IU X-ray's frontal and lateral; a single view is repeated) are
encoded once: visual tokens F are the encoder tokens of each view, average-pooled on the token grid by
``pool``, then concatenated (``views = concat``) or averaged (``mean``, R2GenGPT / the released code) over
the views (:func:`visual_tokens`, the seam of the encoder that feeds the LLM); the disease features F_d
are the Q-Former outputs averaged over the views.
Stage-1 weights are frozen in stage 2 (paper III-E), so these are computed once per run, not per step:
in memory for a test split (:func:`study_features`), or streamed to row files for the training splits
(:func:`write_study_features`), which hold ~0.4 MB per study with the paper's Swin-B and would not fit
in RAM for MIMIC-CXR.

A generator-side encoder (``generator_vision``, seed 002 C0/C4: MambaXray-VL's and the released AM-MRG code's
separate encoder of F) is a :class:`VisionTower` at the same seam: its tokens of the same view images replace
the classifier's in F, while F_d still comes from the frozen classifier. Frozen, it is run once here like the
classifier (``tower`` of :func:`iter_study_features`); trainable, :class:`amrg.tasks.GeneratorTask` runs it in
the training step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import nn

from ..data.store import TensorRows, write_rows
from ..io import autocast, progress
from .classifier import DiseaseClassifier
from .vision import VisionEncoder

if TYPE_CHECKING:
    from .generator import VisionSpec

N_VIEWS = 2
VISION_WEIGHTS = "vision.safetensors"  # the generator-side encoder's weights, beside generator/weights.safetensors


def visual_tokens(encoder_tokens: torch.Tensor, grid: tuple[int, int], n_studies: int, pool: int,
                  views: str) -> torch.Tensor:
    """F, the visual tokens fed to the LLM for a batch of ``n_studies`` studies:
    ``encoder_tokens (n_studies * V, gh * gw, C)`` are the tokens of each study's V view images
    (study-major, row-major on the ``grid``), average-pooled on the grid by ``pool`` (ceil mode: T tokens
    per view), then both views' tokens concatenated (``views = concat``: ``(n_studies, V * T, C)``) or
    averaged (``mean``: ``(n_studies, T, C)``, as R2GenGPT and the released code do).

    The seam of the vision encoder that feeds the LLM: ``encoder_tokens`` are the frozen stage-1
    classifier's, from the pass that also gives F_d (:func:`iter_study_features`; the paper's AM-MRG), or a
    generator-side encoder's (:class:`VisionTower`; the released code feeds the LLM a separate, trainable
    encoder, MambaXray-VL, paper IV-B), its tokens of the same view images taking the classifier's place
    (``C`` is then its width, which the generator's visual mapper reads)."""
    c = encoder_tokens.shape[-1]
    x = encoder_tokens.transpose(1, 2).reshape(-1, c, *grid)
    if pool > 1:
        x = torch.nn.functional.avg_pool2d(x, pool, ceil_mode=True)
    x = x.flatten(2).transpose(1, 2).reshape(n_studies, -1, x.shape[2] * x.shape[3], c)  # (S, V, T, C)
    return x.mean(1) if views == "mean" else x.flatten(1, 2)


def resize_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Grayscale images ``(N, H, W)`` at ``size x size`` for an encoder that reads another size than the
    preprocessed pixels: bilinear with antialiasing (the images as a downscaled photograph would show them),
    float on the pixels' device in the uint8 range :meth:`VisionEncoder.normalise` scales; unchanged (the
    uint8 tensor itself) when the size already matches."""
    if tuple(pixels.shape[-2:]) == (size, size):
        return pixels
    x = torch.nn.functional.interpolate(pixels.float().unsqueeze(1), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return x.squeeze(1)


class VisionTower(nn.Module):
    """The generator-side encoder of F: ``encoder`` (a :class:`~amrg.models.vision.VisionEncoder`, parameters
    under ``encoder.``) reading each view resized to ``image_size``, its tokens made F by
    :func:`visual_tokens` (``pool``, ``views``) exactly as the classifier's are."""

    def __init__(self, encoder: VisionEncoder, image_size: int, pool: int, views: str):
        super().__init__()
        self.encoder, self.image_size, self.pool, self.views = encoder, int(image_size), int(pool), views

    @property
    def width(self) -> int:
        """C of F: the encoder's token width (what the generator's visual mapper reads)."""
        return int(self.encoder.num_features)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 view pixels ``(S, V, H, W)`` of S studies -> F ``(S, N_F, C)`` float32."""
        s, v = pixels.shape[:2]
        tokens = self.encoder(resize_pixels(pixels.flatten(0, 1), self.image_size))
        return visual_tokens(tokens.float(), self.encoder.grid, s, self.pool, self.views)


def vision_tower(spec: "VisionSpec", pool: int, views: str, checkpoint: str | Path | None = None) -> VisionTower:
    """The :class:`VisionTower` a :class:`~amrg.models.generator.VisionSpec` describes: ``VisionEncoder(name,
    checkpoint, img_size=image_size, **kwargs)``, frozen (``requires_grad`` off, eval mode) unless the spec is
    trainable."""
    encoder = VisionEncoder(spec.name, checkpoint=None if checkpoint is None else str(checkpoint),
                            img_size=spec.image_size, **spec.kwargs)
    tower = VisionTower(encoder, spec.image_size, pool, views)
    if not spec.trainable:
        tower.requires_grad_(False).eval()
    return tower


@torch.inference_mode()
def iter_study_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, pool: int, device: torch.device,
                        precision: str, batch: int, views: str = "concat",
                        tower: VisionTower | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``view_rows (S, N_VIEWS)`` rows of uint8 ``pixels`` -> batches of (F ``(b, N_F, C)``, F_d
    ``(b, 14, D)``) float32 on CPU, in study order (F: :func:`visual_tokens`, N_F = N_VIEWS * T or T). With a
    generator-side ``tower`` F is its tokens of the same views (the tower's pool and views); F_d is the
    classifier's either way."""
    model.eval()
    if tower is not None:
        tower.eval()
    for s in progress(range(0, len(view_rows), batch), "stage-1 features", unit="batch"):
        rows = view_rows[s:s + batch]
        b, v = rows.shape
        x = pixels[rows.reshape(-1)].to(device)
        with autocast(device, precision):
            tokens, fd = model.features(x)
            f = None if tower is None else tower(x.reshape(b, v, *x.shape[1:]))
        f = visual_tokens(tokens.float(), model.encoder.grid, b, pool, views) if f is None else f.float()
        yield f.cpu(), fd.float().reshape(b, v, *fd.shape[1:]).mean(1).cpu()


def study_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, pool: int, device: torch.device,
                   precision: str, batch: int, views: str = "concat",
                   tower: VisionTower | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(F ``(S, N_F, C)``, F_d ``(S, 14, D)``) of the studies ``view_rows`` in memory (a test split)."""
    f, fd = zip(*iter_study_features(model, pixels, view_rows, pool, device, precision, batch, views, tower))
    return torch.cat(f), torch.cat(fd)


def write_study_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, pool: int, device: torch.device,
                         precision: str, batch: int, out_dir: Path, views: str = "concat",
                         tower: VisionTower | None = None) -> tuple[TensorRows, TensorRows]:
    """:func:`study_features` streamed to ``out_dir/F.npy`` and ``out_dir/Fd.npy``, read back by rows."""
    if len(view_rows) == 0:
        raise ValueError(f"no studies to compute stage-1 features for ({out_dir.name} split is empty)")
    f, fd = write_rows([out_dir / "F.npy", out_dir / "Fd.npy"], len(view_rows),
                       iter_study_features(model, pixels, view_rows, pool, device, precision, batch, views, tower))
    return f, fd


def write_disease_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, device: torch.device,
                           precision: str, batch: int, out_dir: Path) -> TensorRows:
    """F_d alone streamed to ``out_dir/Fd.npy`` (a trainable generator-side encoder computes F in the training
    step, so only the frozen classifier's part is cached)."""
    if len(view_rows) == 0:
        raise ValueError(f"no studies to compute stage-1 features for ({out_dir.name} split is empty)")
    batches = ((fd,) for _, fd in iter_study_features(model, pixels, view_rows, 1, device, precision, batch))
    return write_rows([out_dir / "Fd.npy"], len(view_rows), batches)[0]
