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

Numbers that match published ones: :func:`ce_grid` computes every cell of {``all14``, ``common5``} x
{micro, macro, example} x {uncertain as negative, as positive} from the same counts (cells named like
``all14.macro.uncertain_negative``), and :func:`named_conventions` reads from it the conventions papers and
tools report under their own names (:data:`NAMED_CONVENTIONS`: R2Gen macro-14, "CheXbert micro-5" of Miura
et al. / RGRG / f1chexbert with uncertain as positive, LLaVA-Rad's Micro/Macro-F1-14/-5 with and without
"+", example-based of PromptMRG / RGRG / CXRMate), each with the files that compute it. ``ce_scores`` is
unchanged by them. README's CE-conventions table is :func:`conventions_table`'s output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from amrg.labels.schema import CHEXPERT_14, COMMON_5, N_LABELS, UNCERTAIN_AS, binarize

LABEL_SETS: dict[str, tuple[str, ...]] = {"all14": CHEXPERT_14, "common5": COMMON_5}
AVERAGINGS: tuple[str, ...] = ("micro", "macro", "example")
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
    averaged, (lp, lr, lf) = _averaged(tp, fp, fn)
    per_label = {
        n: {"precision": float(lp[j]), "recall": float(lr[j]), "f1": float(lf[j]), "support": int(yr[:, j].sum())}
        for j, n in enumerate(names)
    }
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


def _averaged(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[dict[str, dict[str, float]], tuple]:
    """Micro, macro and example P/R/F1 of bool ``(N, L)`` TP/FP/FN arrays (see the module docstring), plus the
    per-label ``(P_l, R_l, F1_l)`` arrays the macro average is taken over."""
    # per label (sum over studies) and per study (sum over labels)
    lab = [x.sum(axis=0) for x in (tp, fp, fn)]
    ex = [x.sum(axis=1) for x in (tp, fp, fn)]
    micro = _prf(*(x.sum() for x in lab))
    lp, lr, lf = _prf_arrays(*lab)
    ep, er, ef = _prf_arrays(*ex)
    macro = {"precision": float(lp.mean()), "recall": float(lr.mean()), "f1": float(lf.mean())}
    example = {"precision": float(ep.mean()), "recall": float(er.mean()), "f1": float(ef.mean())}
    return {"micro": micro, "macro": macro, "example": example}, (lp, lr, lf)


def prf(tp, fp, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 of count arrays (any shape), with ``a/0 := 0``."""
    return _prf_arrays(tp, fp, fn)


def grid_cell(labels: str, averaging: str, uncertain_as: str) -> str:
    """Name of one cell of :func:`ce_grid`: ``"{labels}.{averaging}.uncertain_{uncertain_as}"``,
    e.g. ``grid_cell("all14", "macro", "negative") == "all14.macro.uncertain_negative"``."""
    for value, allowed, what in ((labels, tuple(LABEL_SETS), "labels"), (averaging, AVERAGINGS, "averaging"),
                                 (uncertain_as, UNCERTAIN_AS, "uncertain_as")):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    return f"{labels}.{averaging}.uncertain_{uncertain_as}"


GRID_CELLS: tuple[str, ...] = tuple(
    grid_cell(lab, avg, unc) for lab in LABEL_SETS for avg in AVERAGINGS for unc in UNCERTAIN_AS
)
"""The 12 cells of :func:`ce_grid`, in its order: label set, then averaging, then uncertain mapping."""


def ce_grid(pred: np.ndarray, ref: np.ndarray) -> dict[str, dict[str, float]]:
    """Every CE convention cell of one labeler's label arrays: {``all14``, ``common5``} x {``micro``,
    ``macro``, ``example``} x {uncertain (-1) as negative, as positive}.

    ``pred`` / ``ref``: ``(N, 14)`` CheXpert values (1 / 0 / -1 / NaN or None) of the generated and the
    reference reports, in ``CHEXPERT_14`` order, from the same labeler. Returns ``{cell: {"precision",
    "recall", "f1"}}`` keyed by :data:`GRID_CELLS` (e.g. ``all14.macro.uncertain_negative``), in that
    order, plain floats. Each cell is computed exactly as :func:`ce_scores` computes that averaging
    (same counts, same binarisation, ``a/0 := 0``), so ``ce_grid(p, r)["all14.macro.uncertain_negative"]``
    is the pipeline's headline CE (R2Gen ``compute_ce.py``). :func:`named_conventions` picks the cells
    that papers and tools report under their names.
    """
    out: dict[str, dict[str, float]] = {}
    for labels in LABEL_SETS:
        by_unc = {unc: _averaged(*ce_counts(pred, ref, unc, labels))[0] for unc in UNCERTAIN_AS}
        for avg in AVERAGINGS:
            for unc in UNCERTAIN_AS:
                out[grid_cell(labels, avg, unc)] = by_unc[unc][avg]
    return out


# the f1chexbert code path (uncertain -> positive) and the tools that score through it
_F1CHEXBERT_SOURCES: tuple[str, ...] = (
    "PyPI:f1chexbert==0.0.2:f1chexbert/f1chexbert.py",
    "jbdel/vilmedic:vilmedic/blocks/scorers/scores.py",
    "jbdel/RadEval:radeval/metrics/_chexbert_base.py",
    "jbdel/RadEval:radeval/metrics/f1chexbert/adapter.py",
    "microsoft/LLaVA-Rad:llava/eval/rrg_eval/rrg_eval/chexbert.py",
    "microsoft/LLaVA-Rad:llava/eval/rrg_eval/run.py",
)

_UNC_NEG = "blank (NaN) and uncertain (-1) -> negative"
_UNC_POS = "blank (NaN) -> negative, uncertain (-1) -> positive"

NAMED_CONVENTIONS: dict[str, dict[str, Any]] = {
    # name -> the grid cell it is, a one-line definition, who reports it (aka: the names they print) and the
    # files that compute it ("owner/repo:path"; "PyPI:package==version:path" for a package's source).
    # Every source below was read; what could not be read is marked "unverified" in used_by.
    "r2gen_macro14": {
        "cell": "all14.macro.uncertain_negative",
        "definition": (
            "mean over the 14 labels of per-label P, R and F1 (sklearn average='macro', "
            f"0 for 0/0); {_UNC_NEG}"
        ),
        "used_by": [
            "R2Gen / R2GenCMN CE P/R/F1 (CheXpert labeler; compute_ce.py F1_MACRO, RECALL_MACRO, PRECISION_MACRO)",
            "AM-MRG / CXPMRG-Bench (authors: CE follows R2Gen compute_ce.py, Event-AHU/Medical_Image_Analysis#15)",
            "amrg headline ce.precision / ce.recall / ce.f1",
            "LLaVA-Rad rrg_eval Macro-F1-14 (CheXbert)",
            "CXRMate / cvt2distilgpt2 {precision,recall,f1}_macro (CheXbert)",
            "MAIRA-2 Macro-F1-14 (unverified: no evaluation code of it read)",
        ],
        "aka": ["CE P/R/F1", "F1_MACRO", "Macro-F1-14", "ce_f1_macro", "f1_macro"],
        "sources": [
            "zhjohnchan/R2Gen:compute_ce.py",
            "zhjohnchan/R2Gen:modules/metrics.py",
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/rrg_eval/chexbert.py",
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/run.py",
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/rrg_eval/factuality_utils.py",
            "aehrc/cvt2distilgpt2:tools/metrics/chexbert.py",
            "aehrc/cxrmate:tools/metrics/chexbert.py",
        ],
    },
    "r2gen_micro14": {
        "cell": "all14.micro.uncertain_negative",
        "definition": (
            "P, R, "
            f"F1 of the TP/FP/FN pooled over the 14 labels and all studies (sklearn average='micro'); {_UNC_NEG}"
        ),
        "used_by": [
            "R2Gen compute_ce.py F1_MICRO / RECALL_MICRO / PRECISION_MICRO (printed beside the macro values)",
            "LLaVA-Rad rrg_eval Micro-F1-14 (CheXbert)",
            "CXRMate / cvt2distilgpt2 {precision,recall,f1}_micro (CheXbert; 0/0 gives NaN there, 0 here)",
            "MAIRA-2 Micro-F1-14 (unverified: no evaluation code of it read)",
        ],
        "aka": ["F1_MICRO", "Micro-F1-14", "ce_f1_micro", "f1_micro"],
        "sources": [
            "zhjohnchan/R2Gen:compute_ce.py",
            "zhjohnchan/R2Gen:modules/metrics.py",
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/rrg_eval/chexbert.py",
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/run.py",
            "aehrc/cvt2distilgpt2:tools/metrics/chexbert.py",
            "aehrc/cxrmate:tools/metrics/chexbert.py",
        ],
    },
    "llava_rad_micro5": {
        "cell": "common5.micro.uncertain_negative",
        "definition": (
            "micro P, R, F1 over the 5 labels Atelectasis, Cardiomegaly, Consolidation, "
            f"Edema, Pleural Effusion; {_UNC_NEG}"
        ),
        "used_by": [
            "LLaVA-Rad rrg_eval Micro-F1-5 (the unmarked variant; CheXbert)",
            "MAIRA-2 Micro-F1-5 (unverified: no evaluation code of it read)",
        ],
        "aka": ["Micro-F1-5"],
        "sources": [
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/rrg_eval/chexbert.py",
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/run.py",
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/rrg_eval/factuality_utils.py",
        ],
    },
    "llava_rad_macro5": {
        "cell": "common5.macro.uncertain_negative",
        "definition": f"mean over the 5 common labels of per-label P, R and F1 (0 for 0/0); {_UNC_NEG}",
        "used_by": [
            "LLaVA-Rad rrg_eval Macro-F1-5 (CheXbert)",
            "MAIRA-2 Macro-F1-5 (unverified: no evaluation code of it read)",
        ],
        "aka": ["Macro-F1-5"],
        "sources": [
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/rrg_eval/chexbert.py",
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/run.py",
            "microsoft/LLaVA-Rad:llava/eval/rrg_eval/rrg_eval/factuality_utils.py",
        ],
    },
    "chexbert_micro5": {
        "cell": "common5.micro.uncertain_positive",
        "definition": f"CheXbert micro-5: micro P, R, F1 over the 5 common labels; {_UNC_POS}",
        "used_by": [
            "Miura et al. 2021 (ifcc) 5-micro",
            "RGRG precision/recall/f1_micro_5",
            ("f1chexbert package (rrg mode) cr_5 micro avg, "
             "and through it ViLMedic chexbert-5_micro avg and RadEval f1chexbert_5_micro_f1"),
            "LLaVA-Rad rrg_eval Micro-F1-5+",
        ],
        "aka": ["CheXbert micro-5 F1", "5-micro", "f1_micro_5", "chexbert-5_micro avg_f1-score",
                "f1chexbert_5_micro_f1", "Micro-F1-5+"],
        "sources": [
            "ysmiura/ifcc:eval_prf.py",
            "ttanida/rgrg:src/full_model/evaluate_full_model/evaluate_language_model.py",
            *_F1CHEXBERT_SOURCES,
        ],
    },
    "chexbert_micro14": {
        "cell": "all14.micro.uncertain_positive",
        "definition": f"micro P, R, F1 over all 14 labels; {_UNC_POS}",
        "used_by": [
            "RGRG precision/recall/f1_micro_all",
            ("f1chexbert package (rrg mode) cr micro avg, "
             "and through it ViLMedic chexbert-all_micro avg and RadEval f1chexbert_all_micro_f1"),
            "LLaVA-Rad rrg_eval Micro-F1-14+",
        ],
        "aka": ["f1_micro_all", "chexbert-all_micro avg_f1-score", "f1chexbert_all_micro_f1", "Micro-F1-14+"],
        "sources": [
            "ttanida/rgrg:src/full_model/evaluate_full_model/evaluate_language_model.py",
            *_F1CHEXBERT_SOURCES,
        ],
    },
    "chexbert_macro14": {
        "cell": "all14.macro.uncertain_positive",
        "definition": f"mean over the 14 labels of per-label P, R and F1 (0 for 0/0); {_UNC_POS}",
        "used_by": [
            ("f1chexbert package (rrg mode) cr macro avg, "
             "and through it ViLMedic chexbert-all_macro avg and RadEval f1chexbert_all_macro_f1"),
            "LLaVA-Rad rrg_eval Macro-F1-14+",
        ],
        "aka": ["chexbert-all_macro avg_f1-score", "f1chexbert_all_macro_f1", "Macro-F1-14+"],
        "sources": [
            *_F1CHEXBERT_SOURCES,
        ],
    },
    "chexbert_macro5": {
        "cell": "common5.macro.uncertain_positive",
        "definition": f"mean over the 5 common labels of per-label P, R and F1 (0 for 0/0); {_UNC_POS}",
        "used_by": [
            ("f1chexbert package (rrg mode) cr_5 macro avg, "
             "and through it ViLMedic chexbert-5_macro avg and RadEval f1chexbert_5_macro_f1"),
            "LLaVA-Rad rrg_eval Macro-F1-5+",
        ],
        "aka": ["chexbert-5_macro avg_f1-score", "f1chexbert_5_macro_f1", "Macro-F1-5+"],
        "sources": [
            *_F1CHEXBERT_SOURCES,
        ],
    },
    "example14": {
        "cell": "all14.example.uncertain_negative",
        "definition": (
            "mean over the studies of per-study P, R, F1 over the 14 labels (0 for 0/0, "
            f"so a study with no positive at all scores 0); {_UNC_NEG}"
        ),
        "used_by": [
            "PromptMRG ce_precision / ce_recall / ce_f1 (CheXbert; its model selection metric)",
            "RGRG precision/recall/f1_example_all (following Nicolson et al.)",
            ("CXRMate / cvt2distilgpt2 {precision,recall,f1}_example (CheXbert; "
             "CXRMate can first average the counts over a study's images)"),
        ],
        "aka": ["example-based CE", "ce_f1", "f1_example_all", "f1_example"],
        "sources": [
            "jhb86253817/PromptMRG:modules/metrics_clinical.py",
            "ttanida/rgrg:src/full_model/evaluate_full_model/evaluate_language_model.py",
            "aehrc/cvt2distilgpt2:tools/metrics/chexbert.py",
            "aehrc/cxrmate:tools/metrics/chexbert.py",
        ],
    },
}
"""The CE conventions the field reports, by name, in order (R2Gen's headline first). README's CE-conventions table lists them."""


def named_conventions(grid: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{name: {"precision", "recall", "f1"}}`` for every entry of :data:`NAMED_CONVENTIONS`, read from the
    cells of ``grid`` (the output of :func:`ce_grid`), in :data:`NAMED_CONVENTIONS` order."""
    missing = sorted({c["cell"] for c in NAMED_CONVENTIONS.values()} - set(grid))
    if missing:
        raise KeyError(f"grid lacks the cells {', '.join(missing)}; pass the output of ce_grid()")
    return {name: {k: grid[c["cell"]][k] for k in ("precision", "recall", "f1")}
            for name, c in NAMED_CONVENTIONS.items()}


def conventions_table() -> str:
    """:data:`NAMED_CONVENTIONS` as a markdown table (convention name = grid cell | exact definition |
    used by | source), the one in README."""
    rows = ["| convention name (= `ce_grid` cell) | exact definition | used by | source (owner/repo:path) |",
            "|---|---|---|---|"]
    for name, c in NAMED_CONVENTIONS.items():
        cells = [f"`{name}` = `{c['cell']}`", c["definition"], "; ".join(c["used_by"]),
                 "<br>".join(f"`{src}`" for src in c["sources"])]
        rows.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(rows) + "\n"


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
