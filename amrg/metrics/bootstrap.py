"""Paired bootstrap confidence intervals over test studies for the corpus-level report metrics.

Resampling
----------
``B`` resamples of the ``N`` test studies, drawn with replacement by ``np.random.default_rng(seed)``
(:func:`resample_weights`; each resample is a vector of multiplicities ``w`` with ``sum(w) = N``). The
same resamples score the model and every baseline (paired), and they depend only on ``(seed, N)``:
two runs on the same test split (two experiments) are resampled identically, so their intervals and a
difference between them are computed on the same pseudo-test-sets.

What is recomputed per resample
-------------------------------
Every metric is recomputed **at corpus level** on each resample from per-study sufficient
statistics, giving exactly what pycocoevalcap would return on the resampled corpus (a study drawn
twice counts as two documents); ``tests/test_bootstrap.py`` checks this against
:func:`amrg.metrics.nlg.nlg_scores` on explicit resamples.

* BLEU-1..4: per-study clipped n-gram matches, n-gram guesses, hypothesis and reference lengths are
  summed with weights ``w``; then pycocoevalcap's corpus formula (its 1e-15 / 1e-9 epsilons, brevity
  penalty from the summed lengths).
* ROUGE-L: weighted mean of the per-study LCS F-scores (beta 1.2).
* CIDEr (pycocoevalcap's CIDEr-D): the document frequencies are **recomputed over the resampled
  references** (``df_b(g) = sum_i w_i [g in ref_i]``, idf ``= log N - log max(1, df_b)``), as
  pycocoevalcap does for whatever corpus it is given; per study the clipped tf-idf cosine per n-gram
  order with the Gaussian length penalty (sigma 6, on bigram counts, as pycocoevalcap), x10; corpus
  score = weighted mean.
* CE (the headline macro precision / recall / F1): per-study, per-label TP/FP/FN summed with weights.
* METEOR: **no interval**. Its corpus aggregate is computed inside the Java scorer from segment
  statistics; rescoring B resamples would mean B Java round trips (minutes), so it is reported as a
  point estimate only.

Interval: the percentile interval ``[q_(1-level)/2, q_(1+level)/2]`` of the B resampled values
(level 0.95 by default). Paired differences: the same percentiles of ``model - baseline`` per
resample, plus the share of resamples where the difference is <= 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

from ..io import progress
from .ce import ce_counts, prf
from .registry import CE_KEYS, NLG_CI_KEYS

CI_KEYS = NLG_CI_KEYS  # the NLG scores with an interval (all but METEOR)
_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap BleuScorer's epsilons
_SIGMA = 6.0  # pycocoevalcap CiderScorer's length-penalty width
_MAX_DENSE = 2e7  # cells of one (resamples x n-grams) block


def resample_weights(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n)`` int32 multiplicities of ``n`` studies drawn with replacement, each row summing to n."""
    if n < 1 or n_resamples < 1:
        raise ValueError(f"need n >= 1 studies and n_resamples >= 1 (got n={n}, n_resamples={n_resamples})")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    w = np.zeros((n_resamples, n), dtype=np.int32)
    np.add.at(w, (np.repeat(np.arange(n_resamples), n), idx.ravel()), 1)
    return w


def _ngrams(text: str, n: int = 4) -> tuple[int, dict[tuple[str, ...], int]]:
    """Token count and n-gram counts (orders 1..n) of a whitespace-tokenised text, as pycocoevalcap's precook."""
    words = text.split()
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return len(words), counts


@dataclass
class NlgStats:
    """Per-study sufficient statistics of BLEU, ROUGE-L and CIDEr for one system."""

    correct: np.ndarray  # (N, 4) clipped n-gram matches
    guess: np.ndarray  # (N, 4) hypothesis n-grams
    testlen: np.ndarray  # (N,)
    reflen: np.ndarray  # (N,)
    rouge: np.ndarray  # (N,) ROUGE-L F per study
    ref_presence: sparse.csr_matrix  # (N, G) n-gram g occurs in reference i (document frequency)
    clip: list[sparse.csr_matrix]  # per order: min(tf_hyp, tf_ref) * tf_ref, (N, G_n)
    hyp_sq: list[sparse.csr_matrix]  # per order: tf_hyp^2
    ref_sq: list[sparse.csr_matrix]  # per order: tf_ref^2
    columns: list[np.ndarray]  # per order: its columns in ref_presence's n-gram vocabulary
    length_penalty: np.ndarray  # (N,) exp(-(bigrams_hyp - bigrams_ref)^2 / (2 sigma^2))


def nlg_stats(refs: list[str], hyps: list[str]) -> NlgStats:
    """Statistics of texts already normalised by :func:`amrg.metrics.nlg.prepare_texts`."""
    from pycocoevalcap.rouge.rouge import Rouge

    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"need as many references as hypotheses, at least one (got {len(refs)} and {len(hyps)})")
    n = len(refs)
    correct, guess = np.zeros((n, 4)), np.zeros((n, 4))
    testlen, reflen, penalty = np.zeros(n), np.zeros(n), np.zeros(n)
    vocab: dict[tuple[str, ...], int] = {}
    rows_r, cols_r, rows, cols, clip, hsq, rsq = [], [], [], [], [], [], []
    for i, (r, h) in enumerate(zip(refs, hyps)):
        lr, cr = _ngrams(r)
        lh, ch = _ngrams(h)
        testlen[i], reflen[i] = lh, lr
        guess[i] = [max(0, lh - k) for k in range(4)]
        for g, c in ch.items():
            correct[i, len(g) - 1] += min(c, cr.get(g, 0))
        penalty[i] = np.exp(-float(max(0, lh - 1) - max(0, lr - 1)) ** 2 / (2 * _SIGMA**2))
        for g in cr.keys() | ch.keys():
            j = vocab.setdefault(g, len(vocab))
            th, tr = ch.get(g, 0), cr.get(g, 0)
            if tr:
                rows_r.append(i), cols_r.append(j)
            rows.append(i), cols.append(j), clip.append(min(th, tr) * tr), hsq.append(th * th), rsq.append(tr * tr)
    g_total = len(vocab)
    order = np.zeros(g_total, dtype=np.int8)
    for g, j in vocab.items():
        order[j] = len(g)
    presence = sparse.csr_matrix((np.ones(len(rows_r)), (rows_r, cols_r)), shape=(n, g_total))
    mats = [sparse.csr_matrix((np.asarray(v, float), (rows, cols)), shape=(n, g_total)) for v in (clip, hsq, rsq)]
    columns = [np.flatnonzero(order == k) for k in range(1, 5)]
    per_order = [[m[:, c] for c in columns] for m in mats]
    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    rouge = np.asarray(Rouge().compute_score(gts, res)[1], dtype=float)
    return NlgStats(correct, guess, testlen, reflen, rouge, presence, *per_order, columns, penalty)


def nlg_replicates(s: NlgStats, weights: np.ndarray) -> dict[str, np.ndarray]:
    """BLEU_1..4, ROUGE_L, CIDEr of every weighted corpus: ``weights (B, N)`` -> ``{metric: (B,)}``."""
    w = np.asarray(weights, dtype=float)
    n_docs = w.sum(1)
    out: dict[str, np.ndarray] = {}
    c, g = w @ s.correct, w @ s.guess
    ratio = (w @ s.testlen + _TINY) / (w @ s.reflen + _SMALL)
    bp = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, _TINY)), 1.0)
    prod = np.cumprod((c + _TINY) / (g + _SMALL), axis=1)
    for k in range(4):
        out[f"BLEU_{k + 1}"] = bp * prod[:, k] ** (1.0 / (k + 1))
    out["ROUGE_L"] = (w @ s.rouge) / n_docs
    out["CIDEr"] = _cider(s, w, n_docs)
    return out


def _cider(s: NlgStats, w: np.ndarray, n_docs: np.ndarray) -> np.ndarray:
    """Weighted-corpus CIDEr-D, idf from the weighted reference document frequencies."""
    b, g = w.shape[0], s.ref_presence.shape[1]
    out = np.zeros(b)
    step = max(1, int(_MAX_DENSE // max(g, 1)))
    pres_t = s.ref_presence.T.tocsr()
    for lo in range(0, b, step):
        wc = w[lo:lo + step]
        df = np.asarray((pres_t @ wc.T).T)  # (b', G)
        idf2 = (np.log(n_docs[lo:lo + step, None]) - np.log(np.maximum(1.0, df))) ** 2
        val = np.zeros((s.ref_presence.shape[0], wc.shape[0]))
        for cols, clip, hsq, rsq in zip(s.columns, s.clip, s.hyp_sq, s.ref_sq):
            x = idf2[:, cols].T  # (G_n, b')
            dot, nh, nr = clip @ x, hsq @ x, rsq @ x
            den = np.sqrt(nh * nr)
            val += np.divide(dot, den, out=np.asarray(dot, dtype=float).copy(), where=den > 0)
        per_study = 10.0 * val / 4 * s.length_penalty[:, None]  # (N, b')
        out[lo:lo + step] = (wc * per_study.T).sum(1) / n_docs[lo:lo + step]
    return out


@dataclass
class CeStats:
    tp: np.ndarray  # (N, L) bool
    fp: np.ndarray
    fn: np.ndarray


def ce_stats(pred_labels: np.ndarray, ref_labels: np.ndarray, uncertain_as: str = "negative",
             labels: str = "all14") -> CeStats:
    return CeStats(*ce_counts(pred_labels, ref_labels, uncertain_as, labels))


def ce_replicates(s: CeStats, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Headline (macro over labels) CE precision / recall / F1 per weighted corpus: ``{key: (B,)}``."""
    w = np.asarray(weights, dtype=float)
    p, r, f = prf(w @ s.tp, w @ s.fp, w @ s.fn)  # (B, L) each
    return {"precision": p.mean(1), "recall": r.mean(1), "f1": f.mean(1)}


@dataclass
class SystemStats:
    nlg: NlgStats
    ce: CeStats


def replicates(stats: SystemStats, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Flat ``{"BLEU_1": (B,), ..., "ce.f1": (B,)}`` of one system over the resamples ``weights``."""
    out = nlg_replicates(stats.nlg, weights)
    out.update({f"ce.{k}": v for k, v in ce_replicates(stats.ce, weights).items()})
    return out


def _interval(values: np.ndarray, level: float) -> dict[str, float]:
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return {"lo": float(lo), "hi": float(hi)}


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"BLEU_1": x, "ce.f1": y}`` -> ``{"BLEU_1": x, "ce": {"f1": y}}`` (the layout of the point scores).

    The inverse of reading with :func:`amrg.config.get_dotted`: it builds the nested dict (one dot, the
    only depth :func:`replicates` writes) rather than looking a key up, so it is not a copy of it."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        head, _, tail = k.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = v
        else:
            out[k] = v
    return out


def bootstrap_ci(systems: dict[str, SystemStats], n_resamples: int, seed: int, level: float = 0.95,
                 reference: str = "model") -> dict[str, Any]:
    """Percentile intervals of every system and paired differences ``reference - other``.

    Returns ``{"method": {...}, "ci": {system: {"BLEU_1": {"lo", "hi"}, ..., "ce": {"f1": {...}}}},
    "paired": {other: {metric: {"diff", "lo", "hi", "p_le_0"}}}}`` where ``diff`` is the mean
    resampled difference. Progress (resamples scored over all systems) goes to a bar and the log.
    """
    n = {s.nlg.rouge.shape[0] for s in systems.values()}
    if len(n) != 1:
        raise ValueError(f"every system must be scored on the same studies; got sizes {sorted(n)}")
    weights = resample_weights(n.pop(), n_resamples, seed)
    names = list(systems)
    scored = progress(names, "bootstrap resamples", total=len(names) * n_resamples, unit="resamples",
                      count=lambda _: n_resamples)
    reps = {name: replicates(systems[name], weights) for name in scored}
    ci = {name: _nest({k: _interval(v, level) for k, v in r.items()}) for name, r in reps.items()}
    paired = {}
    if reference in reps:
        for name, r in reps.items():
            if name == reference:
                continue
            diffs = {k: reps[reference][k] - v for k, v in r.items()}
            paired[name] = _nest({k: {"diff": float(d.mean()), **_interval(d, level), "p_le_0": float((d <= 0).mean())}
                                  for k, d in diffs.items()})
    return {"method": method(n_resamples, seed, level, reference), "ci": ci, "paired": paired}


def mean_replicates(values, weights: np.ndarray) -> np.ndarray:
    """Bootstrap replicates of a per-study mean: ``weights (B, N)`` multiplicities -> ``(B,)`` weighted means.

    ``weights`` are the rows of :func:`resample_weights`; replicate b is ``sum_i w_bi v_i / sum_i w_bi``,
    i.e. the mean over the resampled corpus (a study drawn twice counts twice)."""
    v = np.asarray(values, dtype=float)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    if v.ndim != 1 or w.shape[1] != v.shape[0]:
        raise ValueError(f"need values (N,) and weights (B, N); got {v.shape} and {w.shape}")
    return (w @ v) / w.sum(1)


def per_study_ci(per_study: dict[str, dict[str, Any]], n_resamples: int, seed: int, level: float = 0.95,
                 reference: str = "model") -> dict[str, Any]:
    """Intervals of per-study metrics (``{system: {key: values in study order}}``, e.g. BERTScore or
    RadGraph F1) on the same resamples as :func:`bootstrap_ci` (same ``seed`` and test size), so their
    paired differences join the corpus metrics'. Same output layout as :func:`bootstrap_ci`."""
    n = {len(v) for keys in per_study.values() for v in keys.values()}
    if len(n) != 1:
        raise ValueError(f"every system must be scored on the same studies; got sizes {sorted(n)}")
    weights = resample_weights(n.pop(), n_resamples, seed)
    reps = {s: {k: mean_replicates(v, weights) for k, v in keys.items()} for s, keys in per_study.items()}
    ci = {s: {k: _interval(r, level) for k, r in keys.items()} for s, keys in reps.items()}
    paired = {s: {k: {"diff": float((reps[reference][k] - r).mean()), **_interval(reps[reference][k] - r, level),
                      "p_le_0": float(((reps[reference][k] - r) <= 0).mean())} for k, r in keys.items()}
              for s, keys in reps.items() if s != reference and reference in reps}
    return {"method": method(n_resamples, seed, level, reference), "ci": ci, "paired": paired}


def method(n_resamples: int, seed: int, level: float = 0.95, reference: str = "model") -> dict[str, Any]:
    """The JSON description of the interval method written next to the intervals."""
    return {
        "name": "paired percentile bootstrap over test studies",
        "resamples": n_resamples, "seed": seed, "level": level,
        "resampling": "studies drawn with replacement (numpy default_rng(seed)); the same resamples for every "
                      "system and for every run with the same seed and test size",
        "recomputed": "corpus-level BLEU-1..4, ROUGE-L, CIDEr (document frequencies recomputed over each "
                      "resample's references) and the headline CE P/R/F1 on every resample",
        "metrics_with_ci": list(CI_KEYS) + [f"ce.{k}" for k in CE_KEYS],
        "no_ci": "METEOR (corpus aggregate inside the Java scorer; point estimate only)",
        "paired": f"{reference} minus each other system on the same resamples; p_le_0 = share of resamples "
                  "where the difference is <= 0",
    }
