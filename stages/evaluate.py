"""Stage evaluate (paper IV): generate test reports, score NLG and clinical efficacy vs baselines.

The test split is read here and nowhere else. The trained run (classifier, memory banks, generator) is
rebuilt by :func:`amrg.inference.load_run`, reports are decoded with ``decode.*``, labelled with the
same labeler as the references, and scored: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, protocol
in metrics.json) and CE precision/recall/F1 (convention in metrics.json). Three baselines are scored
beside the model on every run (most frequent training report, nearest neighbour by classifier
features, oracle template from the true labels; see :mod:`amrg.baselines`); the classifier's test
AUROC is reported too. ``evaluate.bootstrap`` resamples of the test studies give paired 95% CIs
(:mod:`amrg.metrics.bootstrap`). Outputs: ``metrics.json`` (headline scores, CIs, protocol),
``details.json`` (per-label CE, paired differences), ``predictions.parquet`` and ``report.html``.
"""

from __future__ import annotations

import numpy as np
import torch

from amrg.baselines import most_frequent_report, nearest_neighbour_reports, oracle_reports
from amrg.cam import heat_overlay
from amrg.data.store import load_images, load_studies
from amrg.inference import MAX_CAMS, NO_FINDING, load_run, predicted, study_probabilities
from amrg.io import read_json, setup_runtime, write_json, write_parquet, write_text
from amrg.labels import count_empty, label
from amrg.labels.schema import CHEXPERT_14
from amrg.metrics import ce_scores, nlg_scores
from amrg.metrics.bootstrap import bootstrap_ci, ce_stats, method, nlg_stats, SystemStats
from amrg.metrics.classification import multilabel_metrics
from amrg.metrics.nlg import java_problem, prepare_texts, protocol
from amrg.models.classifier import binarise_targets
from amrg.models.features import N_VIEWS
from amrg.report_html import Sample, positive_labels, render, sentence_findings

from .common import ARTIFACTS, PHANTOM_FLAG, Timer, is_phantom, start, write_resolved

PRE, CLS, OUT = ARTIFACTS / "preprocess", ARTIFACTS / "classifier", ARTIFACTS / "eval"


def check_java(ev) -> None:
    """Fail before any compute when METEOR / PTB would need a Java that is not there."""
    if problem := java_problem(ev.nlg_tokenization, ev.meteor):
        raise SystemExit(f"evaluate: {problem}. Fix: install a Java runtime >= 8 (e.g. "
                         "`apt-get install default-jre-headless`), or set `evaluate.meteor: false` "
                         "(and `evaluate.nlg_tokenization: r2gen`) in params.yaml to score without METEOR.")


def score(refs: list[str], hyps: list[str], ref_labels: np.ndarray, labeler, ev) -> tuple[dict, SystemStats | None, np.ndarray]:
    """NLG + CE of ``hyps`` (generated reports are labelled exactly as the references were), the
    per-study statistics the bootstrap resamples (None without ``evaluate.bootstrap``), and the labels."""
    hyp_labels = labeler(hyps)
    ce = ce_scores(hyp_labels, ref_labels, uncertain_as=ev.ce_uncertain_as, labels=ev.ce_labels)
    scores = {**nlg_scores(refs, hyps, tokenization=ev.nlg_tokenization, meteor=ev.meteor), "ce": ce}
    stats = SystemStats(nlg_stats(*prepare_texts(refs, hyps, ev.nlg_tokenization)),
                        ce_stats(hyp_labels, ref_labels, ev.ce_uncertain_as, ev.ce_labels)) if ev.bootstrap else None
    return scores, stats, hyp_labels


def pick_samples(ref_labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` test rows for the report, half with a reference finding (a positive other than No Finding)."""
    rng = np.random.default_rng(seed)
    finding = np.flatnonzero((np.delete(np.nan_to_num(ref_labels), NO_FINDING, axis=1) == 1).any(1))
    other = np.setdiff1d(np.arange(len(ref_labels)), finding)
    a = rng.choice(finding, min(len(finding), (k + 1) // 2), replace=False)
    b = rng.choice(other, min(len(other), k - len(a)), replace=False)
    return np.sort(np.concatenate([a, b]).astype(int))


def samples(run, rows: np.ndarray, view_rows: np.ndarray, study_probs: np.ndarray, pixels: torch.Tensor,
            ids: list[str], refs: list[str], hyps: list[str], ref_labels, hyp_labels, labeler, params) -> list[Sample]:
    """Report samples: views, CAM overlays of up to MAX_CAMS predicted diseases, reports with their labels."""
    ua = params.evaluate.ce_uncertain_as
    texts = sentence_findings([refs[i] for i in rows] + [hyps[i] for i in rows], labeler, ua)
    cams = run.explain(pixels, view_rows[rows], study_probs[rows], params.cam, params.evaluate.batch_size)
    out = []
    for j, i in enumerate(rows):
        views = list(dict.fromkeys(view_rows[i].tolist()))
        sample = Sample(ids[i], [pixels[r].numpy() for r in views], texts[j], texts[len(rows) + j],
                        positive_labels(ref_labels[i], ua), positive_labels(hyp_labels[i], ua),
                        [(CHEXPERT_14[d], p) for d, p in predicted(study_probs[i])])
        for c in cams[j]:
            sample.overlays.append((f"{c['label']}, view {views.index(c['image'])}: {c['where']}",
                                    heat_overlay(pixels[c['image']].numpy(), c["map"])))
        out.append(sample)
    return out


def main(argv: list[str] | None = None) -> None:
    params, log = start("evaluate", argv)
    ev, timer = params.evaluate, Timer()
    check_java(ev)
    device = setup_runtime(params.runtime)
    run = load_run(ARTIFACTS, device, params.runtime.precision)
    studies, images = load_studies(PRE / "studies.parquet"), load_images(PRE / "images.parquet")
    test, train = studies.rows("test"), studies.rows("train")
    if len(test) == 0:
        raise ValueError("no test studies after preprocess: nothing to evaluate")
    pixels = torch.from_numpy(images.pixels.copy())
    ids = [studies.ids[i] for i in test]

    test_imgs = np.flatnonzero(images.split == "test")
    idx = studies.index()
    img_targets = binarise_targets(torch.from_numpy(studies.labels[[idx[images.study_ids[r]] for r in test_imgs]]),
                                   read_json(CLS / "config.json")["uncertain_as"]).numpy()
    img_probs = run.probabilities(pixels, test_imgs, ev.batch_size)
    cls_test = multilabel_metrics(img_targets, img_probs)

    view_rows = images.study_views(ids, N_VIEWS)
    f, fd = run.features(pixels, view_rows)
    train_fd = run.features(pixels, images.study_views([studies.ids[i] for i in train], N_VIEWS))[1]
    gen_timer = Timer()
    hyps = run.generate(f, fd, params.decode, ev.batch_size, desc="generate test reports")
    gen_seconds = gen_timer()

    refs = [studies.reports[i] for i in test]
    ref_labels = studies.labels[test]
    train_reports = [studies.reports[i] for i in train]
    labeler = lambda texts: label(texts, params.labels.labeler, **params.labels.options())  # noqa: E731
    systems = {"model": hyps,
               "most_frequent": [most_frequent_report(train_reports)] * len(test),
               "nearest_neighbour": nearest_neighbour_reports(train_fd, train_reports, fd),
               "oracle_template": oracle_reports(ref_labels, train_reports, labeler, ev.ce_uncertain_as)}
    score_timer = Timer()
    scored = {name: score(refs, texts, ref_labels, labeler, ev) for name, texts in systems.items()}
    score_seconds, boot_timer = score_timer(), Timer()
    boot = bootstrap_ci({k: v[1] for k, v in scored.items()}, ev.bootstrap, params.runtime.seed) if ev.bootstrap else None
    boot_seconds = boot_timer()

    def headline(s: dict) -> dict:
        return {**{k: v for k, v in s.items() if k != "ce"},
                "ce": {k: v for k, v in s["ce"].items() if k not in ("per_label", "convention", "headline")}}

    result = {
        PHANTOM_FLAG: is_phantom(),
        "note": "scores on PHANTOM images drawn from the labels; not comparable with real-image results"
        if is_phantom() else "real images",
        "n_test": len(test),
        "empty_generated": count_empty(hyps),  # scored as all-negative reports, counted here
        "nlg_protocol": protocol(ev.nlg_tokenization, ev.meteor),
        "ce_convention": {k: v for k, v in scored["model"][0]["ce"]["convention"].items() if k != "label_names"},
        "ci_method": method(ev.bootstrap, params.runtime.seed) if boot else None,
        "model": headline(scored["model"][0]),
        "baselines": {name: headline(v[0]) for name, v in scored.items() if name != "model"},
        "ci95": boot["ci"] if boot else None,
        "classifier_test": {"mean_auroc": cls_test["mean_auroc"], "mean_ap": cls_test["mean_ap"]},
        "generation": {"seconds": gen_seconds, "reports_per_s": round(len(test) / max(gen_seconds, 1e-9), 2)},
        "scoring_seconds": score_seconds,
        "bootstrap_seconds": boot_seconds,
    }
    per_label = {name: v[0]["ce"]["per_label"] for name, v in scored.items()}
    hyp_labels = scored["model"][2]
    study_probs = study_probabilities(img_probs, test_imgs, view_rows)
    report_timer = Timer()
    picked = pick_samples(ref_labels, ev.report_samples, params.runtime.seed) if ev.report_samples else np.zeros(0, int)
    shown = samples(run, picked, view_rows, study_probs, pixels, ids, refs, hyps, ref_labels, hyp_labels, labeler, params)
    write_text(OUT / "report.html", render(result, per_label, shown, ci=result["ci95"], paired=boot["paired"] if boot else None,
                                           auroc=cls_test["per_label"], notes=[f"CAM overlays: {params.cam.method} of the "
                                           f"classifier for up to {MAX_CAMS} predicted diseases (p > 0.5) per study"],
                                           title="amrg evaluation: test split"))
    result["report_seconds"] = report_timer()
    result["seconds"] = timer()
    write_json(OUT / "metrics.json", result)
    write_json(OUT / "details.json", {"ce_per_label": per_label, "ce_label_names": scored["model"][0]["ce"]["convention"]["label_names"],
                                      "paired_differences": boot["paired"] if boot else None,
                                      "classifier_test_per_label": cls_test["per_label"],
                                      "report_samples": [ids[i] for i in picked]})
    write_parquet(OUT / "predictions.parquet", {"id": ids, "reference": refs, "generated": hyps,
                                                **{f"baseline_{k}": v for k, v in systems.items() if k != "model"}})
    write_resolved(OUT, decode=params.decode, evaluate=ev, labels=params.labels, cam=params.cam, runtime=params.runtime)
    print(summary(result))


def _half(interval: dict | None) -> str:
    return f"{(interval['hi'] - interval['lo']) / 2:.3f}" if interval else ""


def summary(result: dict) -> str:
    keys = ["BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]
    rows = [("model", result["model"])] + [(k, v) for k, v in result["baselines"].items()]
    ci = result.get("ci95") or {}
    lines = [("PHANTOM IMAGES: " if result[PHANTOM_FLAG] else "") + f"test studies: {result['n_test']}",
             f"{'':18}" + "".join(f"{k:>9}" for k in keys) + f"{'CE P':>8}{'CE R':>8}{'CE F1':>8}"]
    for name, r in rows:
        lines.append(f"{name:18}" + "".join(f"{r.get(k, float('nan')):9.3f}" for k in keys)
                     + "".join(f"{r['ce'][k]:8.3f}" for k in ("precision", "recall", "f1")))
        if name in ci:
            c = ci[name]
            lines.append(f"{'  95% CI ±':18}" + "".join(f"{_half(c.get(k)):>9}" for k in keys)
                         + "".join(f"{_half(c['ce'][k]):>8}" for k in ("precision", "recall", "f1")))
    conv = result["ce_convention"]
    lines.append(f"CE headline: {conv['headline']}; labels {conv['labels']}, uncertain as {conv['uncertain_as']}")
    if result.get("ci_method"):
        lines.append(f"95% CIs: paired bootstrap, {result['ci_method']['resamples']} resamples of the test studies "
                     f"(half-widths shown; METEOR has none)")
    lines.append(f"classifier test mean AUROC: {result['classifier_test']['mean_auroc']:.3f}")
    lines.append(f"report: {OUT / 'report.html'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
