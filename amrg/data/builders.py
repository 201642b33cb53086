"""Dataset builders: each turns a dataset's own files into :class:`Study` records plus counted skips.

``data.dataset`` picks the builder (:data:`BUILDERS`); each takes the typed :class:`amrg.config.Data`
and returns ``(studies, skips)``. Every rejected entry becomes a :class:`Skip` with its reason, nothing
is dropped silently. Builders read text and metadata only; images are decoded by preprocess.

- ``iu_xray`` / ``annotation``: an R2Gen-format ``annotation.json`` (this module);
- ``mimic_cxr``: MIMIC-CXR-JPG 2.0.0 + the free-text reports (:mod:`amrg.data.mimic_cxr`);
- ``chexpert_plus``: CheXpert Plus's ``df_chexpert_plus_240401.csv`` (:mod:`amrg.data.chexpert_plus`);
- ``table``: the user's own CSV / parquet (:mod:`amrg.data.table`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

from . import chexpert_plus, mimic_cxr, table
from .annotation import load_annotation
from .schema import Skip, Study

if TYPE_CHECKING:
    from ..config import Data

log = logging.getLogger(__name__)


def build_annotation(data: "Data") -> tuple[list[Study], list[Skip]]:
    return load_annotation(data.annotation, data.report_cleaner, data.max_views)


BUILDERS: dict[str, Callable[["Data"], tuple[list[Study], list[Skip]]]] = {
    "iu_xray": build_annotation,
    "annotation": build_annotation,
    "mimic_cxr": mimic_cxr.build,
    "chexpert_plus": chexpert_plus.build,
    "table": table.build,
}


def limit_per_split(studies: list[Study], n: int) -> list[Study]:
    """The first ``n`` studies of each split (a small, deterministic profile)."""
    seen: dict[str, int] = {}
    out = []
    for s in studies:
        seen[s.split] = seen.get(s.split, 0) + 1
        if seen[s.split] <= n:
            out.append(s)
    return out


def build_dataset(data: "Data") -> tuple[list[Study], list[Skip]]:
    """The studies and skips of ``data.dataset``, built from ``data``'s paths."""
    if data.dataset not in BUILDERS:
        raise ValueError(f"unknown dataset {data.dataset!r}; known: {sorted(BUILDERS)}")
    studies, skips = BUILDERS[data.dataset](data)
    log.info("%s: %d studies, %d skipped", data.dataset, len(studies), len(skips))
    return studies, skips
