"""``amrg generate --input DIR|CSV --out FILE`` (amrg.predict) on a tiny run: studies by folder or CSV
column, DICOM beside PNG/JPEG, every bad study a counted skip with its reason, resumable after an
interruption, and the readable form of each report."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from amrg import predict
from amrg.cli import main
from amrg.data.clean import readable_report
from tests import _dicom
from tests._tiny_run import build_tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_tiny_run(tmp_path_factory.mktemp("run"))


def png(path, seed=0, shape=(80, 72)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def tree(tmp_path):
    """s1: PNG + DICOM of one study; s2: one JPEG; top-level single.png; bad ones: a corrupt file, a
    multi-frame DICOM, DICOMs of two studies in one folder; notes.txt is not an image."""
    root = tmp_path / "in"
    png(root / "s1" / "frontal.png", 1)
    uid = "1.2.3.4"
    _dicom.write(root / "s1" / "lateral.dcm", np.random.default_rng(2).integers(0, 4095, (70, 70)).astype(np.uint16),
                 bits_stored=12, photometric="MONOCHROME1", study_uid=uid)
    img = np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    (root / "s2").mkdir()
    Image.fromarray(img).save(root / "s2" / "view.jpg")
    png(root / "single.png", 4)
    (root / "corrupt").mkdir()
    (root / "corrupt" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _dicom.write(root / "cine" / "multi.dcm", np.zeros((3, 32, 32), np.uint8))
    _dicom.write(root / "mixed" / "a.dcm", np.zeros((32, 32), np.uint8), study_uid="1.1")
    _dicom.write(root / "mixed" / "b.dcm", np.zeros((32, 32), np.uint8), study_uid="2.2")
    (root / "notes.txt").write_text("not an image")
    return root


GOOD, BAD = {"s1", "s2", "single.png"}, {"corrupt": "unreadable_image", "cine": "multi_frame", "mixed": "mixed_studies"}


def test_a_folder_gives_one_row_per_study_and_counts_every_skip(run_dir, tree, tmp_path, capsys):
    out = tmp_path / "reports.parquet"
    assert main(["generate", "--input", str(tree), "--out", str(out), "--run", str(run_dir), "--batch-size", "2"]) == 0
    rows = {r["study"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == GOOD | set(BAD)
    for s in GOOD:
        r = rows[s]
        assert r["error"] is None and r["report"] and r["report_readable"] == readable_report(r["report"])
        labels = json.loads(r["labels"])
        assert len(labels) == 14 and labels["Cardiomegaly"] > 0.99  # the tiny run's classifier
        assert "Cardiomegaly" in json.loads(r["retrieved"]) and r["phantom_trained"] is True
    assert len(rows["s1"]["images"]) == 2 and rows["s1"]["views_dropped"] == 0
    for s, reason in BAD.items():
        assert rows[s]["report"] is None and rows[s]["error"].startswith(reason), rows[s]
    stdout = capsys.readouterr().out
    assert "3 of 6 studies have a report" in stdout and "3 skipped" in stdout
    assert not predict.journal_of(out).exists()  # the parquet holds everything; no sidecar is left


def test_an_interrupted_batch_resumes_where_it_stopped(run_dir, tree, tmp_path, monkeypatch):
    out = tmp_path / "reports.jsonl"
    calls = []
    real = predict.describe

    def flaky(run, pixels, view_rows, *a, **k):
        calls.append(len(view_rows))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second batch never finishes
        return real(run, pixels, view_rows, *a, **k)

    monkeypatch.setattr(predict, "describe", flaky)
    with pytest.raises(KeyboardInterrupt):
        main(["generate", "--input", str(tree), "--out", str(out), "--run", str(run_dir), "--batch-size", "1"])
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["study"] for r in first if not r["error"]] == ["s1"]  # sorted order; the skips before s2 too
    with out.open("a") as f:
        f.write('{"study": "torn')  # a write cut by the interruption
    calls.clear()
    monkeypatch.setattr(predict, "describe", real)
    stats = predict.generate_batch(*_loaded(run_dir), predict.studies_from_dir(tree), out, batch_size=1, progress=False)
    assert stats["already_written"] == 1 and stats["written"] == 3 and stats["skipped"] == 3
    rows = predict._read_done(out)
    assert {s for s, r in rows.items() if not r["error"]} == GOOD
    again = predict.generate_batch(*_loaded(run_dir), predict.studies_from_dir(tree), out, batch_size=1, progress=False)
    assert again["already_written"] == 3 and again["written"] == 3  # only the skipped ones are retried


def _loaded(run_dir):
    import torch

    from amrg.inference import load_run, run_params
    from amrg.layout import Layout

    layout = Layout(run_dir)
    return load_run(layout, torch.device("cpu")), run_params(layout)


def test_a_csv_groups_rows_into_studies(run_dir, tmp_path):
    a, b, c = png(tmp_path / "img" / "a.png", 5), png(tmp_path / "img" / "b.png", 6), png(tmp_path / "img" / "c.png", 7)
    csv = tmp_path / "list.csv"
    csv.write_text(f"accession,file\nX1,img/a.png\nX1,img/b.png\nX2,{c}\nX3,img/missing.png\n")
    out = tmp_path / "r.jsonl"
    assert main(["generate", "--input", str(csv), "--out", str(out), "--run", str(run_dir),
                 "--study-column", "accession", "--path-column", "file"]) == 0
    rows = predict._read_done(out)
    assert len(rows["X1"]["images"]) == 2 and rows["X1"]["error"] is None and rows["X2"]["error"] is None
    assert rows["X3"]["error"].startswith("missing_image")


@pytest.mark.parametrize("content, msg", [("study,image\ns,a.png\n", "no column ['path']"),
                                          ("study,path\n,a.png\n", "empty 'study' or 'path'")])
def test_a_malformed_csv_is_a_clear_error(run_dir, tmp_path, capsys, content, msg):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    assert main(["generate", "--input", str(csv), "--out", str(tmp_path / "o.parquet"), "--run", str(run_dir)]) == 2
    assert msg in capsys.readouterr().err and not (tmp_path / "o.parquet").exists()


def test_bad_batch_arguments(run_dir, tmp_path, capsys):
    assert main(["generate", "--input", str(tmp_path), "--out", str(tmp_path / "o.csv"), "--run", str(run_dir)]) == 2
    assert "must end in .parquet or .jsonl" in capsys.readouterr().err
    assert main(["generate", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o.jsonl"), "--run", str(run_dir)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["generate", "--input", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--run", str(run_dir)]) == 2
    assert "no image files found" in capsys.readouterr().err


def test_one_dicom_study_on_the_command_line(run_dir, tmp_path, capsys):
    a = _dicom.write(tmp_path / "f.dcm", np.random.default_rng(8).integers(0, 255, (90, 90), dtype=np.uint8), study_uid="9.9")
    b = _dicom.write(tmp_path / "l.dcm", np.random.default_rng(9).integers(0, 255, (90, 90), dtype=np.uint8), study_uid="9.9")
    c = _dicom.write(tmp_path / "other.dcm", np.zeros((40, 40), np.uint8), study_uid="8.8")
    assert main(["generate", str(a), str(b), "--study", "--run", str(run_dir), "--json"]) == 0
    [r] = json.loads(capsys.readouterr().out)
    assert r["report_readable"] == readable_report(r["report"]) and r["predicted"][0][0] == "Cardiomegaly"
    assert main(["generate", str(a), str(c), "--study", "--run", str(run_dir)]) == 2
    assert "2 different studies" in capsys.readouterr().err
