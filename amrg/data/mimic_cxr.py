"""MIMIC-CXR-JPG 2.0.0 + the MIMIC-CXR free-text reports -> :class:`amrg.data.schema.Study` records.

Inputs (``data.root``, the MIMIC-CXR-JPG root): ``mimic-cxr-2.0.0-split.csv.gz`` (dicom_id, study_id,
subject_id, split), ``mimic-cxr-2.0.0-metadata.csv.gz`` (dicom_id, subject_id, study_id, ViewPosition, ...),
``mimic-cxr-2.0.0-chexpert.csv.gz`` (subject_id, study_id, the 14 CheXpert columns); an uncompressed
``.csv`` of the same stem is read when the ``.csv.gz`` is absent. ``data.reports``: the reports'
``files/pNN/p<subject>/s<study>.txt`` tree, given as the folder holding ``files/``, as ``files/`` itself,
or as ``mimic-cxr-reports.zip`` read in place (members ``files/...``, optionally under a top folder).

- **Id**: ``s<study_id>`` (``s50414267``), the report's file stem. ``patient_id`` is the subject id.
- **Split**: ``data.annotation`` null: the official split CSV (``validate`` -> ``val``). Set: R2Gen's
  MIMIC-CXR ``annotation.json`` (entries with ``study_id``, else the ``s<id>`` folder of ``image_path``),
  grouped by study; its ``image_path`` / ``report`` are not used (images and text come from the release).
  The release is every study of the split CSV or the metadata. Release studies without a split are
  skipped as ``not_in_split_file``; split studies absent from the release as ``not_in_release``; a
  study under two splits as ``split_conflict``.
- **Views**: PA, then AP, then LATERAL, then LL (:data:`VIEW_ORDER`), by dicom_id within a view; the
  first ``data.max_views`` are kept. Images of any other ViewPosition (oblique, decubitus, blank) are
  dropped and counted in the log; a study left without an image is skipped as ``no_usable_view``.
  Image paths are ``files/pNN/p<subject>/s<study>/<dicom_id>.jpg``, relative to the root; their
  existence is not checked here (preprocess counts missing files).
- **Text**: FINDINGS / IMPRESSION by :mod:`amrg.data.sections`; ``data.sections`` picks the target:
  ``findings``, ``impression``, or ``findings_impression`` (the ones present, findings first, joined by
  a sentence break). ``Study.findings`` / ``impression`` keep the raw section text; ``report`` is the
  target through :func:`amrg.data.clean.clean_report` with ``data.report_cleaner``.
- **Labels**: the CheXpert row of the study in :data:`CHEXPERT_14` order (1 / 0 / -1 / NaN), None for
  a study without a row (counted in a warning, not a skip).
- **Skips**: first those of the split (``malformed_entry``: an annotation entry without a study id,
  ``split_conflict``, ``not_in_release``, ``not_in_split_file``), then per study in build order, checked
  in this order: ``no_usable_view``, ``missing_report``, ``report_not_utf8``, ``no_findings_section`` /
  ``no_impression_section`` / ``no_section`` (neither, with ``findings_impression``), ``empty_report``
  (nothing left after cleaning).
- **Bad input** raises: a missing file (:class:`FileNotFoundError`); a missing column, an unreadable or
  corrupt gzip, a malformed CSV row (wrong field count, a non-numeric id, an unknown split or label
  value: the error names the file and the line), a reports path that is not a zip nor a folder with
  ``files/`` (:class:`ValueError`).

Studies come back ordered by split, then subject, then study id.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import pandas as pd

from ..labels.schema import CHEXPERT_14
from .annotation import read_entries
from .clean import clean_report
from .schema import SPLITS, Skip, Study
from .sections import findings_impression

if TYPE_CHECKING:
    from ..config import Data

log = logging.getLogger(__name__)

SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
OFFICIAL_SPLITS = {"train": "train", "validate": "val", "test": "test"}
VIEW_ORDER = ("PA", "AP", "LATERAL", "LL")  # frontal (PA, AP) first, then lateral
LABEL_VALUES = (1.0, 0.0, -1.0)  # plus NaN (blank: not mentioned)
HEADER_LINES = 1  # a CSV's data row i (0-based) is on line i + 1 + HEADER_LINES
_ID_PATTERN = {"dicom_id": r"\S+"}  # any other id column: digits
_REPORT_MEMBER = re.compile(r"(?:^|/)files/(p\d\d/p\d+/s\d+\.txt)$")
_STUDY_DIR = re.compile(r"(?:^|/)s(\d+)/")


def read_csv(path: Path, columns: tuple[str, ...], ids: tuple[str, ...] = ()) -> pd.DataFrame:
    """``path`` (gzip by suffix) as strings, with ``columns`` present and ``ids`` all digits."""
    try:
        # object columns: plain Python strings, faster to iterate than pandas' Arrow-backed str dtype
        df = pd.read_csv(path, dtype=object, keep_default_na=False, compression="infer")
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: malformed CSV: {str(e).strip()}") from e
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{path}: cannot read it as a (gzip) CSV: {type(e).__name__}: {e}") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (found {list(df.columns)})")
    for col in ids:
        values = df[col].fillna("")
        bad = ~values.str.fullmatch(_ID_PATTERN.get(col, r"\d+"))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{path} line {i + 1 + HEADER_LINES}: column {col!r} is {values.iloc[i]!r}"
                             " (a short row, or not an id)")
    return df


def _release_file(root: Path, name: str) -> Path:
    for path in (root / name, root / name.removesuffix(".gz")):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found in {root} (data.root must be a MIMIC-CXR-JPG 2.0.0 root)")


class Reports:
    """Report bytes by ``pNN/p<subject>/s<study>.txt`` from a ``files/`` tree or a zip read in place."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.zip: Optional[zipfile.ZipFile] = None
        if self.path.is_dir():
            base = self.path / "files" if (self.path / "files").is_dir() else self.path
            self.base = str(base)
            if not any(c.is_dir() and re.fullmatch(r"p\d\d", c.name) for c in base.iterdir()):
                raise ValueError(f"{self.path}: no files/pNN/ report folders (data.reports must be the folder"
                                 " holding files/, files/ itself, or mimic-cxr-reports.zip)")
        elif self.path.is_file():
            try:
                self.zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{self.path}: not a readable zip file ({e})") from e
            self.members = {m.group(1): name for name in self.zip.namelist() if (m := _REPORT_MEMBER.search(name))}
            if not self.members:
                raise ValueError(f"{self.path}: no files/pNN/p<subject>/s<study>.txt member in the zip")
        else:
            raise FileNotFoundError(f"reports not found: {self.path} (set data.reports)")

    def read(self, rel: str) -> Optional[bytes]:
        """The bytes of ``rel`` (``p10/p10000032/s50414267.txt``), None when absent."""
        if self.zip is not None:
            name = self.members.get(rel)
            try:
                return None if name is None else self.zip.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise ValueError(f"{self.path}: member {name} is corrupt ({e})") from e
        try:
            with open(os.path.join(self.base, rel), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def __enter__(self) -> "Reports":
        return self

    def __exit__(self, *exc) -> None:
        if self.zip is not None:
            self.zip.close()


def _labels(path: Path) -> dict[str, tuple[float, ...]]:
    df = read_csv(path, ("subject_id", "study_id") + CHEXPERT_14, ids=("study_id",))
    values = np.full((len(df), len(CHEXPERT_14)), np.nan)
    for j, name in enumerate(CHEXPERT_14):
        col = df[name].fillna("").str.strip()
        try:
            values[:, j] = pd.to_numeric(col.where(col != "", None)).to_numpy(dtype=float)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: column {name!r}: {e}") from e
    bad = ~(np.isin(values, LABEL_VALUES) | np.isnan(values))
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"{path} line {i + 1 + HEADER_LINES}: {CHEXPERT_14[j]!r} is {values[i, j]}, "
                         f"expected one of {LABEL_VALUES} or blank")
    out: dict[str, tuple[float, ...]] = {}
    for study, row in zip(df["study_id"], values.tolist()):
        out.setdefault(study, tuple(row))
    return out


def _r2gen_split(annotation: str) -> tuple[dict[str, str], set[str], list[Skip]]:
    """study_id -> split of R2Gen's MIMIC-CXR annotation (one entry per image, grouped by study), the
    studies under two splits, and the skips of both kinds."""
    where: dict[str, set[str]] = {}
    skips = []
    for split, entries in read_entries(annotation).items():
        for i, entry in enumerate(entries):
            study = entry.get("study_id") if isinstance(entry, dict) else None
            study = str(study) if isinstance(study, (int, str)) and str(study).isdigit() else None
            if study is None and isinstance(entry, dict):
                paths = entry.get("image_path") or []
                found = [m.group(1) for p in ([paths] if isinstance(paths, str) else paths)
                         if isinstance(p, str) and (m := _STUDY_DIR.search(p))]
                study = found[0] if found else None
            if study is None:
                eid = entry.get("id", f"<{split}[{i}]>") if isinstance(entry, dict) else f"<{split}[{i}]>"
                skips.append(Skip(str(eid), "malformed_entry", "no study_id nor s<study> in image_path"))
                continue
            where.setdefault(study, set()).add(split)
    split_of = {study: next(iter(splits)) for study, splits in where.items() if len(splits) == 1}
    conflicts = {study for study, splits in where.items() if len(splits) > 1}
    skips += [Skip(f"s{s}", "split_conflict", ", ".join(sorted(where[s]))) for s in sorted(conflicts, key=int)]
    return split_of, conflicts, skips


def _views(meta: pd.DataFrame, max_views: int) -> tuple[dict, dict[str, list[str]], Counter]:
    """study -> (paths, views) of its usable images in :data:`VIEW_ORDER`; study -> its other views."""
    meta = meta.assign(ViewPosition=meta["ViewPosition"].fillna("").str.strip())
    rank = meta["ViewPosition"].map({v: i for i, v in enumerate(VIEW_ORDER)})
    usable = meta[rank.notna()].assign(rank=rank[rank.notna()]).sort_values(["study_id", "rank", "dicom_id"])
    kept: dict[str, tuple[list[str], list[str]]] = {}
    counts: Counter = Counter(other_view=int(rank.isna().sum()))
    for study, subject, dicom, view in zip(usable["study_id"], usable["subject_id"], usable["dicom_id"],
                                           usable["ViewPosition"]):
        paths, views = kept.setdefault(study, ([], []))
        if len(paths) < max_views:
            paths.append(f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg")
            views.append(view)
        else:
            counts["over_max_views"] += 1
    others: dict[str, list[str]] = {}
    for study, view in zip(meta["study_id"][rank.isna()], meta["ViewPosition"][rank.isna()]):
        others.setdefault(study, []).append(view)
    return kept, others, counts


def _target(findings: str, impression: str, which: str) -> tuple[str, str]:
    """(text to clean, skip reason when there is none) for ``data.sections``."""
    if which == "findings":
        return findings, "no_findings_section"
    if which == "impression":
        return impression, "no_impression_section"
    if findings and impression:
        stop = "" if findings.rstrip().endswith(".") else "."
        return f"{findings.rstrip()}{stop} {impression}", ""
    return findings or impression, "no_section"


def _splits(data: "Data", split_csv: Path, split_df: pd.DataFrame, subject_of: dict[str, str]
            ) -> tuple[dict[str, str], list[Skip]]:
    """study_id -> split (official or R2Gen, module docstring) and the split-level skips."""
    if data.annotation:
        split_of, conflicts, skips = _r2gen_split(data.annotation)
        absent = sorted(set(split_of) - set(subject_of), key=int)
        skips += [Skip(f"s{s}", "not_in_release", split_of.pop(s)) for s in absent]
    else:
        unknown = ~split_df["split"].isin(list(OFFICIAL_SPLITS))
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise ValueError(f"{split_csv} line {i + 1 + HEADER_LINES}: split {split_df['split'].iloc[i]!r}, "
                             f"expected one of {list(OFFICIAL_SPLITS)}")
        pairs = split_df.drop_duplicates(["study_id", "split"])
        twice = pairs["study_id"].duplicated(keep=False)
        conflicts = set(pairs["study_id"][twice])
        split_of = {s: OFFICIAL_SPLITS[v] for s, v in zip(pairs["study_id"][~twice], pairs["split"][~twice])}
        skips = [Skip(f"s{s}", "split_conflict", ", ".join(sorted(pairs["split"][pairs["study_id"] == s])))
                 for s in sorted(conflicts, key=int)]
    skips += [Skip(f"s{s}", "not_in_split_file") for s in sorted(set(subject_of) - set(split_of) - conflicts, key=int)]
    return split_of, skips


def build(data: "Data") -> tuple[list[Study], list[Skip]]:
    """The studies and skips of the MIMIC-CXR release at ``data.root`` / ``data.reports`` (module docstring)."""
    if not data.root or not data.reports:
        raise ValueError("data.root and data.reports are required with data.dataset=mimic_cxr")
    root = Path(data.root)
    ids = ("dicom_id", "subject_id", "study_id")
    split_csv = _release_file(root, SPLIT_CSV)
    split_df = read_csv(split_csv, ids + ("split",), ids=ids)
    meta = read_csv(_release_file(root, METADATA_CSV), ids + ("ViewPosition",), ids=ids)
    labels = _labels(_release_file(root, CHEXPERT_CSV))
    with Reports(data.reports) as reports:
        subject_of = dict(zip(meta["study_id"], meta["subject_id"]))
        subject_of.update(zip(split_df["study_id"], split_df["subject_id"]))
        split_of, skips = _splits(data, split_csv, split_df, subject_of)
        kept, others, counts = _views(meta, data.max_views)
        studies: list[Study] = []
        for study in sorted(split_of, key=lambda s: (SPLITS.index(split_of[s]), int(subject_of[s]), int(s))):
            sid, split, subject = f"s{study}", split_of[study], subject_of[study]
            if study not in kept:
                detail = f"views {others[study]}" if study in others else "no metadata rows"
                skips.append(Skip(sid, "no_usable_view", detail))
                continue
            rel = f"p{subject[:2]}/p{subject}/s{study}.txt"
            raw = reports.read(rel)
            if raw is None:
                skips.append(Skip(sid, "missing_report", f"files/{rel}"))
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skips.append(Skip(sid, "report_not_utf8", f"files/{rel}: {e.reason} at byte {e.start}"))
                continue
            findings, impression = findings_impression(text)
            target, reason = _target(findings, impression, data.sections)
            if not target:
                skips.append(Skip(sid, reason, f"files/{rel}"))
                continue
            cleaned = clean_report(target, data.report_cleaner)
            if not cleaned:
                skips.append(Skip(sid, "empty_report", repr(target[:40])))
                continue
            if study not in labels:
                counts["no_labels"] += 1
            paths, views = kept[study]
            studies.append(Study(sid, split, cleaned, findings, impression, list(paths), list(views), subject,
                                 labels.get(study)))

    per_split = Counter(s.split for s in studies)
    log.info("mimic_cxr: %s studies (%s), skips %s; images dropped: %d other view, %d over max_views=%d",
             len(studies), ", ".join(f"{k} {per_split[k]}" for k in SPLITS), dict(Counter(k.reason for k in skips)),
             counts["other_view"], counts["over_max_views"], data.max_views)
    if counts["no_labels"]:
        log.warning("mimic_cxr: %d studies have no row in %s (labels None)", counts["no_labels"], CHEXPERT_CSV)
    return studies, skips
