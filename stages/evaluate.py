"""Stage evaluate (paper IV): generate test reports, score NLG and clinical efficacy vs baselines.

The test split is read here and nowhere else. The trained run is rebuilt by
:func:`amrg.inference.load_run`, reports are decoded with ``decode.*``, and every system (the model and
three baselines, :func:`amrg.evaluation.baseline_systems`) is labelled with the references' labeler and
scored by :func:`amrg.evaluation.score_systems`: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap,
protocol in metrics.json), CE precision/recall/F1 (convention in metrics.json) and ``evaluate.bootstrap``
paired resamples for 95% CIs. The classifier's test AUROC is reported too. Outputs: ``metrics.json``
(headline scores, CIs, protocol), ``details.json`` (per-label CE, paired differences),
``predictions.parquet`` and ``report.html``.

Decoding is ``decode.backend`` (native: :mod:`amrg.models.decoding`; hf: transformers' ``generate``). With
``runtime.num_processes > 1`` (or under ``torchrun``) the test reports are generated data-parallel: each rank
decodes a contiguous share and the reports are gathered in study order
(:func:`amrg.models.decoding.generate_sharded`); rank 0 scores and writes everything.
"""

from __future__ import annotations

import numpy as np
import torch

from amrg import dist
from amrg.data.store import image_targets, load_images, load_studies
from amrg.evaluation import (EvalSplit, baseline_systems, build_details, build_result, check_java, per_label,
                             phantom_localisation, pick_samples, report_samples, score_systems, summary,
                             template_guard, truncate_references)
from amrg.inference import MAX_CAMS, load_run, study_probabilities
from amrg.io import read_json, setup_runtime, write_json, write_parquet, write_text
from amrg.labels import label
from amrg.labels.schema import DECISION_THRESHOLD
from amrg.metrics.classification import multilabel_metrics
from amrg.models.decoding import generate_sharded
from amrg.models.features import N_VIEWS
from amrg.report_html import render

from .common import Timer, start, write_resolved


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("evaluate", argv, relaunch=True)
    ev, seed, timer, out = params.evaluate, params.runtime.seed, Timer(), layout.stage_dir("evaluate")
    check_java(ev)
    device = setup_runtime(params.runtime)
    run = load_run(layout, device, params.runtime.precision)
    studies, images = load_studies(layout.studies), load_images(layout.images, layout.pixels)
    test, train = studies.rows("test"), studies.rows("train")
    if len(test) == 0:
        raise ValueError(f"no test studies in {layout.studies}: check data.annotation and data.max_studies")
    pixels = images.pixels  # read by batch from the pixel store
    ids = [studies.ids[i] for i in test]

    def labeler(texts: list[str]) -> np.ndarray:
        return label(texts, params.labels.labeler, device=str(device), **params.labels.options())

    refs = truncate_references([studies.reports[i] for i in test], run.generator.tokenizer, ev.reference_max_tokens)
    ref_labels = labeler(refs) if ev.reference_max_tokens else studies.labels[test]  # as preprocess labels them
    ts = EvalSplit(ids, refs, ref_labels, images.study_views(ids, N_VIEWS), pixels)

    f, fd = run.features(pixels, ts.view_rows, ev.batch_size)
    gen_timer = Timer()
    hyps = generate_sharded(lambda a, b: run.generate(f[a:b], fd[a:b], params.decode, ev.batch_size,
                                                      desc="generate test reports"), len(test))
    gen_seconds = gen_timer()
    if not dist.context().is_main:  # the other ranks only generated their share
        dist.shutdown()
        return

    test_imgs = np.flatnonzero(images.split == "test")
    img_probs = run.probabilities(pixels, test_imgs, ev.batch_size)
    uncertain_as = read_json(layout.classifier_config)["uncertain_as"]
    cls_test = multilabel_metrics(image_targets(studies, images, test_imgs, uncertain_as), img_probs)
    train_views = images.study_views([studies.ids[i] for i in train], N_VIEWS)
    train_fd = (fd_batch for _, fd_batch in run.iter_features(pixels, train_views, ev.batch_size))  # streamed

    systems = baseline_systems(hyps, [studies.reports[i] for i in train], train_fd, fd, ts.ref_labels, labeler,
                               ev.ce_uncertain_as)
    scores = score_systems(ts.refs, systems, ts.ref_labels, labeler, ev, seed)
    timings = {"generation": generation_record(gen_seconds, len(test), params, device)}
    guard = template_guard(scores, ts.ref_labels, ev.ce_uncertain_as)
    phantom = layout.is_phantom()
    result = build_result(scores, ev, seed, phantom=phantom, n_test=len(test), classifier_test=cls_test,
                          timings=timings, guard=guard, labels=params.labels)
    if result["warning"]:
        log.warning("%s", result["warning"])
    if phantom:  # the drawn findings are the ground truth of where CAM should point
        loc_timer = Timer()
        drawn_with = read_json(layout.params("preprocess"))["runtime"]["seed"]
        localisation = phantom_localisation(run, ts, studies.targets[test], images.views, drawn_with, params.cam.method,
                                            ev.batch_size, params.cam.backend)
        result["cam_localisation"] = {k: v for k, v in localisation.items() if k != "per_disease"}
        result["cam_localisation_seconds"] = loc_timer()

    report_timer = Timer()
    picked = pick_samples(ts.ref_labels, ev.report_samples, seed) if ev.report_samples else np.zeros(0, int)
    shown = report_samples(run, ts, picked, study_probabilities(img_probs, test_imgs, ts.view_rows), hyps,
                           scores.systems["model"].labels, labeler, params.cam, ev.ce_uncertain_as, ev.batch_size)
    note = (f"CAM overlays: {params.cam.method} of the classifier for up to {MAX_CAMS} predicted diseases "
            f"(p > {DECISION_THRESHOLD}) per study")
    write_text(layout.report_html, render(result, per_label(scores), shown, ci=result["ci95"],
                                          paired=scores.bootstrap["paired"] if scores.bootstrap else None,
                                          auroc=cls_test["per_label"], notes=[note] + [w for w in [result["warning"]] if w],
                                          title="amrg evaluation: test split"))
    result["report_seconds"], result["seconds"] = report_timer(), timer()
    write_json(out / "metrics.json", result)
    write_json(out / "details.json", {**build_details(scores, cls_test, [ids[i] for i in picked], guard,
                                                    params.labels.labeler),
                                      "cam_localisation_per_disease": localisation["per_disease"] if phantom else None})
    write_parquet(out / "predictions.parquet", {"id": ids, "reference": ts.refs, "generated": hyps,
                                                **{f"baseline_{k}": v for k, v in systems.items() if k != "model"}})
    write_resolved(out, decode=params.decode, evaluate=ev, labels=params.labels, cam=params.cam, runtime=params.runtime)
    log.info("evaluation done\n%s", summary(result, layout.report_html))
    dist.shutdown()


def generation_record(seconds: float, n_test: int, params, device) -> dict:
    """How the test reports were generated and how fast (a CXPMRG-Bench "Time" column says where it was
    measured): wall seconds and minutes over every rank, reports/s, device name, processes, batch, beams,
    decoding backend and precision."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"seconds": seconds, "minutes": round(seconds / 60, 3), "reports_per_s": round(n_test / max(seconds, 1e-9), 2),
            "device": name, "processes": dist.context().world, "batch_size": params.evaluate.batch_size,
            "num_beams": params.decode.num_beams, "backend": params.decode.backend,
            "precision": params.runtime.precision}


if __name__ == "__main__":
    main()
