"""CheXpert-14 labels of free-text chest X-ray reports.

``label(reports, labeler="rules")`` returns a float32 ``(N, 14)`` array in :data:`CHEXPERT_14` order:
1.0 positive, 0.0 negative, -1.0 uncertain, NaN not mentioned. Empty reports give all-NaN rows
(count them with :func:`count_empty`). No Finding is 1 or NaN (CheXpert convention; see
:mod:`amrg.labels.rules`).

Labelers are looked up in :data:`LABELERS` (name -> function ``list[str] -> ndarray``). Model-based
labelers (named in :data:`MODEL_LABELERS`) also take the keyword options ``checkpoint``, ``tokenizer``,
``device``, ``batch_size`` and ``precision``, which :func:`label` passes on from its ``chexbert_*`` /
``device`` / ``batch_size`` / ``precision`` arguments; the rule labeler ignores them.

``"chexbert"`` (:mod:`amrg.labels.chexbert`) needs a local CheXbert checkpoint
(``chexbert_checkpoint``) and a bert-base-uncased tokenizer + ``config.json`` (``chexbert_tokenizer``,
a local directory or hub id; default ``bert-base-uncased``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from . import chexbert, rules
from .rules import count_empty, split_sentences
from .schema import (CHEXPERT_14, COMMON_5, DECISION_THRESHOLD, LABEL_COLUMNS, N_LABELS, NEGATIVE, NO_FINDING,
                     POSITIVE, UNCERTAIN, UNCERTAIN_AS, binarize, label_column)

Labeler = Callable[[Sequence[str]], np.ndarray]

LABELERS: dict[str, Labeler] = {
    "rules": rules.label_reports,
    "chexbert": chexbert.label_reports,
}
MODEL_LABELERS: frozenset[str] = frozenset({"chexbert"})
"""Labelers called with the keyword options ``checkpoint, tokenizer, device, batch_size, precision``."""


def label(reports: Sequence[str], labeler: str = "rules", *, chexbert_checkpoint: str | None = None,
          chexbert_tokenizer: str | None = None, device: str | None = None, batch_size: int = 64,
          precision: str = "fp32") -> np.ndarray:
    """CheXpert-14 labels of ``reports`` as a float32 ``(N, 14)`` array (1 / 0 / -1 / NaN).

    ``labeler="rules"`` (default) ignores the keyword options. ``labeler="chexbert"`` needs
    ``chexbert_checkpoint`` (path of the CheXbert release ``chexbert.pth``) and takes
    ``chexbert_tokenizer`` (directory or hub id with the bert-base-uncased tokenizer and config.json;
    ``None``: ``bert-base-uncased``), ``device`` (``None``/``"auto"``: CUDA when available),
    ``batch_size`` and ``precision`` (``"bf16"``: autocast on CUDA). The loaded model is cached per
    (checkpoint, tokenizer, device).
    """
    fn = LABELERS.get(labeler)
    if fn is None:
        raise ValueError(f"unknown labeler {labeler!r}; allowed: {', '.join(sorted(LABELERS))}")
    if labeler in MODEL_LABELERS:
        return fn(reports, checkpoint=chexbert_checkpoint, tokenizer=chexbert_tokenizer, device=device,
                  batch_size=batch_size, precision=precision)
    return fn(reports)


__all__ = [
    "CHEXPERT_14", "COMMON_5", "DECISION_THRESHOLD", "LABEL_COLUMNS", "LABELERS", "MODEL_LABELERS", "N_LABELS",
    "NEGATIVE", "NO_FINDING", "POSITIVE", "UNCERTAIN", "UNCERTAIN_AS", "binarize", "chexbert", "count_empty", "label",
    "label_column", "rules", "split_sentences",
]
