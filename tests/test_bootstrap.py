"""Tests of amrg.metrics.bootstrap: resampled corpus metrics equal pycocoevalcap / ce_scores on the
resampled corpus, hand-computed resamples, and the interval / paired-difference bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest

from amrg.labels.schema import CHEXPERT_14
from amrg.metrics import ce_scores, nlg_scores
from amrg.metrics.bootstrap import (SystemStats, bootstrap_ci, ce_replicates, ce_stats, nlg_replicates, nlg_stats,
                                    replicates, resample_weights)
from amrg.metrics.nlg import prepare_texts

REFS = ["the heart is normal in size .", "there is a small left pleural effusion .", "no pneumothorax",
        "the lungs are clear . no acute findings", "mild cardiomegaly with edema ."]
HYPS = ["the heart is normal .", "small pleural effusion on the left .", "", "The lungs are clear .",
        "cardiomegaly ."]
NLG = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr")


def _stats(refs, hyps):
    return nlg_stats(*prepare_texts(refs, hyps))


def test_resample_weights():
    w = resample_weights(7, 50, seed=3)
    assert w.shape == (50, 7) and (w.sum(1) == 7).all() and (w >= 0).all()
    assert np.array_equal(w, resample_weights(7, 50, seed=3))  # depends only on (seed, n)
    assert not np.array_equal(w, resample_weights(7, 50, seed=4))
    with pytest.raises(ValueError, match="n >= 1"):
        resample_weights(0, 5, 0)


def test_identity_weights_equal_pycocoevalcap():
    s = _stats(REFS, HYPS)
    got = nlg_replicates(s, np.ones((1, len(REFS))))
    want = nlg_scores(REFS, HYPS, meteor=False)
    for k in NLG:
        assert got[k][0] == pytest.approx(want[k], rel=1e-12, abs=1e-15), k


def test_resamples_equal_pycocoevalcap_on_the_resampled_corpus():
    """Each weighted corpus scores what pycocoevalcap gives for the corpus with studies repeated: CIDEr's
    document frequencies are recomputed over the resampled references."""
    s = _stats(REFS, HYPS)
    w = resample_weights(len(REFS), 4, seed=1)
    got = nlg_replicates(s, w)
    for b, row in enumerate(w):
        idx = np.repeat(np.arange(len(REFS)), row)
        want = nlg_scores([REFS[i] for i in idx], [HYPS[i] for i in idx], meteor=False)
        for k in NLG:
            assert got[k][b] == pytest.approx(want[k], rel=1e-12, abs=1e-15), (k, row)


def test_cider_resamples_by_hand():
    # refs "a b", "c d"; hyps "a b", "c e" (CIDEr 3.125 on the whole set, see test_metrics.test_cider_by_hand).
    # resample (2, 0): refs "a b" twice -> every df = 2 = N -> idf 0 -> CIDEr 0
    # resample (0, 2): ref n-grams idf 0; the hypothesis-only "e" has idf log 2 but the reference vector is
    #                  all zero -> CIDEr 0
    s = _stats(["a b", "c d"], ["a b", "c e"])
    got = nlg_replicates(s, np.array([[2, 0], [0, 2], [1, 1]]))["CIDEr"]
    assert got == pytest.approx([0.0, 0.0, 3.125], abs=1e-12)


def test_ce_resamples_by_hand():
    # one label (Cardiomegaly): study 0 is a TP, study 1 a FP; every other label has no positive.
    # (1, 1): P = 1/2, R = 1, F1 = 2/3;  (2, 0): P = R = F1 = 1;  (0, 2): TP 0 -> P = 0, R = 0/0 := 0, F1 = 0
    # macro = the label's value / 14
    a = CHEXPERT_14.index("Cardiomegaly")
    pred, ref = np.full((2, 14), np.nan), np.full((2, 14), np.nan)
    pred[:, a] = 1
    ref[0, a] = 1
    got = ce_replicates(ce_stats(pred, ref), np.array([[1, 1], [2, 0], [0, 2]]))
    assert got["precision"] == pytest.approx(np.array([0.5, 1.0, 0.0]) / 14)
    assert got["recall"] == pytest.approx(np.array([1.0, 1.0, 0.0]) / 14)
    assert got["f1"] == pytest.approx(np.array([2 / 3, 1.0, 0.0]) / 14)
    whole = ce_scores(pred, ref)
    assert got["f1"][0] == pytest.approx(whole["f1"])


def test_intervals_and_paired_differences():
    rng = np.random.default_rng(0)
    ref_labels = rng.choice(np.array([1.0, 0.0, np.nan]), size=(len(REFS), 14))
    hyp_labels = rng.choice(np.array([1.0, 0.0, np.nan]), size=(len(REFS), 14))
    model = SystemStats(_stats(REFS, HYPS), ce_stats(hyp_labels, ref_labels))
    same = SystemStats(_stats(REFS, HYPS), ce_stats(hyp_labels, ref_labels))
    other = SystemStats(_stats(REFS, REFS[::-1]), ce_stats(ref_labels[::-1], ref_labels))
    out = bootstrap_ci({"model": model, "same": same, "other": other}, n_resamples=400, seed=0)
    assert out["method"]["resamples"] == 400 and "METEOR" in out["method"]["no_ci"]
    for k in NLG:
        c = out["ci"]["model"][k]
        assert 0.0 <= c["lo"] <= c["hi"]
    assert set(out["ci"]["model"]["ce"]) == {"precision", "recall", "f1"}
    # an identical system: every paired difference is exactly 0
    for k in NLG:
        assert out["paired"]["same"][k] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_le_0": 1.0}
    assert out["paired"]["same"]["ce"]["f1"]["diff"] == 0.0
    assert "model" not in out["paired"] and set(out["paired"]) == {"same", "other"}
    # the same seed gives the same intervals (two experiments on one test split are resampled alike)
    again = bootstrap_ci({"model": model, "other": other}, n_resamples=400, seed=0)
    assert again["ci"]["model"] == out["ci"]["model"] and again["paired"]["other"] == out["paired"]["other"]


def test_two_studies_percentiles_by_hand():
    # ROUGE-L per study a, b; a resample's ROUGE-L is a, (a+b)/2 or b. With 1000 resamples each extreme
    # has probability 1/4 per draw, so the 2.5th / 97.5th percentiles are exactly min / max.
    s = _stats(["a b c d", "e f g h"], ["a b c d", "e x y z"])
    a, b = s.rouge
    assert (a, b) == (1.0, pytest.approx(2.44 * 0.25 * 0.25 / (0.25 + 1.44 * 0.25)))
    stats = SystemStats(s, ce_stats(np.zeros((2, 14)), np.zeros((2, 14))))
    ci = bootstrap_ci({"model": stats}, n_resamples=1000, seed=0)["ci"]["model"]["ROUGE_L"]
    assert ci == {"lo": pytest.approx(min(a, b)), "hi": pytest.approx(max(a, b))}
    reps = replicates(stats, resample_weights(2, 1000, 0))["ROUGE_L"]
    assert set(np.round(reps, 12)) == set(np.round([a, (a + b) / 2, b], 12))


def test_systems_must_share_the_studies():
    s2 = SystemStats(_stats(REFS[:2], HYPS[:2]), ce_stats(np.zeros((2, 14)), np.zeros((2, 14))))
    s3 = SystemStats(_stats(REFS[:3], HYPS[:3]), ce_stats(np.zeros((3, 14)), np.zeros((3, 14))))
    with pytest.raises(ValueError, match="same studies"):
        bootstrap_ci({"model": s2, "other": s3}, 10, 0)


def test_per_study_ci_pairs_with_the_corpus_resamples():
    """A per-study metric's replicate is the mean over the resampled corpus, on the same resamples."""
    from amrg.metrics.bootstrap import per_study_ci, resample_weights

    a, b = np.array([1.0, 0.0, 0.5, 0.25]), np.array([0.0, 0.0, 0.5, 0.25])
    out = per_study_ci({"model": {"f1": a}, "other": {"f1": b}}, 200, seed=3)
    w = resample_weights(4, 200, 3)
    reps_a = np.array([(wi * a).sum() / 4 for wi in w])  # each row sums to n: a plain mean over the resample
    lo, hi = np.percentile(reps_a, [2.5, 97.5])
    assert out["ci"]["model"]["f1"] == pytest.approx({"lo": lo, "hi": hi})
    diffs = reps_a - np.array([(wi * b).sum() / 4 for wi in w])
    assert out["paired"]["other"]["f1"]["diff"] == pytest.approx(diffs.mean())
    assert out["paired"]["other"]["f1"]["p_le_0"] == pytest.approx((diffs <= 0).mean())
