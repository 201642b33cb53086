"""Small MIMIC-CXR trees in the published layout, for the ``mimic_cxr`` builder's tests and benchmarks.

:func:`make_mimic_tree` writes ``<root>/mimic-cxr-jpg`` (the MIMIC-CXR-JPG 2.0.0 root: the three gzip
CSVs and ``files/pNN/p<subject>/s<study>/<dicom_id>.jpg``) and ``<root>/mimic-cxr-reports/files/...``
(optionally also ``<root>/mimic-cxr-reports.zip``), with every case that breaks builders, and returns
what the builder must make of it. :func:`synthetic_mimic_tree` writes N ordinary studies fast.

Reports are real IU X-ray FINDINGS (``data/iu_xray/annotation.json``, ``XXXX`` -> ``___``) rewritten in
MIMIC-CXR's report layout (a ``FINAL REPORT`` title, one-space indented lines wrapped at
:data:`WRAP`, blank lines of one space); the impressions are short hand-written conclusions.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import textwrap
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from amrg.labels.schema import CHEXPERT_14

IU_ANNOTATION = Path(__file__).resolve().parents[1] / "data" / "iu_xray" / "annotation.json"
WRAP = 76  # MIMIC-CXR reports wrap lines at about this many characters
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning")
CHEXPERT_COLUMNS = ("subject_id", "study_id") + tuple(sorted(CHEXPERT_14))  # the release's (alphabetical) order
VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
IMPRESSIONS = ("No acute cardiopulmonary process.", "No acute intrathoracic abnormality.",
               "Stable cardiomegaly without pulmonary edema.", "Small left pleural effusion.",
               "Low lung volumes with bibasilar atelectasis.")
# three label patterns for ordinary studies (release column -> value; other columns blank)
LABEL_PATTERNS = ({"No Finding": 1.0},
                  {"Cardiomegaly": 1.0, "Edema": -1.0, "Pleural Effusion": 0.0},
                  {"Pleural Effusion": 1.0, "Atelectasis": 1.0, "Support Devices": 1.0, "Pneumothorax": 0.0})
OFFICIAL = {"train": "train", "val": "validate", "test": "test"}
EXTRA_SPLITS = ("train",) * 8 + ("val", "test")  # make_mimic_tree's n_extra studies cycle through these


def iu_findings() -> list[str]:
    """IU X-ray FINDINGS texts (train split, in file order), ``XXXX`` replaced by MIMIC's ``___``."""
    raw = json.loads(IU_ANNOTATION.read_text(encoding="utf-8"))
    return [e["report"].replace("XXXX", "___") for e in raw["train"] if e["report"].strip()]


def wrapped(text: str) -> str:
    """``text`` as it stands in a MIMIC report body: wrapped lines joined by ``"\\n "``."""
    return "\n ".join(textwrap.wrap(text, WRAP))


def mimic_report(findings: Optional[str], impression: Optional[str]) -> str:
    """A MIMIC-CXR-style report; a None section is left out (header and all)."""
    lines = [" " * 33 + "FINAL REPORT", " EXAMINATION:  CHEST (PA AND LAT)", " ",
             " INDICATION:  ___ year old with cough, evaluate for pneumonia.", " ",
             " TECHNIQUE:  Chest PA and lateral", " ", " COMPARISON:  None.", " "]
    for header, body in (("FINDINGS", findings), ("IMPRESSION", impression)):
        if body is not None:
            lines += [f" {header}:", " ", " " + wrapped(body), " "]
    return "\n".join(lines) + "\n"


def dicom_id(study: str, k: int) -> str:
    """A dicom id shaped like the release's (``02aa804e-bde0afdd-112c0b34-7bc16630-4e384014``)."""
    h = hashlib.sha1(f"{study}/{k}".encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def jpeg_bytes(size: int, shade: int) -> bytes:
    """A small grayscale JPEG: a vertical gradient plus ``shade``."""
    ramp = np.linspace(0, 200, size, dtype=np.float32)[:, None] + shade
    pixels = np.clip(np.repeat(ramp, size, axis=1), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _gz_csv(path: Path, columns: tuple[str, ...], rows: list[tuple], level: int = 6) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=level) as f:
        f.write(buf.getvalue())


def _label_row(subject: str, study: str, labels: dict[str, float]) -> tuple:
    return (subject, study) + tuple("" if c not in labels else f"{labels[c]:.1f}" for c in CHEXPERT_COLUMNS[2:])


def write_tree(root: Path, studies: list[dict], image_size: int, *, images: Optional[list[bytes]] = None,
               zip_reports: bool = False, level: int = 6) -> dict:
    """Write ``studies`` (dicts: subject, study, split (train/val/test), images [(dicom, view, write)],
    report (bytes or None: no file), labels (release column -> value, or None: no row)) under ``root``.
    ``images``: encoded JPEGs to cycle through (default: one encoded per image)."""
    jpg_root, rep_root = root / "mimic-cxr-jpg", root / "mimic-cxr-reports"
    split_rows, meta_rows, label_rows = [], [], []
    n = 0
    for st in studies:
        subject, study = st["subject"], st["study"]
        img_dir = jpg_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        img_dir.mkdir(parents=True, exist_ok=True)
        for dicom, view, write in st["images"]:
            split_rows.append((dicom, study, subject, OFFICIAL[st["split"]]))
            meta_rows.append((dicom, subject, study, "CHEST (PA AND LAT)", view, image_size, image_size,
                              21800506, f"{213014 + n}.531", "CHEST (PA AND LAT)", VIEW_MEANING.get(view, ""),
                              "Erect"))
            if write:
                data = images[n % len(images)] if images else jpeg_bytes(image_size, 5 * (n % 11))
                (img_dir / f"{dicom}.jpg").write_bytes(data)
            n += 1
        if st["report"] is not None:
            rep = rep_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            rep.parent.mkdir(parents=True, exist_ok=True)
            rep.write_bytes(st["report"])
        if st["labels"] is not None:
            label_rows.append(_label_row(subject, study, st["labels"]))
    _gz_csv(jpg_root / "mimic-cxr-2.0.0-split.csv.gz", SPLIT_COLUMNS, split_rows, level)
    _gz_csv(jpg_root / "mimic-cxr-2.0.0-metadata.csv.gz", METADATA_COLUMNS, meta_rows, level)
    _gz_csv(jpg_root / "mimic-cxr-2.0.0-chexpert.csv.gz", CHEXPERT_COLUMNS, label_rows, level)
    out = {"root": jpg_root, "reports": rep_root, "reports_dir": rep_root, "reports_zip": None, "n_images": n}
    if zip_reports:
        out["reports"] = out["reports_zip"] = zip_dir(rep_root, root / "mimic-cxr-reports.zip")
    return out


def zip_dir(reports_dir: Path, dst: Path, prefix: str = "") -> Path:
    """Zip ``reports_dir/files/**`` as ``<prefix>files/...`` members (``prefix`` e.g. ``mimic-cxr-reports/``)."""
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted((reports_dir / "files").rglob("*.txt")):
            z.write(f, prefix + f.relative_to(reports_dir).as_posix())
    return dst


def _labels14(labels: Optional[dict[str, float]]) -> Optional[tuple[float, ...]]:
    return None if labels is None else tuple(labels.get(c, math.nan) for c in CHEXPERT_14)


def make_mimic_tree(root: Path, *, n_extra: int = 0, zip_reports: bool = False, image_size: int = 64) -> dict:
    """A small release under ``root`` with the hard cases; returns paths and the expected builder output.

    Keys: ``root`` (MIMIC-CXR-JPG root), ``reports`` (give as data.reports: the zip with ``zip_reports``,
    else the folder holding ``files/``), ``reports_dir``, ``reports_zip``; ``cases`` (case -> study id);
    with ``sections=findings, max_views=2`` and the official split: ``ids`` (split -> ids in builder
    order), ``skips`` (id -> reason); for every built-able study: ``split``, ``subject``, ``views`` /
    ``images`` (ordered, before max_views), ``findings`` / ``impression`` (raw section text),
    ``labels`` (CHEXPERT_14 order or None); ``missing_images`` (listed, not on disk).
    ``n_extra`` more ordinary studies go 8 train : 1 val : 1 test. 18 train, 6 val, 5 test build.
    """
    texts = iu_findings()
    specs: list[dict] = []
    meta: dict[str, dict] = {}
    cases: dict[str, str] = {}

    def add(case: Optional[str], split: str, subject: str, views: list[str], *, findings: Optional[str] = "",
            impression: Optional[str] = "", labels: Optional[dict] = None, report: str = "ok",
            unwritten: tuple[int, ...] = ()) -> str:
        k = len(specs)
        study = str(50000000 + 7919 * (k + 1) % 99991)  # 8 digits, unique, not in insertion order
        findings = texts[k % len(texts)] if findings == "" else findings
        impression = IMPRESSIONS[k % len(IMPRESSIONS)] if impression == "" else impression
        labels = LABEL_PATTERNS[k % len(LABEL_PATTERNS)] if labels is None else labels
        text = mimic_report(findings, impression).encode("utf-8")
        if report == "not_utf8":
            text = text.replace(b"IMPRESSION:", b"IMPRESSION:  Caf\xe9 ___.")  # latin-1 bytes
        images = [(dicom_id(study, j), v, j not in unwritten) for j, v in enumerate(views)]
        specs.append({"subject": subject, "study": study, "split": split, "images": images,
                      "report": None if report == "missing" else text,
                      "labels": None if report == "no_labels" else labels})
        sid = f"s{study}"
        rank = {v: i for i, v in enumerate(("PA", "AP", "LATERAL", "LL"))}
        usable = sorted((im for im in images if im[1] in rank), key=lambda im: (rank[im[1]], im[0]))
        pre = f"files/p{subject[:2]}/p{subject}/s{study}/"
        meta[sid] = {"split": split, "subject": subject, "views": [v for _, v, _ in usable],
                     "images": [pre + d + ".jpg" for d, _, _ in usable],
                     "findings": "" if findings is None else wrapped(findings),
                     "impression": "" if impression is None else wrapped(impression),
                     "labels": _labels14(specs[-1]["labels"]), "missing": [pre + d + ".jpg" for d, _, w in images
                                                                          if not w]}
        if case:
            cases[case] = sid
        return sid

    def ordinary(i: int, split: str) -> str:
        subject = str(19000000 - 1013 * i if i % 2 else 10000032 + 1013 * i)  # p18 / p10 ..., unordered
        return add(None, split, subject, ["LATERAL", "PA"] if i % 3 == 0 else ["PA", "LATERAL"])

    plan = ["train"] * 14 + ["val"] * 4 + ["test"] * 4
    for i, split in enumerate(plan):
        ordinary(i, split)
    add("no_findings", "train", "11000101", ["PA", "LATERAL"], findings=None, impression="No acute process.")
    add("lateral_only", "train", "12000202", ["LATERAL"])
    add("three_views", "train", "13000303", ["LATERAL", "AP", "PA"],
        findings="The lungs are clear. No pleural effusion or pneumothorax.", impression="Normal chest.",
        labels={"Atelectasis": 1.0, "Cardiomegaly": -1.0, "Edema": 0.0, "Support Devices": 1.0})
    add("missing_image", "val", "14000404", ["PA", "LATERAL"], unwritten=(1,))
    add("missing_report", "train", "15000505", ["PA", "LATERAL"], report="missing")
    add("two_splits_train", "train", "16000606", ["PA", "LATERAL"])
    add("two_splits_test", "test", "16000606", ["AP"])
    add("not_utf8", "test", "17000707", ["PA", "LATERAL"], report="not_utf8")
    add("other_view_only", "train", "18000808", ["LAO", ""])
    add("no_labels", "val", "19000909", ["PA", "LATERAL"], report="no_labels")
    add("extra_view", "train", "10000111", ["", "LL", "AP", "SWIMMERS"])
    for i in range(n_extra):
        ordinary(len(plan) + i, EXTRA_SPLITS[i % len(EXTRA_SPLITS)])

    out = write_tree(Path(root), specs, image_size, zip_reports=zip_reports)
    skips = {cases["no_findings"]: "no_findings_section", cases["missing_report"]: "missing_report",
             cases["not_utf8"]: "report_not_utf8", cases["other_view_only"]: "no_usable_view"}
    built = sorted((sid for sid in meta if sid not in skips),
                   key=lambda s: (("train", "val", "test").index(meta[s]["split"]), int(meta[s]["subject"]),
                                  int(s[1:])))
    out.update(cases=cases, skips=skips, ids={sp: [s for s in built if meta[s]["split"] == sp]
                                              for sp in ("train", "val", "test")},
               missing_images=[p for m in meta.values() for p in m["missing"]],
               **{key: {s: m[key] for s, m in meta.items()} for key in
                  ("split", "subject", "views", "images", "findings", "impression", "labels")})
    return out


def synthetic_mimic_tree(root: Path, n_studies: int, image_size: int, seed: int = 0, views: int = 2) -> dict:
    """``n_studies`` ordinary studies (``views`` images each: PA, LATERAL, AP, LL, ...) written fast: a
    handful of pre-encoded JPEGs reused, IU X-ray texts cycled, fast gzip. Patients have 1-4 studies;
    the official split is by patient, about 98% train / 1% val / 1% test. Returns ``root``,
    ``reports``, ``n_studies``, ``n_images`` and ``splits`` (split -> studies)."""
    rng = np.random.default_rng(seed)
    texts = iu_findings()
    jpegs = [jpeg_bytes(image_size, shade) for shade in range(0, 40, 5)]  # 8 encodings, cycled
    order = ("PA", "LATERAL", "AP", "LL")
    cols = CHEXPERT_COLUMNS[2:]
    specs, splits = [], {"train": 0, "val": 0, "test": 0}
    subject, left, split = 10000000, 0, "train"
    for k in range(n_studies):
        if left == 0:
            subject += int(rng.integers(1, 900))  # stays 8 digits (p10..p1x) for n_studies well above 50,000
            left = int(rng.integers(1, 5))
            split = str(rng.choice(["train", "val", "test"], p=[0.98, 0.01, 0.01]))
        left -= 1
        study = str(50000000 + k)
        draw = rng.random(len(cols))
        labels = {c: (1.0 if d < 0.1 else 0.0 if d < 0.15 else -1.0) for c, d in zip(cols, draw) if d < 0.2}
        report = mimic_report(texts[k % len(texts)], IMPRESSIONS[k % len(IMPRESSIONS)]).encode("utf-8")
        specs.append({"subject": str(subject), "study": study, "split": split, "report": report, "labels": labels,
                      "images": [(dicom_id(study, j), order[j % len(order)], True) for j in range(views)]})
        splits[split] += 1
    out = write_tree(Path(root), specs, image_size, images=jpegs, level=1)
    return {"root": out["root"], "reports": out["reports"], "n_studies": n_studies, "n_images": out["n_images"],
            "splits": splits}
