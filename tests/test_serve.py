"""``amrg serve`` (amrg.serve) on a tiny run: started on a free local port and driven in headless Chromium
(Playwright over the system's Chromium, as the report-HTML test uses it): a phantom upload gives the
readable report, the label table and non-blank CAM overlays; bad uploads give a visible error and the
server keeps serving. The HTTP-level checks run without a browser too (FastAPI's test client)."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from amrg.data.phantoms import draw_phantom
from amrg.inference import load_run, run_params
from amrg.labels.schema import CHEXPERT_14
from amrg.layout import Layout
from amrg.serve import create_app
from tests import _dicom
from tests._tiny_run import BANK_SENTENCES, build_tiny_run

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    layout = Layout(build_tiny_run(tmp_path_factory.mktemp("run")))
    return create_app(load_run(layout, torch.device("cpu")), run_params(layout), max_upload_mb=2.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    labels = np.zeros(14)
    labels[CHEXPERT_14.index("Cardiomegaly")] = 1
    Image.fromarray(draw_phantom(labels, 0, 256, 1)).save(d / "frontal.png")
    Image.fromarray(draw_phantom(labels, 1, 256, 1)).save(d / "lateral.png")
    _dicom.write(d / "frontal.dcm", draw_phantom(labels, 0, 128, 2))
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    (d / "notes.txt").write_text("not an image")
    Image.new("L", (20_000, 20_000)).save(d / "huge.png", compress_level=1)  # ~0.5 MB on disk
    _dicom.write(d / "other_study.dcm", draw_phantom(labels, 1, 128, 3), study_uid="5.5")
    return d


def post(client, files, **named):
    return client.post("/report", files={k: (p.name, p.read_bytes()) for k, p in named.items()})


def test_http_upload_and_errors(app, files):
    from fastapi.testclient import TestClient

    client = TestClient(app)
    home = client.get("/")
    assert home.status_code == 200 and "id='upload'" in home.text and "id='phantom-warning'" in home.text
    ok = post(client, files, frontal=files / "frontal.png", lateral=files / "lateral.png")
    assert ok.status_code == 200 and "id='report-text'" in ok.text and "id='error'" not in ok.text
    assert ok.text.count("<tr class=") == 14 and "<tr class='pos'><td>Cardiomegaly</td>" in ok.text
    retrieved = ok.text.split("<ul id='retrieved'>", 1)[1].split("</ul>", 1)[0]  # the R-Hopfield's top bank rows
    assert "<b>Cardiomegaly</b>" in retrieved and sum(s in retrieved for s in BANK_SENTENCES) == 3
    assert post(client, files, frontal=files / "frontal.dcm").status_code == 200
    for bad, status, msg in (("corrupt.png", 400, "unreadable_image"), ("notes.txt", 400, "unreadable_image"),
                             ("huge.png", 400, "image_too_large")):
        r = post(client, files, frontal=files / bad)
        assert r.status_code == status and "id='error'" in r.text and msg in r.text, (bad, r.text[-600:])
    mixed = post(client, files, frontal=files / "frontal.dcm", lateral=files / "other_study.dcm")
    assert mixed.status_code == 400 and "mixed_studies" in mixed.text
    assert client.post("/report", files={}).status_code == 400
    big = client.post("/report", files={"frontal": ("x.png", b"\0" * (3 * 2 ** 20))})
    assert big.status_code == 413 and "limit" in big.text
    assert post(client, files, frontal=files / "frontal.png").status_code == 200  # still serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app):
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def image_std(src: str) -> float:
    assert src.startswith("data:image/png;base64,")
    return float(np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("L"), float).std())


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH: apt-get install chromium "
                                             "(.ci/run installs it when CI=true)")
def test_the_page_in_headless_chromium(server, files):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server + "/")
            assert page.locator("#phantom-warning").is_visible()
            page.set_input_files("#frontal", str(files / "frontal.png"))
            page.set_input_files("#lateral", str(files / "lateral.png"))
            with page.expect_navigation():
                page.click("#submit")
            assert page.locator("#report-text").inner_text().strip()
            assert page.locator("#labels tr").count() == 15  # header + 14 labels
            assert page.locator("#labels tr.pos").first.inner_text().startswith("Cardiomegaly")
            overlays = page.locator("img.overlay")
            assert overlays.count() >= 2  # Cardiomegaly on both views
            for i in range(overlays.count()):
                img = overlays.nth(i)
                assert img.evaluate("i => i.complete && i.naturalWidth > 0")
                assert image_std(img.get_attribute("src")) > 5  # a radiograph under a heat map, not blank
            page.set_input_files("#frontal", str(files / "corrupt.png"))
            with page.expect_navigation():
                page.click("#submit")
            assert page.locator("#error").is_visible() and "unreadable_image" in page.locator("#error").inner_text()
            page.set_input_files("#frontal", str(files / "frontal.dcm"))  # the server keeps serving
            with page.expect_navigation():
                page.click("#submit")
            assert page.locator("#report-text").inner_text().strip() and page.locator("#error").count() == 0
        finally:
            browser.close()
