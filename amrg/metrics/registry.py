"""The one registry of metric names: what each score is called in metrics.json and what people call it.

Every table, CI, sweep comparison and flow artifact takes its keys from here, so a metric is named in
one place. Keys are dotted paths inside one system's scores (``ce.f1`` is ``scores["ce"]["f1"]``).
"""

from __future__ import annotations

# NLG scores as pycocoevalcap names them (R2Gen protocol); METEOR has no bootstrap CI
NLG_KEYS: tuple[str, ...] = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
NLG_CI_KEYS: tuple[str, ...] = tuple(k for k in NLG_KEYS if k != "METEOR")
# clinical efficacy: the headline averaging's precision / recall / F1
CE_KEYS: tuple[str, ...] = ("precision", "recall", "f1")

LABELS: dict[str, str] = {
    "BLEU_1": "BLEU-1", "BLEU_2": "BLEU-2", "BLEU_3": "BLEU-3", "BLEU_4": "BLEU-4", "METEOR": "METEOR",
    "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr", "ce.precision": "CE P", "ce.recall": "CE R", "ce.f1": "CE F1",
}
# the compact headline table (flow artifact, console summary, sweep comparison, `python -m flows.show`)
HEADLINE: tuple[str, ...] = ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "ce.precision", "ce.recall", "ce.f1")


def label(key: str) -> str:
    """Display name of a metric key (``ce.f1`` -> ``CE F1``)."""
    return LABELS.get(key, key)


# what every key means: the name papers give it, which way is better, and what computes it
HIGHER = "higher is better"
METRICS: dict[str, dict[str, str]] = {
    **{k: {"paper_name": LABELS[k], "direction": HIGHER, "computed_by": "pycocoevalcap"} for k in NLG_KEYS},
    **{f"ce.{k}": {"paper_name": f"CE {k} (macro over the selected CheXpert labels, R2Gen compute_ce.py)",
                   "direction": HIGHER, "computed_by": "amrg.metrics.ce with the configured labeler"} for k in CE_KEYS},
}


def provenance(versions: dict[str, str], extra: dict[str, dict] | None = None) -> dict[str, dict]:
    """Per metric key: its paper name, direction and what computed it (``versions``: package -> version,
    e.g. ``{"pycocoevalcap": "1.2"}``; ``extra``: further keys, e.g. a labeler's checkpoint checksum)."""
    out = {}
    for key, info in METRICS.items():
        by = info["computed_by"]
        out[key] = {**info, "computed_by": f"{by} {versions[by]}" if by in versions else by}
    return {**out, **(extra or {})}

