"""Memory-bank construction (paper III-C): region selection, report sampling, pooling.

- Visual bank rows are CAM regions, at most ``max_per_disease`` per disease, the most confident first.
- A region's vector is the mean of the encoder tokens whose grid cell lies in a kept patch
  (the kept-patch mask max-pooled onto the token grid): the encoder sees the masked image and only
  the region's own tokens are pooled.
- The report bank draws training reports per disease in proportion to the training label frequency
  (``size`` reports in all, seeded), splits them into sentences and keeps each distinct sentence once
  (with how many drawn reports contain it), since repeated stock sentences would otherwise dominate
  every retrieval.
"""

from __future__ import annotations

import numpy as np
import torch

from .data.clean import report_sentences


def select_regions(scores: np.ndarray, diseases: np.ndarray, max_per_disease: int) -> np.ndarray:
    """Indices of the kept rows: per disease the ``max_per_disease`` highest scores (ties: first row)."""
    keep = []
    for d in np.unique(diseases):
        rows = np.flatnonzero(diseases == d)
        order = rows[np.argsort(-scores[rows], kind="stable")]
        keep.append(order[:max_per_disease])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch mask ``(B, h, w)`` -> token-grid mask ``(B, gh, gw)`` (a cell is kept if any patch in it is)."""
    m = mask.float().unsqueeze(1)
    if tuple(m.shape[-2:]) != tuple(grid):
        m = torch.nn.functional.adaptive_max_pool2d(m, grid) if m.shape[-1] >= grid[-1] else \
            torch.nn.functional.interpolate(m, size=grid, mode="nearest")
    return m[:, 0] > 0


def masked_mean_pool(tokens: torch.Tensor, grid_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens (B, N, C)`` over the cells of ``grid_mask (B, gh, gw)``; all tokens if empty."""
    w = grid_mask.flatten(1).to(tokens.dtype)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    return (tokens * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)


def sample_reports_by_disease(labels: np.ndarray, size: int, seed: int) -> list[tuple[int, int]]:
    """(report index, disease) pairs: disease d gets ``round(size * f_d / Σf)`` of its positive reports.

    ``labels`` is a binary ``(N, 14)`` matrix of training reports. A report drawn for several diseases is
    kept once (first disease in CheXpert order). All positives are taken when a disease has fewer.
    """
    rng = np.random.default_rng(seed)
    freq = labels.sum(0).astype(np.float64)
    if freq.sum() == 0:
        return []
    quota = np.round(size * freq / freq.sum()).astype(int)
    chosen: dict[int, int] = {}
    for d in range(labels.shape[1]):
        rows = np.flatnonzero(labels[:, d] > 0)
        for r in rng.permutation(rows)[: quota[d]]:
            chosen.setdefault(int(r), d)
    return sorted(chosen.items())


def sentence_rows(reports: list[str], study_ids: list[str], picks: list[tuple[int, int]]) -> dict[str, list]:
    """Distinct sentences of the picked reports with metadata (first study/disease) and a count."""
    rows: dict[str, dict] = {}
    for r, d in picks:
        for s in report_sentences(reports[r]):
            if s in rows:
                rows[s]["count"] += 1
            else:
                rows[s] = {"sentence": s, "study_id": study_ids[r], "disease": d, "count": 1}
    return {k: [row[k] for row in rows.values()] for k in ("sentence", "study_id", "disease", "count")}


def load_banks(layout, hopfield) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The memory banks of the run in ``layout`` (:class:`amrg.layout.Layout`) that the Hopfield switches
    turn on (None for a switched-off memory; Table IV rows #01-#04)."""
    from .io import load_tensors

    layout.require(([layout.visual_bank] if hopfield.visual else []) + ([layout.report_bank] if hopfield.report else []))
    v = load_tensors(layout.visual_bank)["bank"] if hopfield.visual else None
    r = load_tensors(layout.report_bank)["bank"] if hopfield.report else None
    return v, r
