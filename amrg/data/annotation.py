"""The R2Gen ``annotation.json`` format: IU X-ray's file, R2Gen's MIMIC-CXR file, CXPMRG-Bench's CheXpert
Plus file. :func:`load_annotation` builds studies from it; :func:`read_split` reads only its split
(study id -> split), which the MIMIC-CXR and CheXpert Plus builders use for the R2Gen / CXPMRG-Bench split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .clean import clean_report
from .schema import SPLITS, Skip, Study

log = logging.getLogger(__name__)


def read_entries(annotation: str | Path) -> dict[str, list]:
    """The file's ``{split: [entry, ...]}`` (splits ``train`` / ``val`` / ``test``), checked for being UTF-8 JSON
    keyed by known splits; the entries themselves are checked by the caller."""
    path = Path(annotation)
    if not path.exists():
        raise FileNotFoundError(f"annotation file not found: {path} (set data.annotation)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not UTF-8 JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by split, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SPLITS))
    if unknown:
        raise ValueError(f"{path}: unknown split keys {unknown}; expected {list(SPLITS)}")
    bad = [k for k, v in raw.items() if not isinstance(v, list)]
    if bad:
        raise ValueError(f"{path}: split {bad[0]!r} is not a list of entries")
    return raw


def load_annotation(annotation: str | Path, cleaner: str = "iu", max_views: int | None = None
                    ) -> tuple[list[Study], list[Skip]]:
    """An R2Gen-format ``annotation.json``: ``{split: [{id, report, image_path, split, ...}]}`` (IU X-ray,
    R2Gen's MIMIC-CXR file, CXPMRG-Bench's CheXpert Plus file), reports cleaned by ``cleaner``.

    ``report`` is the file's report text (FINDINGS for IU X-ray and R2Gen's MIMIC-CXR); it is kept in
    ``findings``, and IMPRESSION is not in these files, so ``impression`` is empty. ``subject_id`` (R2Gen's
    MIMIC-CXR file) becomes the patient id. ``image_path`` is kept in its order, cut to ``max_views``.
    """
    raw = read_entries(annotation)
    studies: list[Study] = []
    skips: list[Skip] = []
    seen: set[str] = set()
    for split in SPLITS:
        for i, entry in enumerate(raw.get(split, [])):
            sid = str(entry.get("id", f"<{split}[{i}]>")) if isinstance(entry, dict) else f"<{split}[{i}]>"
            if not isinstance(entry, dict) or "id" not in entry:
                skips.append(Skip(sid, "malformed_entry", "entry is not an object with an 'id'"))
                continue
            if sid in seen:
                skips.append(Skip(sid, "duplicate_id", f"second occurrence in split {split}"))
                continue
            report = entry.get("report")
            if not isinstance(report, str):
                skips.append(Skip(sid, "report_not_string", f"type {type(report).__name__}"))
                continue
            try:  # a lone surrogate (a "\udcff" JSON escape, bytes decoded with surrogateescape) is not text
                report.encode("utf-8")
            except UnicodeEncodeError as e:
                skips.append(Skip(sid, "report_not_utf8", f"{e.reason} at {e.start}: {report[:40]!r}"))
                continue
            cleaned = clean_report(report, cleaner)
            if not cleaned:
                skips.append(Skip(sid, "empty_report", repr(report[:40])))
                continue
            paths = entry.get("image_path") or []
            if isinstance(paths, str):
                paths = [paths]
            if not paths or not all(isinstance(p, str) and p for p in paths):
                skips.append(Skip(sid, "no_image_path", repr(paths)[:80]))
                continue
            seen.add(sid)
            paths = list(paths)[:max_views] if max_views else list(paths)
            patient = entry.get("subject_id", entry.get("patient_id", ""))
            studies.append(Study(sid, split, cleaned, report, "", paths, [""] * len(paths),
                                 "" if patient is None else str(patient)))
    return studies, skips
