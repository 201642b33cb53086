"""A small CheXpert Plus release on disk, with its breaking cases, for the chexpert_plus builder's tests.

:func:`make_chexpert_plus_tree` writes ``df_chexpert_plus_240401.csv`` with the release's 27 columns (and
the leading unnamed index column a pandas ``to_csv`` leaves), small images at ``path_to_image`` (``.jpg``,
or with ``png=True`` the PNG release's layout: ``PNG/<same path>.png`` while the CSV still says ``.jpg``),
CheXbert labels ``chexbert_labels/findings_fixed.json`` (JSON Lines) for some images, and a
CXPMRG-Bench-style ``annotation.json``. Reports are real IU X-ray texts (``data/iu_xray/annotation.json``,
by id). It returns the paths and the hand-written expectations the tests compare with.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IU_ANNOTATION = ROOT / "data" / "iu_xray" / "annotation.json"
CSV_NAME = "df_chexpert_plus_240401.csv"
COLUMNS = ["path_to_image", "path_to_dcm", "frontal_lateral", "ap_pa", "deid_patient_id",
           "patient_report_date_order", "report", "section_narrative", "section_clinical_history",
           "section_history", "section_comparison", "section_technique", "section_procedure_comments",
           "section_findings", "section_impression", "section_end_of_impression", "section_summary",
           "section_accession_number", "age", "sex", "race", "ethnicity", "interpreter_needed",
           "insurance_type", "recent_bmi", "deceased", "split"]
NOT_UTF8 = "\udcff"  # written as the byte 0xff (surrogateescape): not UTF-8
IU = {  # IU X-ray reports used as CheXpert Plus sections
    "A": "CXR2926_IM-1328",  # Cardiac and mediastinal contours are within normal limits. The lungs are clear. ...
    "B": "CXR2434_IM-0976",  # The heart is normal in size. The mediastinum is unremarkable. ...
    "C": "CXR1451_IM-0291",  # Left lower lobe calcified granuloma. Heart size normal. ...
    "D": "CXR3655_IM-1817",  # Well circumscribed 11 mm right upper lobe nodule, ...
    "E": "CXR2887_IM-1289",  # ... Displaced fracture of the mid one-third of the right clavicle.
}
LABELS = {  # findings_fixed.json records: image path -> {observation: value}
    "train/patient101/study1/view2_lateral.jpg": {"No Finding": 1.0, "Cardiomegaly": 0.0},
    "train/patient101/study1/view1_frontal.jpg": {"No Finding": 1.0, "Cardiomegaly": 0.0, "Support Devices": None},
    "train/patient102/study1/view1_lateral.jpg": {"Lung Lesion": 1.0, "Pleural Effusion": 0.0, "Fracture": -1.0},
}


def iu_reports() -> dict[str, str]:
    entries = {e["id"]: e["report"] for split in json.loads(IU_ANNOTATION.read_text()).values() for e in split}
    return {k: entries[v] for k, v in IU.items()}


def _row(path: str, fl: str, ap_pa: str, findings: str, impression: str, split: str, order: int = 1) -> dict:
    patient = path.split("/")[1] if path.count("/") >= 3 else "patient0"
    report = f"NARRATIVE:\nChest 2 Views\n\nFINDINGS:\n{findings}\n\nIMPRESSION:\n{impression}"
    return {"path_to_image": path, "path_to_dcm": path.rsplit(".", 1)[0] + ".dcm", "frontal_lateral": fl,
            "ap_pa": ap_pa, "deid_patient_id": patient, "patient_report_date_order": order, "report": report,
            "section_narrative": "Chest 2 Views", "section_clinical_history": "61 years Female",
            "section_findings": findings, "section_impression": impression,
            "section_end_of_impression": "I have personally reviewed the images for this examination.",
            "section_accession_number": "9959089", "age": 61.0, "sex": "Female", "race": "White",
            "ethnicity": "Non-Hispanic/Non-Latino", "interpreter_needed": "No",
            "insurance_type": "Private Insurance", "recent_bmi": 22.2, "deceased": "No", "split": split}


def make_chexpert_plus_tree(root: Path, *, png: bool = False, image_size: int = 64, n_extra: int = 0) -> dict:
    """Write the release under ``root``; return paths and expectations (``sections="findings"``, default
    ``max_views=2``, the CSV's own split unless the key says ``annotation``)."""
    r = iu_reports()
    upper_a = r["A"].upper().replace(". ", ".\n\n")  # CheXpert Plus sections are often upper case, one per line
    first = {k: v.split(". ")[0] + "." for k, v in r.items()}
    rows = [
        # a lateral row listed first; the frontal (PA) must come first in the study
        _row("train/patient101/study1/view2_lateral.jpg", "Lateral", "", upper_a, first["B"], "train"),
        _row("train/patient101/study1/view1_frontal.jpg", "Frontal", "PA", upper_a, first["B"], "train"),
        # three views: PA before AP before lateral; max_views=2 keeps PA, AP
        _row("train/patient101/study2/view1_frontal.jpg", "Frontal", "AP", r["C"], first["A"], "train", 2),
        _row("train/patient101/study2/view2_lateral.jpg", "Lateral", "", r["C"], first["A"], "train", 2),
        _row("train/patient101/study2/view3_frontal.jpg", "Frontal", "PA", r["C"], first["A"], "train", 2),
        # lateral only
        _row("train/patient102/study1/view1_lateral.jpg", "Lateral", "", r["D"], first["C"], "train"),
        # no findings section (null in the release: an empty cell)
        _row("train/patient103/study1/view1_frontal.jpg", "Frontal", "AP", "", first["C"], "train"),
        # the validation split, named "valid" in the release
        _row("valid/patient104/study1/view1_frontal.jpg", "Frontal", "PA", r["E"], first["D"], "valid"),
        _row("valid/patient104/study1/view2_lateral.jpg", "Lateral", "", r["E"], first["D"], "valid"),
        # one patient in two splits
        _row("train/patient105/study1/view1_frontal.jpg", "Frontal", "AP", r["B"], first["E"], "train"),
        _row("valid/patient105/study2/view1_frontal.jpg", "Frontal", "PA", r["A"], first["E"], "valid", 2),
        # a findings cell that is not UTF-8
        _row("train/patient106/study1/view1_frontal.jpg", "Frontal", "AP", f"Heart size normal{NOT_UTF8}.",
             first["A"], "train"),
        # a findings cell with nothing left after cleaning
        _row("train/patient107/study1/view1_frontal.jpg", "Frontal", "AP", " . ", first["A"], "train"),
        # its image file is missing on disk
        _row("train/patient108/study1/view1_frontal.jpg", "Frontal", "PA", r["B"], first["B"], "train"),
        # paths escaping the images directory
        _row("../patient109/study1/view1_frontal.jpg", "Frontal", "PA", r["B"], first["B"], "train"),
        _row("/etc/patient110/study1/view1_frontal.jpg", "Frontal", "PA", r["B"], first["B"], "train"),
        # a split the release does not have
        _row("train/patient111/study1/view1_frontal.jpg", "Frontal", "PA", r["C"], first["C"], "holdout"),
    ]
    extra = [f"train/patient{900 + i}/study1/view1_frontal.jpg" for i in range(n_extra)]
    rows += [_row(p, "Frontal", "PA", r["A"], first["A"], "train") for p in extra]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([""] + COLUMNS)
    line_of = {}  # path -> the CSV line its row starts on (quoted newlines take lines)
    for i, row in enumerate(rows):
        line_of[row["path_to_image"]] = buf.getvalue().count("\n") + 1
        w.writerow([i] + [row.get(c, "") for c in COLUMNS])
    malformed_line = buf.getvalue().count("\n") + 1
    buf.write("9999,train/patient112/study1/view1_frontal.jpg,Frontal,PA\n")  # 4 fields: malformed
    (root / CSV_NAME).parent.mkdir(parents=True, exist_ok=True)
    (root / CSV_NAME).write_bytes(buf.getvalue().encode("utf-8", "surrogateescape"))
    bad_lines = [n for path, n in line_of.items() if path.startswith(("..", "/"))]

    images_dir = root / "PNG" if png else root
    rng = np.random.default_rng(0)
    for row in rows:
        p = row["path_to_image"]
        if p.startswith(("..", "/")) or "patient108" in p:
            continue
        target = images_dir / (p[:-4] + ".png" if png else p)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (image_size, image_size), dtype=np.uint8)).save(target)

    (root / "chexbert_labels").mkdir(exist_ok=True)
    with open(root / "chexbert_labels" / "findings_fixed.json", "w") as f:
        for path, values in LABELS.items():
            f.write(json.dumps({"path_to_image": path, **values}) + "\n")

    annotation = {  # CXPMRG-Bench style: matched by patientN/studyM in image_path (or in the id)
        "train": [{"id": "0", "report": r["A"], "image_path": ["train/patient101/study1/view1_frontal.png"],
                   "split": "train"},
                  {"id": "patient102_study1", "report": r["D"], "image_path": [], "split": "train"},
                  {"id": "2", "report": r["B"], "image_path": ["PNG/train/patient105/study1/view1_frontal.png"],
                   "split": "train"}],
        "val": [{"id": "3", "report": r["E"], "image_path": ["valid/patient104/study1/view1_frontal.png",
                                                             "valid/patient104/study1/view2_lateral.png"],
                 "split": "val"}],
        "test": [{"id": "4", "report": r["C"], "image_path": ["train/patient101/study2/view3_frontal.png"],
                  "split": "test"},
                 {"id": "5", "report": r["A"], "image_path": ["valid/patient105/study2/view1_frontal.png"],
                  "split": "test"},
                 {"id": "6", "report": r["B"], "image_path": ["train/patient108/study1/view1_frontal.png"],
                  "split": "test"},
                 {"id": "7", "report": r["B"], "image_path": ["train/patient999/study1/view1_frontal.png"],
                  "split": "test"},
                 {"id": "8", "report": r["B"], "image_path": ["view1_frontal.png"], "split": "test"}],
    }
    (root / "annotation.json").write_text(json.dumps(annotation))

    ext = ".png" if png else ".jpg"
    return {
        "root": root, "csv": root / CSV_NAME, "images_dir": images_dir, "annotation": root / "annotation.json",
        "ext": ext, "extra_ids": [p.split("/", 1)[1].rsplit("/", 1)[0] for p in extra],
        "splits": {"patient101/study1": "train", "patient101/study2": "train", "patient102/study1": "train",
                   "patient104/study1": "val", "patient105/study1": "train", "patient105/study2": "val",
                   "patient108/study1": "train"},
        "annotation_splits": {"patient101/study1": "train", "patient102/study1": "train",
                              "patient105/study1": "train", "patient104/study1": "val",
                              "patient101/study2": "test", "patient105/study2": "test",
                              "patient108/study1": "test"},
        "views": {"patient101/study1": ["PA", "LATERAL"], "patient101/study2": ["PA", "AP"],
                  "patient102/study1": ["LATERAL"], "patient104/study1": ["PA", "LATERAL"]},
        "files": {"patient101/study1": ["train/patient101/study1/view1_frontal", "train/patient101/study1/view2_lateral"],
                  "patient101/study2": ["train/patient101/study2/view3_frontal", "train/patient101/study2/view1_frontal"],
                  "patient102/study1": ["train/patient102/study1/view1_lateral"]},
        "skips": {("patient103/study1", "no_findings_section"), ("patient106/study1", "report_not_utf8"),
                  ("patient107/study1", "empty_report"), ("patient111/study1", "unknown_split"),
                  *((f"line {n}", "path_outside_images_dir") for n in bad_lines),
                  (f"line {malformed_line}", "malformed_row")},
        "missing_image": "train/patient108/study1/view1_frontal.jpg",
        "not_in_annotation": ["patient103/study1", "patient106/study1", "patient107/study1", "patient111/study1"],
        "annotation_skips": {("7", "annotation_not_in_csv"), ("8", "annotation_not_in_csv")},
    }

