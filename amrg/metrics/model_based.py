"""Model-based metrics of a set of systems' reports: BERTScore and RadGraph F1 (the ``score`` stage)."""

from __future__ import annotations


def model_based_scores(refs: list[str], systems: dict[str, list[str]], p, device: str) -> dict:
    """BERTScore and RadGraph F1 of every system (``p`` is :class:`amrg.config.Score`). A metric whose model
    is not set is ``{"skipped": <the key to set>}``; each computed one carries its provenance and
    ``per_study`` values in study order (for :func:`amrg.metrics.bootstrap.per_study_ci`)."""
    out: dict[str, dict] = {}
    if p.bertscore_model:
        from .bertscore import bertscore_scores

        runs = {name: bertscore_scores(refs, hyps, p.bertscore_model, p.bertscore_layer, p.bertscore_rescale,
                                       p.bertscore_idf, p.batch_size, device, p.bertscore_model_name,
                                       p.bertscore_baseline) for name, hyps in systems.items()}
        out["bertscore"] = {"provenance": next(iter(runs.values()))["provenance"],
                            "systems": {n: {k: v for k, v in r.items() if k != "provenance"} for n, r in runs.items()}}
    else:
        out["bertscore"] = {"skipped": "set score.bertscore_model (a local model directory) and score.bertscore_layer"}
    if p.radgraph_model:
        from .radgraph import RadGraphExtractor, radgraph_scores

        extractor = RadGraphExtractor(p.radgraph_model, p.radgraph_model_type, p.radgraph_base_model, device,
                                      p.batch_size)
        ref_graphs = extractor(list(refs))
        out["radgraph"] = {"provenance": extractor.provenance(),
                           "systems": {n: radgraph_scores(refs, hyps, extractor, ref_graphs) for n, hyps in systems.items()}}
    else:
        out["radgraph"] = {"skipped": "set score.radgraph_model (a local RadGraph model directory)"}
    return out
