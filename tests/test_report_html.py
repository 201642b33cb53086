"""eval/report.html from synthetic scores and images: self-contained, label differences marked, and it
renders in headless Chromium with every image decoded (skipped, saying why, only without a Chromium)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from amrg.cam import heat_overlay
from amrg.config import Evaluate
from amrg.evaluation import build_result, per_label, score_systems
from amrg.labels import label
from amrg.labels.schema import CHEXPERT_14
from amrg.report_html import Sample, positive_labels, render, sentence_findings

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
# counts images and those that did not decode once the page has loaded, for --dump-dom to show
PROBE = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
         "document.body.dataset.images=i.length;"
         "document.body.dataset.broken=i.filter(x=>!x.complete||x.naturalWidth===0).length;});</script>")

REFS = ["the heart is enlarged . there is a small left pleural effusion . no pneumothorax .",
        "the lungs are clear . <b>no</b> acute findings .",
        "there is mild pulmonary edema . the heart is normal in size ."]
HYPS = ["the heart is enlarged . there is a right pneumothorax .",
        "the lungs are clear . no acute findings .",
        "the heart is normal in size ."]


@pytest.fixture(scope="module")
def page():
    """The page evaluate writes, assembled by the same library functions evaluate calls."""
    ref_labels = label(REFS)
    ev = Evaluate(meteor=False, bootstrap=50)
    scores = score_systems(REFS, {"model": HYPS, "most_frequent": [REFS[1]] * 3}, ref_labels, label, ev, seed=0)
    result = build_result(scores, ev, 0, phantom=True, n_test=3,
                          classifier_test={"mean_auroc": 0.5, "mean_ap": 0.5, "per_label": {}}, timings={})
    hyp_labels = scores.systems["model"].labels
    rng = np.random.default_rng(0)
    views = [rng.integers(0, 255, (64, 64), dtype=np.uint8) for _ in range(2)]
    cam = np.outer(np.linspace(0, 1, 64), np.linspace(1, 0, 64))
    texts = sentence_findings(REFS + HYPS, label)
    samples = [Sample(f"study-{i}", views, texts[i], texts[3 + i], positive_labels(ref_labels[i]),
                      positive_labels(hyp_labels[i]), [("Cardiomegaly", 0.9)],
                      [("Cardiomegaly, view 0: upper left", heat_overlay(views[0], cam))] if i == 0 else [])
               for i in range(3)]
    html = render(result, per_label(scores), samples, ci=result["ci95"], paired=scores.bootstrap["paired"],
                  auroc={n: {"auroc": 0.5} for n in CHEXPERT_14}, title="synthetic")
    return html, samples


def test_self_contained_and_marked(page):
    html, samples = page
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]+)"', html)
    assert len(srcs) == sum(len(s.images) + len(s.overlays) for s in samples) == 7
    for src in srcs:  # every image is an embedded PNG that decodes
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not re.search(r'(?:src|href)="(?:https?:|//|file:)', html)  # nothing fetched from elsewhere
    for table in ("metrics", "paired", "per-label"):
        assert f'<table id="{table}">' in html
    assert "[0." in html and "PHANTOM IMAGES" in html  # intervals and the phantom banner
    first = html.split('id="study-study-0"')[1].split('id="study-study-1"')[0]
    reference, generated = first.split("<h4>generated</h4>")
    # the reference's effusion is missed (red, in the reference); the generated pneumothorax is extra
    # (orange, in the generated text); cardiomegaly is in both (green)
    assert re.search(r'<mark class="missed"[^>]*>there is a small left pleural effusion', reference)
    assert re.search(r'<mark class="extra"[^>]*>there is a right pneumothorax', generated)
    assert '<mark class="both" title="Cardiomegaly">the heart is enlarged' in generated
    assert "− Pleural Effusion" in first and "+ Pneumothorax" in first
    assert "&lt;b&gt;no&lt;/b&gt;" in html and "<b>no</b>" not in html  # report text is escaped


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH: apt-get install chromium "
                                             "(.ci/run installs it when CI=true)")
def test_renders_in_headless_chromium(page, tmp_path):
    html, samples = page
    path = tmp_path / "report.html"
    path.write_text(html.replace("</body>", PROBE + "</body>"))
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert '<table id="metrics">' in dom
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-images="7"' in body and 'data-broken="0"' in body, body
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,1600", f"--screenshot={shot}", path.as_uri()],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # text, tables and images, not a blank page
