"""Per-study inputs of the generator from the frozen stage-1 classifier.

For each study the first two views (IU X-ray's frontal and lateral; a single view is repeated) are
encoded once: visual tokens F are the encoder tokens of both views, average-pooled on the token grid by
``pool`` and concatenated; the disease features F_d are the Q-Former outputs averaged over the views.
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


@torch.inference_mode()
def iter_study_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, pool: int, device: torch.device,
                        precision: str, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``view_rows (S, N_VIEWS)`` rows of uint8 ``pixels`` -> batches of (F ``(b, N_VIEWS*T, C)``,
    F_d ``(b, 14, D)``) float32 on CPU, in study order."""
    model.eval()
    gh, gw = model.encoder.grid
    for s in progress(range(0, len(view_rows), batch), "stage-1 features", unit="batch"):
        rows = view_rows[s:s + batch]
        b, v = rows.shape
        with autocast(device, precision):
            tokens, fd = model.features(pixels[rows.reshape(-1)].to(device))
        tokens, fd = tokens.float(), fd.float()
        c = tokens.shape[-1]
        grid = tokens.transpose(1, 2).reshape(b * v, c, gh, gw)
        if pool > 1:
            grid = torch.nn.functional.avg_pool2d(grid, pool, ceil_mode=True)
        yield grid.flatten(2).transpose(1, 2).reshape(b, -1, c).cpu(), fd.reshape(b, v, *fd.shape[1:]).mean(1).cpu()


def study_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, pool: int,
                   device: torch.device, precision: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(F ``(S, N_VIEWS*T, C)``, F_d ``(S, 14, D)``) of the studies ``view_rows`` in memory (a test split)."""
    f, fd = zip(*iter_study_features(model, pixels, view_rows, pool, device, precision, batch))
    return torch.cat(f), torch.cat(fd)


def write_study_features(model: DiseaseClassifier, pixels, view_rows: np.ndarray, pool: int, device: torch.device,
                         precision: str, batch: int, out_dir: Path) -> tuple[TensorRows, TensorRows]:
    """:func:`study_features` streamed to ``out_dir/F.npy`` and ``out_dir/Fd.npy``, read back by rows."""
    if len(view_rows) == 0:
        raise ValueError(f"no studies to compute stage-1 features for ({out_dir.name} split is empty)")
    f, fd = write_rows([out_dir / "F.npy", out_dir / "Fd.npy"], len(view_rows),
                       iter_study_features(model, pixels, view_rows, pool, device, precision, batch))
    return f, fd
