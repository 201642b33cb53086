"""The CheXpert-14 observation schema shared by every labeler, classifier and metric.

Values follow the CheXpert convention: 1 positive, 0 negative, -1 uncertain, NaN/None not mentioned.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

CHEXPERT_14: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
N_LABELS = len(CHEXPERT_14)
NO_FINDING = CHEXPERT_14.index("No Finding")
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
UNCERTAIN_AS: tuple[str, ...] = ("negative", "positive")
"""How an uncertain (-1) value counts when labels are made binary (:func:`binarize`)."""

DECISION_THRESHOLD = 0.5
"""A classifier probability above this predicts the observation positive (CAM targets, F1, report pages)."""

# The five "competition" observations often reported separately.
COMMON_5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def label_slug(name: str) -> str:
    """File-name form of an observation, e.g. ``Pleural Effusion`` -> ``pleural_effusion``."""
    return name.lower().replace(" ", "_")


def label_column(name: str) -> str:
    """Column name of an observation in parquet tables, e.g. ``Pleural Effusion`` -> ``lbl_pleural_effusion``."""
    return "lbl_" + label_slug(name)


LABEL_COLUMNS: tuple[str, ...] = tuple(label_column(n) for n in CHEXPERT_14)
TARGET_COLUMNS: tuple[str, ...] = tuple("tgt_" + c[len("lbl_"):] for c in LABEL_COLUMNS)  # classifier targets


def binarize(values: Any, uncertain_as: str = "negative") -> Any:
    """CheXpert values -> booleans: 1 -> True; 0, NaN/None (not mentioned) -> False; -1 (uncertain) ->
    True iff ``uncertain_as == "positive"``.

    ``values``: a NumPy array (or anything ``np.asarray`` takes) -> bool ``np.ndarray``; a torch tensor ->
    bool tensor on its device. Any other value (e.g. 0.5) is False. Use ``.astype(np.float32)`` /
    ``.float()`` for 0/1 training targets.
    """
    if uncertain_as not in UNCERTAIN_AS:
        raise ValueError(f"unknown uncertain_as {uncertain_as!r}; allowed: {', '.join(UNCERTAIN_AS)}")
    torch = sys.modules.get("torch")  # a tensor implies torch is imported; never import it here
    if torch is not None and isinstance(values, torch.Tensor):
        out = values == POSITIVE
        return out | (values == UNCERTAIN) if uncertain_as == "positive" else out
    a = np.asarray(values, dtype=float)  # None -> NaN
    out = a == POSITIVE
    if uncertain_as == "positive":
        out |= a == UNCERTAIN
    return out
