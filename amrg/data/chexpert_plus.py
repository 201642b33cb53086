"""CheXpert Plus (Stanford AIMI, 2024) -> :class:`amrg.data.schema.Study` records.

Input
-----
``data.root`` holds the release's ``df_chexpert_plus_240401.csv``: one row per *image* (223,462 rows),
the report and its sections repeated on every image row of a study. Columns read (by header name; order,
extra columns and a leading unnamed index column do not matter): ``path_to_image``
(``train/patient42142/study5/view1_frontal.jpg``), ``frontal_lateral`` (``Frontal`` / ``Lateral``),
``ap_pa`` (``AP`` / ``PA``, 17 frontal rows ``LL`` / ``RL``, empty on lateral rows), ``deid_patient_id``
(``patient42142``), ``section_findings``, ``section_impression`` and, without ``data.annotation``,
``split`` (``train`` 223,228 / ``valid`` 234 rows: the release has no test split). These names, values
and counts come from public third-party code and notes that read the release (they agree with each
other); the Stanford-AIMI/chexpert-plus repository itself publishes no schema, and we had no copy.

Images are at ``path_to_image`` below ``data.image_root``. The JPG release stores that path; the PNG
release stores the same relative path with ``.png``. With ``data.images == "files"`` each image's path
is the first of ``<stem>.jpg`` / ``<stem>.png`` that exists (one stat or two per image), or the path as
given when neither does (preprocess then counts it ``missing_image``); with phantom images it is kept as
given.

Studies
-------
A study is the rows sharing ``deid_patient_id`` and the study folder of ``path_to_image``; its id is
``<patient folder>/<study folder>`` (``patient42142/study5``, unique in the release: 187,711 studies),
its ``patient_id`` is ``deid_patient_id``. Views: frontal first (``PA``, then ``AP``, then other
frontal), then lateral, ties in CSV order, cut to ``data.max_views``; a view is named by ``ap_pa``, or
``LATERAL`` for a lateral row without one. The target is ``section_findings``, ``section_impression`` or
both joined findings first (``data.sections``; :func:`amrg.data.table.join_sections`, one missing part is
left out), cleaned by R2Gen's ``data.report_cleaner`` (``auto``: ``mimic``); the raw sections are kept in
``findings`` / ``impression``.

Splits
------
No ``data.annotation``: the CSV's ``split`` (``valid`` / ``validate`` -> ``val``). With one: the split of
an R2Gen-format ``annotation.json`` (CXPMRG-Bench's CheXpert Plus re-split, 40,463 / 5,780 / 11,562
studies; ``{split: [{id, report, image_path: [...]}, ...]}``, read by :func:`read_entries`). Its entry
format beyond that shape is not published, so an entry is matched to a study by the ``patientN/studyM``
(or ``patientN_studyM``) it names in its ``image_path`` entries or its ``id``; its report and image list are
not used (the CSV's are). CSV studies absent from the annotation are one summary skip
``not_in_annotation`` (id ``<N studies>``); an entry naming no study of the CSV is a skip
``annotation_not_in_csv``. A patient with studies in more than one split is logged as a warning, not
skipped (the official split is patient-disjoint; a re-split need not be).

Labels
------
CheXpert Plus ships CheXbert labels (``chexbert_labels.zip``, unpacked beside the CSV as
``chexbert_labels/``): ``findings_fixed.json``, ``impression_fixed.json`` and ``report_fixed.json``, JSON
Lines keyed by ``path_to_image``, the 14 CheXpert observations by name as 1.0 / 0.0 / -1.0 / null (the
same third-party sources; a JSON array is read too). The file of the target (``findings``,
``impression``, ``report`` for ``findings_impression``) fills :attr:`Study.labels` (CHEXPERT_14 order,
null -> NaN) from the study's first view that has a record; labels stay None when the file is absent.

Bad input
---------
No CSV, or a missing column: ``ValueError`` naming the file and the column; a bad labels file: a
``ValueError`` naming its line. Everything else is a counted :class:`Skip`. Per CSV row (id ``line N``):
``malformed_row`` (field count differs from the header's), ``row_not_utf8`` (path, patient, view or split
cell not UTF-8), ``path_outside_images_dir`` (absolute, a drive, or ``..``), ``bad_image_path`` (no
``patient/study/file`` tail). Per study: ``duplicate_id``, ``split_conflict`` (its rows, or the annotation,
give two splits), ``unknown_split``, ``report_not_utf8`` (a chosen section cell not UTF-8),
``no_findings_section`` / ``no_impression_section`` / ``no_findings_impression_section`` (the chosen
section cell(s) empty, i.e. null in the release), ``empty_report`` (nothing left after cleaning). A raw
section kept in ``findings`` / ``impression`` that is not UTF-8 has its bad bytes replaced by U+FFFD.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Optional

from ..labels.schema import CHEXPERT_14
from .annotation import read_entries
from .clean import clean_report
from .schema import SPLITS, Skip, Study
from .table import as_text, join_sections, normalize_split, not_utf8, open_csv, outside_root, require_columns

if TYPE_CHECKING:
    from ..config import Data

log = logging.getLogger(__name__)

CSV_NAME = "df_chexpert_plus_240401.csv"
LABELS_DIR = "chexbert_labels"
LABEL_FILES = {"findings": "findings_fixed.json", "impression": "impression_fixed.json",
               "findings_impression": "report_fixed.json"}
FINDINGS, IMPRESSION = "section_findings", "section_impression"
SECTIONS = {"findings": (FINDINGS,), "impression": (IMPRESSION,), "findings_impression": (FINDINGS, IMPRESSION)}
ROW_COLUMNS = ("path_to_image", "frontal_lateral", "ap_pa", "deid_patient_id")
SPLIT_COLUMN = "split"
FRONTAL, LATERAL = "frontal", "lateral"
FRONTAL_RANK = {"PA": 0, "AP": 1}  # other frontal positions: 2; lateral: 3; anything else: 4
IMAGE_SUFFIXES = (".jpg", ".png")
STUDY_REF = re.compile(r"(patient\d+)[/_](study\d+)")
LABEL_VALUES = {1.0: 1.0, 0.0: 0.0, -1.0: -1.0}
CONFLICT = "<conflict>"
EXAMPLES = 5  # study ids named in a summary skip's detail


@dataclass
class _Rows:
    """One study's image rows, as read."""

    patient: str
    findings: str
    impression: str
    images: list[tuple[int, int, str, str]] = field(default_factory=list)  # (rank, row order, path, view)
    splits: set[str] = field(default_factory=set)


def _view(frontal_lateral: str, ap_pa: str) -> tuple[int, str]:
    kind, pos = frontal_lateral.strip().lower(), ap_pa.strip().upper()
    if kind == FRONTAL:
        return FRONTAL_RANK.get(pos, 2), pos
    return (3 if kind == LATERAL else 4), pos or ("LATERAL" if kind == LATERAL else "")


def read_rows(csv_path: Path, need_split: bool) -> tuple[dict[tuple[str, str], _Rows], list[Skip]]:
    """The CSV's studies keyed by ``(deid_patient_id, id)`` in first-appearance order, and the row skips."""
    groups: dict[tuple[str, str], _Rows] = {}
    skips: list[Skip] = []
    with open_csv(csv_path) as (header, rows):
        required = ROW_COLUMNS + (FINDINGS, IMPRESSION) + ((SPLIT_COLUMN,) if need_split else ())
        require_columns(csv_path, header, required, " (is this the CheXpert Plus release's table?)")
        col = {name: header.index(name) for name in required}
        for line, fields in rows:
            if len(fields) != len(header):
                if any(f.strip() for f in fields):
                    skips.append(Skip(f"line {line}", "malformed_row",
                                      f"{len(fields)} fields, the header has {len(header)}"))
                continue
            path, fl, ap_pa, patient = (fields[col[c]].strip() for c in ROW_COLUMNS)
            split = fields[col[SPLIT_COLUMN]].strip() if need_split else ""
            if not_utf8(path, patient, fl, ap_pa, split):
                skips.append(Skip(f"line {line}", "row_not_utf8", as_text(path)))
                continue
            if outside_root(path):
                skips.append(Skip(f"line {line}", "path_outside_images_dir", path))
                continue
            parts = [part for part in path.split("/") if part not in ("", ".")]
            if len(parts) < 3:
                skips.append(Skip(f"line {line}", "bad_image_path", f"{path!r}: expected .../<patient>/<study>/<file>"))
                continue
            key = (patient, f"{parts[-3]}/{parts[-2]}")
            group = groups.get(key)
            if group is None:
                group = groups[key] = _Rows(patient, fields[col[FINDINGS]], fields[col[IMPRESSION]])
            rank, view = _view(fl, ap_pa)
            group.images.append((rank, len(group.images), path, view))
            group.splits.add(normalize_split(split) or split)
    return groups, skips


def annotation_splits(path: str | Path) -> tuple[dict[str, str], list[tuple[str, list[str]]], list[Skip]]:
    """``study id -> split`` of an R2Gen-format annotation (:data:`CONFLICT` for a study it puts in two
    splits), each entry's ``(label, study ids)``, and the skips of entries that name no study."""
    split_of: dict[str, str] = {}
    entries: list[tuple[str, list[str]]] = []
    skips: list[Skip] = []
    raw = read_entries(path)
    for split in SPLITS:
        for i, entry in enumerate(raw.get(split, [])):
            label = f"<{split}[{i}]>"
            if not isinstance(entry, dict):
                skips.append(Skip(label, "malformed_entry", "entry is not an object"))
                continue
            label = str(entry.get("id", label))
            paths = entry.get("image_path") or []
            refs = [str(entry.get("id", ""))] + ([paths] if isinstance(paths, str) else [str(p) for p in paths])
            ids = sorted({"/".join(m) for r in refs for m in STUDY_REF.findall(r)})
            if not ids:
                skips.append(Skip(label, "annotation_not_in_csv", f"names no patientN/studyM: {refs[:2]!r}"[:120]))
                continue
            entries.append((label, ids))
            for sid in ids:
                split_of[sid] = split if split_of.get(sid, split) == split else CONFLICT
    return split_of, entries, skips


def locate(image_root: Path, rel: str) -> str:
    """``rel`` with the suffix (``.jpg``, then ``.png``) under which the image exists, else ``rel``."""
    stem = PurePosixPath(rel).with_suffix("")
    for suffix in IMAGE_SUFFIXES:
        candidate = f"{stem}{suffix}"
        if (image_root / candidate).is_file():
            return candidate
    return rel


def _label(name: str, value: object) -> float:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) in LABEL_VALUES:
        return LABEL_VALUES[float(value)]
    raise ValueError(f"{name!r} is {value!r}; expected 1, 0, -1 or null")


def read_labels(path: Path, wanted: dict[str, tuple[int, int]], n: int) -> list[Optional[tuple[float, ...]]]:
    """Per study (``wanted``: image path -> (study index, view order)), the labels of its first view with a
    record in the CheXbert labels file ``path`` (JSON Lines, or one JSON array), else None."""
    best = [math.inf] * n
    labels: list[Optional[tuple[float, ...]]] = [None] * n
    line = 0
    with open(path, encoding="utf-8") as f:
        array = f.read(1) == "["
        f.seek(0)
        try:
            for line, item in enumerate(json.load(f) if array else f, 1):
                rec = item if array else (json.loads(item) if item.strip() else None)
                if rec is None:
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("path_to_image"), str):
                    raise ValueError("a record must be an object with a 'path_to_image' string")
                values = tuple(_label(name, rec.get(name)) for name in CHEXPERT_14)  # every record checked
                hit = wanted.get(rec["path_to_image"])
                if hit is not None and hit[1] < best[hit[0]]:
                    best[hit[0]], labels[hit[0]] = hit[1], values
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path}: {'record' if array else 'line'} {line}: bad CheXbert labels: {e}") from e
    return labels


def build(data: "Data") -> tuple[list[Study], list[Skip]]:
    """The studies and counted skips of the CheXpert Plus release at ``data.root`` (module docstring)."""
    if not data.root:
        raise ValueError("data.root is required with data.dataset=chexpert_plus (the folder of " + CSV_NAME + ")")
    root = Path(data.root)
    csv_path = root / CSV_NAME
    if not csv_path.is_file():
        raise ValueError(f"CheXpert Plus table not found: {csv_path} (data.root must hold {CSV_NAME})")
    split_of, entries, skips = annotation_splits(data.annotation) if data.annotation else (None, [], [])
    groups, row_skips = read_rows(csv_path, need_split=split_of is None)
    skips += row_skips
    columns = SECTIONS[data.sections]
    image_root = Path(data.image_root) if data.image_root else None
    studies: list[Study] = []
    first_paths: list[list[str]] = []
    seen: set[str] = set()
    absent: list[str] = []
    for (patient, sid), g in groups.items():
        if split_of is not None:
            split = split_of.get(sid)
            if split is None:
                absent.append(sid)
                continue
            if split == CONFLICT:
                skips.append(Skip(sid, "split_conflict", "the annotation lists it in two splits"))
                continue
        elif len(g.splits) > 1:
            skips.append(Skip(sid, "split_conflict", f"its rows say {sorted(g.splits)}"))
            continue
        else:
            split = next(iter(g.splits))
            if split not in SPLITS:
                skips.append(Skip(sid, "unknown_split", f"{split!r}; expected train / valid (val) / test"))
                continue
        if sid in seen:
            skips.append(Skip(sid, "duplicate_id", f"a second patient {patient!r} has this study folder"))
            continue
        texts = [g.findings if c == FINDINGS else g.impression for c in columns]
        if not_utf8(*texts):
            skips.append(Skip(sid, "report_not_utf8", repr(as_text(" ".join(texts))[:40])))
            continue
        if not any(texts):
            skips.append(Skip(sid, f"no_{data.sections}_section", f"{' and '.join(columns)} empty"))
            continue
        report = clean_report(join_sections(texts), data.report_cleaner)
        if not report:
            skips.append(Skip(sid, "empty_report", repr(" ".join(texts)[:40])))
            continue
        seen.add(sid)
        views = sorted(g.images)
        kept = views[:data.max_views]
        paths = [locate(image_root, p) if image_root else p for _, _, p, _ in kept]
        studies.append(Study(sid, split, report, as_text(g.findings).strip(), as_text(g.impression).strip(), paths,
                             [v for *_, v in kept], patient))
        first_paths.append([p for _, _, p, _ in views])
    if absent:
        skips.append(Skip(f"<{len(absent)} studies>", "not_in_annotation",
                          f"CSV studies the annotation does not list, e.g. {', '.join(absent[:EXAMPLES])}"))
    known = {sid for _, sid in groups}
    skips += [Skip(label, "annotation_not_in_csv", ", ".join(ids)) for label, ids in entries
              if not any(i in known for i in ids)]
    _attach_labels(root / LABELS_DIR / LABEL_FILES[data.sections], studies, first_paths)
    _warn_patients_across_splits(studies)
    log.info("chexpert_plus %s: %d studies, %d skipped", csv_path, len(studies), len(skips))
    return studies, skips


def _attach_labels(path: Path, studies: list[Study], paths: list[list[str]]) -> None:
    if not path.is_file():
        log.info("no CheXbert labels at %s: Study.labels stay None", path)
        return
    wanted = {p: (i, order) for i, ps in enumerate(paths) for order, p in enumerate(ps)}
    for study, labels in zip(studies, read_labels(path, wanted, len(studies))):
        study.labels = labels


def _warn_patients_across_splits(studies: list[Study]) -> None:
    splits: dict[str, set[str]] = defaultdict(set)
    for s in studies:
        splits[s.patient_id].add(s.split)
    mixed = sorted(p for p, ss in splits.items() if len(ss) > 1)
    if mixed:
        log.warning("%d patients have studies in more than one split (e.g. %s): the split is not patient-disjoint",
                    len(mixed), ", ".join(mixed[:EXAMPLES]))
