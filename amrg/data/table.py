"""Your own data: a CSV or parquet table at ``data.table`` -> :class:`amrg.data.schema.Study` records.

One row per study::

    id,split,patient_id,findings,impression,images,views
    s001,train,p01,"The heart is normal in size. The lungs are clear.",No acute disease.,s001/pa.png;s001/lat.png,PA;LATERAL
    s002,train,p02,"Mild cardiomegaly. No pleural effusion.",Cardiomegaly.,s002/ap.png,AP
    s003,val,p03,"Small left pleural effusion. No pneumothorax.",Left effusion.,s003/pa.png;s003/lat.png,PA;LATERAL
    s004,test,p04,"The lungs are clear. No focal consolidation.",Normal chest.,s004/pa.png,PA

Columns (a header row names them; order and extra columns do not matter):

- ``id`` (required, unique), ``split`` (required: ``train`` / ``val`` / ``test``; ``valid``, ``validate``,
  ``validation`` mean ``val``; case and surrounding spaces are ignored);
- the report: ``report`` if the table has it (used as is, whatever ``data.sections`` says; kept raw in
  ``Study.findings``), else ``findings`` / ``impression`` as ``data.sections`` asks
  (``findings_impression``: both columns, findings first, joined by :func:`join_sections`; an empty cell
  contributes nothing; both kept raw in ``Study.findings`` / ``.impression``); cleaned with R2Gen's
  ``data.report_cleaner`` (``auto``: ``mimic``);
- ``images`` (required): image paths relative to ``data.image_root``, ``;``-separated in a CSV, a list
  (or a ``;``-separated string) in parquet; kept in the table's order, cut to ``data.max_views``;
- ``patient_id`` (optional, ``""`` when absent), ``views`` (optional, ``;``-separated view positions, one
  per image, e.g. ``PA;LATERAL``; ``""`` each when absent).

The file type is its suffix (``.csv``; ``.parquet`` / ``.pq``); a CSV is UTF-8 (a BOM is fine). A missing
file or required column is a ``ValueError`` naming it. Rows are otherwise never fatal; each rejected row
is a counted :class:`Skip`: ``malformed_row`` (a CSV row whose field count differs from the header's; id
``line N``), ``missing_id``, ``duplicate_id`` (the later row), ``unknown_split``, ``report_not_utf8`` (a
report cell that is not UTF-8) / ``row_not_utf8`` (another used cell), ``empty_report`` (nothing left
after cleaning), ``no_image_path``, ``path_outside_images_dir`` (an absolute path or one with ``..``:
the whole row), ``views_mismatch`` (a ``views`` cell whose count differs from the images'). A listed
image that is missing on disk is counted by preprocess (``missing_image``), not here. Labels: None.

The helpers here (:func:`open_csv`, :func:`require_columns`, :func:`normalize_split`, :func:`outside_root`,
:func:`not_utf8`, :func:`as_text`, :func:`join_sections`) also serve :mod:`amrg.data.chexpert_plus`.
"""

from __future__ import annotations

import csv
import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .clean import clean_report
from .schema import Skip, Study

if TYPE_CHECKING:
    from ..config import Data

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val",
                 "test": "test"}
LIST_SEP = ";"
CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
_DRIVE = re.compile(r"[A-Za-z]:")
SECTION_COLUMNS = {"findings": ("findings",), "impression": ("impression",),
                   "findings_impression": ("findings", "impression")}


@contextmanager
def open_csv(path: Path) -> Iterator[tuple[list[str], Iterator[tuple[int, list[str]]]]]:
    """``(header, rows)`` of a UTF-8 CSV; ``rows`` yields ``(first line number, fields)``. Bytes that are
    not UTF-8 come through as lone surrogates (:func:`not_utf8`), for the caller to count."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path}: empty file, expected a header row") from None

        def rows() -> Iterator[tuple[int, list[str]]]:
            start = reader.line_num + 1
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise ValueError(f"{path}: line {start}: unreadable CSV: {e}") from e
                yield start, fields
                start = reader.line_num + 1

        yield [h.strip() for h in header], rows()


def require_columns(path: Path, header: list[str], columns: tuple[str, ...], why: str = "") -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column {missing[0]!r}{why} (columns: {header})")


def not_utf8(*cells: str) -> bool:
    """True when a cell holds bytes that were not UTF-8 (read with ``surrogateescape``)."""
    for cell in cells:
        try:
            cell.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return False


def normalize_split(value: str) -> str | None:
    """``train`` / ``val`` / ``test`` for a split name (``valid``, ``validate``: ``val``), else None."""
    return SPLIT_ALIASES.get(value.strip().lower())


def outside_root(rel: str) -> bool:
    """True for an image path that would escape the images directory: absolute, a drive, or ``..``."""
    posix = rel.replace("\\", "/")
    return posix.startswith("/") or bool(_DRIVE.match(posix)) or ".." in posix.split("/")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    return str(value)


def as_text(cell: str) -> str:
    """A cell as valid text: bytes that were not UTF-8 become U+FFFD."""
    return cell.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _list_cell(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        items = [_cell(v) for v in value]
    else:
        items = _cell(value).split(LIST_SEP)
    return [s.strip() for s in items if s.strip()]


def _read(path: Path) -> tuple[list[str], list[tuple[str, dict[str, Any] | None, int]]]:
    """Header and ``(row label, row dict, field count)`` per row; the dict is None for a malformed CSV row."""
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
            raise ValueError(f"{path}: not a readable parquet file: {e}") from e
        names = list(table.column_names)
        return names, [(f"row {i}", r, len(names)) for i, r in enumerate(table.to_pylist())]
    if suffix not in CSV_SUFFIXES:
        raise ValueError(f"{path}: unknown table type {suffix!r}; expected {CSV_SUFFIXES + PARQUET_SUFFIXES}")
    with open_csv(path) as (header, rows):
        return header, [(f"line {line}", dict(zip(header, fields)) if len(fields) == len(header) else None,
                         len(fields)) for line, fields in rows if any(f.strip() for f in fields)]


def build(data: "Data") -> tuple[list[Study], list[Skip]]:
    """The studies and counted skips of the table at ``data.table`` (see the module docstring)."""
    if not data.table:
        raise ValueError("data.table is required with data.dataset=table")
    path = Path(data.table)
    if not path.is_file():
        raise ValueError(f"table not found: {path} (set data.table)")
    header, rows = _read(path)
    require_columns(path, header, ("id", "split", "images"))
    text_columns = ("report",) if "report" in header else SECTION_COLUMNS[data.sections]
    require_columns(path, header, text_columns, f" (data.sections={data.sections} needs it, or give 'report')")
    raw_findings = "report" if "report" in header else "findings"  # kept in Study.findings
    studies: list[Study] = []
    skips: list[Skip] = []
    seen: set[str] = set()
    for label, row, n_fields in rows:
        if row is None:
            skips.append(Skip(label, "malformed_row", f"{n_fields} fields, the header has {len(header)}"))
            continue
        sid = _cell(row["id"]).strip()
        split_raw = _cell(row["split"])
        images = _list_cell(row["images"])
        views = _list_cell(row["views"]) if "views" in row else []
        patient = _cell(row.get("patient_id")).strip()
        texts = [_cell(row[c]).strip() for c in text_columns]
        if not sid:
            skips.append(Skip(label, "missing_id", "empty id cell"))
            continue
        if not_utf8(sid, split_raw, patient, *images, *views):
            skips.append(Skip(as_text(sid), "row_not_utf8", label))
            continue
        if not_utf8(*texts):
            skips.append(Skip(sid, "report_not_utf8", label))
            continue
        if sid in seen:
            skips.append(Skip(sid, "duplicate_id", f"{label}: second occurrence"))
            continue
        split = normalize_split(split_raw)
        if split is None:
            skips.append(Skip(sid, "unknown_split", f"{split_raw!r}; expected one of {sorted(SPLIT_ALIASES)}"))
            continue
        cleaned = clean_report(join_sections(texts), data.report_cleaner)
        if not cleaned:
            skips.append(Skip(sid, "empty_report", repr(" ".join(texts)[:40])))
            continue
        if not images:
            skips.append(Skip(sid, "no_image_path", label))
            continue
        bad = [p for p in images if outside_root(p)]
        if bad:
            skips.append(Skip(sid, "path_outside_images_dir", bad[0]))
            continue
        if views and len(views) != len(images):
            skips.append(Skip(sid, "views_mismatch", f"{len(views)} views for {len(images)} images"))
            continue
        seen.add(sid)
        keep = images[:data.max_views]
        findings, impression = (as_text(_cell(row.get(c)).strip()) for c in (raw_findings, "impression"))
        studies.append(Study(sid, split, cleaned, findings, impression, keep,
                             views[:len(keep)] if views else [""] * len(keep), patient))
    log.info("table %s: %d studies, %d skipped", path, len(studies), len(skips))
    return studies, skips


def join_sections(texts: list[str]) -> str:
    """The non-empty sections in order, each but the last ended by a period so that the cleaner keeps
    their sentences apart (``"No effusion"`` + ``"Normal."`` -> ``"No effusion. Normal."``)."""
    parts = [t.strip() for t in texts if t.strip()]
    return " ".join(t if t.endswith(".") or i == len(parts) - 1 else t + "." for i, t in enumerate(parts))
