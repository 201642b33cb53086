"""``amrg serve``: a small local web page over a trained run (FastAPI, no network at run time).

Upload one or two views of a study (PNG, JPEG, TIFF or DICOM) and the page shows what
:func:`amrg.predict.describe` gives ``amrg generate``: the report in readable form (and its scoring form),
the classifier's 14 probabilities with the predicted labels marked, the CAM overlays of the predicted
diseases with where each points, and the report-bank sentences the R-Hopfield weighs most for them. A run
trained on phantom images says so in a banner on every page.

Every bad upload (not an image, truncated, no pixel data, multi-frame, 20,000 x 20,000 pixels, DICOM files
of two studies, over ``--max-upload-mb``) is answered with the form and a visible error (HTTP 4xx); an
unexpected failure in the model is a visible error too (HTTP 500). The server keeps serving either way.
Requests are served one at a time (one model, one device); uploads live in a temporary folder that is
removed when the request ends. Pages are self-contained: images are PNG ``data:`` URIs.
"""

from __future__ import annotations

import html
import logging
import re
import tempfile
import threading
from pathlib import Path

import numpy as np
from fastapi import Request  # module level: the route signature's annotation is resolved from here

from .labels.schema import CHEXPERT_14, DECISION_THRESHOLD
from .report_html import png_data_uri

log = logging.getLogger(__name__)

VIEWS = ("frontal", "lateral")  # the form's file fields, in study order
IMAGE_WIDTH = 320  # px of each image and overlay on the page

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1b1f24;padding:0 16px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.banner{background:#fff4ce;border:1px solid #e3b341;padding:8px 12px;border-radius:6px;margin:10px 0}
.error{background:#ffebe9;border:1px solid #ff8182;padding:8px 12px;border-radius:6px;margin:10px 0;color:#82071e}
#report-text{font-size:17px;background:#f6f8fa;padding:12px;border-radius:6px}
table{border-collapse:collapse} td,th{border:1px solid #d0d7de;padding:3px 8px;text-align:left}
tr.pos td{background:#dafbe1;font-weight:600}
figure{display:inline-block;margin:0 12px 12px 0;vertical-align:top} figcaption{font-size:13px;color:#57606a;max-width:320px}
form{background:#f6f8fa;padding:12px;border-radius:6px} label{display:inline-block;min-width:70px}
"""


def _page(body: str, phantom: bool) -> str:
    banner = ("<div class='banner' id='phantom-warning'><b>Trained on phantom images.</b> This run learnt from "
              "synthetic radiographs drawn from report labels (the embedded default); its reports for real "
              "X-rays are not meaningful.</div>" if phantom else "")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>amrg report</title>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body>"
            f"<h1>amrg: chest X-ray report</h1>{banner}{body}</body></html>")


def _form() -> str:
    fields = "".join(f"<p><label for='{v}'>{v}</label> <input type='file' id='{v}' name='{v}'"
                     f"{' required' if i == 0 else ''}> {'' if i == 0 else '(optional)'}</p>"
                     for i, v in enumerate(VIEWS))
    return (f"<form id='upload' method='post' action='/report' enctype='multipart/form-data'>"
            f"<p>One or two views of one study: PNG, JPEG, TIFF or DICOM.</p>{fields}"
            f"<button type='submit' id='submit'>Write the report</button></form>")


def _error(message: str) -> str:
    return f"<div class='error' id='error' role='alert'>{html.escape(message)}</div>"


def _result(r: dict, pixels, names: list[str]) -> str:
    """The page body for one study's :func:`amrg.predict.describe` result."""
    e = html.escape
    predicted = {name for name, _ in r["predicted"]}
    rows = "".join(f"<tr class='{'pos' if n in predicted else 'neg'}'><td>{e(n)}</td><td>{p:.3f}</td>"
                   f"<td>{'yes' if n in predicted else ''}</td></tr>"
                   for n, p in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
    views = "".join(f"<figure><img class='view' alt='{e(names[i])}' src='{png_data_uri(px, IMAGE_WIDTH)}'>"
                    f"<figcaption>{e(names[i])}</figcaption></figure>" for i, px in enumerate(pixels))
    figs = []
    for c, ov in zip(r["cam"], r["overlays"]):
        where = (f"{c['where']} of the image, eq. 1 keeps {c['kept']:.0%} of the patches" if c["box"] else
                 f"{c['where']} of the image, no patch above cam.tau")
        figs.append(f"<figure><img class='overlay' alt='CAM {e(c['label'])}' src='{png_data_uri(ov, IMAGE_WIDTH)}'>"
                    f"<figcaption>{e(c['label'])} on {e(names[c['image']])}: {e(where)}</figcaption></figure>")
    cams = "".join(figs) or "<p>No disease predicted (No Finding aside): no CAM to show.</p>"
    retrieved = "".join(
        f"<li><b>{e(label)}</b><ol>" + "".join(f"<li>{e(t)} <small>(α {w:.3f})</small></li>" for t, w in sents)
        + "</ol></li>" for label, sents in r["retrieved"].items())
    retrieved = (f"<ul id='retrieved'>{retrieved}</ul>" if retrieved else
                 "<p id='retrieved'>No report-memory sentences to show (no predicted disease, or the run has no "
                 "report memory).</p>")
    return (f"<h2>Report</h2><p id='report-text'>{e(r['report_readable']) or '(empty report)'}</p>"
            f"<details><summary>scoring form</summary><code id='report-scoring'>{e(r['report'])}</code></details>"
            f"<h2>Images</h2>{views}"
            f"<h2>Labels</h2><p>Classifier probabilities, study level; predicted: p &gt; {DECISION_THRESHOLD}.</p>"
            f"<table id='labels'><tr><th>label</th><th>p</th><th>predicted</th></tr>{rows}</table>"
            f"<h2>Where the model looked (CAM of each predicted disease)</h2><div id='cams'>{cams}</div>"
            f"<h2>Report memory: sentences retrieved for the predicted diseases</h2>{retrieved}"
            f"<h2>Another study</h2>{_form()}")


def _safe_name(name: str, i: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name or f"view{i}").name)[:80] or f"view{i}"
    return f"{i}_{stem}"


def create_app(run, params, max_upload_mb: float = 64.0):
    """The FastAPI app over a loaded run (:func:`amrg.inference.load_run`) and its params."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, PlainTextResponse
    from starlette.datastructures import UploadFile

    from .predict import StudyError, describe, read_study

    app = FastAPI(title="amrg", docs_url=None, redoc_url=None, openapi_url=None)
    phantom = run.layout.is_phantom()
    lock = threading.Lock()
    limit = int(max_upload_mb * 2 ** 20)
    labels = len(CHEXPERT_14)

    def page(body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(_page(body, phantom), status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page(_form())

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz():
        return f"ok: {labels} labels, phantom-trained: {phantom}"

    @app.post("/report", response_class=HTMLResponse)
    async def report(request: Request):
        if int(request.headers.get("content-length") or 0) > limit:
            return page(_error(f"The upload is over the {max_upload_mb:g} MB limit.") + _form(), 413)
        try:
            form = await request.form(max_files=len(VIEWS), max_fields=len(VIEWS))
        except Exception as e:  # a malformed multipart body
            return page(_error(f"Could not read the upload: {e}") + _form(), 400)
        uploads = [(v, form.get(v)) for v in VIEWS]
        uploads = [(v, f) for v, f in uploads if isinstance(f, UploadFile) and f.filename]
        if not uploads:
            return page(_error("Choose at least one image file (the frontal view).") + _form(), 400)
        with tempfile.TemporaryDirectory(prefix="amrg-serve-") as tmp:
            paths, names = [], []
            for i, (view, f) in enumerate(uploads):
                data = await f.read(limit + 1)
                if len(data) > limit:
                    return page(_error(f"{f.filename}: over the {max_upload_mb:g} MB limit.") + _form(), 413)
                if not data:
                    return page(_error(f"{f.filename}: the file is empty.") + _form(), 400)
                path = Path(tmp) / _safe_name(f.filename, i)
                path.write_bytes(data)
                paths.append(path)
                names.append(f"{view}: {f.filename}")
            try:
                with lock:
                    pixels, _ = read_study(paths, run.image_size)
                    [r] = describe(run, pixels, np.array([[0, min(1, len(pixels) - 1)]]), params)
            except StudyError as e:
                detail = e.detail.replace(tmp + "/", "")
                return page(_error(f"Cannot use this upload ({e.reason}): {detail}") + _form(), 400)
            except Exception as e:  # the model failed: say so, keep serving
                log.exception("report failed")
                return page(_error(f"The model failed on this study: {type(e).__name__}: {e}") + _form(), 500)
        return page(_result(r, pixels, names))

    return app


def serve(run, params, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 64.0) -> int:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    print(f"amrg serve: http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(run, params, max_upload_mb), host=host, port=port, log_level="info")
    return 0
