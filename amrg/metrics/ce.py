"""Clinical-efficacy (CE) metrics: precision / recall / F1 of CheXpert labels of generated reports
against the labels of the reference reports.

Inputs are ``(N, 14)`` arrays in CheXpert order (``amrg.labels.schema.CHEXPERT_14``) with the
CheXpert values 1 positive, 0 negative, -1 uncertain, NaN (or None) not mentioned.

Binarisation: NaN -> 0 (not mentioned counts as negative); -1 -> 0 when
``uncertain_as="negative"`` (the default) or -> 1 when ``uncertain_as="positive"``; 1 -> 1; 0 -> 0.
``labels="all14"`` scores all 14 observations, ``labels="common5"`` only ``COMMON_5``.

With per-label counts ``TP_l, FP_l, FN_l`` over the N studies and per-study counts
``TP_i, FP_i, FN_i`` over the selected labels, and ``a/0 := 0`` everywhere (sklearn's
``zero_division=0``: no predicted positives -> precision 0, no reference positives -> recall 0,
``TP = FP = FN = 0`` -> F1 0):

* micro:   P = sum TP / sum (TP+FP),  R = sum TP / sum (TP+FN),  F1 = 2 sum TP / (2 sum TP + sum FP + sum FN)
* macro:   mean over the L labels of P_l = TP_l/(TP_l+FP_l), R_l = TP_l/(TP_l+FN_l),
           F1_l = 2TP_l/(2TP_l+FP_l+FN_l); labels without any reference or predicted positive
           count as 0 (sklearn ``average="macro"``).  Macro F1 is the mean of per-label F1, not the
           harmonic mean of macro P and macro R.
* example: mean over the N studies of the same per-study ratios (sklearn ``average="samples"``); a
           study with no reference and no predicted positive scores P = R = F1 = 0.  (With
           ``all14`` a normal study usually carries "No Finding" = 1, so this case is rare.)

Headline ("CE precision / recall / F1" as reported by R2Gen and the papers that copy its numbers,
AM-MRG included): **macro** averaging over all 14 labels, uncertain and not-mentioned as negative,
zero_division 0.  Sources: ``compute_ce.py`` of zhjohnchan/R2Gen (fillna(0), -1 -> 0, all label
columns, then ``modules/metrics.py::compute_mlc`` which prints sklearn micro *and* macro P/R/F1);
R2Gen's published MIMIC-CXR CE (P 0.333, R 0.273, F1 0.276) can only be macro, since the micro F1
is the harmonic mean of micro P and R (which would be 0.300); the AM-MRG authors state that their CE
"follows R2Gen's compute_ce.py" (Event-AHU/Medical_Image_Analysis issue #15).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from amrg.labels.schema import CHEXPERT_14, COMMON_5, N_LABELS, UNCERTAIN_AS, binarize

LABEL_SETS: dict[str, tuple[str, ...]] = {"all14": CHEXPERT_14, "common5": COMMON_5}
HEADLINE = "macro"
_ALLOWED_VALUES = (1.0, 0.0, -1.0)


def ce_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    uncertain_as: str = "negative",
    labels: str = "all14",
) -> dict[str, Any]:
    """CE precision / recall / F1 of predicted-report labels ``pred`` against reference labels ``ref``.

    Returns ``{"precision", "recall", "f1"}`` (the headline, macro) plus ``"headline"`` (the same
    with its averaging name), ``"micro"``, ``"macro"``, ``"example"`` (each ``{"precision",
    "recall", "f1"}``), ``"per_label"`` (``{name: {"precision", "recall", "f1", "support"}}``,
    support = reference positives) and ``"convention"``.  All values are plain Python numbers.
    """
    tp, fp, fn = ce_counts(pred, ref, uncertain_as, labels)
    names = LABEL_SETS[labels]
    yp, yr = tp | fp, tp | fn
    # per label (sum over studies) and per study (sum over labels)
    lab = [x.sum(axis=0) for x in (tp, fp, fn)]
    ex = [x.sum(axis=1) for x in (tp, fp, fn)]
    micro = _prf(*(x.sum() for x in lab))
    lp, lr, lf = _prf_arrays(*lab)
    ep, er, ef = _prf_arrays(*ex)
    macro = {"precision": float(lp.mean()), "recall": float(lr.mean()), "f1": float(lf.mean())}
    example = {"precision": float(ep.mean()), "recall": float(er.mean()), "f1": float(ef.mean())}
    per_label = {
        n: {"precision": float(lp[j]), "recall": float(lr[j]), "f1": float(lf[j]), "support": int(yr[:, j].sum())}
        for j, n in enumerate(names)
    }
    averaged = {"micro": micro, "macro": macro, "example": example}
    head = averaged[HEADLINE]
    return {
        "precision": head["precision"],
        "recall": head["recall"],
        "f1": head["f1"],
        "headline": {"averaging": HEADLINE, **head},
        **averaged,
        "per_label": per_label,
        "convention": {
            "headline": f"{HEADLINE} average over the selected labels (R2Gen compute_ce.py / AM-MRG convention)",
            "uncertain_as": uncertain_as,
            "uncertain": f"-1 -> {0 if uncertain_as == 'negative' else 1}",
            "nan": "not mentioned (NaN/None) -> 0 (negative)",
            "labels": labels,
            "label_names": list(names),
            "zero_division": 0,
            "example_empty_study": "no reference and no predicted positive -> P = R = F1 = 0 (sklearn 'samples')",
            "n_studies": int(yp.shape[0]),
        },
    }


def ce_counts(pred: np.ndarray, ref: np.ndarray, uncertain_as: str = "negative",
              labels: str = "all14") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated, binarised per-study, per-label outcomes: bool ``(N, L)`` arrays TP, FP, FN over the
    selected labels (the sufficient statistics of every averaging; :mod:`amrg.metrics.bootstrap`
    resamples their rows)."""
    if uncertain_as not in UNCERTAIN_AS:
        raise ValueError(f"unknown uncertain_as {uncertain_as!r}; allowed: {', '.join(UNCERTAIN_AS)}")
    if labels not in LABEL_SETS:
        raise ValueError(f"unknown labels {labels!r}; allowed: {', '.join(LABEL_SETS)}")
    p = _as_label_array(pred, "pred")
    r = _as_label_array(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref must have the same shape; got pred {p.shape} and ref {r.shape}")
    cols = [CHEXPERT_14.index(n) for n in LABEL_SETS[labels]]
    yp = binarize(p, uncertain_as)[:, cols]
    yr = binarize(r, uncertain_as)[:, cols]
    return yp & yr, yp & ~yr, ~yp & yr


def prf(tp, fp, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 of count arrays (any shape), with ``a/0 := 0``."""
    return _prf_arrays(tp, fp, fn)


def _as_label_array(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype == object:
        a = np.where(np.equal(a, None), np.nan, a)
    try:
        a = a.astype(float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric (1/0/-1/NaN); could not convert: {exc}") from exc
    if a.ndim != 2 or a.shape[1] != N_LABELS:
        raise ValueError(f"{name} must have shape (N, {N_LABELS}) in CheXpert order; got {a.shape}")
    if a.shape[0] == 0:
        raise ValueError(f"{name} has no rows (shape {a.shape}); CE needs at least one study")
    bad_mask = ~(np.isnan(a) | np.isin(a, _ALLOWED_VALUES))
    if bad_mask.any():
        bad = np.unique(a[bad_mask])
        shown = ", ".join(repr(float(v)) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise ValueError(f"{name} has values outside {{1, 0, -1, NaN}}: {shown} ({int(bad_mask.sum())} cells)")
    return a


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _prf_arrays(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _div(tp, tp + fp), _div(tp, tp + fn), _div(2 * tp, 2 * tp + fp + fn)


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p, r, f = _prf_arrays(np.asarray(tp), np.asarray(fp), np.asarray(fn))
    return {"precision": float(p), "recall": float(r), "f1": float(f)}
