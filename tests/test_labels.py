"""Tests of amrg.labels: the rule-based CheXpert-14 labeler, its sentence splitter and the public API."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from amrg.labels import CHEXPERT_14, LABELERS, count_empty, label, rules, split_sentences

NAN = math.nan
POS, NEG, UNC = 1.0, 0.0, -1.0
COL = {name: i for i, name in enumerate(CHEXPERT_14)}
REPO = Path(__file__).resolve().parents[1]


def row(text: str) -> dict[str, float]:
    return dict(zip(CHEXPERT_14, label([text])[0].tolist()))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# (text, {observation: expected}) -- 1 positive, 0 negative, -1 uncertain, NaN not mentioned
CASES = [
    # negation
    ("Heart size is normal.", {"Cardiomegaly": NEG, "Pleural Effusion": NAN}),
    ("The heart is normal in size.", {"Cardiomegaly": NEG}),
    ("Normal heart size.", {"Cardiomegaly": NEG}),
    ("The heart is not enlarged.", {"Cardiomegaly": NEG}),
    ("No pneumothorax or pleural effusion.", {"Pneumothorax": NEG, "Pleural Effusion": NEG, "Edema": NAN}),
    ("No focal airspace consolidation, pleural effusion or pneumothorax.",
     {"Consolidation": NEG, "Pleural Effusion": NEG, "Pneumothorax": NEG}),
    ("no focal consolidation pleural effusion or pneumothorax", {"Consolidation": NEG, "Pleural Effusion": NEG,
                                                                  "Pneumothorax": NEG}),  # R2Gen-cleaned text
    ("No XXXX of pleural effusion.", {"Pleural Effusion": NEG}),
    ("The lungs are free of focal airspace disease.", {"Lung Opacity": NEG, "Consolidation": NEG}),
    ("Negative for pneumothorax.", {"Pneumothorax": NEG}),
    ("The lungs are grossly clear of focal airspace disease, pneumothorax, or pleural effusion.",
     {"Pneumothorax": NEG, "Pleural Effusion": NEG, "Consolidation": NEG}),
    ("The lungs are normally inflated without evidence of focal airspace disease, pleural effusion, or pneumothorax.",
     {"Pneumothorax": NEG, "Pleural Effusion": NEG}),
    ("Pneumothorax is not seen.", {"Pneumothorax": NEG}),
    ("The previously seen right pleural effusion has resolved.", {"Pleural Effusion": NEG}),
    ("No suspicious pulmonary mass or nodule is identified.", {"Lung Lesion": NEG}),
    ("There is no focal air space opacity to suggest a pneumonia.", {"Lung Opacity": NEG, "Pneumonia": NEG}),
    ("No pneumonia, effusions, edema, pneumothorax, adenopathy, nodules or masses.",
     {"Pneumonia": NEG, "Pleural Effusion": NEG, "Edema": NEG, "Pneumothorax": NEG, "Lung Lesion": NEG}),
    ("Heart size and mediastinal contour are within normal limits.",
     {"Cardiomegaly": NEG, "Enlarged Cardiomediastinum": NEG}),
    ("There is no mediastinal widening.", {"Enlarged Cardiomediastinum": NEG}),
    ("Pulmonary vascularity is within normal limits.", {"Edema": NEG}),
    ("No acute, displaced rib fractures.", {"Fracture": NEG}),
    ("The costophrenic angles are sharp.", {"Pleural Effusion": NEG}),
    ("The endotracheal tube has been removed.", {"Support Devices": NEG}),
    # positive
    ("Mild cardiomegaly.", {"Cardiomegaly": POS}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": POS}),
    ("Enlarged cardiac silhouette.", {"Cardiomegaly": POS}),
    ("Heart size is enlarged.", {"Cardiomegaly": POS}),
    ("The cardiomediastinal silhouette is enlarged.", {"Enlarged Cardiomediastinum": POS}),
    ("There is a small left pleural effusion.", {"Pleural Effusion": POS, "Pneumothorax": NAN}),
    ("Blunting of the right costophrenic angle.", {"Pleural Effusion": POS}),
    ("There is a small right apical pneumothorax.", {"Pneumothorax": POS}),
    ("Bibasilar subsegmental atelectasis.", {"Atelectasis": POS}),
    ("There is patchy airspace disease in the right lower lobe.", {"Consolidation": POS, "Lung Opacity": POS}),
    ("Right lower lobe consolidation.", {"Consolidation": POS}),
    ("Mild interstitial edema.", {"Edema": POS}),
    ("Mild pulmonary vascular congestion.", {"Edema": POS}),
    ("There is a right lower lobe pneumonia.", {"Pneumonia": POS}),
    ("There is a 9 mm right lower lobe pulmonary nodule, not seen on prior exams.", {"Lung Lesion": POS}),
    ("Old healed right rib fractures.", {"Fracture": POS}),
    ("Biapical pleural thickening.", {"Pleural Other": POS}),
    ("There is biapical scarring.", {"Lung Opacity": POS}),
    ("Left-sided pacemaker with leads in the right atrium and ventricle.", {"Support Devices": POS}),
    ("Median sternotomy wires are intact.", {"Support Devices": POS}),
    ("Right PICC line tip in the SVC.", {"Support Devices": POS}),
    ("No change in the small left effusion.", {"Pleural Effusion": POS}),
    # uncertain
    ("May represent atelectasis.", {"Atelectasis": UNC}),
    ("Streaky opacity in the left base which may represent atelectasis.", {"Lung Opacity": POS, "Atelectasis": UNC}),
    ("Possible small left pleural effusion.", {"Pleural Effusion": UNC}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": UNC}),
    ("Cannot exclude a small pneumothorax.", {"Pneumothorax": UNC}),
    ("Left basilar opacity, likely atelectasis.", {"Lung Opacity": POS, "Atelectasis": UNC}),
    ("Atelectasis versus pneumonia in the left base.", {"Atelectasis": UNC, "Pneumonia": UNC}),
    ("Findings are suspicious for pneumonia.", {"Pneumonia": UNC}),
    ("Opacity concerning for pneumonia.", {"Pneumonia": UNC, "Lung Opacity": POS}),
    ("Questionable small right midlung nodule.", {"Lung Lesion": UNC}),
    ("Heart size is upper limits of normal.", {"Cardiomegaly": UNC}),
    ("Heart size XXXX borderline enlarged.", {"Cardiomegaly": UNC}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": UNC}),
    ("Bilateral interstitial prominence.", {"Edema": UNC}),
    ("No evidence of pneumonia, may represent atelectasis.", {"Pneumonia": NEG, "Atelectasis": UNC}),
    ("Additional fractures cannot entirely be excluded.", {"Fracture": UNC}),
    # not mentioned / conventions
    ("The lungs are clear.", {name: NAN for name in CHEXPERT_14 if name != "No Finding"}),
    ("Heart size is stable.", {"Cardiomegaly": NAN}),
    ("Calcified granuloma in the right upper lobe.", {"Lung Lesion": NAN, "No Finding": NAN}),
    ("Scattered calcified pulmonary nodules.", {"Lung Lesion": NAN}),
    ("Cardiomegaly and/or pericardial effusion.", {"Cardiomegaly": POS, "Pleural Effusion": NAN}),
    ("There are residuals of prior granulomatous infection.", {"Pneumonia": NAN}),
    ("Degenerative changes of the thoracic spine.", {"Fracture": NAN, "No Finding": NAN}),
]


@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:50] for c in CASES])
def test_hand_labelled_sentences(text, expected):
    got = row(text)
    bad = {k: (got[k], v) for k, v in expected.items() if not same(got[k], v)}
    assert not bad, f"{text!r}: (got, expected) {bad}"


# ------------------------------------------------------------------------------ aggregation, No Finding
def test_positive_beats_uncertain_beats_negative():
    r = row("No pleural effusion. Possible small left pleural effusion. Small left pleural effusion.")
    assert r["Pleural Effusion"] == POS
    r = row("No pleural effusion. Possible small left pleural effusion.")
    assert r["Pleural Effusion"] == UNC
    r = row("Possible small left pleural effusion. No pleural effusion.")
    assert r["Pleural Effusion"] == UNC
    r = row("No pleural effusion. There is no pleural effusion or pneumothorax.")
    assert r["Pleural Effusion"] == NEG


def test_no_finding_derivation():
    normal = "Heart size is normal. The lungs are clear. No pneumothorax or pleural effusion."
    assert row(normal)["No Finding"] == POS
    assert row("The lungs are clear.")["No Finding"] == POS  # nothing mentioned still counts as no finding
    assert math.isnan(row(normal + " Mild cardiomegaly.")["No Finding"])
    assert math.isnan(row(normal + " Possible atelectasis.")["No Finding"])  # uncertain also blocks
    r = row(normal + " Right PICC line tip in the SVC.")  # support devices do not block
    assert r["No Finding"] == POS and r["Support Devices"] == POS
    assert math.isnan(row(normal + " Calcified granuloma.")["No Finding"])  # other findings block
    assert math.isnan(row(normal + " Degenerative changes of the spine.")["No Finding"])
    assert row(normal + " No hyperinflation.")["No Finding"] == POS
    # No Finding is never 0 or -1
    arr = label([normal, "Cardiomegaly.", "Possible effusion.", "", "Lungs clear."])
    assert set(np.unique(arr[:, COL["No Finding"]][~np.isnan(arr[:, COL["No Finding"]])])) == {1.0}


def test_empty_reports_give_nan_rows_and_are_counted():
    reports = ["", "   ", "\n\n", "...", "Heart size is normal."]
    arr = label(reports)
    assert np.isnan(arr[:4]).all()
    assert not np.isnan(arr[4]).all()
    assert count_empty(reports) == 4
    assert rules.count_empty([]) == 0


def test_output_dtype_shape_and_values():
    reports = ["Heart size is normal.", "Mild cardiomegaly. Possible effusion.", "", "No pneumothorax."]
    arr = label(reports)
    assert arr.dtype == np.float32 and arr.shape == (4, 14)
    vals = arr[~np.isnan(arr)]
    assert set(np.unique(vals)).issubset({-1.0, 0.0, 1.0})
    assert label([]).shape == (0, 14) and label([]).dtype == np.float32
    assert label(r for r in reports).shape == (4, 14)  # any iterable of strings
    np.testing.assert_array_equal(label(reports, labeler="rules"), arr)
    assert len(CHEXPERT_14) == 14 and CHEXPERT_14[0] == "No Finding"


def test_type_errors():
    with pytest.raises(TypeError, match=r"reports\[1\].*int"):
        label(["ok", 3])
    with pytest.raises(TypeError, match=r"reports\[2\].*NoneType"):
        label(["a", "b", None])
    with pytest.raises(TypeError, match="sequence of strings"):
        label("Heart size is normal.")
    with pytest.raises(TypeError):
        split_sentences(None)


def test_unknown_labeler():
    with pytest.raises(ValueError, match=r"unknown labeler 'nope'"):
        label(["x"], labeler="nope")
    with pytest.raises(ValueError, match=r"needs chexbert_checkpoint"):
        label(["x"], labeler="chexbert")
    assert {"rules", "chexbert"} <= set(LABELERS)


# ------------------------------------------------------------------------------ sentence splitting
@pytest.mark.parametrize("text,expected", [
    ("The lungs are clear. No pneumothorax.", ["The lungs are clear.", "No pneumothorax."]),
    ("Heart size normal.Lungs clear.", ["Heart size normal.", "Lungs clear."]),  # missing space
    ("Nodule 2.5cm in size.", ["Nodule 2.5cm in size."]),
    ("A 2.5 cm nodule. Heart is normal.", ["A 2.5 cm nodule.", "Heart is normal."]),
    ("Findings, e.g. atelectasis, are minimal. No effusion.", ["Findings, e.g. atelectasis, are minimal.",
                                                               "No effusion."]),
    ("Nodule measuring approx. 7 mm. No effusion.", ["Nodule measuring approx. 7 mm.", "No effusion."]),
    ("Atelectasis vs. scarring. Dr. XXXX was notified.", ["Atelectasis vs. scarring.", "Dr. XXXX was notified."]),
    ("1. Cardiomegaly. 2. Small effusion. 3. No pneumothorax.", ["Cardiomegaly.", "Small effusion.",
                                                                 "No pneumothorax."]),
    ("No XXXX of pleural effusion. Normal XXXX.", ["No XXXX of pleural effusion.", "Normal XXXX."]),
    ("Fracture of right rib 4. The lungs are clear.", ["Fracture of right rib 4.", "The lungs are clear."]),
    ("the heart is normal . the lungs are clear .", ["the heart is normal .", "the lungs are clear ."]),
    ("FINDINGS: Lungs are clear.\n\nIMPRESSION: No acute\ndisease", ["Lungs are clear.", "No acute disease"]),
    ("Is there effusion? No!  Lungs   clear..", ["Is there effusion?", "No!", "Lungs clear.."]),
    ("The previously<BR>described deformity.", ["The previously described deformity."]),
    ("", []),
    ("  . . ", []),
])
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


# ------------------------------------------------------------------------------ real data (IU X-Ray)
IU_ANNOTATION = REPO / "data" / "iu_xray" / "annotation.json"


def test_iu_xray_frequencies():
    """Label frequencies over all IU X-Ray reports fall in plausible ranges (labelling speed: bench/)."""
    data = json.loads(IU_ANNOTATION.read_text())
    reports = [e["report"] for split in ("train", "val", "test") for e in data[split]]
    assert len(reports) == 2955
    arr = label(reports)
    n = len(reports)
    print(f"\nlabelled {n} IU X-Ray reports; empty: {count_empty(reports)}")
    print(f"{'observation':28s} {'pos':>5s} {'unc':>5s} {'neg':>5s} {'nan':>5s}")
    counts = {}
    for j, name in enumerate(CHEXPERT_14):
        c = arr[:, j]
        counts[name] = (int((c == 1).sum()), int((c == -1).sum()), int((c == 0).sum()), int(np.isnan(c).sum()))
        print(f"{name:28s} {counts[name][0]:5d} {counts[name][1]:5d} {counts[name][2]:5d} {counts[name][3]:5d}")
    frac = {k: v[0] / n for k, v in counts.items()}
    assert 0.30 <= frac["No Finding"] <= 0.70
    assert 0.03 <= frac["Cardiomegaly"] <= 0.25
    assert 0.01 <= frac["Pleural Effusion"] <= 0.15
    assert frac["Pneumothorax"] < 0.02
    assert 0.02 <= frac["Support Devices"] <= 0.15
    assert counts["Pneumothorax"][2] / n > 0.5  # IU reports routinely negate pneumothorax and effusion
    assert counts["Pleural Effusion"][2] / n > 0.5
    assert counts["No Finding"][1] == counts["No Finding"][2] == 0
