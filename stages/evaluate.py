"""Stage evaluate (paper IV): generate test reports, score NLG and clinical efficacy vs a baseline.

The test split is read here and nowhere else. The generator (trainable weights + its config) is rebuilt
over the frozen classifier and the memory banks, reports are decoded with ``decode.*``, labelled with the
same labeler as the references, and scored: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap, protocol
in metrics.json) and CE precision/recall/F1 (convention in metrics.json). Three baselines are scored
beside the model on every run (most frequent training report, nearest neighbour by classifier
features, oracle template from the true labels; see :mod:`amrg.baselines`); the classifier's test
AUROC is reported too.
"""

from __future__ import annotations

import numpy as np
import torch

from amrg.baselines import most_frequent_report, nearest_neighbour_reports, oracle_reports
from amrg.config import Hopfield
from amrg.data.store import load_images, load_studies
from amrg.io import autocast, load_tensors, read_json, setup_runtime, write_json, write_parquet
from amrg.labels import count_empty, label
from amrg.metrics import ce_scores, nlg_scores
from amrg.metrics.classification import multilabel_metrics
from amrg.metrics.nlg import protocol
from amrg.models.classifier import binarise_targets, predict_proba
from amrg.models.features import N_VIEWS, study_features
from amrg.models.generator import ReportGenerator
from amrg.models.llm import load_llm
from amrg.models.load import load_classifier

from .common import ARTIFACTS, PHANTOM_FLAG, Timer, is_phantom, load_banks, start, write_resolved

PRE, CLS, GEN, OUT = ARTIFACTS / "preprocess", ARTIFACTS / "classifier", ARTIFACTS / "generator", ARTIFACTS / "eval"


def score(refs: list[str], hyps: list[str], ref_labels: np.ndarray, labels_cfg, ev) -> dict:
    """NLG + CE of ``hyps``; generated reports are labelled exactly as the references were."""
    hyp_labels = label(hyps, labels_cfg.labeler, **labels_cfg.options())
    ce = ce_scores(hyp_labels, ref_labels, uncertain_as=ev.ce_uncertain_as, labels=ev.ce_labels)
    return {**nlg_scores(refs, hyps, tokenization=ev.nlg_tokenization, meteor=ev.meteor), "ce": ce}


def main(argv: list[str] | None = None) -> None:
    params, log = start("evaluate", argv)
    ev, timer = params.evaluate, Timer()
    device = setup_runtime(params.runtime)
    studies, images = load_studies(PRE / "studies.parquet"), load_images(PRE / "images.parquet")
    test, train = studies.rows("test"), studies.rows("train")
    if len(test) == 0:
        raise ValueError("no test studies after preprocess: nothing to evaluate")
    classifier = load_classifier(CLS, device)
    pixels = torch.from_numpy(images.pixels.copy())

    test_imgs = np.flatnonzero(images.split == "test")
    idx = studies.index()
    img_targets = binarise_targets(torch.from_numpy(studies.labels[[idx[images.study_ids[r]] for r in test_imgs]]),
                                   read_json(CLS / "config.json")["uncertain_as"]).numpy()
    cls_test = multilabel_metrics(img_targets, predict_proba(classifier, pixels, test_imgs, device,
                                                             params.runtime.precision, ev.batch_size))

    cfg = read_json(GEN / "config.json")
    hop = Hopfield(**cfg["hopfield"])
    f, fd = study_features(classifier, pixels, images.study_views([studies.ids[i] for i in test], N_VIEWS),
                           cfg["visual_pool"], device, params.runtime.precision)
    train_fd = study_features(classifier, pixels, images.study_views([studies.ids[i] for i in train], N_VIEWS),
                              cfg["visual_pool"], device, params.runtime.precision)[1]
    llm, tokenizer = load_llm(GEN, cfg["llm"])
    model = ReportGenerator(llm, tokenizer, cfg["visual_dim"], cfg["query_dim"], *load_banks(hop), hop, cfg["prompt"])
    model.load_trainable(load_tensors(GEN / "weights.safetensors"))
    model = model.to(device).eval()
    gen_timer, hyps = Timer(), []
    for s in range(0, len(test), ev.batch_size):
        with autocast(device, params.runtime.precision):
            hyps += model.generate(f[s:s + ev.batch_size].to(device), fd[s:s + ev.batch_size].to(device), params.decode)
    gen_seconds = gen_timer()

    refs = [studies.reports[i] for i in test]
    ref_labels = studies.labels[test]
    train_reports = [studies.reports[i] for i in train]
    most_frequent = most_frequent_report(train_reports)
    labeler = lambda texts: label(texts, params.labels.labeler, **params.labels.options())  # noqa: E731
    baselines = {"most_frequent": [most_frequent] * len(test),
                 "nearest_neighbour": nearest_neighbour_reports(train_fd, train_reports, fd),
                 "oracle_template": oracle_reports(ref_labels, train_reports, labeler, ev.ce_uncertain_as)}
    result = {
        PHANTOM_FLAG: is_phantom(),
        "note": "scores on PHANTOM images drawn from the labels; not comparable with real-image results"
        if is_phantom() else "real images",
        "n_test": len(test),
        "empty_generated": count_empty(hyps),  # scored as all-negative reports, counted here
        "nlg_protocol": protocol(ev.nlg_tokenization, ev.meteor),
        "model": score(refs, hyps, ref_labels, params.labels, ev),
        "baselines": {name: score(refs, texts, ref_labels, params.labels, ev) for name, texts in baselines.items()},
        "classifier_test": {"mean_auroc": cls_test["mean_auroc"], "mean_ap": cls_test["mean_ap"],
                            "per_label": cls_test["per_label"]},
        "generation": {"seconds": gen_seconds, "reports_per_s": round(len(test) / max(gen_seconds, 1e-9), 2)},
    }
    result["ce_convention"] = result["model"]["ce"]["convention"]
    result["seconds"] = timer()
    write_json(OUT / "metrics.json", result)
    write_parquet(OUT / "predictions.parquet", {"id": [studies.ids[i] for i in test], "reference": refs,
                                                "generated": hyps, **{f"baseline_{k}": v for k, v in baselines.items()}})
    write_resolved(OUT, decode=params.decode, evaluate=ev, labels=params.labels, runtime=params.runtime)
    print(summary(result))


def summary(result: dict) -> str:
    keys = ["BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"]
    rows = [("model", result["model"])] + [(k, v) for k, v in result["baselines"].items()]
    lines = [("PHANTOM IMAGES: " if result[PHANTOM_FLAG] else "") + f"test studies: {result['n_test']}",
             f"{'':18}" + "".join(f"{k:>9}" for k in keys) + f"{'CE P':>8}{'CE R':>8}{'CE F1':>8}"]
    for name, r in rows:
        lines.append(f"{name:18}" + "".join(f"{r.get(k, float('nan')):9.3f}" for k in keys)
                     + "".join(f"{r['ce'][k]:8.3f}" for k in ("precision", "recall", "f1")))
    conv = result["ce_convention"]
    lines.append(f"CE headline: {conv['headline']}; labels {conv['labels']}, uncertain as {conv['uncertain_as']}")
    lines.append(f"classifier test mean AUROC: {result['classifier_test']['mean_auroc']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
