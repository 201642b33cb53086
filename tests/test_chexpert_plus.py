"""The CheXpert Plus builder (amrg.data.chexpert_plus) against the hand-written expectations of a small
release written by tests/_fixtures_chexpert.py."""

from __future__ import annotations

import json
import logging
import math

import pytest

from amrg.config import Data
from amrg.data.chexpert_plus import build
from amrg.data.images import ImageError, decode_image
from amrg.labels.schema import CHEXPERT_14
from tests._fixtures_chexpert import CSV_NAME, make_chexpert_plus_tree

REPORTS = {  # cleaned by hand (mimic cleaner: newlines are spaces, digits and hyphens stay)
    "patient101/study1": "cardiac and mediastinal contours are within normal limits . the lungs are clear . "
                         "bony structures are intact .",
    "patient102/study1": "well circumscribed 11 mm right upper lobe nodule unchanged appearance from previous "
                         "examination 7 years ago . the trachea is midline . negative for pneumothorax pleural "
                         "effusion . the heart size is normal . redemonstrated syndesmophyte .",
    "patient104/study1": "the cardiomediastinal silhouette is normal in size and contour . there are a few xxxx "
                         "opacities in the lung bases bilaterally . no definitive pneumothorax or pleural effusion "
                         ". displaced fracture of the mid one-third of the right clavicle .",
}


def _labels(**values: float) -> tuple:
    return tuple(values.get(name.replace(" ", "_"), math.nan) for name in CHEXPERT_14)


def _same_labels(a, b) -> bool:
    return a is not None and b is not None and all((x == y) or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def _data(tree: dict, **kw) -> Data:
    return Data(**{"dataset": "chexpert_plus", "root": str(tree["root"]), "annotation": None, **kw})


def _by_id(studies) -> dict:
    return {s.id: s for s in studies}


@pytest.fixture
def tree(tmp_path):
    return make_chexpert_plus_tree(tmp_path / "chexpert_plus")


def test_official_split(tree, caplog):
    caplog.set_level(logging.WARNING, "amrg.data.chexpert_plus")
    studies, skips = build(_data(tree))
    got = _by_id(studies)
    assert [s.id for s in studies] == ["patient101/study1", "patient101/study2", "patient102/study1",
                                       "patient104/study1", "patient105/study1", "patient105/study2",
                                       "patient108/study1"]
    assert {s.id: s.split for s in studies} == tree["splits"]
    assert {k: got[k].views for k in tree["views"]} == tree["views"]
    for sid, stems in tree["files"].items():  # phantom images: the CSV's paths as given
        assert got[sid].image_paths == [s + ".jpg" for s in stems]
    for sid, report in REPORTS.items():
        assert got[sid].report == report
    assert got["patient101/study1"].findings.startswith("CARDIAC AND MEDIASTINAL CONTOURS ARE WITHIN NORMAL LIMITS.\n\n")
    assert got["patient101/study1"].impression == "The heart is normal in size."
    assert {s.patient_id for s in studies} == {"patient101", "patient102", "patient104", "patient105", "patient108"}
    assert {(k.id, k.reason) for k in skips} == tree["skips"]
    assert {k.detail for k in skips if k.reason == "path_outside_images_dir"} == {
        "../patient109/study1/view1_frontal.jpg", "/etc/patient110/study1/view1_frontal.jpg"}
    assert "patient105" in caplog.text and "more than one split" in caplog.text


def test_labels_from_chexbert_file(tree):
    got = _by_id(build(_data(tree))[0])
    # the frontal view comes first, so its record is the study's (Support Devices null -> NaN)
    assert _same_labels(got["patient101/study1"].labels, _labels(No_Finding=1.0, Cardiomegaly=0.0))
    assert _same_labels(got["patient102/study1"].labels, _labels(Lung_Lesion=1.0, Pleural_Effusion=0.0, Fracture=-1.0))
    assert got["patient101/study2"].labels is None  # no record
    # impression targets read impression_fixed.json, which this release lacks
    assert all(s.labels is None for s in build(_data(tree, sections="impression"))[0])


def test_bad_labels_file_names_its_line(tree):
    (tree["root"] / "chexbert_labels" / "findings_fixed.json").write_text(
        json.dumps({"path_to_image": "a.jpg", "Edema": 1.0}) + "\n" + json.dumps({"path_to_image": "b.jpg", "Edema": 2}))
    with pytest.raises(ValueError, match=r"findings_fixed\.json: line 2: .*'Edema' is 2"):
        build(_data(tree))


def test_views_cut_at_max_views(tree):
    got = _by_id(build(_data(tree, max_views=3))[0])
    assert got["patient101/study2"].views == ["PA", "AP", "LATERAL"]
    assert got["patient101/study2"].image_paths[-1] == "train/patient101/study2/view2_lateral.jpg"
    assert _by_id(build(_data(tree, max_views=1))[0])["patient104/study1"].views == ["PA"]


def test_jpg_release_files(tree):
    got = _by_id(build(_data(tree, images="files"))[0])  # image root: data.root
    assert got["patient101/study1"].image_paths == [s + ".jpg" for s in tree["files"]["patient101/study1"]]


def test_png_release_files(tmp_path):
    tree = make_chexpert_plus_tree(tmp_path / "cxp", png=True)
    studies, _ = build(_data(tree, images="files", images_dir=str(tree["images_dir"])))
    got = _by_id(studies)
    for sid, stems in tree["files"].items():  # the CSV says .jpg, the PNG release has .png
        assert got[sid].image_paths == [s + ".png" for s in stems]
    # neither file exists: kept as given, and preprocess counts it missing
    missing = got["patient108/study1"].image_paths
    assert missing == [tree["missing_image"]]
    with pytest.raises(ImageError) as e:
        decode_image(tree["images_dir"], missing[0], 32)
    assert e.value.reason == "missing_image"
    assert decode_image(tree["images_dir"], got["patient101/study1"].image_paths[0], 32).shape == (32, 32)


def test_sections_and_cleaner(tree):
    got = _by_id(build(_data(tree, sections="impression"))[0])
    assert got["patient103/study1"].report == "left lower lobe calcified granuloma ."  # no findings: fine here
    assert got["patient106/study1"].report == "cardiac and mediastinal contours are within normal limits ."
    assert got["patient106/study1"].findings == "Heart size normal\ufffd."  # not UTF-8: replaced, kept raw
    both = _by_id(build(_data(tree, sections="findings_impression"))[0])
    assert both["patient101/study1"].report == REPORTS["patient101/study1"] + " the heart is normal in size ."
    assert both["patient103/study1"].report == "left lower lobe calcified granuloma ."  # one part missing
    # the IU cleaner does not split on ".\n\n": the upper-case, one-sentence-per-line findings stay one sentence
    iu = _by_id(build(_data(tree, cleaner="iu"))[0])
    assert iu["patient101/study1"].report == ("cardiac and mediastinal contours are within normal limits the lungs "
                                              "are clear bony structures are intact .")


def test_annotation_split(tree, caplog):
    caplog.set_level(logging.WARNING, "amrg.data.chexpert_plus")
    studies, skips = build(_data(tree, annotation=str(tree["annotation"])))
    assert {s.id: s.split for s in studies} == tree["annotation_splits"]
    summary = [k for k in skips if k.reason == "not_in_annotation"]
    assert len(summary) == 1 and summary[0].id == f"<{len(tree['not_in_annotation'])} studies>"
    assert all(sid in summary[0].detail for sid in tree["not_in_annotation"])
    assert {(k.id, k.reason) for k in skips if k.reason.startswith("annotation")} == tree["annotation_skips"]
    assert "patient101" in caplog.text  # its studies are now in train and test


def test_annotation_split_conflict_and_no_split_column(tree):
    ann = json.loads(tree["annotation"].read_text())
    ann["val"].append({"id": "9", "report": "x", "image_path": ["train/patient101/study1/view1_frontal.png"]})
    tree["annotation"].write_text(json.dumps(ann))
    csv_path = tree["csv"]
    header, rest = csv_path.read_bytes().split(b"\n", 1)
    csv_path.write_bytes(header.replace(b",split", b",fold") + b"\n" + rest)
    studies, skips = build(_data(tree, annotation=str(tree["annotation"])))  # the CSV's split is not needed
    assert ("patient101/study1", "split_conflict") in {(k.id, k.reason) for k in skips}
    assert "patient101/study1" not in _by_id(studies)
    with pytest.raises(ValueError, match=rf"{CSV_NAME}: missing column 'split'"):
        build(_data(tree))


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=rf"CheXpert Plus table not found: .*{CSV_NAME}"):
        build(Data(dataset="chexpert_plus", root=str(tmp_path), annotation=None))
    tree = make_chexpert_plus_tree(tmp_path / "cxp")
    header, rest = tree["csv"].read_bytes().split(b"\n", 1)
    tree["csv"].write_bytes(header.replace(b"section_findings", b"findings") + b"\n" + rest)
    with pytest.raises(ValueError, match=rf"{CSV_NAME}: missing column 'section_findings'"):
        build(_data(tree))


def test_many_studies_fast(tmp_path):
    tree = make_chexpert_plus_tree(tmp_path / "cxp", image_size=16, n_extra=300)
    studies, skips = build(_data(tree, images="files"))
    got = _by_id(studies)
    assert all(got[sid].split == "train" and got[sid].views == ["PA"] for sid in tree["extra_ids"])
    assert len(studies) == 7 + 300 and {(k.id, k.reason) for k in skips} == tree["skips"]
