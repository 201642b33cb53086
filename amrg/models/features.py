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
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..data.store import TensorRows, write_rows
from ..io import autocast, progress
from .classifier import DiseaseClassifier

N_VIEWS = 2


def visual_tokens(encoder_tokens: torch.Tensor, grid: tuple[int, int], n_studies: int, pool: int,
                  views: str) -> torch.Tensor:
    """F, the visual tokens fed to the LLM for a batch of ``n_studies`` studies:
    ``encoder_tokens (n_studies * V, gh * gw, C)`` are the tokens of each study's V view images
    (study-major, row-major on the ``grid``), average-pooled on the grid by ``pool`` (ceil mode: T tokens
    per view), then both views' tokens concatenated (``views = concat``: ``(n_studies, V * T, C)``) or
    averaged (``mean``: ``(n_studies, T, C)``, as R2GenGPT and the released code do).

    The seam of the vision encoder that feeds the LLM: today ``encoder_tokens`` are the frozen stage-1
    classifier's, from the pass that also gives F_d (:func:`iter_study_features`), the only
    implementation. The released code feeds the LLM a separate, trainable encoder instead (MambaXray-VL,
    paper IV-B); such an encoder plugs in here, its tokens of the same view images taking the
    classifier's place (``C`` is then its width, which the generator's visual mapper reads)."""
    c = encoder_tokens.shape[-1]
    x = encoder_tokens.transpose(1, 2).reshape(-1, c, *grid)
    if pool > 1:
        x = torch.nn.functional.avg_pool2d(x, pool, ceil_mode=True)
    x = x.flatten(2).transpose(1, 2).reshape(n_studies, -1, x.shape[2] * x.shape[3], c)  # (S, V, T, C)
    return x.mean(1) if views == "mean" else x.flatten(1, 2)


@torch.inference_mode()
def iter_study_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, pool: int, device: torch.device,
                        precision: str, batch: int,
                        views: str = "concat") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``view_rows (S, N_VIEWS)`` rows of uint8 ``pixels`` -> batches of (F ``(b, N_F, C)``, F_d
    ``(b, 14, D)``) float32 on CPU, in study order (F: :func:`visual_tokens`, N_F = N_VIEWS * T or T)."""
    model.eval()
    for s in progress(range(0, len(view_rows), batch), "stage-1 features", unit="batch"):
        rows = view_rows[s:s + batch]
        b, v = rows.shape
        with autocast(device, precision):
            tokens, fd = model.features(pixels[rows.reshape(-1)].to(device))
        f = visual_tokens(tokens.float(), model.encoder.grid, b, pool, views)
        yield f.cpu(), fd.float().reshape(b, v, *fd.shape[1:]).mean(1).cpu()


def study_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, pool: int, device: torch.device,
                   precision: str, batch: int, views: str = "concat") -> tuple[torch.Tensor, torch.Tensor]:
    """(F ``(S, N_F, C)``, F_d ``(S, 14, D)``) of the studies ``view_rows`` in memory (a test split)."""
    f, fd = zip(*iter_study_features(model, pixels, view_rows, pool, device, precision, batch, views))
    return torch.cat(f), torch.cat(fd)


def write_study_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, pool: int, device: torch.device,
                         precision: str, batch: int, out_dir: Path,
                         views: str = "concat") -> tuple[TensorRows, TensorRows]:
    """:func:`study_features` streamed to ``out_dir/F.npy`` and ``out_dir/Fd.npy``, read back by rows."""
    if len(view_rows) == 0:
        raise ValueError(f"no studies to compute stage-1 features for ({out_dir.name} split is empty)")
    f, fd = write_rows([out_dir / "F.npy", out_dir / "Fd.npy"], len(view_rows),
                       iter_study_features(model, pixels, view_rows, pool, device, precision, batch, views))
    return f, fd
