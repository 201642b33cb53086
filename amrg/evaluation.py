"""Scoring a test split (paper IV): the systems, their scores and CIs, the result files, the report page.

    systems = baseline_systems(hyps, train_reports, train_fd, test_fd, ref_labels, labeler, uncertain_as)
    scores = score_systems(refs, systems, ref_labels, labeler, ev, seed)   # NLG + CE + paired bootstrap
    result = build_result(scores, ev, seed, phantom=..., n_test=..., ...)   # -> eval/metrics.json
    details = build_details(scores, classifier_test, sample_ids)            # -> eval/details.json

Every system (the model and the baselines of :mod:`amrg.baselines`) is labelled with the same labeler
as the references and scored by the same functions; metric names come from :mod:`amrg.metrics.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from .baselines import most_frequent_report, nearest_neighbour_reports, oracle_reports
from .config import get_dotted
from .labels import count_empty
from .labels.schema import CHEXPERT_14, NO_FINDING, binarize
from .layout import PHANTOM_FLAG
from .metrics import ce_scores, nlg_scores, registry
from .metrics.bootstrap import SystemStats, bootstrap_ci, ce_stats, method, nlg_stats
from .metrics.ce import ce_grid, named_conventions
from .metrics.provenance import file_sha256, package_version
from .metrics.nlg import distinct_ratio, java_problem, prepare_texts, protocol

Labeler = Callable[[list[str]], np.ndarray]


def check_java(ev) -> None:
    """Fail before any compute when METEOR / PTB would need a Java that is not there."""
    if problem := java_problem(ev.nlg_tokenization, ev.meteor):
        raise SystemExit(f"evaluate: {problem} (params.yaml: `evaluate.meteor: false` and "
                         "`evaluate.nlg_tokenization: r2gen` score without Java)")


@dataclass
class SystemScores:
    texts: list[str]  # the system's reports, in test-study order
    scores: dict  # NLG scores + "ce" (ce_scores)
    labels: np.ndarray  # (S, 14) labels of the system's reports
    stats: SystemStats | None  # per-study statistics the bootstrap resamples (None without bootstrap)
    grid: dict | None = None  # every CE convention (amrg.metrics.ce.ce_grid) under the same labeler


@dataclass
class Scores:
    systems: dict[str, SystemScores]  # "model" first, then the baselines
    bootstrap: dict | None  # bootstrap_ci(...): {"ci": ..., "paired": ...}
    seconds: dict[str, float]  # scoring_seconds, bootstrap_seconds


def baseline_systems(hyps: list[str], train_reports: list[str], train_fd: torch.Tensor | Iterable[torch.Tensor],
                     test_fd: torch.Tensor,
                     ref_labels: np.ndarray, labeler: Labeler, uncertain_as: str) -> dict[str, list[str]]:
    """The model's reports and the three baselines' (most frequent, nearest neighbour, oracle template)."""
    return {"model": hyps,
            "most_frequent": [most_frequent_report(train_reports)] * len(hyps),
            "nearest_neighbour": nearest_neighbour_reports(train_fd, train_reports, test_fd),
            "oracle_template": oracle_reports(ref_labels, train_reports, labeler, uncertain_as)}


def score_systems(refs: list[str], systems: dict[str, list[str]], ref_labels: np.ndarray, labeler: Labeler,
                  ev, seed: int) -> Scores:
    """NLG + CE of every system under ``ev`` (:class:`amrg.config.Evaluate`), and ``ev.bootstrap``
    paired resamples of the test studies for 95% CIs (none when 0)."""
    import time

    t0, out = time.perf_counter(), {}
    for name, hyps in systems.items():
        hyp_labels = labeler(hyps)
        ce = ce_scores(hyp_labels, ref_labels, uncertain_as=ev.ce_uncertain_as, labels=ev.ce_labels)
        scores = {**nlg_scores(refs, hyps, tokenization=ev.nlg_tokenization, meteor=ev.meteor), "ce": ce}
        stats = SystemStats(nlg_stats(*prepare_texts(refs, hyps, ev.nlg_tokenization)),
                            ce_stats(hyp_labels, ref_labels, ev.ce_uncertain_as, ev.ce_labels)) if ev.bootstrap else None
        out[name] = SystemScores(hyps, scores, hyp_labels, stats, ce_grid(hyp_labels, ref_labels))
    t1 = time.perf_counter()
    boot = bootstrap_ci({k: v.stats for k, v in out.items()}, ev.bootstrap, seed) if ev.bootstrap else None
    seconds = {"scoring_seconds": round(t1 - t0, 3), "bootstrap_seconds": round(time.perf_counter() - t1, 3)}
    return Scores(out, boot, seconds)


def template_guard(scores: Scores, ref_labels: np.ndarray, uncertain_as: str) -> dict:
    """Template collapse, per system: the share of distinct reports, the vocabulary size, and per label
    the predicted vs reference prevalence (under the CE convention's ``uncertain_as``). A system that
    writes one report for every study has a distinct ratio of 1/S, whatever BLEU says."""
    ref = binarize(ref_labels, uncertain_as).mean(0)
    out = {}
    for name, s in scores.systems.items():
        pred = binarize(s.labels, uncertain_as).mean(0)
        out[name] = {"distinct_ratio": distinct_ratio(s.texts),
                     "vocabulary": len({w for t in s.texts for w in t.split()}),
                     "prevalence": {n: {"predicted": float(pred[j]), "reference": float(ref[j])}
                                    for j, n in enumerate(CHEXPERT_14)}}
    return out


def compact_guard(guard: dict) -> dict:
    """One system's guard for metrics.json: distinct ratio, vocabulary and, per label, the predicted and
    reference prevalence as ``[predicted, reference]`` (a collapsed system predicts ~0 for every finding)."""
    return {"distinct_ratio": guard["distinct_ratio"], "vocabulary": guard["vocabulary"],
            "prevalence": {n: [round(p["predicted"], 4), round(p["reference"], 4)] for n, p in guard["prevalence"].items()}}


HEADLINE_DIFFERENCES = ("ce.f1", "ce.precision", "ce.recall", "BLEU_4", "CIDEr")


def headline_differences(bootstrap: dict | None) -> dict | None:
    """The model minus each baseline on the headline metrics, with the paired 95% CI and the share of
    resamples where the difference is <= 0 (the full set of differences is in details.json)."""
    if not bootstrap:
        return None
    return {name: {key: {k: round(v, 4) for k, v in d.items()} for key in HEADLINE_DIFFERENCES
                   if (d := get_dotted(diffs, key))} for name, diffs in bootstrap["paired"].items()}


def collapse_warning(scores: Scores, guard: dict) -> str | None:
    """A warning when the model does not beat the most frequent report on CE F1 (the paired 95% CI of
    model - most_frequent does not lie above 0), or writes fewer distinct reports than 1 in 10 studies."""
    problems = []
    paired = ((scores.bootstrap or {}).get("paired") or {}).get("most_frequent", {}).get("ce", {}).get("f1")
    if paired is not None and paired["lo"] <= 0:
        problems.append(f"the model does not beat the most-frequent report on CE F1 (paired difference "
                        f"{paired['diff']:+.3f}, 95% CI [{paired['lo']:+.3f}, {paired['hi']:+.3f}])")
    elif paired is None and "most_frequent" in scores.systems:
        f1 = scores.systems["model"].scores["ce"]["f1"], scores.systems["most_frequent"].scores["ce"]["f1"]
        if f1[0] <= f1[1]:
            problems.append(f"the model's CE F1 {f1[0]:.3f} is not above the most-frequent report's {f1[1]:.3f}")
    if guard["model"]["distinct_ratio"] < 0.1:
        problems.append(f"only {guard['model']['distinct_ratio']:.1%} of the generated reports are distinct")
    return ("possible template collapse: " + "; ".join(problems)) if problems else None


def truncate_references(refs: list[str], tokenizer, max_tokens: int) -> list[str]:
    """The references cut to their first ``max_tokens`` tokens of the LLM's tokenizer, as the released
    AM-MRG and MambaXray-VL code score (100 tokens; 60 on IU X-ray); ``max_tokens = 0``: unchanged."""
    if not max_tokens:
        return list(refs)
    ids = tokenizer(list(refs), add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    return [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _version(package: str) -> str:
    return package_version(package) or "not installed"


def labeler_provenance(labels) -> dict:
    """Which labeler made the CE labels (both sides), with the checkpoint's sha256 for CheXbert.
    ``labels`` is :class:`amrg.config.Labels`."""
    out = {"labeler": labels.labeler, "amrg": _version("amrg")}
    if labels.labeler == "chexbert" and labels.chexbert_checkpoint:
        out.update(checkpoint=labels.chexbert_checkpoint, sha256=file_sha256(labels.chexbert_checkpoint),
                   tokenizer=labels.chexbert_tokenizer)
    return out


def _headline(s: dict) -> dict:
    """A system's scores without the per-label CE and the convention (those go to details.json)."""
    return {**{k: v for k, v in s.items() if k != "ce"},
            "ce": {k: v for k, v in s["ce"].items() if k not in ("per_label", "convention", "headline")}}


def build_result(scores: Scores, ev, seed: int, *, phantom: bool, n_test: int, classifier_test: dict,
                 timings: dict, guard: dict | None = None, labels=None) -> dict:
    """``eval/metrics.json``: headline scores of the model and baselines, 95% CIs, protocol, convention,
    the paired differences of the headline metrics (model minus each baseline) and the template-collapse
    guard of every system (distinct ratio, vocabulary, per-label predicted vs reference prevalence)."""
    model = scores.systems["model"]
    protocol_ = protocol(ev.nlg_tokenization, ev.meteor)
    if ev.reference_max_tokens:
        protocol_["references_truncated"] = (f"to their first {ev.reference_max_tokens} tokens of the LLM's tokenizer "
                                             "(evaluate.reference_max_tokens), as the released AM-MRG code scores")
    return {
        PHANTOM_FLAG: phantom,
        "note": "scores on PHANTOM images drawn from the labels; not comparable with real-image results"
        if phantom else "real images",
        "n_test": n_test,
        "empty_generated": count_empty(model.texts),  # scored as all-negative reports, counted here
        "nlg_protocol": protocol_,
        "ce_convention": {k: v for k, v in model.scores["ce"]["convention"].items() if k != "label_names"},
        "ce_conventions": named_conventions(model.grid),  # the model under every named convention
        "provenance": registry.provenance({"pycocoevalcap": _version("pycocoevalcap")},
                                          {"labeler": labeler_provenance(labels)} if labels is not None else None),
        "ci_method": method(ev.bootstrap, seed) if scores.bootstrap else None,
        "model": _headline(model.scores),
        "baselines": {name: _headline(s.scores) for name, s in scores.systems.items() if name != "model"},
        "ci95": scores.bootstrap["ci"] if scores.bootstrap else None,
        "classifier_test": {"mean_auroc": classifier_test["mean_auroc"], "mean_ap": classifier_test["mean_ap"]},
        "paired": headline_differences(scores.bootstrap),
        **({"template_guard": {n: compact_guard(g) for n, g in guard.items()},
            "warning": collapse_warning(scores, guard)} if guard is not None else {}),
        **timings, **scores.seconds,
    }


def build_details(scores: Scores, classifier_test: dict, sample_ids: list[str], guard: dict | None = None,
                  labeler: str = "rules") -> dict:
    """``eval/details.json``: per-label CE of every system, paired differences, per-label AUROC, and
    per label the predicted vs reference prevalence of every system."""
    return {"ce_per_label": per_label(scores),
            "ce_grid": {labeler: {name: s.grid for name, s in scores.systems.items()}},  # labeler x cell
            "ce_conventions": {labeler: {name: named_conventions(s.grid) for name, s in scores.systems.items()}},
            "prevalence": {n: g["prevalence"] for n, g in guard.items()} if guard is not None else None,
            "ce_label_names": scores.systems["model"].scores["ce"]["convention"]["label_names"],
            "paired_differences": scores.bootstrap["paired"] if scores.bootstrap else None,
            "classifier_test_per_label": classifier_test["per_label"],
            "report_samples": sample_ids}


def per_label(scores: Scores) -> dict[str, dict]:
    return {name: s.scores["ce"]["per_label"] for name, s in scores.systems.items()}


def pick_samples(ref_labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` test rows for the report, half with a reference finding (a positive other than No Finding)."""
    rng = np.random.default_rng(seed)
    finding = np.flatnonzero(np.delete(binarize(ref_labels), NO_FINDING, axis=1).any(1))
    other = np.setdiff1d(np.arange(len(ref_labels)), finding)
    a = rng.choice(finding, min(len(finding), (k + 1) // 2), replace=False)
    b = rng.choice(other, min(len(other), k - len(a)), replace=False)
    return np.sort(np.concatenate([a, b]).astype(int))


@dataclass
class EvalSplit:
    """The test studies as evaluate holds them: ids, reference reports and labels, view rows into ``pixels``."""

    ids: list[str]
    refs: list[str]
    ref_labels: np.ndarray  # (S, 14)
    view_rows: np.ndarray  # (S, N_VIEWS) rows of pixels
    pixels: torch.Tensor  # uint8 (N, H, W)


def report_samples(run, test: EvalSplit, rows: np.ndarray, study_probs: np.ndarray, hyps: list[str],
                   hyp_labels: np.ndarray, labeler: Labeler, cam, uncertain_as: str, batch_size: int) -> list:
    """Samples for report.html: both views, CAM overlays of up to MAX_CAMS predicted diseases
    (:meth:`amrg.inference.Run.explain`), and the two reports with their labels."""
    from .cam import heat_overlay
    from .inference import predicted
    from .report_html import Sample, positive_labels, sentence_findings

    texts = sentence_findings([test.refs[i] for i in rows] + [hyps[i] for i in rows], labeler, uncertain_as)
    cams = run.explain(test.pixels, test.view_rows[rows], study_probs[rows], cam, batch_size)
    out = []
    for j, i in enumerate(rows):
        views = list(dict.fromkeys(test.view_rows[i].tolist()))
        sample = Sample(test.ids[i], [test.pixels[r].numpy() for r in views], texts[j], texts[len(rows) + j],
                        positive_labels(test.ref_labels[i], uncertain_as), positive_labels(hyp_labels[i], uncertain_as),
                        [(CHEXPERT_14[d], p) for d, p in predicted(study_probs[i])])
        for c in cams[j]:
            sample.overlays.append((f"{c['label']}, view {views.index(c['image'])}: {c['where']}",
                                    heat_overlay(test.pixels[c['image']].numpy(), c["map"])))
        out.append(sample)
    return out


def phantom_localisation(run, test: EvalSplit, labels: np.ndarray, views: np.ndarray, seed: int, method: str,
                         batch_size: int, backend: str = "auto") -> dict:
    """Where the truth is known (phantom images, :mod:`amrg.data.phantoms`): for every test image and every
    finding drawn on it, the classifier's ``method`` CAM of that disease against the drawn region. The
    pointing-game hit rate (:func:`amrg.cam.pointing_game`) and the mean lift of CAM mass inside the
    region over chance (:func:`amrg.cam.cam_hit`: 1 is a uniform map), per disease and over all pairs.
    ``labels`` are the studies' labels the images were drawn from (preprocess's), ``views[r]`` image row
    r's view index (the drawing's view is ``views[r] % 2``), ``seed`` preprocess's ``runtime.seed``."""
    from .cam import cam_hit, pointing_game
    from .data.phantoms import phantom_regions, phantom_seed

    size = int(test.pixels.shape[-1])
    pairs = []  # (image row, disease, region)
    for s, rows in enumerate(test.view_rows):
        for r in dict.fromkeys(int(x) for x in rows):
            drawn = phantom_regions(labels[s], int(views[r]) % 2, size, phantom_seed(test.ids[s], seed))
            pairs += [(r, CHEXPERT_14.index(name), region) for name, region in drawn.items() if region.any()]
    maps = run.cams(test.pixels[[r for r, _, _ in pairs]], [d for _, d, _ in pairs], method, batch_size, backend)
    per: dict[str, dict[str, list]] = {}
    for (_, d, region), m in zip(pairs, maps):
        p = per.setdefault(CHEXPERT_14[d], {"hit": [], "lift": []})
        p["hit"].append(pointing_game(m, region))
        p["lift"].append(cam_hit(m, region)["lift"])
    hits = [h for p in per.values() for h in p["hit"]]
    lifts = [v for p in per.values() for v in p["lift"]]
    return {"method": method, "pairs": len(pairs),
            "pointing_game": float(np.mean(hits)) if hits else None,
            "mean_lift": float(np.mean(lifts)) if lifts else None,
            "per_disease": {n: {"pairs": len(p["hit"]), "pointing_game": float(np.mean(p["hit"])),
                                "mean_lift": float(np.mean(p["lift"]))} for n, p in per.items()}}


def summary(result: dict, report_path) -> str:
    """The console summary of an evaluation: the compact headline table (:mod:`amrg.metrics.table`), the CE
    convention and the CI method."""
    from .metrics.table import caption, headline_table, to_markdown

    lines = [caption(result), to_markdown(headline_table(result))]
    conv = result["ce_convention"]
    lines.append(f"CE headline: {conv['headline']}; labels {conv['labels']}, uncertain as {conv['uncertain_as']}")
    if result.get("ci_method"):
        lines.append(f"95% CIs: paired bootstrap, {result['ci_method']['resamples']} resamples of the test studies "
                     "(METEOR has none)")
    for name, d in (result.get("paired") or {}).items():
        if "ce.f1" in d:
            f1 = d["ce.f1"]
            lines.append(f"model - {name}, CE F1: {f1['diff']:+.3f} (95% CI [{f1['lo']:+.3f}, {f1['hi']:+.3f}])")
    if result.get("warning"):
        lines.append(f"WARNING: {result['warning']}")
    lines.append(f"classifier test mean AUROC: {result['classifier_test']['mean_auroc']:.3f}")
    lines.append(f"report: {report_path}")
    return "\n".join(lines)
