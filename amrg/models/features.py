"""Per-study inputs of the generator from the frozen stage-1 classifier.

For each study the first two views (IU X-ray's frontal and lateral; a single view is repeated) are
encoded once: visual tokens F are the encoder tokens of both views, average-pooled on the token grid by
``pool`` and concatenated; the disease features F_d are the Q-Former outputs averaged over the views.
Stage-1 weights are frozen in stage 2 (paper III-E), so these are computed once per run, not per step.
"""

from __future__ import annotations

import numpy as np
import torch

from ..io import autocast, progress
from .classifier import DiseaseClassifier

N_VIEWS = 2


@torch.inference_mode()
def study_features(model: DiseaseClassifier, pixels: torch.Tensor, view_rows: np.ndarray, pool: int,
                   device: torch.device, precision: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``view_rows (S, N_VIEWS)`` rows of ``pixels`` -> (F ``(S, N_VIEWS*T, C)``, F_d ``(S, 14, D)``) on CPU."""
    model.eval()
    gh, gw = model.encoder.grid
    f_all, fd_all = [], []
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
        f_all.append(grid.flatten(2).transpose(1, 2).reshape(b, -1, c).cpu())
        fd_all.append(fd.reshape(b, v, *fd.shape[1:]).mean(1).cpu())
    return torch.cat(f_all), torch.cat(fd_all)
