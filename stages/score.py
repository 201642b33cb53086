"""Stage score: model-based metrics of evaluate's reports, in their own cached stage.

BERTScore (``score.bertscore_*``) and RadGraph F1 (``score.radgraph_*``) of the model and every baseline
are computed from ``eval/predictions.parquet``, so adding or changing one never reruns generation. Each
metric's per-study values join the paired bootstrap on the same resamples as evaluate's
(``evaluate.bootstrap``, ``runtime.seed``). A metric whose local model is not set is reported as skipped,
naming the key to set. Outputs: ``metrics.json`` (scores, 95% CIs, paired differences, provenance) and
``per_study.parquet``.
"""

from __future__ import annotations

from amrg.export import read_predictions, systems_of
from amrg.io import resolve_device, write_json, write_parquet
from amrg.metrics.bootstrap import per_study_ci
from amrg.metrics.model_based import model_based_scores

from .common import Timer, start, write_resolved


def main(argv: list[str] | None = None) -> None:
    params, log, layout = start("score", argv)
    p, ev, timer, out = params.score, params.evaluate, Timer(), layout.stage_dir("score")
    pred = read_predictions(layout.predictions)
    systems = {name: pred[name] for name in systems_of(pred)}
    scores = model_based_scores(pred["reference"], systems, p, str(resolve_device(params.runtime.device)))
    result, columns = {"phantom_images": layout.is_phantom(), "n_test": len(pred["id"])}, {"id": pred["id"]}
    for metric, s in scores.items():
        if "skipped" in s:
            result[metric] = s
            log.info("%s skipped: %s", metric, s["skipped"])
            continue
        per_study = {name: r["per_study"] for name, r in s["systems"].items()}
        boot = per_study_ci(per_study, ev.bootstrap, params.runtime.seed) if ev.bootstrap else None
        result[metric] = {"provenance": s["provenance"],
                          **{name: {k: v for k, v in r.items() if k not in ("per_study", "n")}
                             for name, r in s["systems"].items()},
                          "ci95": boot["ci"] if boot else None, "paired": boot["paired"] if boot else None}
        columns.update({f"{metric}.{name}.{k}": v for name, keys in per_study.items() for k, v in keys.items()})
    result["seconds"] = timer()
    write_json(out / "metrics.json", result)
    write_parquet(out / "per_study.parquet", columns)
    write_resolved(out, score=p, evaluate_bootstrap=ev.bootstrap, runtime=params.runtime)
    log.info("model-based metrics of %d systems on %d studies in %.1fs", len(systems), len(pred["id"]), timer())


if __name__ == "__main__":
    main()
