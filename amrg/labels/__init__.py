"""CheXpert-14 labels of free-text chest X-ray reports.

``label(reports, labeler="rules")`` returns a float32 ``(N, 14)`` array in :data:`CHEXPERT_14` order:
1.0 positive, 0.0 negative, -1.0 uncertain, NaN not mentioned. Empty reports give all-NaN rows
(count them with :func:`count_empty`). No Finding is 1 or NaN (CheXpert convention; see
:mod:`amrg.labels.rules`).

Labelers are looked up in :data:`LABELERS` (name -> function ``list[str] -> ndarray``); a model-based
labeler (e.g. ``"chexbert"``) is added by registering it there.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from . import rules
from .rules import count_empty, split_sentences
from .schema import (CHEXPERT_14, COMMON_5, LABEL_COLUMNS, N_LABELS, NEGATIVE, POSITIVE, UNCERTAIN,
                     label_column)

Labeler = Callable[[Sequence[str]], np.ndarray]

LABELERS: dict[str, Labeler] = {
    "rules": rules.label_reports,
}


def label(reports: Sequence[str], labeler: str = "rules") -> np.ndarray:
    """CheXpert-14 labels of ``reports`` as a float32 ``(N, 14)`` array (1 / 0 / -1 / NaN)."""
    fn = LABELERS.get(labeler)
    if fn is None:
        raise ValueError(f"unknown labeler {labeler!r}; allowed: {', '.join(sorted(LABELERS))}")
    return fn(reports)


__all__ = [
    "CHEXPERT_14", "COMMON_5", "LABEL_COLUMNS", "LABELERS", "N_LABELS", "NEGATIVE", "POSITIVE", "UNCERTAIN",
    "count_empty", "label", "label_column", "rules", "split_sentences",
]
