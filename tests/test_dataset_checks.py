"""amrg.data.checks: every number of check_dataset against hand-written expectations."""

from __future__ import annotations

import json
import logging

from amrg.config import Data
from amrg.data.checks import PUBLISHED_STUDIES, UNKNOWN_PATIENTS, check_dataset, log_checks
from amrg.data.schema import Skip, Study

NORMAL = "no acute cardiopulmonary abnormality ."


def _study(sid, split, report, patient="", n=2):
    return Study(sid, split, report, report, image_paths=[f"{sid}/{i}.png" for i in range(n)],
                 views=["PA", "LATERAL"][:n], patient_id=patient)


STUDIES = [
    _study("s1", "train", NORMAL, "p1"),
    _study("s2", "train", "heart is enlarged .", "p2", n=1),
    _study("s3", "train", "small left effusion .", "p3"),
    _study("s4", "val", "lungs are clear .", "p4", n=1),
    _study("s5", "test", NORMAL, "p1"),  # p1 in train and test, report shared with s1
    _study("s6", "test", "right upper lobe opacity .", "p5"),
    _study("s7", "test", "heart is enlarged .", "p6"),  # shared with s2
    _study("s8", "val", "mild edema .", "p3"),  # p3 in train and val
    _study("s9", "test", "pneumothorax .", ""),  # no patient id: not counted
]
SKIPS = [Skip("k1", "no_findings_section"), Skip("k2", "no_impression_section"), Skip("k3", "no_findings_section"),
         Skip("k4", "no_usable_view", "only LL"), Skip("k5", "no_readable_image", "truncated"),
         Skip("k6", "empty_report"), Skip("k7", "no_image_path")]
MIMIC = Data(dataset="mimic_cxr", annotation=None, root="r", reports="r")


def test_every_number():
    c = check_dataset(MIMIC, STUDIES, SKIPS, examples=5)
    assert c["studies"] == {"train": 3, "val": 2, "test": 4}
    assert c["images"] == {"train": 5, "val": 3, "test": 8} and c["images_from"] == "image_paths"
    assert c["patients_in_several_splits"] == {"count": 2, "patients_with_id": 6,
                                               "examples": {"p1": ["train", "test"], "p3": ["train", "val"]}}
    assert c["reports_shared_train_test"] == {"count": 2, "test_studies": 4, "fraction": 0.5,
                                              "examples": ["s5", "s7"]}
    assert c["without_section"] == {"count": 3, "examples": ["k1", "k2", "k3"],
                                    "by_reason": {"no_findings_section": 2, "no_impression_section": 1}}
    assert c["no_usable_view"] == {"count": 2, "examples": ["k4", "k5"],
                                   "by_reason": {"no_usable_view": 1, "no_readable_image": 1}}
    assert c["skipped_by_reason"] == {"no_findings_section": 2, "no_impression_section": 1, "no_usable_view": 1,
                                      "no_readable_image": 1, "empty_report": 1, "no_image_path": 1}
    json.dumps(c)


def test_examples_capped_and_decoded_images():
    c = check_dataset(MIMIC, STUDIES, SKIPS, n_images={"train": 4, "test": 7}, examples=1)
    assert c["images"] == {"train": 4, "val": 0, "test": 7} and c["images_from"] == "decoded"
    assert c["patients_in_several_splits"]["count"] == 2
    assert list(c["patients_in_several_splits"]["examples"]) == ["p1"]
    assert c["reports_shared_train_test"]["examples"] == ["s5"]
    assert c["without_section"]["examples"] == ["k1"] and c["no_usable_view"]["examples"] == ["k4"]


def test_iu_xray_published_and_no_patient_ids():
    studies = [_study(f"t{i}", "train", f"r{i}") for i in range(2069)] + \
              [_study(f"v{i}", "val", f"r{i}") for i in range(296)] + \
              [_study(f"e{i}", "test", f"e{i}") for i in range(590)]
    c = check_dataset(Data(dataset="iu_xray"), studies, [])
    pub = c["published"]
    assert pub["studies"] == {"train": 2069, "val": 296, "test": 590} and pub["applies"]
    assert pub["difference"] == {"train": 0, "val": 0, "test": 0}
    assert c["patients_in_several_splits"]["count"] == UNKNOWN_PATIENTS
    assert c["reports_shared_train_test"]["count"] == 0
    json.dumps(c)


def test_published_per_dataset():
    c = check_dataset(Data(dataset="mimic_cxr", annotation="a.json", root="r", reports="r"), STUDIES, [])
    assert c["published"]["split"] == "R2Gen MIMIC-CXR"
    # R2Gen's MIMIC-CXR file has one entry per image: its counts are compared with the images built
    assert c["published"]["studies"] is None and c["published"]["images"] == {"train": 270790, "val": 2130, "test": 3858}
    assert c["published"]["difference"] == {"train": 5 - 270790, "val": 3 - 2130, "test": 8 - 3858}
    cx = check_dataset(Data(dataset="chexpert_plus", annotation="a.json", root="r"), STUDIES, [])["published"]
    assert cx["studies"] == {"train": 40463, "val": 5780, "test": 11562}
    # the official MIMIC-CXR split counts every study, before section filtering: said in the note
    off = check_dataset(MIMIC, STUDIES, [])["published"]
    assert off["studies"] == {"train": 222758, "val": 1808, "test": 3269} and "section" in off["note"]
    # official CheXpert Plus: no confirmed counts, and it says so
    cp = check_dataset(Data(dataset="chexpert_plus", annotation=None, root="r"), STUDIES, [])["published"]
    assert cp["studies"] is None and cp["difference"] is None and "no confirmed" in cp["note"]
    tb = check_dataset(Data(dataset="table", annotation=None, table="t.csv"), STUDIES, [])["published"]
    assert tb["studies"] is None and "table" in tb["note"]
    assert all(e["studies"] is None or set(e["studies"]) == {"train", "val", "test"}
               for e in PUBLISHED_STUDIES.values())


def test_smoke_profile_comparison_does_not_apply():
    pub = check_dataset(Data(dataset="iu_xray", max_studies=8), STUDIES, [])["published"]
    assert not pub["applies"] and "does not apply" in pub["note"]
    assert pub["difference"] == {"train": 3 - 2069, "val": 2 - 296, "test": 4 - 590}  # still reported


def test_log_checks(caplog):
    log = logging.getLogger("amrg.test_checks")
    with caplog.at_level(logging.INFO, logger=log.name):
        log_checks(check_dataset(MIMIC, STUDIES, SKIPS), log)
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 4
    assert any("patients_in_several_splits: 2" in w and "p1" in w for w in warns)
    assert any("reports_shared_train_test: 2" in w and "50.0%" in w and "s5" in w for w in warns)
    assert any("without_section: 3" in w and "k1" in w for w in warns)
    assert any("no_usable_view: 2" in w and "k5" in w for w in warns)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "222758" in infos[0] and "difference" in infos[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=log.name):
        log_checks(check_dataset(Data(dataset="chexpert_plus", annotation=None, root="r"),
                                 [_study("a", "train", "x"), _study("b", "test", "y")], []), log)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "published: none" in caplog.records[0].getMessage()
