"""Memory-bank construction (paper III-C): region selection, report sampling, pooling.

- Visual bank rows are CAM regions, at most ``max_per_disease`` non-empty ones per disease (the cap counts
  after empty masks are dropped, IV-B), the most confident first or a seeded random sample (the released
  code's ``random.sample``). ``regions.parquet`` names the rule that made it (:func:`with_region_rule`).
- A region's vector is the mean of the encoder tokens whose grid cell lies in a kept patch
  (the kept-patch mask max-pooled onto the token grid): the encoder sees the masked image and only
  the region's own tokens are pooled. The released code's alternative (``banks.visual.unit: patch``):
  a row per kept patch, its crop resized to the image size (:func:`patch_crops`) and all its tokens pooled.
- The report bank draws training reports per disease in proportion to the training label frequency
  (``size`` reports in all, seeded), splits them into sentences and keeps each distinct sentence once
  (with how many drawn reports contain it), since repeated stock sentences would otherwise dominate
  every retrieval.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from .data.clean import report_sentences

SELECT_RULES = ("confident", "random")
_RULE_KEY = b"cam.rule"


def region_order(scores: np.ndarray, diseases: np.ndarray, rule: str = "confident", seed: int = 0) -> np.ndarray:
    """Every row index, grouped by disease (ascending), each disease's rows in the order the cap takes them.

    ``confident``: highest ``scores`` first (ties: first row). ``random``: a seeded permutation of all rows
    (``numpy.random.default_rng(seed)``), so each disease's rows come in a uniformly random order and the
    rows of any subset keep the relative order they have here.
    """
    if rule not in SELECT_RULES:
        raise ValueError(f"unknown cam.select {rule!r}; choose from {SELECT_RULES}")
    scores, diseases = np.asarray(scores), np.asarray(diseases)
    key = -scores if rule == "confident" else np.random.default_rng(seed).permutation(len(scores))
    return np.lexsort((np.arange(len(scores)), key, diseases))


def select_regions(scores: np.ndarray, diseases: np.ndarray, max_per_disease: int, rule: str = "confident",
                   seed: int = 0, eligible: np.ndarray | None = None) -> np.ndarray:
    """Indices (ascending) of the kept rows: per disease the first ``max_per_disease`` eligible rows in
    :func:`region_order` (``rule``, ``seed``). ``eligible`` (bool per row, default all) drops rows (an
    empty CAM mask) before the cap, without changing the order of the others: the result equals
    ``select_regions`` run on the eligible rows alone for ``confident``, and is still a uniform sample of
    them for ``random``."""
    order = region_order(scores, diseases, rule, seed)
    if eligible is not None:
        order = order[np.asarray(eligible, dtype=bool)[order]]
    d = np.asarray(diseases)[order]
    start = np.flatnonzero(np.r_[True, d[1:] != d[:-1]]) if len(d) else np.zeros(0, dtype=np.int64)
    rank = np.arange(len(d)) - np.repeat(start, np.diff(np.r_[start, len(d)]))  # position within its disease
    return np.sort(order[rank < max_per_disease]).astype(np.int64)


def with_region_rule(table: pa.Table, rule: dict) -> pa.Table:
    """``table`` with the mining rule that made it (a JSON dict: tau, max_patches, select, ...) in its schema
    metadata; a column selection keeps it (as the ``patch_mask`` geometry of ``amrg.data.store``)."""
    meta = dict(table.schema.metadata or {})
    meta[_RULE_KEY] = json.dumps(rule, sort_keys=True).encode()
    return table.replace_schema_metadata(meta)


def read_region_rule(table: pa.Table) -> dict:
    """The rule written by :func:`with_region_rule`."""
    meta = table.schema.metadata or {}
    if _RULE_KEY not in meta:
        raise ValueError("regions table does not say which CAM rule made it (written by an older amrg): "
                         "rerun `dvc repro mine_cam`")
    return json.loads(meta[_RULE_KEY])


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch mask ``(B, h, w)`` -> token-grid mask ``(B, gh, gw)`` (a cell is kept if any patch in it is)."""
    m = mask.float().unsqueeze(1)
    if tuple(m.shape[-2:]) != tuple(grid):
        m = torch.nn.functional.adaptive_max_pool2d(m, grid) if m.shape[-1] >= grid[-1] else \
            torch.nn.functional.interpolate(m, size=grid, mode="nearest")
    return m[:, 0] > 0


def patch_crops(pixels: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, patch: int) -> torch.Tensor:
    """The ``patch x patch`` crops at patch coordinates ``(rows[i], cols[i])`` of images ``pixels[i]``
    (``(B, S, S)``), each resized bilinearly (half-pixel centres, as ``cv2.resize``) to ``(S, S)``: float
    ``(B, S, S)`` in the pixels' value range, the released code's one-patch encoder input."""
    b, size = pixels.shape[0], pixels.shape[-1]
    offs = torch.arange(patch, device=pixels.device)
    ys, xs = rows[:, None] * patch + offs, cols[:, None] * patch + offs  # (B, patch) pixel indices
    crops = pixels[torch.arange(b, device=pixels.device)[:, None, None], ys[:, :, None], xs[:, None, :]]
    return torch.nn.functional.interpolate(crops.float().unsqueeze(1), size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0]


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
