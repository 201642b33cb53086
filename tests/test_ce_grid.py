"""Tests of the CE convention grid (amrg.metrics.ce.ce_grid) and the named conventions the field reports.

The grid is checked against fractions worked out by hand, against re-implementations of the scripts that
papers take their numbers from (R2Gen compute_ce.py, Miura et al.'s eval_prf.py, LLaVA-Rad rrg_eval,
f1chexbert, PromptMRG / RGRG example-based), and against convention mix-ups (uncertain mapping, label set).
"""

from __future__ import annotations

import csv
import re
import warnings
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    classification_report,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
)

from amrg.labels.schema import CHEXPERT_14, COMMON_5
from amrg.metrics.ce import (
    AVERAGINGS,
    GRID_CELLS,
    LABEL_SETS,
    NAMED_CONVENTIONS,
    ce_grid,
    ce_scores,
    conventions_table,
    grid_cell,
    named_conventions,
)

NAN = np.nan
from .test_metrics import _rows  # noqa: E402  (the same (N, 14) builder)
IDX = {n: CHEXPERT_14.index(n) for n in CHEXPERT_14}
NF, CARD, LO, ED, CONS, ATEL, PE, SD = (
    IDX[n] for n in ("No Finding", "Cardiomegaly", "Lung Opacity", "Edema", "Consolidation", "Atelectasis",
                     "Pleural Effusion", "Support Devices")
)




# ------------------------------------------------------------------------------------- hand example
# 4 studies; Card, Ed, Cons, Atel, PE are in COMMON_5, NF, LO, SD are not; the other 6 labels are blank.
REF = _rows([
    {CARD: 1, ED: -1, PE: 1, SD: 1},          # s1
    {NF: 1},                                  # s2
    {LO: 1, ATEL: 1, CONS: -1, PE: -1},       # s3
    {CARD: 0, ED: 0},                         # s4: negatives only
])
PRED = _rows([
    {CARD: 1, ED: 1, PE: 1, SD: 1, LO: 1},    # s1
    {NF: 1, ATEL: -1},                        # s2
    {LO: -1, ATEL: 1, CONS: 0, PE: 1, CARD: 1},  # s3
    {CARD: -1},                               # s4
])

# Binarised, uncertain -> NEGATIVE (U-):
#   s1 ref {Card, PE, SD}        pred {Card, Ed, PE, SD, LO}  TP 3 FP 2 FN 0
#   s2 ref {NF}                  pred {NF}                    TP 1 FP 0 FN 0
#   s3 ref {LO, Atel}            pred {Atel, PE, Card}        TP 1 FP 2 FN 1
#   s4 ref {}                    pred {}                      nothing -> P = R = F1 = 0
#   per label (TP FP FN): NF 1 0 0 | Card 1 1 0 | LO 0 1 1 | Ed 0 1 0 | Atel 1 0 0 | PE 1 1 0 | SD 1 0 0
#   P_l:  NF 1, Card 1/2, LO 0, Ed 0, Atel 1, PE 1/2, SD 1      (sum 4)
#   R_l:  NF 1, Card 1,   LO 0, Ed 0, Atel 1, PE 1,   SD 1      (sum 5)
#   F1_l: NF 1, Card 2/3, LO 0, Ed 0, Atel 1, PE 2/3, SD 1      (sum 13/3)
# Binarised, uncertain -> POSITIVE (U+):
#   s1 ref {Card, Ed, PE, SD}    pred {Card, Ed, PE, SD, LO}  TP 4 FP 1 FN 0
#   s2 ref {NF}                  pred {NF, Atel}              TP 1 FP 1 FN 0
#   s3 ref {LO, Atel, Cons, PE}  pred {LO, Atel, PE, Card}    TP 3 FP 1 FN 1
#   s4 ref {}                    pred {Card}                  TP 0 FP 1 FN 0
#   per label (TP FP FN): NF 1 0 0 | Card 1 2 0 | LO 1 1 0 | Ed 1 0 0 | Cons 0 0 1 | Atel 1 1 0 | PE 2 0 0 | SD 1 0 0
#   P_l:  NF 1, Card 1/3, LO 1/2, Ed 1, Cons 0, Atel 1/2, PE 1, SD 1   (sum 16/3)
#   R_l:  NF 1, Card 1,   LO 1,   Ed 1, Cons 0, Atel 1,   PE 1, SD 1   (sum 7)
#   F1_l: NF 1, Card 1/2, LO 2/3, Ed 1, Cons 0, Atel 2/3, PE 1, SD 1   (sum 35/6)
HAND: dict[str, tuple[F, F, F]] = {
    # all14, U-: micro TP 5 FP 4 FN 1 -> P 5/9, R 5/6, F1 10/15
    "all14.micro.uncertain_negative": (F(5, 9), F(5, 6), F(10, 15)),
    # all14, U+: micro TP 8 FP 4 FN 1 -> P 8/12, R 8/9, F1 16/21
    "all14.micro.uncertain_positive": (F(8, 12), F(8, 9), F(16, 21)),
    # macro = per-label sums / 14
    "all14.macro.uncertain_negative": (F(4, 14), F(5, 14), F(13, 3) / 14),
    "all14.macro.uncertain_positive": (F(16, 3) / 14, F(7, 14), F(35, 6) / 14),
    # example U-: s1 3/5, 1, 6/8 | s2 1, 1, 1 | s3 1/3, 1/2, 2/5 | s4 0, 0, 0 -> means over 4 studies
    "all14.example.uncertain_negative": ((F(3, 5) + 1 + F(1, 3)) / 4, (1 + 1 + F(1, 2)) / 4,
                                         (F(6, 8) + 1 + F(2, 5)) / 4),       # = 29/60, 5/8, 43/80
    # example U+: s1 4/5, 1, 8/9 | s2 1/2, 1, 2/3 | s3 3/4, 3/4, 6/8 | s4 0 (0/1), 0 (0/0), 0
    "all14.example.uncertain_positive": ((F(4, 5) + F(1, 2) + F(3, 4)) / 4, (1 + 1 + F(3, 4)) / 4,
                                         (F(8, 9) + F(2, 3) + F(6, 8)) / 4),  # = 41/80, 11/16, 83/144
    # common5 (Atel, Card, Cons, Ed, PE), U-: Card 1 1 0 | Cons 0 0 0 | Ed 0 1 0 | Atel 1 0 0 | PE 1 1 0
    #   micro TP 3 FP 3 FN 0 -> P 3/6, R 3/3, F1 6/9
    "common5.micro.uncertain_negative": (F(3, 6), F(3, 3), F(6, 9)),
    #   macro P (1/2 + 0 + 0 + 1 + 1/2)/5, R (1 + 0 + 0 + 1 + 1)/5, F1 (2/3 + 0 + 0 + 1 + 2/3)/5
    "common5.macro.uncertain_negative": (F(2, 5), F(3, 5), F(7, 3) / 5),
    #   example: s1 ref {Card, PE} pred {Card, Ed, PE} 2/3, 1, 4/5 | s2 none 0 | s3 ref {Atel} pred {Atel, PE, Card}
    #   1/3, 1, 2/4 | s4 none 0
    "common5.example.uncertain_negative": ((F(2, 3) + F(1, 3)) / 4, (1 + 1) / F(4), (F(4, 5) + F(2, 4)) / 4),
    # common5, U+: Card 1 2 0 | Cons 0 0 1 | Ed 1 0 0 | Atel 1 1 0 | PE 2 0 0
    #   micro TP 5 FP 3 FN 1 -> P 5/8, R 5/6, F1 10/14
    "common5.micro.uncertain_positive": (F(5, 8), F(5, 6), F(10, 14)),
    #   macro P (1/3 + 0 + 1 + 1/2 + 1)/5, R (1 + 0 + 1 + 1 + 1)/5, F1 (1/2 + 0 + 1 + 2/3 + 1)/5
    "common5.macro.uncertain_positive": (F(17, 6) / 5, F(4, 5), F(19, 6) / 5),
    #   example: s1 {Card, Ed, PE} both -> 1, 1, 1 | s2 ref {} pred {Atel} 0 | s3 ref {Atel, Cons, PE}
    #   pred {Atel, PE, Card} TP 2 FP 1 FN 1 -> 2/3, 2/3, 4/6 | s4 ref {} pred {Card} 0
    "common5.example.uncertain_positive": ((1 + F(2, 3)) / 4, (1 + F(2, 3)) / 4, (1 + F(4, 6)) / 4),
}


def _prf(cell_value):
    return (cell_value["precision"], cell_value["recall"], cell_value["f1"])


def _approx(fracs):
    return pytest.approx(tuple(float(x) for x in fracs), rel=1e-12, abs=1e-15)


def test_grid_hand_example_every_cell():
    g = ce_grid(PRED, REF)
    assert list(g) == list(GRID_CELLS) and set(HAND) == set(GRID_CELLS) and len(g) == 12
    for cell, fracs in HAND.items():
        assert _prf(g[cell]) == _approx(fracs), cell
        assert all(type(v) is float for v in g[cell].values()) and set(g[cell]) == {"precision", "recall", "f1"}


def test_grid_cells_equal_ce_scores():
    """Each cell is what ce_scores computes for that averaging / labels / uncertain mapping (one counting code)."""
    g = ce_grid(PRED, REF)
    for labels in LABEL_SETS:
        for unc in ("negative", "positive"):
            s = ce_scores(PRED, REF, uncertain_as=unc, labels=labels)
            for avg in AVERAGINGS:
                assert g[grid_cell(labels, avg, unc)] == s[avg]
    # the pipeline headline is the R2Gen cell
    s = ce_scores(PRED, REF)
    assert (s["precision"], s["recall"], s["f1"]) == _prf(g["all14.macro.uncertain_negative"])


def test_grid_cell_names_and_errors():
    assert grid_cell("common5", "micro", "positive") == "common5.micro.uncertain_positive"
    assert GRID_CELLS[0] == "all14.micro.uncertain_negative" and GRID_CELLS[-1] == "common5.example.uncertain_positive"
    for bad in (("all13", "micro", "negative"), ("all14", "samples", "negative"), ("all14", "micro", "ignore")):
        with pytest.raises(ValueError, match="unknown"):
            grid_cell(*bad)
    with pytest.raises(ValueError, match="same shape"):
        ce_grid(PRED, REF[:2])
    with pytest.raises(ValueError, match="outside"):
        ce_grid(PRED + 5, REF)


# ------------------------------------------------------------------------------------- named conventions
# the hand values of each named convention (a mix-up between names and cells changes these)
NAMED_HAND = {
    "r2gen_macro14": (F(4, 14), F(5, 14), F(13, 42)),
    "r2gen_micro14": (F(5, 9), F(5, 6), F(2, 3)),
    "llava_rad_micro5": (F(1, 2), F(1), F(2, 3)),
    "llava_rad_macro5": (F(2, 5), F(3, 5), F(7, 15)),
    "chexbert_micro5": (F(5, 8), F(5, 6), F(5, 7)),
    "chexbert_micro14": (F(2, 3), F(8, 9), F(16, 21)),
    "chexbert_macro14": (F(8, 21), F(1, 2), F(5, 12)),
    "chexbert_macro5": (F(17, 30), F(4, 5), F(19, 30)),
    "example14": (F(29, 60), F(5, 8), F(43, 80)),
}


def test_named_conventions_on_hand_example():
    named = named_conventions(ce_grid(PRED, REF))
    assert list(named) == list(NAMED_CONVENTIONS) == list(NAMED_HAND)
    for name, fracs in NAMED_HAND.items():
        assert _prf(named[name]) == _approx(fracs), name
        assert _prf(named[name]) == _approx(HAND[NAMED_CONVENTIONS[name]["cell"]]), name
    # the R2Gen headline comes first and is the pipeline's ce.{precision,recall,f1}
    assert next(iter(NAMED_CONVENTIONS)) == "r2gen_macro14"
    s = ce_scores(PRED, REF)
    assert _prf(named["r2gen_macro14"]) == (s["precision"], s["recall"], s["f1"])


def test_uncertain_mapping_mixup_is_caught():
    """'CheXbert micro-5' (Miura / RGRG / f1chexbert) counts uncertain as positive; LLaVA-Rad's unmarked
    Micro-F1-5 as negative. On the hand example the two differ in every one of P, R, F1."""
    named = named_conventions(ce_grid(PRED, REF))
    pos, neg = _prf(named["chexbert_micro5"]), _prf(named["llava_rad_micro5"])
    assert pos == _approx((F(5, 8), F(5, 6), F(5, 7)))
    assert neg == _approx((F(1, 2), F(1), F(2, 3)))
    assert all(abs(a - b) > 0.04 for a, b in zip(pos, neg))
    # swapping the uncertain mapping of any named cell changes its value on this example
    g = ce_grid(PRED, REF)
    for name, conv in NAMED_CONVENTIONS.items():
        cell = conv["cell"]
        flipped = cell.replace("negative", "POS").replace("positive", "negative").replace("POS", "positive")
        assert _prf(g[flipped]) != _prf(g[cell]), name
    # and ce_scores(uncertain_as="positive", labels="common5") micro is the CheXbert micro-5
    s = ce_scores(PRED, REF, uncertain_as="positive", labels="common5")
    assert _prf(s["micro"]) == pos


def test_named_conventions_entries_are_consistent():
    cells = [c["cell"] for c in NAMED_CONVENTIONS.values()]
    assert len(set(cells)) == len(cells), "two names for one cell"
    source = re.compile(r"^(?:[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+|PyPI:[A-Za-z0-9_.-]+==[0-9.]+):[^\s:]+$")
    for name, c in NAMED_CONVENTIONS.items():
        assert set(c) >= {"cell", "definition", "used_by", "sources"}, name
        assert c["cell"] in GRID_CELLS, name
        labels, avg, unc = c["cell"].split(".")
        d = c["definition"]
        assert "\n" not in d and d == d.strip(), name
        # the definition states the cell's uncertain mapping, label count and averaging, and nothing else
        if unc == "uncertain_positive":
            assert "uncertain (-1) -> positive" in d and "uncertain (-1) -> negative" not in d, name
        else:
            assert "uncertain (-1) -> negative" in d and "-> positive" not in d, name
        assert (" 14 " in d) == (labels == "all14") and (" 5 " in d) == (labels == "common5"), name
        assert {"micro": "micro", "macro": "mean over the", "example": "mean over the studies"}[avg] in d, name
        if avg == "macro":
            assert "per-label" in d and "studies" not in d, name
        if avg == "micro":
            assert "mean over" not in d, name
        assert c["used_by"] and all(isinstance(u, str) and u for u in c["used_by"]), name
        assert c["sources"] and all(source.match(s) for s in c["sources"]), (name, c["sources"])
    # the peers whose code was read, where the brief says they belong
    assert "zhjohnchan/R2Gen:compute_ce.py" in NAMED_CONVENTIONS["r2gen_macro14"]["sources"]
    assert "ysmiura/ifcc:eval_prf.py" in NAMED_CONVENTIONS["chexbert_micro5"]["sources"]
    assert any(s.startswith("ttanida/rgrg:") for s in NAMED_CONVENTIONS["chexbert_micro5"]["sources"])
    assert any(s.startswith("PyPI:f1chexbert") for s in NAMED_CONVENTIONS["chexbert_micro5"]["sources"])
    assert any(s.startswith("microsoft/LLaVA-Rad:") for s in NAMED_CONVENTIONS["llava_rad_micro5"]["sources"])


def test_named_conventions_needs_the_cells():
    g = ce_grid(PRED, REF)
    del g["common5.micro.uncertain_positive"]
    with pytest.raises(KeyError, match="common5.micro.uncertain_positive"):
        named_conventions(g)


def test_docs_table_matches_named_conventions():
    doc = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert conventions_table() in doc, "README's CE conventions table is stale: paste conventions_table() into it"
    assert conventions_table().count("\n") == len(NAMED_CONVENTIONS) + 2


# ------------------------------------------------------------------------------------- peers' scripts
def _random_pair(seed, n=200):
    """Seeded CheXpert-valued (pred, ref) with the zero-division cases R2Gen's sklearn calls warn about."""
    rng = np.random.default_rng(seed)
    vals = np.array([1.0, 0.0, -1.0, NAN])
    pred = rng.choice(vals, size=(n, 14), p=[0.2, 0.3, 0.1, 0.4])
    ref = rng.choice(vals, size=(n, 14), p=[0.15, 0.3, 0.1, 0.45])
    pred[:, IDX["Fracture"]] = rng.choice(vals[1:], size=n)        # never predicted positive (0 / -1 / blank)
    pred[:, IDX["Pleural Other"]] = NAN                             # a label nobody mentions ...
    ref[:, IDX["Pleural Other"]] = rng.choice([0.0, NAN], size=n)   # ... or only negates
    pred[:5], ref[3:8] = NAN, NAN                                   # studies with no positive at all
    return pred, ref


def _write_labeler_csv(path, labels, reports):
    """A CheXpert-labeler output file: "Reports" column, then the 14 labels (1.0 / 0.0 / -1.0 / blank)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Reports", *CHEXPERT_14])
        for text, row in zip(reports, labels):
            w.writerow([text, *("" if np.isnan(v) else f"{v:.1f}" for v in row)])


def _read_csv_like_pandas(path):
    """``pd.read_csv(path)`` for this file: the header, then numeric columns where blanks become NaN."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    values = np.array([[float(v) if v != "" else NAN for v in r[1:]] for r in body])
    return header, values


def _r2gen_compute_mlc_prf(gt, pred):
    """The P/R/F lines of zhjohnchan/R2Gen:modules/metrics.py::compute_mlc, sklearn defaults as called there
    (no zero_division argument: 'warn', which scores 0). Its per-label AUROC lines are not CE P/R/F1 (and raise
    on a label with one class only), so they are left out."""
    res = {}
    res["F1_MACRO"] = f1_score(gt, pred, average="macro")
    res["F1_MICRO"] = f1_score(gt, pred, average="micro")
    res["RECALL_MACRO"] = recall_score(gt, pred, average="macro")
    res["RECALL_MICRO"] = recall_score(gt, pred, average="micro")
    res["PRECISION_MACRO"] = precision_score(gt, pred, average="macro")
    res["PRECISION_MICRO"] = precision_score(gt, pred, average="micro")
    return res


def _r2gen_compute_ce(res_path, gts_path):
    """zhjohnchan/R2Gen:compute_ce.py main(), step by step, without pandas (not a project dependency)."""
    (res_header, res_data), (_, gts_data) = _read_csv_like_pandas(res_path), _read_csv_like_pandas(gts_path)
    res_data, gts_data = np.nan_to_num(res_data, nan=0.0), np.nan_to_num(gts_data, nan=0.0)  # .fillna(0)
    label_set = res_header[1:]                                   # res_data.columns[1:].tolist()
    res_data[res_data == -1] = 0
    gts_data[gts_data == -1] = 0
    return label_set, _r2gen_compute_mlc_prf(gts_data, res_data)  # compute_mlc(gts_data, res_data, label_set)


def test_r2gen_compute_ce_reimplementation_matches_the_named_cells(tmp_path):
    pred, ref = _random_pair(2020)
    reports = [f"report {i}, with a comma" for i in range(len(pred))]
    _write_labeler_csv(tmp_path / "res_labeled.csv", pred, reports)
    _write_labeler_csv(tmp_path / "gts_labeled.csv", ref, reports)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        label_set, r2gen = _r2gen_compute_ce(tmp_path / "res_labeled.csv", tmp_path / "gts_labeled.csv")
    assert label_set == list(CHEXPERT_14)
    # the zero-division paths were taken (Fracture never predicted, Pleural Other never positive)
    assert any(issubclass(w.category, UndefinedMetricWarning) for w in caught)
    named = named_conventions(ce_grid(pred, ref))
    assert _prf(named["r2gen_macro14"]) == pytest.approx(
        (r2gen["PRECISION_MACRO"], r2gen["RECALL_MACRO"], r2gen["F1_MACRO"]), abs=1e-12)
    assert _prf(named["r2gen_micro14"]) == pytest.approx(
        (r2gen["PRECISION_MICRO"], r2gen["RECALL_MICRO"], r2gen["F1_MICRO"]), abs=1e-12)
    # and the pipeline headline (ce_scores defaults) is R2Gen's macro
    s = ce_scores(pred, ref)
    assert (s["precision"], s["recall"], s["f1"]) == pytest.approx(
        (r2gen["PRECISION_MACRO"], r2gen["RECALL_MACRO"], r2gen["F1_MACRO"]), abs=1e-12)
    # R2Gen's macro and micro really differ here, so a macro/micro mix-up would show
    assert abs(r2gen["F1_MACRO"] - r2gen["F1_MICRO"]) > 0.02


def test_r2gen_compute_ce_with_pandas_itself(tmp_path):
    pd = pytest.importorskip("pandas")
    pred, ref = _random_pair(7)
    _write_labeler_csv(tmp_path / "res.csv", pred, ["r"] * len(pred))
    _write_labeler_csv(tmp_path / "gts.csv", ref, ["r"] * len(ref))
    res_data, gts_data = pd.read_csv(tmp_path / "res.csv"), pd.read_csv(tmp_path / "gts.csv")
    res_data, gts_data = res_data.fillna(0), gts_data.fillna(0)
    res_data, gts_data = res_data.iloc[:, 1:].to_numpy(), gts_data.iloc[:, 1:].to_numpy()
    res_data[res_data == -1] = 0
    gts_data[gts_data == -1] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        r2gen = _r2gen_compute_mlc_prf(gts_data, res_data)
    g = ce_grid(pred, ref)
    assert _prf(g["all14.macro.uncertain_negative"]) == pytest.approx(
        (r2gen["PRECISION_MACRO"], r2gen["RECALL_MACRO"], r2gen["F1_MACRO"]), abs=1e-12)


# CheXbert's raw classes, as the CheXbert-based scripts see them: 0 blank, 1 positive, 2 negative, 3 uncertain
def _chexbert_classes(a):
    return np.select([np.isnan(a), a == 1, a == 0, a == -1], [0, 1, 2, 3]).astype(int)


def test_miura_eval_prf_5_micro():
    """ysmiura/ifcc:eval_prf.py without --uncertain: generated 3 -> 1 and 2 -> 0; reference (CheXpert CSV
    strings) '-1.0' -> 1, '1.0' -> 1, '0.0' or '' -> 0; the 5 labels' lists concatenated, binary P/R/F."""
    pred, ref = _random_pair(11)
    gen = _chexbert_classes(pred)
    trues5, preds5 = [], []
    for c in ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]:
        j = IDX[c]
        preds5 += [1 if v == 3 else 0 if v == 2 else int(v) for v in gen[:, j]]
        ref_str = ["" if np.isnan(v) else f"{v:.1f}" for v in ref[:, j]]
        trues5 += [1 if v in ("-1.0", "1.0") else 0 for v in ref_str]
    # eval_prf.py passes labels=pos (= 1) too; sklearn ignores labels for average="binary" and now rejects a
    # scalar there, so it is left out (pos_label=1 is the default)
    p, r, f, _ = precision_recall_fscore_support(trues5, preds5, average="binary")
    named = named_conventions(ce_grid(pred, ref))
    assert _prf(named["chexbert_micro5"]) == pytest.approx((p, r, f), abs=1e-12)


def test_rgrg_micro_and_example():
    """ttanida/rgrg evaluate_language_model.py: micro (Miura: 2 -> 0, 3 -> 1) over 5 and 14 conditions;
    example-based over 14 with only class 1 positive, NaN ratios -> 0."""
    pred, ref = _random_pair(12)
    gen, gold = _chexbert_classes(pred).T.tolist(), _chexbert_classes(ref).T.tolist()  # (14, N) like label()
    conv = lambda rows: [[0 if v == 2 else 1 if v == 3 else v for v in row] for row in rows]  # noqa: E731
    g5, r5, g14, r14 = [], [], [], []
    for gc, rc, j in zip(conv(gen), conv(gold), range(14)):
        if CHEXPERT_14[j] in COMMON_5:
            g5 += gc
            r5 += rc
        g14 += gc
        r14 += rc
    named = named_conventions(ce_grid(pred, ref))
    assert _prf(named["chexbert_micro5"]) == pytest.approx(
        precision_recall_fscore_support(r5, g5, average="binary")[:3], abs=1e-12)
    assert _prf(named["chexbert_micro14"]) == pytest.approx(
        precision_recall_fscore_support(r14, g14, average="binary")[:3], abs=1e-12)
    gp, gr = np.array(gen) == 1, np.array(gold) == 1
    tp, fp, fn = (gp & gr).sum(0), (gp & ~gr).sum(0), (~gp & gr).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ex = [np.nan_to_num(x).mean() for x in (tp / (tp + fp), tp / (tp + fn), 2 * tp / (2 * tp + fp + fn))]
    assert _prf(named["example14"]) == pytest.approx(ex, abs=1e-12)


def test_llava_rad_rrg_eval_and_f1chexbert():
    """microsoft/LLaVA-Rad rrg_eval: map_to_binary 'rrg' (uncertain -> 0) / 'rrg+' (uncertain -> 1), sklearn
    classification_report(zero_division=0) micro / macro avg over 14 and 5; f1chexbert 0.0.2 'rrg' mode is
    'rrg+' with the sklearn default zero_division."""
    pred, ref = _random_pair(13)
    gen, gold = _chexbert_classes(pred), _chexbert_classes(ref)
    rrg = {"rrg": {0: 0, 2: 0, 3: 0, 1: 1}, "rrg+": {0: 0, 2: 0, 3: 1, 1: 1}}
    five = [j for j, n in enumerate(CHEXPERT_14) if n in COMMON_5]
    named = named_conventions(ce_grid(pred, ref))
    expected = {("rrg", 14): ("r2gen_micro14", "r2gen_macro14"),
                ("rrg", 5): ("llava_rad_micro5", "llava_rad_macro5"),
                ("rrg+", 14): ("chexbert_micro14", "chexbert_macro14"),
                ("rrg+", 5): ("chexbert_micro5", "chexbert_macro5")}
    for (mode, n), (micro_name, macro_name) in expected.items():
        yp, yt = np.vectorize(rrg[mode].get)(gen), np.vectorize(rrg[mode].get)(gold)
        if n == 5:
            yp, yt = yp[:, five], yt[:, five]
        names = [CHEXPERT_14[j] for j in (five if n == 5 else range(14))]
        cr = classification_report(yt, yp, target_names=names, output_dict=True, zero_division=0)
        for avg, name in (("micro avg", micro_name), ("macro avg", macro_name)):
            want = (cr[avg]["precision"], cr[avg]["recall"], cr[avg]["f1-score"])
            assert _prf(named[name]) == pytest.approx(want, abs=1e-12), (mode, n, avg)
        if mode == "rrg+":  # f1chexbert: same mapping, classification_report without zero_division
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UndefinedMetricWarning)
                cr_default = classification_report(yt, yp, target_names=names, output_dict=True)
            assert cr_default["micro avg"] == cr["micro avg"] and cr_default["macro avg"] == cr["macro avg"]


def test_promptmrg_example_based():
    """jhb86253817/PromptMRG modules/metrics_clinical.py: == 1 positive (uncertain and blank negative), per-study
    ratios with nan_to_num, F1 = tp / (tp + (fp + fn) / 2), mean over studies."""
    pred, ref = _random_pair(14)
    res, gts = _chexbert_classes(pred) == 1, _chexbert_classes(ref) == 1
    tp, fp, fn = ((res * gts).astype(float), (res * ~gts).astype(float), (~res * gts).astype(float))
    tp_eg, fp_eg, fn_eg = tp.sum(1), fp.sum(1), fn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = (np.nan_to_num(tp_eg / (tp_eg + fp_eg)).mean(), np.nan_to_num(tp_eg / (tp_eg + fn_eg)).mean(),
                np.nan_to_num(tp_eg / (tp_eg + 0.5 * (fp_eg + fn_eg))).mean())
    assert _prf(named_conventions(ce_grid(pred, ref))["example14"]) == pytest.approx(want, abs=1e-12)


def test_grid_matches_sklearn_on_random_labels():
    pred, ref = _random_pair(99)
    g = ce_grid(pred, ref)
    for labels, names in LABEL_SETS.items():
        cols = [IDX[n] for n in names]
        for unc, u in (("negative", 0), ("positive", 1)):
            yp = np.where(np.isnan(pred), 0, np.where(pred == -1, u, pred)).astype(int)[:, cols]
            yr = np.where(np.isnan(ref), 0, np.where(ref == -1, u, ref)).astype(int)[:, cols]
            for avg, sk in (("micro", "micro"), ("macro", "macro"), ("example", "samples")):
                want = precision_recall_fscore_support(yr, yp, average=sk, zero_division=0)[:3]
                assert _prf(g[grid_cell(labels, avg, unc)]) == pytest.approx(want, abs=1e-12)
