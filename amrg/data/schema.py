"""One Study schema shared by every dataset adapter, and the skip record for bad input."""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


@dataclass
class Study:
    """A radiology study: cleaned report text plus references to its images (both IU views)."""

    id: str
    split: str
    report: str  # cleaned findings, the generation target
    findings: str  # raw findings text as in the source
    impression: str = ""
    image_paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Skip:
    """A counted, logged skip: never a silent drop. Collected into ``stats.json``."""

    id: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict:
        return {"id": self.id, "reason": self.reason, "detail": self.detail}
