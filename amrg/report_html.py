"""``eval/report.html``: one self-contained page a person reads after ``evaluate``.

The page holds the metric table (model vs baselines, 95% bootstrap CIs, paired differences), the
per-label CE table, and, for a sample of test studies, the images, CAM overlays of the predicted
diseases, and the reference and generated reports side by side with the label differences marked:
a finding the reference has and the generated report misses is red (in the reference), one the
generated report adds is orange (in the generated text), and agreed findings are green. Images are
PNG ``data:`` URIs, styles are inline: the file opens anywhere, offline, with no other file.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from .config import get_dotted
from .labels.schema import CHEXPERT_14, DECISION_THRESHOLD, binarize
from .metrics import registry

NLG_COLUMNS = registry.NLG_KEYS
CE_COLUMNS = registry.CE_KEYS
_NO_CI = frozenset(registry.NLG_KEYS) - frozenset(registry.NLG_CI_KEYS)  # METEOR: no paired difference


def png_data_uri(pixels: np.ndarray, width: int | None = None) -> str:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` -> ``data:image/png;base64,...`` (optionally resized to ``width``)."""
    img = Image.fromarray(np.ascontiguousarray(pixels))
    if width and img.width != width:
        img = img.resize((width, round(img.height * width / img.width)), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def positive_labels(row: np.ndarray, uncertain_as: str = "negative") -> set[str]:
    """Names of the CheXpert labels a ``(14,)`` row marks positive under the CE convention."""
    return {CHEXPERT_14[j] for j in np.flatnonzero(binarize(row, uncertain_as))}


def sentence_findings(texts: list[str], labeler: Callable[[list[str]], np.ndarray],
                      uncertain_as: str = "negative") -> list[list[tuple[str, set[str]]]]:
    """Each report split into sentences (cleaned reports: `` .``-separated), each with its positive labels;
    all sentences of all reports are labelled in one labeler call."""
    from .data.clean import report_sentences

    split = [report_sentences(t) or ([t] if t.strip() else []) for t in texts]
    flat = [s for ss in split for s in ss]
    labels = labeler(flat) if flat else np.zeros((0, len(CHEXPERT_14)))
    out, k = [], 0
    for ss in split:
        out.append([(s, positive_labels(labels[k + i], uncertain_as)) for i, s in enumerate(ss)])
        k += len(ss)
    return out


@dataclass
class Sample:
    """One test study as shown on the page."""

    study_id: str
    images: list[np.ndarray]  # uint8 (H, W) per view
    reference: list[tuple[str, set[str]]]  # sentences with their positive labels
    generated: list[tuple[str, set[str]]]
    reference_labels: set[str]  # study-level positives (CE convention)
    generated_labels: set[str]
    predicted: list[tuple[str, float]] = field(default_factory=list)  # classifier: (label, probability) > threshold
    overlays: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (caption, RGB uint8)


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1280px;color:#1b1f24;padding:0 16px}
h1{font-size:22px;margin:0 0 6px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.banner{background:#fff4ce;border:1px solid #e3b341;padding:8px 12px;border-radius:6px;margin:10px 0}
.meta{color:#57606a;font-size:13px} .meta li{margin:2px 0}
table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;vertical-align:top} th{background:#f6f8fa}
td.name,th.name{text-align:left;white-space:nowrap} tr.model td{background:#eef6ff;font-weight:600}
td small{display:block;color:#57606a;font-weight:400;font-size:11px} .best{text-decoration:underline}
.better{color:#1a7f37} .worse{color:#cf222e} .nsig{color:#8c959f}
.study{border:1px solid #d0d7de;border-radius:8px;padding:12px;margin:14px 0}
.study h3{margin:0 0 8px;font-size:15px} .imgs{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:8px}
figure{margin:0;text-align:center;font-size:11px;color:#57606a;width:140px} figure img{display:block;width:140px;height:140px;border-radius:4px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:12px} .pair>div{background:#f6f8fa;border-radius:6px;padding:8px 10px}
.pair h4{margin:0 0 4px;font-size:13px}
.chips span{display:inline-block;border-radius:10px;padding:0 8px;margin:2px 3px 2px 0;font-size:12px;border:1px solid}
.both{background:#dafbe1;border-color:#4ac26b} .missed{background:#ffebe9;border-color:#ff8182} .extra{background:#fff1e5;border-color:#fb8f44}
mark.both{background:#dafbe1} mark.missed{background:#ffcecb} mark.extra{background:#ffd8b5}
.legend span{margin-right:10px}
"""


def _fmt(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def _metric_keys(result: dict) -> list[tuple[str, str]]:
    keys = [(k, registry.label(k)) for k in NLG_COLUMNS if k in result["model"]]
    return keys + [(f"ce.{k}", registry.label(f"ce.{k}")) for k in CE_COLUMNS]


def metric_table(result: dict, ci: dict | None) -> str:
    systems = [("model", result["model"])] + list(result.get("baselines", {}).items())
    keys = _metric_keys(result)
    best = {k: max((get_dotted(s, k) for _, s in systems if get_dotted(s, k) is not None), default=None) for k, _ in keys}
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in keys)
    rows = []
    for name, scores in systems:
        cells = []
        for k, _ in keys:
            v = get_dotted(scores, k)
            interval = get_dotted(ci or {}, f"{name}.{k}")
            small = f"<small>[{_fmt(interval['lo'])}, {_fmt(interval['hi'])}]</small>" if interval else ""
            cls = ' class="best"' if v is not None and v == best[k] else ""
            cells.append(f"<td><span{cls}>{_fmt(v)}</span>{small}</td>")
        rows.append(f'<tr class="{"model" if name == "model" else ""}"><td class="name">{html.escape(name)}</td>{"".join(cells)}</tr>')
    return f'<table id="metrics"><tr><th class="name">system</th>{head}</tr>{"".join(rows)}</table>'


def paired_table(result: dict, paired: dict) -> str:
    if not paired:
        return ""
    keys = [(k, lab) for k, lab in _metric_keys(result) if k not in _NO_CI]
    head = "".join(f"<th>{html.escape(lab)}</th>" for _, lab in keys)
    rows = []
    for name, diffs in paired.items():
        cells = []
        for k, _ in keys:
            d = get_dotted(diffs, k)
            if d is None:
                cells.append("<td>–</td>")
                continue
            sig = "better" if d["lo"] > 0 else "worse" if d["hi"] < 0 else "nsig"
            cells.append(f'<td class="{sig}">{d["diff"]:+.3f}<small>[{d["lo"]:+.3f}, {d["hi"]:+.3f}]</small></td>')
        rows.append(f'<tr><td class="name">model − {html.escape(name)}</td>{"".join(cells)}</tr>')
    return (f'<table id="paired"><tr><th class="name">paired difference</th>{head}</tr>{"".join(rows)}</table>'
            '<p class="meta">Green: the model is better (the 95% interval of the difference is above 0); red: worse '
            '(below 0); grey: the interval contains 0.</p>')


def per_label_table(per_label: dict[str, dict], auroc: dict[str, Any] | None = None) -> str:
    """``per_label``: ``{system: ce["per_label"]}``; the model's P/R/F1, the others' F1, support, AUROC."""
    systems = list(per_label)
    model = per_label[systems[0]]
    head = ("<th class='name'>label</th><th>support</th><th>P</th><th>R</th><th>F1</th>"
            + "".join(f"<th>F1 {html.escape(s)}</th>" for s in systems[1:])
            + ("<th>classifier AUROC</th>" if auroc else ""))
    rows = []
    for lab, m in model.items():
        cells = [f"<td class='name'>{html.escape(lab)}</td><td>{m['support']}</td>"]
        cells += [f"<td>{_fmt(m[k])}</td>" for k in CE_COLUMNS]
        cells += [f"<td>{_fmt(per_label[s][lab]['f1'])}</td>" for s in systems[1:]]
        if auroc:
            cells.append(f"<td>{_fmt((auroc.get(lab) or {}).get('auroc'))}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table id="per-label"><tr>{head}</tr>{"".join(rows)}</table>'


def _chips(ref: set[str], gen: set[str]) -> str:
    spans = []
    for lab in CHEXPERT_14:
        if lab in ref and lab in gen:
            spans.append(f'<span class="both" title="in both">{html.escape(lab)}</span>')
        elif lab in ref:
            spans.append(f'<span class="missed" title="in the reference, missed by the generated report">− {html.escape(lab)}</span>')
        elif lab in gen:
            spans.append(f'<span class="extra" title="in the generated report, not in the reference">+ {html.escape(lab)}</span>')
    return f'<div class="chips">{"".join(spans) or "<span class=both>no positive finding in either</span>"}</div>'


def _marked(sentences: list[tuple[str, set[str]]], wrong: set[str], wrong_cls: str, agreed: set[str]) -> str:
    """Sentences with a finding in ``wrong`` marked ``wrong_cls``, with an agreed one green. "No Finding"
    is a study-level label (every sentence without a finding carries it), so it marks no sentence."""
    out = []
    wrong, agreed = wrong - {"No Finding"}, agreed - {"No Finding"}
    for sent, labs in sentences:
        text = html.escape(sent) + " ."
        if labs & wrong:
            text = f'<mark class="{wrong_cls}" title="{html.escape(", ".join(sorted(labs & wrong)))}">{text}</mark>'
        elif labs & agreed:
            text = f'<mark class="both" title="{html.escape(", ".join(sorted(labs & agreed)))}">{text}</mark>'
        out.append(text)
    return " ".join(out) or "<em>(empty)</em>"


def sample_html(s: Sample, image_width: int = 140) -> str:
    agreed = s.reference_labels & s.generated_labels
    missed = s.reference_labels - s.generated_labels
    extra = s.generated_labels - s.reference_labels
    figs = [f'<figure><img alt="view {v}" src="{png_data_uri(img, image_width)}"><figcaption>view {v}</figcaption></figure>'
            for v, img in enumerate(s.images)]
    figs += [f'<figure><img alt="{html.escape(cap)}" src="{png_data_uri(ov, image_width)}"><figcaption>{html.escape(cap)}</figcaption></figure>'
             for cap, ov in s.overlays]
    pred = ", ".join(f"{html.escape(lab)} {p:.2f}" for lab, p in s.predicted) or f"none above {DECISION_THRESHOLD:g}"
    return (f'<div class="study" id="study-{html.escape(s.study_id)}"><h3>{html.escape(s.study_id)}</h3>'
            f'<div class="imgs">{"".join(figs)}</div>'
            f'<div class="meta">classifier (p &gt; {DECISION_THRESHOLD:g}): {pred}</div>{_chips(s.reference_labels, s.generated_labels)}'
            f'<div class="pair"><div><h4>reference</h4>{_marked(s.reference, missed, "missed", agreed)}</div>'
            f'<div><h4>generated</h4>{_marked(s.generated, extra, "extra", agreed)}</div></div></div>')


def render(result: dict, per_label: dict[str, dict], samples: list[Sample], ci: dict | None = None,
           paired: dict | None = None, auroc: dict | None = None, notes: list[str] | None = None,
           title: str = "amrg evaluation") -> str:
    """The whole page as one HTML string. ``result`` is the ``metrics.json`` dict of ``evaluate``;
    ``per_label`` ``{system: ce per_label}``; ``auroc`` the classifier's per-label test metrics."""
    conv = result.get("ce_convention", {})
    proto = result.get("nlg_protocol", {})
    proto_text = proto if isinstance(proto, str) else f"{proto.get('name')}: {proto.get('tokenization')}; references never truncated"
    meta = [f"test studies: {result.get('n_test')}",
            f"NLG protocol: {html.escape(str(proto_text))}",
            f"CE: {html.escape(str(conv.get('headline', '')))}; labels {html.escape(str(conv.get('labels', '')))}, "
            f"uncertain as {html.escape(str(conv.get('uncertain_as', '')))}, not mentioned as negative"]
    method = result.get("ci_method")
    if method:
        meta.append(f"95% CIs: {html.escape(method['name'])}, {method['resamples']} resamples (seed {method['seed']}); "
                    f"{html.escape(method['no_ci'])}")
    else:
        meta.append("no confidence intervals (evaluate.bootstrap: 0)")
    meta += [html.escape(n) for n in notes or []]
    banner = (f'<div class="banner"><b>PHANTOM IMAGES.</b> {html.escape(result.get("note", ""))}</div>'
              if result.get("phantom_images") else "")
    legend = ('<p class="legend meta"><span class="chips"><span class="both">agreed finding</span>'
              '<span class="missed">− in the reference, missed</span><span class="extra">+ generated, not in the reference</span>'
              '</span></p>')
    body = "".join(sample_html(s) for s in samples) or "<p class='meta'>no sample studies (evaluate.report_samples: 0)</p>"
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{banner}<ul class='meta'>{''.join(f'<li>{m}</li>' for m in meta)}</ul>"
            f"<h2>Scores: model vs baselines</h2>{metric_table(result, ci)}"
            f"<p class='meta'>Point estimate on the whole test split; below it the 95% bootstrap interval. "
            f"Underlined: the best system in the column.</p>{paired_table(result, paired or {})}"
            f"<h2>Clinical efficacy per label</h2>{per_label_table(per_label, auroc)}"
            f"<h2>Sample test studies</h2>{legend}{body}</body></html>")
