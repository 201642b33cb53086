"""The ``mimic_cxr`` builder and the MIMIC-CXR section parser against hand-written expectations."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from amrg.config import Data
from amrg.data import clean, mimic_cxr
from amrg.data.sections import findings_impression, normalize_name, sections
from tests._fixtures_mimic import make_mimic_tree, synthetic_mimic_tree, zip_dir

NAN = math.nan


@pytest.fixture(autouse=True)
def _mimic_cleaner(monkeypatch):
    """While ``clean_report(..., "mimic")`` is not written yet, the builder cleans with the IU cleaner."""
    try:
        clean.clean_report("The heart is normal.", "mimic")
    except NotImplementedError:
        monkeypatch.setattr(mimic_cxr, "clean_report", lambda text, cleaner: clean.clean_report(text, "iu"))


def cleaned(text: str) -> str:
    return mimic_cxr.clean_report(text, "mimic")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    return make_mimic_tree(tmp_path_factory.mktemp("mimic"), zip_reports=True)


def build(tree: dict, reports=None, **kw):
    kw.setdefault("annotation", None)
    data = Data(dataset="mimic_cxr", root=str(tree["root"]), reports=str(reports or tree["reports_dir"]), **kw)
    studies, skips = mimic_cxr.build(data)
    return {s.id: s for s in studies}, [s.id for s in studies], {k.id: k for k in skips}


# ---------------------------------------------------------------------------------------- section parser

REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___ year old woman with ?pleural effusion
 
 COMPARISON:  ___
 
 FINDINGS:
 
 Cardiac size cannot be evaluated.  Large left pleural effusion is new.  Small
 right effusion is new.
 
 IMPRESSION:
 
 Large left pleural effusion
"""


def test_sections_of_a_standard_report():
    found = sections(REPORT)
    assert found == {"preamble": "FINAL REPORT", "examination": "CHEST (PA AND LAT)",
                     "indication": "___ year old woman with ?pleural effusion", "comparison": "___",
                     "findings": "Cardiac size cannot be evaluated.  Large left pleural effusion is new.  Small\n"
                                 " right effusion is new.",
                     "impression": "Large left pleural effusion"}
    assert findings_impression(REPORT) == (found["findings"], found["impression"])


@pytest.mark.parametrize("header,name", [
    ("FINDINGS AND IMPRESSION", "impression"), ("FINDINGS/IMPRESSION", "impression"), ("CONCLUSION", "impression"),
    ("IMPRESSON", "impression"), ("FINIDNGS", "findings"), ("PA AND LATERAL CHEST RADIOGRAPH", "findings"),
    ("CHEST, TWO VIEWS", "findings"), ("PORTABLE AP", "findings"), ("REASON FOR EXAM", "indication"),
    ("CLINICAL HISTORY", "history"), ("COMPARISONS", "comparison"), ("WET READ", "wet read"),
    ("RECOMMENDATION(S)", "recommendations"), ("FINAL ADDENDUM", "addendum"), ("NOTIFICATION", "notification")])
def test_header_synonyms(header, name):
    assert normalize_name(header) == name
    assert sections(f"FINAL REPORT\n INDICATION: cough\n \n {header}:  Text here.\n")[name] == "Text here."


def test_missing_findings_and_findings_and_impression():
    assert findings_impression(" INDICATION: cough.\n \n IMPRESSION:  No acute process.\n") == \
        ("", "No acute process.")
    assert findings_impression(" FINDINGS AND IMPRESSION:\n Lungs are clear.\n") == ("", "Lungs are clear.")


def test_no_headers_gives_full_report_and_last_paragraph():
    text = ("                FINAL REPORT\n PA and lateral views of the chest.\n \n The lungs are clear.\n \n"
            " No effusion.\n")
    assert sections(text) == {"full report": "FINAL REPORT\n PA and lateral views of the chest.",
                              "last_paragraph": "The lungs are clear.\n \n No effusion."}
    assert findings_impression(text) == ("", "")  # last_paragraph is never promoted (module docstring)
    other = " INDICATION: cough\n \n COMPARISON:  None.\n \n Lungs clear, no effusion.\n"
    assert sections(other)["comparison"] == "None."
    assert sections(other)["last_paragraph"] == "Lungs clear, no effusion."


def test_empty_title_section_repeated_sections_and_layout():
    # an empty "title" findings section is dropped; the next header still opens a section
    text = " CHEST, PA LATERAL:\n \n INDICATION: cough\n \n FINDINGS: Clear lungs.\n"
    assert findings_impression(text) == ("Clear lungs.", "")
    # the last non-empty section of a name wins
    assert findings_impression(" FINDINGS: first.\n \n FINDINGS: second.\n \n FINDINGS:\n")[0] == "second."
    # MIT-LCP's skip-past-the-first-newline rule: a header right under an empty header line stays text
    assert findings_impression(" FINDINGS:\n IMPRESSION: x\n") == ("IMPRESSION: x", "")
    # headers without MIMIC's one-space indentation, at the start of the text
    assert findings_impression("FINDINGS: Clear.\nIMPRESSION: Normal.") == ("Clear.", "Normal.")
    # lower-case or digit-led text before a colon is not a header
    assert findings_impression(" FINDINGS: Heart size: normal.\n Note: 2 views.\n") == \
        ("Heart size: normal.\n Note: 2 views.", "")


# ---------------------------------------------------------------------------------------- the builder

def test_official_split_ids_skips_and_fields(tree):
    by_id, ids, skips = build(tree)
    assert ids == tree["ids"]["train"] + tree["ids"]["val"] + tree["ids"]["test"]
    assert (len(tree["ids"]["train"]), len(tree["ids"]["val"]), len(tree["ids"]["test"])) == (18, 6, 5)
    assert {k: s.reason for k, s in skips.items()} == tree["skips"]
    c = tree["cases"]
    assert set(tree["skips"]) == {c["no_findings"], c["missing_report"], c["not_utf8"], c["other_view_only"]}
    assert skips[c["no_findings"]].reason == "no_findings_section"
    assert skips[c["missing_report"]].reason == "missing_report"
    assert skips[c["not_utf8"]].reason == "report_not_utf8"
    assert skips[c["other_view_only"]].reason == "no_usable_view" and "LAO" in skips[c["other_view_only"]].detail
    for sid, s in by_id.items():
        assert s.split == tree["split"][sid] and s.patient_id == tree["subject"][sid]
        assert s.views == tree["views"][sid][:2] and s.image_paths == tree["images"][sid][:2]
        assert (s.findings, s.impression) == (tree["findings"][sid], tree["impression"][sid])
        assert s.report == cleaned(s.findings) and s.report
        if tree["labels"][sid] is None:
            assert s.labels is None
        else:
            np.testing.assert_array_equal(s.labels, tree["labels"][sid])
    assert sum(len(v) for v in tree["ids"].values()) == len(by_id)


def test_hand_checked_study(tree):
    by_id, _, _ = build(tree)
    s = by_id[tree["cases"]["three_views"]]
    assert s.findings == "The lungs are clear. No pleural effusion or pneumothorax."
    assert s.impression == "Normal chest." and s.patient_id == "13000303" and s.split == "train"
    assert s.image_paths[0].startswith(f"files/p13/p13000303/{s.id}/") and s.image_paths[0].endswith(".jpg")
    # release columns Atelectasis=1, Cardiomegaly=-1, Edema=0, Support Devices=1, the rest blank
    expected = (NAN, NAN, -1.0, NAN, NAN, 0.0, NAN, NAN, 1.0, NAN, NAN, NAN, NAN, 1.0)  # CHEXPERT_14 order
    np.testing.assert_array_equal(s.labels, expected)
    assert by_id[tree["cases"]["no_labels"]].labels is None


def test_views_order_and_max_views(tree):
    c = tree["cases"]
    by2, _, _ = build(tree)
    by3, _, _ = build(tree, max_views=3)
    by1, _, skips1 = build(tree, max_views=1)
    assert by2[c["three_views"]].views == ["PA", "AP"]  # metadata lists LATERAL, AP, PA
    assert by3[c["three_views"]].views == ["PA", "AP", "LATERAL"]
    assert by1[c["three_views"]].views == ["PA"]
    assert by3[c["extra_view"]].views == ["AP", "LL"]  # blank and SWIMMERS dropped
    assert by2[c["lateral_only"]].views == ["LATERAL"]
    assert by2[c["two_splits_test"]].views == ["AP"]
    assert all(v == ["PA", "LATERAL"] for sid, v in ((s, by2[s].views) for s in tree["ids"]["train"][:3])
               if sid not in c.values())
    assert set(by1) == set(by2) and skips1.keys() == build(tree)[2].keys()
    # a listed image without a file is built (preprocess counts missing files)
    missing = by2[c["missing_image"]]
    assert missing.image_paths[1] in tree["missing_images"]
    assert not (tree["root"] / missing.image_paths[1]).exists() and (tree["root"] / missing.image_paths[0]).exists()


def test_patient_in_two_splits(tree):
    by_id, _, _ = build(tree)
    a, b = by_id[tree["cases"]["two_splits_train"]], by_id[tree["cases"]["two_splits_test"]]
    assert (a.split, b.split) == ("train", "test") and a.patient_id == b.patient_id == "16000606"


def test_sections_choice(tree):
    c = tree["cases"]
    imp, _, skips = build(tree, sections="impression")
    assert c["no_findings"] in imp and imp[c["no_findings"]].report == cleaned("No acute process.")
    assert imp[c["three_views"]].report == cleaned("Normal chest.")
    assert c["no_findings"] not in skips
    both, _, skips = build(tree, sections="findings_impression")
    assert both[c["three_views"]].report == cleaned("The lungs are clear. No pleural effusion or pneumothorax. "
                                                    "Normal chest.")
    assert both[c["no_findings"]].report == cleaned("No acute process.")
    assert both[c["no_findings"]].findings == ""


def test_r2gen_split(tree, tmp_path):
    ids = tree["ids"]
    moved, dropped = ids["train"][0], ids["train"][1]  # moved: train -> test; dropped: not in the file

    def entry(sid, split, with_study=True):
        subject = tree["subject"][sid]
        e = {"id": f"dcm-{sid}", "subject_id": int(subject), "report": "x", "split": split,
             "image_path": [f"p{subject[:2]}/p{subject}/{sid}/dcm.jpg"]}
        return {**e, "study_id": int(sid[1:])} if with_study else e

    ann = {"train": [entry(s, "train") for s in ids["train"][2:]] + [entry(ids["train"][2], "train")]
           + [entry(ids["val"][0], "train"), {"id": "dcm-absent", "study_id": 59999999, "image_path": []},
              {"id": "dcm-bad", "image_path": ["nowhere.jpg"]}],
           "val": [entry(s, "val", with_study=False) for s in ids["val"]],  # study from image_path
           "test": [entry(s, "test") for s in ids["test"]] + [entry(moved, "test")]}
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(ann))
    by_id, order, skips = build(tree, annotation=str(path))
    assert by_id[moved].split == "test" and dropped not in by_id
    assert {k: s.reason for k, s in skips.items() if s.reason not in tree["skips"].values()} == {
        dropped: "not_in_split_file", "s59999999": "not_in_release", "dcm-bad": "malformed_entry",
        ids["val"][0]: "split_conflict", **{s: "not_in_split_file" for s in tree["skips"]}}
    assert skips[ids["val"][0]].detail == "train, val"
    assert order == ids["train"][2:] + ids["val"][1:] + sorted(ids["test"] + [moved], key=lambda s: (
        int(tree["subject"][s]), int(s[1:])))


def test_zip_and_directory_forms_agree(tree, tmp_path):
    base = build(tree)
    as_files = build(tree, reports=tree["reports_dir"] / "files")
    as_zip = build(tree, reports=tree["reports_zip"])
    nested = build(tree, reports=zip_dir(tree["reports_dir"], tmp_path / "r.zip", prefix="mimic-cxr-reports/"))
    for other in (as_files, as_zip, nested):
        assert repr(list(other[0].values())) == repr(list(base[0].values()))
        assert {k: (s.reason, s.detail) for k, s in other[2].items()} == {k: (s.reason, s.detail)
                                                                           for k, s in base[2].items()}


def test_uncompressed_csv_is_read(tree, tmp_path):
    root = tmp_path / "jpg"
    shutil.copytree(tree["root"], root, ignore=shutil.ignore_patterns("files"))
    split = root / mimic_cxr.SPLIT_CSV
    (root / split.name.removesuffix(".gz")).write_bytes(gzip.decompress(split.read_bytes()))
    split.unlink()
    assert build({**tree, "root": root})[1] == build(tree)[1]


def test_synthetic_tree(tmp_path):
    t = synthetic_mimic_tree(tmp_path, 300, 32, seed=1, views=3)
    studies, skips = mimic_cxr.build(Data(dataset="mimic_cxr", annotation=None, root=str(t["root"]),
                                          reports=str(t["reports"]), max_views=3))
    assert not skips and len(studies) == 300 and t["n_images"] == 900
    assert {sp: sum(s.split == sp for s in studies) for sp in ("train", "val", "test")} == t["splits"]
    assert all(s.views == ["PA", "AP", "LATERAL"] for s in studies)
    assert (t["root"] / studies[0].image_paths[0]).stat().st_size > 0


# ---------------------------------------------------------------------------------------- bad input

@pytest.fixture()
def fresh(tmp_path) -> dict:
    return make_mimic_tree(tmp_path, image_size=32)


def _rewrite_gz(path: Path, edit) -> None:
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes()).decode()).encode()))


def _insert_line(text: str, lineno: int, row: str) -> str:
    lines = text.split("\n")
    return "\n".join(lines[:lineno - 1] + [row] + lines[lineno - 1:])


def test_missing_column_is_named(fresh):
    meta = fresh["root"] / mimic_cxr.METADATA_CSV
    _rewrite_gz(meta, lambda t: t.replace("ViewPosition", "View", 1))
    with pytest.raises(ValueError, match=r"mimic-cxr-2\.0\.0-metadata\.csv\.gz.*ViewPosition"):
        build(fresh)


def test_missing_label_column_is_named(fresh):
    _rewrite_gz(fresh["root"] / mimic_cxr.CHEXPERT_CSV, lambda t: t.replace("Pleural Other", "Pleural_Other", 1))
    with pytest.raises(ValueError, match=r"chexpert\.csv\.gz.*Pleural Other"):
        build(fresh)


def test_corrupt_and_truncated_gzip(fresh):
    split = fresh["root"] / mimic_cxr.SPLIT_CSV
    good = split.read_bytes()
    split.write_bytes(b"this is not gzip data at all")
    with pytest.raises(ValueError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz: cannot read"):
        build(fresh)
    split.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"mimic-cxr-2\.0\.0-split\.csv\.gz"):
        build(fresh)


def test_malformed_rows_name_the_line(fresh):
    split = fresh["root"] / mimic_cxr.SPLIT_CSV
    good = split.read_bytes()
    _rewrite_gz(split, lambda t: _insert_line(t, 3, "x,1,2,train,extra"))  # one field too many
    with pytest.raises(ValueError, match=r"split\.csv\.gz: malformed CSV.*line 3"):
        build(fresh)
    split.write_bytes(good)
    _rewrite_gz(split, lambda t: _insert_line(t, 2, "abc,123"))  # a short row
    with pytest.raises(ValueError, match=r"split\.csv\.gz line 2: column 'subject_id'"):
        build(fresh)
    split.write_bytes(good)
    _rewrite_gz(split, lambda t: t.replace(",validate\n", ",valid\n", 1))
    with pytest.raises(ValueError, match=r"split\.csv\.gz line \d+: split 'valid'"):
        build(fresh)
    split.write_bytes(good)
    _rewrite_gz(fresh["root"] / mimic_cxr.CHEXPERT_CSV, lambda t: t.replace(",1.0,", ",2.0,", 1))
    with pytest.raises(ValueError, match=r"chexpert\.csv\.gz line 2: .* is 2\.0"):
        build(fresh)


def test_bad_reports_paths_and_missing_files(fresh, tmp_path):
    not_zip = tmp_path / "mimic-cxr-reports-bad.zip"
    not_zip.write_text("not a zip")
    with pytest.raises(ValueError, match="not a readable zip"):
        build(fresh, reports=not_zip)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no files/pNN/"):
        build(fresh, reports=empty)
    with pytest.raises(FileNotFoundError, match="reports not found"):
        build(fresh, reports=tmp_path / "nowhere")
    (fresh["root"] / mimic_cxr.CHEXPERT_CSV).unlink()
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-chexpert\.csv\.gz not found"):
        build(fresh)
