"""Tests of amrg.metrics: NLG scores (pycocoevalcap, R2Gen protocol) and clinical-efficacy scores."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from amrg.labels.schema import CHEXPERT_14, COMMON_5
from amrg.metrics import ce_scores, nlg_scores
from amrg.metrics import nlg as nlg_mod
from amrg.metrics.nlg import protocol

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")

# pycocoevalcap's BleuScorer adds these to every n-gram match count / guess count
TINY, SMALL = 1e-15, 1e-9


def bleu_by_hand(correct, guess, testlen, reflen):
    """BLEU_1..4 from clipped-match and guess counts summed over the corpus (pycocoevalcap's formula)."""
    ratio = (testlen + TINY) / (reflen + SMALL)
    bp = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    out, prod = [], 1.0
    for k in range(4):
        prod *= (correct[k] + TINY) / (guess[k] + SMALL)
        out.append(bp * prod ** (1 / (k + 1)))
    return out


def rouge_l_by_hand(lcs, len_hyp, len_ref, beta=1.2):
    p, r = lcs / len_hyp, lcs / len_ref
    return (1 + beta**2) * p * r / (r + beta**2 * p) if p and r else 0.0


# ----------------------------------------------------------------------------------------- NLG
def test_bleu_single_sentence_by_hand():
    # hyp: the cat sat on the mat | ref: the cat is on the mat  (6 tokens each)
    # 1-grams: the x2, cat, on, mat match, sat does not            -> 5/6
    # 2-grams: "the cat", "on the", "the mat" match of 5          -> 3/5
    # 3-grams: "on the mat" matches of 4                           -> 1/4
    # 4-grams: none of 3 matches -> 0/3 (pycocoevalcap's 1e-15 keeps BLEU_4 ~ 8e-5 instead of 0)
    # lengths 6 vs 6 -> brevity penalty 1
    s = nlg_scores(["the cat is on the mat"], ["the cat sat on the mat"], meteor=False)
    want = bleu_by_hand([5, 3, 1, 0], [6, 5, 4, 3], testlen=6, reflen=6)
    for n in range(4):
        assert s[f"BLEU_{n + 1}"] == pytest.approx(want[n], abs=1e-6)
    assert s["BLEU_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert s["BLEU_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert 0 < s["BLEU_4"] < 1e-4


def test_bleu_corpus_level_with_brevity_penalty_by_hand():
    refs = ["the cat is on the mat", "there is a small dog here"]
    hyps = ["the cat sat on the mat", "there is a small dog"]
    # pair 1 as above: matches [5, 3, 1, 0] of guesses [6, 5, 4, 3]
    # pair 2: every n-gram of the 5-token hypothesis is in the reference: [5, 4, 3, 2] of [5, 4, 3, 2]
    # corpus: matches [10, 7, 4, 2], guesses [11, 9, 7, 5]; lengths 11 vs 12 -> BP = exp(1 - 12/11)
    s = nlg_scores(refs, hyps, meteor=False)
    bp = math.exp(1 - 12 / 11)
    p = [10 / 11, 7 / 9, 4 / 7, 2 / 5]
    for n in range(1, 5):
        assert s[f"BLEU_{n}"] == pytest.approx(bp * math.prod(p[:n]) ** (1 / n), abs=1e-6)
    # corpus-level, not the mean of sentence BLEUs
    per_sentence = np.mean([nlg_scores([r], [h], meteor=False)["BLEU_1"] for r, h in zip(refs, hyps)])
    assert abs(s["BLEU_1"] - per_sentence) > 1e-3


def test_rouge_l_by_hand():
    refs = ["the cat is on the mat", "there is a small dog here"]
    hyps = ["the cat sat on the mat", "there is a small dog"]
    # LCS 1: "the cat on the mat" = 5 of 6 / 6;  LCS 2: "there is a small dog" = 5 of 5 / 6
    want = (rouge_l_by_hand(5, 6, 6) + rouge_l_by_hand(5, 5, 6)) / 2
    assert rouge_l_by_hand(5, 5, 6) == pytest.approx(2.44 * (5 / 6) / (5 / 6 + 1.44))
    assert nlg_scores(refs, hyps, meteor=False)["ROUGE_L"] == pytest.approx(want, abs=1e-9)


def test_identical_texts_score_one_and_cider_ten():
    docs = ["the heart size is normal .", "there is a small left pleural effusion .", "no pneumothorax is seen here"]
    s = nlg_scores(docs, docs, meteor=False)
    assert set(s) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"}
    for n in range(1, 5):
        assert s[f"BLEU_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(1.0)
    # CIDEr-D is scaled by 10: identical reports (>= 4 tokens, each with n-grams not in all others)
    assert s["CIDEr"] == pytest.approx(10.0, abs=1e-6)


def test_cider_degenerate_cases():
    # one-report corpus: idf = log(1) - log(df=1) = 0 for every n-gram -> CIDEr 0 even when identical
    assert nlg_scores(["the heart is normal"], ["the heart is normal"], meteor=False)["CIDEr"] == 0.0
    # a 3-token report has no 4-grams: mean over n = 1..4 of (1, 1, 1, 0) -> 7.5, the other 10
    docs = ["no acute findings", "the heart is enlarged with edema"]
    assert nlg_scores(docs, docs, meteor=False)["CIDEr"] == pytest.approx((7.5 + 10.0) / 2, abs=1e-6)


def test_cider_by_hand():
    # refs "a b", "c d"; hyps "a b", "c e". N = 2, every reference n-gram has df 1 and a hypothesis-only
    # n-gram df 0 -> max(1, 0): every idf is log 2 - log 1 = L.
    # study 1 (identical): n=1 cosine 1, n=2 cosine 1, n=3,4 no n-grams -> 0; mean 2/4 -> x10 = 5
    # study 2: n=1 hyp {c: L, e: L}, ref {c: L, d: L}: min(L, L) * L / (sqrt(2) L * sqrt(2) L) = 1/2;
    #          n=2 "c e" vs "c d": 0 -> mean 0.5/4 -> x10 = 1.25;  equal bigram counts: no length penalty
    s = nlg_scores(["a b", "c d"], ["a b", "c e"], meteor=False)
    assert s["CIDEr"] == pytest.approx((5 + 1.25) / 2, abs=1e-9)
    # the idf comes from the evaluated references: a corpus of one report twice has df 2 = N -> idf 0
    assert nlg_scores(["a b", "a b"], ["a b", "a b"], meteor=False)["CIDEr"] == 0.0


def test_lowercase_and_whitespace_normalised():
    a = nlg_scores(["The Heart  is normal .\n"], ["the heart is NORMAL ."], meteor=False)
    assert a["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert a["ROUGE_L"] == pytest.approx(1.0)


def test_empty_hypothesis_is_handled():
    refs = ["the cat is on the mat", "there is a small dog here", "lungs are clear"]
    hyps = ["the cat is on the mat", "", "   "]
    s = nlg_scores(refs, hyps, meteor=False)
    # empty hypotheses add 0 matches and 0 guesses; lengths 6 vs 6+6+3 -> BP = exp(1 - 15/6)
    want = bleu_by_hand([6, 5, 4, 3], [6, 5, 4, 3], testlen=6, reflen=15)
    for n in range(4):
        assert s[f"BLEU_{n + 1}"] == pytest.approx(want[n], abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(1 / 3)
    # identical pair scores 10 (idf over 3 references, "is" is shared but other n-grams are not)
    assert s["CIDEr"] == pytest.approx(10.0 / 3, abs=1e-6)
    all_empty = nlg_scores(refs, ["", "", ""], meteor=False)
    assert all_empty["BLEU_1"] < 1e-6 and all_empty["ROUGE_L"] == 0.0 and all_empty["CIDEr"] == 0.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="2 references and 1 hypotheses"):
        nlg_scores(["a b", "c d"], ["a b"], meteor=False)
    with pytest.raises(ValueError, match="empty corpus"):
        nlg_scores([], [], meteor=False)
    with pytest.raises(ValueError, match="r2gen, ptb"):
        nlg_scores(["a"], ["a"], tokenization="bpe", meteor=False)
    with pytest.raises(ValueError, match="must be strings"):
        nlg_scores(["a", None], ["a", "b"], meteor=False)


def test_missing_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(RuntimeError, match="default-jre-headless.*meteor=False"):
        nlg_scores(["a b c"], ["a b c"])
    with pytest.raises(RuntimeError, match="Java"):
        nlg_scores(["a b c"], ["a b c"], tokenization="ptb", meteor=False)
    assert "METEOR" not in nlg_scores(["a b c d"], ["a b c d"], meteor=False)  # no Java needed


def test_protocol_description():
    p = protocol("r2gen")
    assert p["name"] == "r2gen" and p["references_truncated"] is False
    assert "no PTB" in p["tokenization"] and "pycocoevalcap" in p["library"]
    assert protocol("ptb")["name"] == "ptb"
    json.dumps(p)
    with pytest.raises(ValueError, match="allowed"):
        protocol("spacy")


@needs_java
def test_ptb_tokenization_strips_punctuation_and_case():
    refs = ["The heart is normal.", "There is a small, left effusion!", "no pneumothorax"]
    hyps = ["the heart, is NORMAL", "", "no pneumothorax ."]
    ptb = nlg_scores(refs, hyps, tokenization="ptb", meteor=False)
    clean_refs = ["the heart is normal", "there is a small left effusion", "no pneumothorax"]
    clean_hyps = ["the heart is normal", "", "no pneumothorax"]
    assert ptb == pytest.approx(nlg_scores(clean_refs, clean_hyps, meteor=False))
    # whereas the r2gen protocol keeps punctuation attached / as tokens
    assert nlg_scores(refs, hyps, meteor=False)["BLEU_1"] < ptb["BLEU_1"]


@pytest.fixture(scope="module")
def meteor_runs():
    """Two METEOR runs (each starts a ~6 s Java process), recording the processes to check shutdown."""
    from pycocoevalcap.meteor import meteor as meteor_module

    procs = []
    real = meteor_module.Meteor

    class SpyMeteor(real):
        def __init__(self):
            super().__init__()
            procs.append(self.meteor_p)

    docs = ["the heart size is normal .", "there is a small left pleural effusion ."]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(meteor_module, "Meteor", SpyMeteor)
        identical = nlg_scores(docs, docs)
        # disjoint words, plus an empty hypothesis
        disjoint = nlg_scores(["heart size is normal", "xqzv wpkj", "lungs are clear"], ["lungs are clear", "mmbr trql", ""])
        # every word matched exactly, in two chunks
        permuted = nlg_scores(["heart size normal lungs clear bilaterally"], ["lungs clear bilaterally heart size normal"])
    return {"identical": identical, "disjoint": disjoint, "permuted": permuted, "procs": procs}


@needs_java
def test_meteor_identical_close_to_one(meteor_runs):
    s = meteor_runs["identical"]
    assert list(s) == ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert s["METEOR"] == pytest.approx(1.0, abs=1e-6)


@needs_java
def test_meteor_disjoint_and_empty_is_zero(meteor_runs):
    assert meteor_runs["disjoint"]["METEOR"] == 0.0


@needs_java
def test_meteor_fragmentation_by_hand(meteor_runs):
    # all 6 words match exactly -> P = R = Fmean = 1 (whatever the content/function word weights);
    # the alignment has 2 chunks over m = 6 matches -> Meteor 1.5 English (gamma 0.6, beta 0.2):
    # penalty = 0.6 * (2/6)^0.2, score = 1 - penalty
    assert meteor_runs["permuted"]["METEOR"] == pytest.approx(1 - 0.6 * (2 / 6) ** 0.2, abs=1e-6)


@needs_java
def test_meteor_java_process_is_closed(meteor_runs):
    assert len(meteor_runs["procs"]) == 3
    for proc in meteor_runs["procs"]:
        assert proc.poll() is not None and proc.stdin.closed and proc.stdout.closed


def test_meteor_failure_is_reported_and_process_closed(monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module

    class FakeProc:
        def __init__(self):
            import io

            self.stdin, self.stdout, self.stderr = io.BytesIO(), io.BytesIO(b""), io.BytesIO(b"boom")
            self.returncode = None

        def poll(self):
            return self.returncode

        def kill(self):
            self.returncode = -9

        def wait(self):
            return self.returncode

    class BrokenMeteor:
        def __init__(self):
            self.meteor_p = FakeProc()

        def compute_score(self, gts, res):
            raise ValueError("could not convert string to float: ''")

    monkeypatch.setattr(meteor_module, "Meteor", BrokenMeteor)
    monkeypatch.setattr(nlg_mod.shutil, "which", lambda name, *a, **k: "/usr/bin/java")
    with pytest.raises(RuntimeError, match="METEOR.*failed.*boom"):
        nlg_scores(["a b"], ["a b"])


# ------------------------------------------------------------------------------------------ CE
NAN = np.nan
A, B, C = CHEXPERT_14.index("Cardiomegaly"), CHEXPERT_14.index("Edema"), CHEXPERT_14.index("Pleural Effusion")


def _rows(rows):
    """Build (N, 14) arrays from {column: value} dicts; unspecified cells are NaN (not mentioned)."""
    out = np.full((len(rows), 14), NAN)
    for i, row in enumerate(rows):
        for j, v in row.items():
            out[i, j] = v
    return out


# 4 studies, only Cardiomegaly (A), Edema (B), Pleural Effusion (C) mentioned; study 3 mentions nothing
REF = _rows([{A: 1, B: 1, C: 0}, {A: 1, C: -1}, {A: 0, B: 1, C: 1}, {}])
PRED = _rows([{A: 1, B: 0, C: 1}, {A: 1, B: 1, C: 1}, {A: -1, B: 1}, {}])


def test_ce_hand_example_uncertain_negative():
    # binarised (-1, NaN -> 0):  ref  s0 {A,B}  s1 {A}      s2 {B,C}  s3 {}
    #                            pred s0 {A,C}  s1 {A,B,C}  s2 {B}    s3 {}
    # per label: A TP2 FP0 FN0 -> 1, 1, 1;  B TP1 FP1 FN1 -> .5, .5, .5;  C TP0 FP2 FN1 -> 0, 0, 0
    # the other 11 labels: no positives anywhere -> 0, 0, 0 (zero_division 0)
    s = ce_scores(PRED, REF)
    assert s["micro"] == pytest.approx({"precision": 3 / 6, "recall": 3 / 5, "f1": 6 / 11})
    assert s["macro"] == pytest.approx({"precision": 1.5 / 14, "recall": 1.5 / 14, "f1": 1.5 / 14})
    # per study: s0 TP1 FP1 FN1 -> .5 .5 .5; s1 TP1 FP2 FN0 -> 1/3 1 .5; s2 TP1 FP0 FN1 -> 1 .5 2/3; s3 -> 0 0 0
    assert s["example"] == pytest.approx({"precision": 11 / 24, "recall": 2 / 4, "f1": 5 / 12})
    assert s["per_label"]["Cardiomegaly"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert s["per_label"]["Edema"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert s["per_label"]["Pleural Effusion"]["support"] == 1 and s["per_label"]["Pleural Effusion"]["f1"] == 0.0
    assert s["per_label"]["Fracture"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # headline = macro (R2Gen compute_ce.py convention), also at the top level
    assert s["headline"]["averaging"] == "macro"
    assert (s["precision"], s["recall"], s["f1"]) == (s["macro"]["precision"], s["macro"]["recall"], s["macro"]["f1"])
    assert s["convention"]["uncertain_as"] == "negative" and s["convention"]["labels"] == "all14"
    assert s["convention"]["n_studies"] == 4 and s["convention"]["zero_division"] == 0
    json.dumps(s)


def test_ce_hand_example_uncertain_positive():
    # -1 -> 1:  ref  s1 gains C;  pred s2 gains A
    # A: ref [1,1,0,0] pred [1,1,1,0] TP2 FP1 FN0 -> 2/3, 1, 4/5;  B unchanged .5;  C: TP1 FP1 FN1 -> .5
    s = ce_scores(PRED, REF, uncertain_as="positive")
    assert s["micro"] == pytest.approx({"precision": 4 / 7, "recall": 4 / 6, "f1": 8 / 13})
    assert s["macro"]["precision"] == pytest.approx((2 / 3 + 0.5 + 0.5) / 14)
    assert s["macro"]["f1"] == pytest.approx((4 / 5 + 0.5 + 0.5) / 14)
    # per study: s0 TP1 FP1 FN1; s1 ref {A,C} pred {A,B,C} TP2 FP1 FN0; s2 ref {B,C} pred {A,B} TP1 FP1 FN1; s3 0
    assert s["example"] == pytest.approx(
        {"precision": (0.5 + 2 / 3 + 0.5) / 4, "recall": (0.5 + 1 + 0.5) / 4, "f1": (0.5 + 0.8 + 0.5) / 4}
    )
    assert s["micro"] != ce_scores(PRED, REF)["micro"]
    assert s["convention"]["uncertain"] == "-1 -> 1"


def test_ce_common5_hand():
    # the same three labels are all in COMMON_5 -> macro divides by 5; add a non-common label that
    # is wrong everywhere: it changes all14 but not common5
    pred, ref = PRED.copy(), REF.copy()
    pred[:, CHEXPERT_14.index("Support Devices")] = 1
    s5 = ce_scores(pred, ref, labels="common5")
    assert s5["macro"] == pytest.approx({"precision": 1.5 / 5, "recall": 1.5 / 5, "f1": 1.5 / 5})
    assert s5["micro"] == pytest.approx(ce_scores(PRED, REF)["micro"])
    assert list(s5["per_label"]) == list(COMMON_5)
    assert s5["convention"]["label_names"] == list(COMMON_5)
    assert ce_scores(pred, ref)["micro"]["precision"] == pytest.approx(3 / 10)


def _random_labels(rng, n):
    return rng.choice(np.array([1.0, 0.0, -1.0, NAN]), size=(n, 14), p=[0.25, 0.3, 0.1, 0.35])


@pytest.mark.parametrize("uncertain_as", ["negative", "positive"])
@pytest.mark.parametrize("labels", ["all14", "common5"])
def test_ce_matches_sklearn(uncertain_as, labels):
    rng = np.random.default_rng(0 if labels == "all14" else 1)
    pred, ref = _random_labels(rng, 60), _random_labels(rng, 60)
    pred[:3] = NAN  # some studies with no predicted positives
    ref[2:4] = NAN  # ... no reference positives, and one with neither
    pred[:, CHEXPERT_14.index("Fracture")] = NAN  # a label never predicted
    cols = [CHEXPERT_14.index(n) for n in (CHEXPERT_14 if labels == "all14" else COMMON_5)]
    up = 1 if uncertain_as == "positive" else 0
    yp = np.where(np.isnan(pred), 0, np.where(pred == -1, up, pred)).astype(int)[:, cols]
    yr = np.where(np.isnan(ref), 0, np.where(ref == -1, up, ref)).astype(int)[:, cols]
    s = ce_scores(pred, ref, uncertain_as=uncertain_as, labels=labels)
    for ours, avg in (("micro", "micro"), ("macro", "macro"), ("example", "samples")):
        p, r, f, _ = precision_recall_fscore_support(yr, yp, average=avg, zero_division=0)
        assert s[ours] == pytest.approx({"precision": p, "recall": r, "f1": f}, abs=1e-12), ours
    p, r, f, sup = precision_recall_fscore_support(yr, yp, average=None, zero_division=0)
    for j, name in enumerate(s["per_label"]):
        assert s["per_label"][name] == pytest.approx(
            {"precision": p[j], "recall": r[j], "f1": f[j], "support": sup[j]}, abs=1e-12
        )


def test_ce_accepts_none_and_ints():
    ref = np.array([[1, 0, -1, None] + [None] * 10], dtype=object)
    s = ce_scores(ref, ref)
    assert s["micro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert ce_scores(np.ones((2, 14), dtype=int), np.ones((2, 14), dtype=int))["f1"] == 1.0


def test_ce_bad_inputs():
    ok = np.zeros((3, 14))
    with pytest.raises(ValueError, match=r"pred \(3, 14\) and ref \(2, 14\)"):
        ce_scores(ok, np.zeros((2, 14)))
    with pytest.raises(ValueError, match=r"shape \(N, 14\).*\(3, 13\)"):
        ce_scores(np.zeros((3, 13)), np.zeros((3, 13)))
    with pytest.raises(ValueError, match=r"\(14,\)"):
        ce_scores(np.zeros(14), np.zeros(14))
    with pytest.raises(ValueError, match="no rows"):
        ce_scores(np.zeros((0, 14)), np.zeros((0, 14)))
    bad = ok.copy()
    bad[0, 0], bad[1, 1] = 2, 0.5
    with pytest.raises(ValueError, match=r"ref has values outside \{1, 0, -1, NaN\}: 0.5, 2.0"):
        ce_scores(ok, bad)
    bad[2, 2] = np.inf
    with pytest.raises(ValueError, match="inf"):
        ce_scores(bad, ok)
    with pytest.raises(ValueError, match="negative, positive"):
        ce_scores(ok, ok, uncertain_as="ignore")
    with pytest.raises(ValueError, match="all14, common5"):
        ce_scores(ok, ok, labels="all13")
    with pytest.raises(ValueError, match="numeric"):
        ce_scores(np.full((1, 14), "x"), np.zeros((1, 14)))


# ----------------------------------------------------------------------------------------- binarize
# the one CheXpert -> bool rule (CE, classifier targets, oracle baseline, report page): a hand table
#            value:   1     0     -1     NaN   None
BINARY_TABLE = {"negative": [True, False, False, False, False],
                "positive": [True, False, True, False, False]}


@pytest.mark.parametrize("uncertain_as", ["negative", "positive"])
def test_binarize_hand_table(uncertain_as):
    import torch

    from amrg.labels.schema import binarize
    from amrg.metrics import ce

    want = BINARY_TABLE[uncertain_as]
    values = np.array([1, 0, -1, np.nan, None], dtype=object)
    got = binarize(values, uncertain_as)
    assert isinstance(got, np.ndarray) and got.dtype == bool and got.tolist() == want
    assert binarize(values.reshape(1, 5).repeat(2, 0), uncertain_as).tolist() == [want, want]  # any shape
    t = binarize(torch.tensor([1.0, 0.0, -1.0, float("nan")]), uncertain_as)  # a tensor stays a tensor
    assert isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.tolist() == want[:4]
    assert ce.binarize is binarize  # CE uses this rule, not a copy


def test_binarize_rejects_unknown_uncertain_as():
    from amrg.labels.schema import binarize

    with pytest.raises(ValueError, match="negative, positive"):
        binarize(np.zeros(3), "ignore")
