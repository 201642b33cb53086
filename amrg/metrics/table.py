"""The headline scores of an ``evaluate`` metrics.json as one compact table: the model and each baseline
as rows, the headline metrics (:data:`amrg.metrics.registry.HEADLINE`) as columns, ``value [lo, hi]``
where the metrics file has a 95% CI. The evaluate stage's summary, the Prefect artifact of the pipeline
flow, the flow's console output and ``python -m flows.show`` all print this table."""

from __future__ import annotations

from typing import Any

from ..config import get_dotted
from .registry import HEADLINE, label


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def systems(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[("model", scores), (baseline, scores), ...]`` of an evaluate metrics.json (empty if it has none)."""
    out = [("model", metrics["model"])] if isinstance(metrics.get("model"), dict) else []
    return out + [(n, s) for n, s in (metrics.get("baselines") or {}).items() if isinstance(s, dict)]


def headline_table(metrics: dict[str, Any], digits: int = 3) -> list[dict[str, str]]:
    """One row per system: ``{"system": name, "BLEU-4": "0.096 [0.086, 0.106]", ...}``. Columns are the
    registry's headline keys that some system has; ``-`` where a system lacks one."""
    rows_of = systems(metrics)
    keys = [k for k in HEADLINE if any(_number(get_dotted(s, k)) for _, s in rows_of)]
    ci95 = metrics.get("ci95") or {}
    rows = []
    for name, scores in rows_of:
        row = {"system": name}
        for k in keys:
            v, ci = get_dotted(scores, k), get_dotted(ci95.get(name), k)
            cell = f"{v:.{digits}f}" if _number(v) else "-"
            if _number(v) and isinstance(ci, dict) and _number(ci.get("lo")) and _number(ci.get("hi")):
                cell += f" [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"
            row[label(k)] = cell
        rows.append(row)
    return rows


def caption(metrics: dict[str, Any]) -> str:
    """``PHANTOM IMAGES, 590 test studies; brackets: 95% bootstrap CI`` (the parts the file has)."""
    parts = ["PHANTOM IMAGES"] if metrics.get("phantom_images") else []
    if _number(metrics.get("n_test")):
        parts.append(f"{metrics['n_test']} test studies")
    text = ", ".join(parts)
    if metrics.get("ci95"):
        text += ("; " if text else "") + "brackets: 95% bootstrap CI"
    return text


def to_markdown(rows: list[dict[str, str]]) -> str:
    """The rows as a markdown table, padded so that it also reads as plain text."""
    if not rows:
        return ""
    cols = list(rows[0])
    width = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in cols}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    out = [line([c.ljust(width[c]) for c in cols]),
           "|" + "|".join("-" * (width[c] + 2) for c in cols) + "|"]
    out += [line([r.get(c, "").ljust(width[c]) if c == cols[0] else r.get(c, "").rjust(width[c]) for c in cols])
            for r in rows]
    return "\n".join(out)
