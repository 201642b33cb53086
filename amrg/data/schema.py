"""One Study schema shared by every dataset builder, and the skip record for bad input."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SPLITS = ("train", "val", "test")


@dataclass
class Study:
    """A radiology study: the cleaned target report plus references to its images.

    ``image_paths`` are relative to ``data.images_dir`` (or the release root), ordered as the model sees
    them (frontal first); ``views`` holds each image's view position as the dataset names it (``PA``,
    ``AP``, ``LATERAL``, ``LL``, ...; ``""`` when the dataset does not say). ``labels`` are the CheXpert-14
    labels the dataset ships (MIMIC-CXR, CheXpert Plus), in :data:`amrg.labels.schema.CHEXPERT_14` order
    with 1 / 0 / -1 / NaN, or None; ``patient_id`` is the subject / patient id ("" when unknown).
    """

    id: str
    split: str
    report: str  # cleaned text of the chosen section(s), the generation target
    findings: str  # raw FINDINGS text as in the source ("" when absent)
    impression: str = ""  # raw IMPRESSION text ("" when absent)
    image_paths: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    patient_id: str = ""
    labels: Optional[tuple[float, ...]] = None


@dataclass(frozen=True)
class Skip:
    """A counted, logged skip: never a silent drop. Collected into ``stats.json``."""

    id: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}
