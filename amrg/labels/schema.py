"""The CheXpert-14 observation schema shared by every labeler, classifier and metric.

Values follow the CheXpert convention: 1 positive, 0 negative, -1 uncertain, NaN/None not mentioned.
"""

from __future__ import annotations

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
POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

# The five "competition" observations often reported separately.
COMMON_5: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def label_column(name: str) -> str:
    """Column name of an observation in parquet tables, e.g. ``Pleural Effusion`` -> ``lbl_pleural_effusion``."""
    return "lbl_" + name.lower().replace(" ", "_")


LABEL_COLUMNS: tuple[str, ...] = tuple(label_column(n) for n in CHEXPERT_14)
