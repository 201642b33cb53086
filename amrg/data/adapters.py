"""Dataset adapters: each turns a dataset's own files into :class:`Study` records plus counted skips.

Adding a dataset (MIMIC-CXR, CheXpert Plus) is one function registered in :data:`ADAPTERS`; nothing
downstream changes. Every rejected entry becomes a :class:`Skip` with its reason.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from .clean import clean_report
from .schema import SPLITS, Skip, Study

log = logging.getLogger(__name__)


def load_iu_xray(annotation: str | Path) -> tuple[list[Study], list[Skip]]:
    """IU X-ray in the R2Gen ``annotation.json`` layout: ``{split: [{id, report, image_path, split}]}``.

    ``report`` is the Open-i FINDINGS text; IMPRESSION is not in this file, so ``impression`` is empty.
    """
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
            cleaned = clean_report(report)
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
            studies.append(Study(sid, split, cleaned, report, "", list(paths)))
    return studies, skips


def limit_per_split(studies: list[Study], n: int) -> list[Study]:
    """The first ``n`` studies of each split (a small, deterministic profile)."""
    seen: dict[str, int] = {}
    out = []
    for s in studies:
        seen[s.split] = seen.get(s.split, 0) + 1
        if seen[s.split] <= n:
            out.append(s)
    return out


ADAPTERS: dict[str, Callable[[str | Path], tuple[list[Study], list[Skip]]]] = {"iu_xray": load_iu_xray}


def load_dataset(name: str, annotation: str | Path) -> tuple[list[Study], list[Skip]]:
    if name not in ADAPTERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(ADAPTERS)}")
    studies, skips = ADAPTERS[name](annotation)
    log.info("%s: %d studies, %d skipped", name, len(studies), len(skips))
    return studies, skips
