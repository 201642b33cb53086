"""Reports for new studies: one image, a folder or a CSV of them, or an upload (``amrg serve``).

One way from files to what a person reads, shared by ``amrg generate``, its batch mode and ``amrg serve``:

    pixels, uids = read_study(paths, run.image_size)     # PNG/JPEG/TIFF/DICOM -> uint8; StudyError if unusable
    out = describe(run, pixels, view_rows, params)      # per study: report (two forms), labels, CAM, retrieved
    stats = generate_batch(run, params, studies, out)   # a folder/CSV, resumable, every skip counted

The model's evidence travels with each report: the classifier's labels above the decision threshold, where
each predicted disease's CAM points (and its overlay), and the report-bank sentences the R-Hopfield weighs
most for the top predicted diseases (eq. 5's α of the disease query F_d[k], after the descent).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .data.clean import readable_report
from .data.images import ImageError, decode_image, is_dicom

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom")
RETRIEVED = 3  # report-bank sentences shown per predicted disease
# the batch output: labels (all 14 probabilities), cam and retrieved are JSON strings; error is the skip's
# reason code and detail (null for a written report)
SCHEMA = pa.schema([("study", pa.string()), ("images", pa.list_(pa.string())), ("report", pa.string()),
                    ("report_readable", pa.string()), ("labels", pa.string()), ("cam", pa.string()),
                    ("retrieved", pa.string()), ("views_dropped", pa.int64()), ("phantom_trained", pa.bool_()),
                    ("error", pa.string())])
COLUMNS = tuple(SCHEMA.names)


class StudyError(ValueError):
    """A study that cannot be reported on; ``reason`` is the counted skip's code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Study:
    id: str
    paths: list[Path]


# ------------------------------------------------------------------------------------------ reading
def dicom_study_uid(path: Path) -> str | None:
    """StudyInstanceUID of a DICOM file (header only), None for other files or when absent."""
    if not is_dicom(path):
        return None
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                   .get("StudyInstanceUID", "")) or None
    except Exception:  # an unreadable header is reported by decode_image with its reason
        return None


def read_study(paths: list[Path], size: int, max_views: int = 2) -> tuple[np.ndarray, int]:
    """uint8 ``(V, size, size)`` of a study's first ``max_views`` images, and how many were left out.
    DICOM files of different StudyInstanceUIDs given as one study, and any unreadable image, raise
    :class:`StudyError` (nothing of the study is used)."""
    if not paths:
        raise StudyError("no_images", "the study has no image files")
    uids = {u for u in map(dicom_study_uid, paths) if u}
    if len(uids) > 1:
        raise StudyError("mixed_studies", f"the files are DICOM images of {len(uids)} different studies "
                                          f"(StudyInstanceUID {', '.join(sorted(uids))}); give each study alone")
    used = paths[:max_views]
    out = []
    for p in used:
        if not p.is_file():
            raise StudyError("missing_image", f"{p}: not found" + (" (a directory)" if p.is_dir() else ""))
        try:
            out.append(decode_image(p.resolve().parent, p.name, size))
        except ImageError as e:
            raise StudyError(e.reason, f"{p}: {e.detail}") from e
    return np.stack(out), len(paths) - len(used)


def view_rows_of(counts: list[int]) -> np.ndarray:
    """``(S, 2)`` image rows of studies with ``counts`` images each, stacked in order (a single view twice)."""
    start = np.cumsum([0, *counts[:-1]])
    return np.array([[s, s + min(1, c - 1)] for s, c in zip(start, counts)], dtype=np.int64)


def studies_from_dir(root: Path) -> list[Study]:
    """Images under ``root`` grouped by folder: each sub-folder holding images is one study (its id the
    folder's path under ``root``, as MIMIC-CXR's ``p10/p10000032/s50414267``); an image directly in
    ``root`` is a study of its own (its id the file name). DICOM files count whatever their names."""
    root = Path(root)
    groups: dict[str, list[Path]] = {}
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        if p.suffix.lower() not in IMAGE_SUFFIXES and not is_dicom(p):
            continue
        rel = p.parent.relative_to(root)
        groups.setdefault(p.name if rel == Path(".") else rel.as_posix(), []).append(p)
    return [Study(k, v) for k, v in groups.items()]


def studies_from_csv(path: Path, study_column: str = "study", path_column: str = "path") -> list[Study]:
    """Studies of a CSV with one row per image: ``study_column`` groups rows, ``path_column`` is the image
    (relative to the CSV's folder, or absolute); studies in order of first appearance."""
    import csv

    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in (study_column, path_column) if c not in header]
            if missing:
                raise StudyError("malformed_csv", f"{path}: no column {missing} (the header is {header}); "
                                                  "name them with --study-column/--path-column")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise StudyError("malformed_csv", f"{path}: {e}") from e
    groups: dict[str, list[Path]] = {}
    for i, row in enumerate(rows, start=2):
        study, rel = (row.get(study_column) or "").strip(), (row.get(path_column) or "").strip()
        if not study or not rel:
            raise StudyError("malformed_csv", f"{path} line {i}: empty {study_column!r} or {path_column!r}")
        p = Path(rel)
        groups.setdefault(study, []).append(p if p.is_absolute() else path.parent / p)
    return [Study(k, v) for k, v in groups.items()]


# ------------------------------------------------------------------------------------------ the model
def retrieved_sentences(run, fd, probs: np.ndarray, per_disease: int = RETRIEVED) -> list[dict[str, list]]:
    """Per study: for each predicted disease (No Finding aside, at most ``MAX_CAMS``), the report-bank
    sentences with the largest R-Hopfield weight α for its disease query, ``{label: [[sentence, α], ...]}``.
    Empty when the run has no report memory or its bank's sentences (``rows.parquet``) are absent."""
    import torch

    from .inference import MAX_CAMS, predicted
    from .io import read_parquet
    from .labels.schema import CHEXPERT_14, NO_FINDING

    hop = getattr(run.generator, "r_hopfield", None)
    rows_file = run.layout.stage_dir("encode_report_bank") / "rows.parquet"
    if hop is None or not rows_file.is_file():
        return [{} for _ in probs]
    sentences = read_parquet(rows_file, ["sentence"]).column("sentence").to_pylist()
    with torch.no_grad():
        alpha, ids = hop.association(fd.to(run.device).float())
    k = min(per_disease, alpha.shape[-1])
    weight, col = alpha.topk(k, dim=-1)
    rows = ids[col].cpu().numpy()
    weight = weight.float().cpu().numpy()
    out = []
    for s in range(len(probs)):
        diseases = [d for d, _ in predicted(probs[s]) if d != NO_FINDING][:MAX_CAMS]
        out.append({CHEXPERT_14[d]: [[sentences[r], round(float(w), 4)] for r, w in zip(rows[s, d], weight[s, d])
                                     if w > 0] for d in diseases})
    return out


def describe(run, pixels: np.ndarray, view_rows: np.ndarray, params, batch_size: int = 8,
             overlays: bool = True) -> list[dict]:
    """Per study: the generated report (``report``: the scoring form; ``report_readable``), the classifier's
    labels above the decision threshold, where each predicted disease's CAM points
    (:meth:`amrg.inference.Run.explain`), the retrieved report-bank sentences, and (``overlays``) the CAM
    overlays as RGB arrays under ``"overlays"``."""
    import torch

    from .cam import heat_overlay
    from .inference import predicted, study_probabilities
    from .labels.schema import CHEXPERT_14

    x = torch.from_numpy(pixels)
    f, fd = run.features(x, view_rows, batch_size)
    reports = run.generate(f, fd, params.decode, batch_size)
    n = np.arange(len(pixels))
    image_probs = run.probabilities(x, n, batch_size)
    probs = study_probabilities(image_probs, n, view_rows)
    cams = run.explain(x, view_rows, probs, params.cam, batch_size)
    retrieved = retrieved_sentences(run, fd, probs)
    out = []
    for s in range(len(view_rows)):
        maps = [c.pop("map") for c in cams[s]]
        for c in cams[s]:
            c.pop("disease")
        row = {"report": reports[s], "report_readable": readable_report(reports[s]),
               "predicted": [(CHEXPERT_14[d], p) for d, p in predicted(probs[s])],
               "probabilities": {CHEXPERT_14[d]: round(float(p), 4) for d, p in enumerate(probs[s])},
               "cam": cams[s], "retrieved": retrieved[s]}
        if overlays:
            row["overlays"] = [heat_overlay(pixels[c["image"]], m) for c, m in zip(cams[s], maps)]
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------ batch mode
def _read_done(path: Path) -> dict[str, dict]:
    """Rows already written (JSON lines or parquet), the last row per study; a torn last JSON line (an
    interrupted write) is ignored, logged."""
    if not path.is_file():
        return {}
    if path.suffix == ".parquet":
        from .io import read_parquet

        return {r["study"]: r for r in read_parquet(path).to_pylist()}
    done: dict[str, dict] = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: ignoring a torn last line (an interrupted write)", path)
                continue
            raise ValueError(f"{path} line {i + 1} is not JSON: not an amrg generate output?") from None
        done[row["study"]] = row
    return done


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that an interruption left without its newline, so that appending goes on cleanly."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def journal_of(out: Path) -> Path:
    """Where rows are appended as they are made: the output itself for ``.jsonl``, else a sidecar."""
    return out if out.suffix == ".jsonl" else out.with_name(out.name + ".partial.jsonl")


def generate_batch(run, params, studies: list[Study], out: Path, batch_size: int = 8, max_views: int = 2,
                   progress: bool = True) -> dict:
    """Reports for ``studies`` into ``out`` (``.parquet`` or ``.jsonl``; columns :data:`COLUMNS`), the model
    loaded once and ``batch_size`` studies per device batch. Resumable: a study already written without
    error is skipped; rows are appended (flushed) to :func:`journal_of` batch by batch, and a parquet
    output is rewritten atomically at the end. A study that cannot be read is written with its ``error``
    (the reason code and detail) and counted; a rerun tries it again. Returns the counts."""
    from .atomic import atomic_path
    from .io import progress as bar

    out = Path(out)
    if out.suffix not in (".parquet", ".jsonl"):
        raise ValueError(f"--out must end in .parquet or .jsonl, got {out.name}")
    journal = journal_of(out)
    done = {**_read_done(out), **(_read_done(journal) if journal != out else {})}
    todo = [s for s in studies if s.id not in done or done[s.id].get("error")]
    phantom = run.layout.is_phantom()
    skips: Counter = Counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(journal)
    with journal.open("a") as jf:
        starts = range(0, len(todo), batch_size)
        for start in (bar(starts, "generate", total=len(todo), unit="study",
                          count=lambda s: len(todo[s:s + batch_size])) if progress else starts):
            rows, pixels, counts, ok = [], [], [], []
            for study in todo[start:start + batch_size]:
                base = {"study": study.id, "images": [str(p) for p in study.paths], "phantom_trained": phantom}
                try:
                    px, dropped = read_study(study.paths, run.image_size, max_views)
                except StudyError as e:
                    skips[e.reason] += 1
                    log.warning("skipped study %s: %s", study.id, e)
                    rows.append({**base, "error": str(e)})
                    continue
                pixels.append(px)
                counts.append(len(px))
                ok.append((len(rows), dropped))
                rows.append(base)
            if pixels:
                described = describe(run, np.concatenate(pixels), view_rows_of(counts), params, batch_size,
                                     overlays=False)
                for (i, dropped), d in zip(ok, described):
                    rows[i].update(report=d["report"], report_readable=d["report_readable"],
                                   labels=json.dumps(d["probabilities"]), cam=json.dumps(d["cam"]),
                                   retrieved=json.dumps(d["retrieved"]), views_dropped=dropped, error=None)
            for r in rows:
                done[r["study"]] = r
                jf.write(json.dumps({c: r.get(c) for c in COLUMNS}) + "\n")
            jf.flush()
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in done.values()], schema=SCHEMA)
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
        journal.unlink(missing_ok=True)
    written = sum(1 for r in done.values() if not r.get("error"))
    return {"studies": len(studies), "already_written": len(studies) - len(todo), "written": written,
            "skipped": int(sum(skips.values())), "skip_reasons": dict(skips), "output": str(out)}

