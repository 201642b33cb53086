"""Memory bounded by the batch: the pixel store's row files, the chunked resumable preprocess, the
streamed nearest neighbour and the data manifest that tells DVC when the inputs changed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amrg.baselines import nearest_neighbour_reports
from amrg.data.chunks import produce
from amrg.data.store import RowFile, RowWriter, TensorRows, write_rows

ROOT = Path(__file__).resolve().parents[1]


def test_row_files_round_trip_and_a_short_write_leaves_nothing(tmp_path):
    rows = np.arange(5 * 3 * 4, dtype=np.uint8).reshape(5, 3, 4)
    with RowWriter(tmp_path / "a.npy", 5, (3, 4), np.uint8) as w:
        w.write(rows[:2])
        w.write(torch.from_numpy(rows[2:]))
    assert np.array_equal(np.load(tmp_path / "a.npy"), rows)  # a plain .npy
    rf = RowFile(tmp_path / "a.npy")
    assert len(rf) == 5 and rf.shape == (5, 3, 4) and rf.dtype == np.uint8
    assert np.array_equal(rf[[4, 0, 4]], rows[[4, 0, 4]]) and np.array_equal(rf[1:3], rows[1:3])
    assert torch.equal(TensorRows(tmp_path / "a.npy")[torch.tensor([3, 1])], torch.from_numpy(rows[[3, 1]]))
    with pytest.raises(ValueError, match="2 rows written, 5 announced"):
        with RowWriter(tmp_path / "b.npy", 5, (3, 4), np.uint8) as w:
            w.write(rows[:2])
    with pytest.raises(ValueError, match="rows of shape"):
        with RowWriter(tmp_path / "c.npy", 5, (3, 4), np.uint8) as w:
            w.write(rows[:, :2])
    assert not (tmp_path / "b.npy").exists() and not (tmp_path / "c.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]  # no temporary left behind
    f, g = write_rows([tmp_path / "f.npy", tmp_path / "g.npy"], 5,
                      ((rows[s:s + 2], rows[s:s + 2, 0].astype(np.float32)) for s in range(0, 5, 2)))
    assert torch.equal(f[torch.arange(5)], torch.from_numpy(rows)) and g.dtype == np.float32


class _Squares:
    """A chunk maker that fails on job ``fail_on`` while ``armed`` exists (a crash mid-run), and reports
    job values divisible by 7 as bad input."""

    def __init__(self, armed: Path, fail_on: int):
        self.armed, self.fail_on = armed, fail_on

    def __call__(self, jobs):
        if self.armed.exists() and self.fail_on in jobs:
            raise RuntimeError("crash")
        ok = [j for j in jobs if j % 7]
        errors = [(i, "bad", str(j)) for i, j in enumerate(jobs) if j % 7 == 0]
        return np.stack([np.full((2, 2), j % 256, np.uint8) for j in ok]), errors


def _assemble(chunks, errors, n, out):
    with RowWriter(out, n - len(errors), (2, 2), np.uint8) as w:
        for c in chunks:
            w.copy_rows(c)
    return out.read_bytes()


def test_produce_resumes_after_a_crash_and_the_result_does_not_depend_on_chunking(tmp_path):
    jobs = list(range(1, 40))
    armed = tmp_path / "armed"
    armed.touch()
    make = _Squares(armed, fail_on=23)
    with pytest.raises(RuntimeError, match="crash"):
        produce(jobs, make, tmp_path / "work", 5, 1, "fp")
    done = sorted(p.name for p in (tmp_path / "work").glob("*.json"))
    assert done == [f"chunk-{k:06d}.json" for k in range(4)]  # jobs 1..20 finished, chunk 4 (21..25) crashed
    armed.unlink()
    made = []
    chunks, errors = produce(jobs, partial(_count, made, make), tmp_path / "work", 5, 1, "fp")
    assert made == [4, 5, 6, 7]  # only the crashed chunk and those after it are made
    assert [j for j, _, _ in errors] == [j - 1 for j in jobs if j % 7 == 0]  # global job indices
    resumed = _assemble(chunks, errors, len(jobs), tmp_path / "resumed.npy")

    made.clear()
    npy = tmp_path / "work/chunk-000002.npy"  # a finished chunk damaged (a power loss before the page cache
    npy.write_bytes(npy.read_bytes()[:-1] + b"\xff")  # reached the disk): its CRC-32 differs, it is made again
    produce(jobs, partial(_count, made, make), tmp_path / "work", 5, 1, "fp")
    assert made == [2]

    chunks, errors = produce(jobs, make, tmp_path / "other", 16, 2, "fp")  # other chunking, a pool of 2
    assert _assemble(chunks, errors, len(jobs), tmp_path / "whole.npy") == resumed
    chunks, _ = produce(jobs, make, tmp_path / "work", 5, 1, "another fingerprint")  # other inputs: all again
    assert len(list((tmp_path / "work").glob("*.json"))) == 8


def _count(made, make, jobs):
    made.append((jobs[0] - 1) // 5)
    return make(jobs)


def test_nearest_neighbour_streamed_over_training_batches_equals_the_dense_search():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 3, 4, generator=g), torch.randn(9, 3, 4, generator=g)
    train[17] = train[3]  # a tie: the first training study wins either way
    reports = [f"r{i}" for i in range(50)]
    dense = nearest_neighbour_reports(train, reports, test)
    sims = torch.nn.functional.normalize(test.flatten(1), dim=1) @ torch.nn.functional.normalize(train.flatten(1), dim=1).T
    assert dense == [reports[i] for i in sims.argmax(1).tolist()]  # the reference: one dense argmax
    assert nearest_neighbour_reports(iter(train.split(7)), reports, test) == dense
    with pytest.raises(ValueError, match="49 training feature rows for 50"):
        nearest_neighbour_reports(iter([train[:49]]), reports, test)


def test_the_manifest_changes_exactly_when_an_input_does(tmp_path):
    from amrg.config import Data
    from amrg.data.manifest import write_manifest

    ann, images = tmp_path / "annotation.json", tmp_path / "images"
    ann.write_text('{"train": []}')
    (images / "s1").mkdir(parents=True)
    for name in ("0.png", "1.jpg", "notes.md"):
        (images / "s1" / name).write_bytes(b"x")
    data = Data(dataset="annotation", annotation=str(ann), images="files", images_dir=str(images))
    out = tmp_path / "manifest.tsv"

    def manifest() -> str:
        write_manifest(data, out)
        return out.read_text()

    first = manifest()
    assert "s1/0.png\t1\tmtime:" in first and "s1/1.jpg" in first and "notes.md" not in first
    assert f"{ann.as_posix()}\t13\tsha256:" in first  # small files by content
    assert manifest() == first  # touching nothing changes nothing
    os.utime(ann, ns=(1, 1))
    assert manifest() == first  # a small file's stamp is its content, not its time
    ann.write_text('{"val": []} ')
    second = manifest()
    assert second != first
    (images / "s1" / "0.png").write_bytes(b"yy")  # an image rewritten
    assert manifest() != second
    phantom = Data(dataset="annotation", annotation=str(ann))
    write_manifest(phantom, out)
    assert "png" not in out.read_text()  # phantom images read no image tree


def _env(**extra):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests/faults"), str(ROOT)]),
                CUDA_VISIBLE_DEVICES="", **extra)


@pytest.mark.timeout(600)
def test_preprocess_killed_mid_way_resumes_to_byte_identical_outputs(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(max_studies=10, image_size=64, annotation=str(ROOT / "data/iu_xray/annotation.json"))
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d, chunk, workers in ((ref, 1000, 2), (run, 8, 1)):
        d.mkdir()
        (d / "params.yaml").write_text(yaml.safe_dump({**params, "data": dict(params["data"], chunk_images=chunk,
                                                                                workers=workers)}))
    cmd = [sys.executable, "-m", "stages.preprocess", "--params", "params.yaml"]
    subprocess.run(cmd, cwd=ref, env=_env(), check=True, capture_output=True)

    marker = tmp_path / "paused"
    p = subprocess.Popen(cmd, cwd=run, env=_env(AMRG_FAULT="preprocess|checkpoint|6", AMRG_FAULT_MARKER=str(marker)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "preprocess ended before its third chunk"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    work = run / "checkpoints/preprocess"
    assert len(list(work.glob("chunk-*.json"))) == 3 and not (run / "artifacts/preprocess/pixels.npy").exists()

    out = subprocess.run(cmd, cwd=run, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "resuming: 3 of" in out.stderr
    for name in ("studies.parquet", "images.parquet", "pixels.npy", "stats.json"):
        a, b = (d / "artifacts/preprocess" / name for d in (ref, run))
        assert a.read_bytes() == b.read_bytes(), name
    assert not work.exists()  # the chunks are gone once the store is assembled


class _WordLengths:
    """A tokenizer stand-in: each word's id is its length."""
    pad_token_id, eos_token_id = 0, 99

    def __call__(self, texts, add_special_tokens, truncation, max_length):
        return {"input_ids": [[len(w) for w in t.split()][:max_length] for t in texts]}


def test_reports_tokenized_in_blocks_equal_one_block(monkeypatch):
    import amrg.tasks as tasks

    reports = ["a bb ccc", "dddd", "e f g h i j k", "ll mm"]
    whole = tasks.tokenize_reports(_WordLengths(), reports, 5)
    assert whole[0].tolist() == [[1, 2, 3, 99, 0], [4, 99, 0, 0, 0], [1, 1, 1, 1, 99], [2, 2, 99, 0, 0]]  # by hand
    assert whole[1].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    monkeypatch.setattr(tasks, "TOKENIZE_BLOCK", 2)  # the block of the longest report comes second
    blocks = tasks.tokenize_reports(_WordLengths(), reports, 5)
    assert all(torch.equal(a, b) for a, b in zip(whole, blocks))


@pytest.mark.timeout(300)
def test_classifier_trained_through_loader_workers_equals_the_main_process(tmp_path):
    """The same weights whether 2 DataLoader worker processes read the row file ahead or the step
    reads it itself: the loader changes where bytes are read, not what is trained on."""
    from amrg.models.classifier import ClassifierSpec, DiseaseClassifier
    from amrg.tasks import ClassifierTask
    from amrg.train import LoopConfig, Selection, fit

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (24, 64, 64), dtype=torch.uint8, generator=g)
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    store = TensorRows(tmp_path / "pixels.npy")
    targets = (torch.rand(24, 14, generator=g) > 0.7).float()
    train, val = np.arange(16), np.arange(16, 24)
    spec = ClassifierSpec("swin_tiny_patch4_window7_224", dict(patch_size=16, embed_dim=16, depths=[1], num_heads=[1]),
                          64, 16, 1, 2)
    torch.manual_seed(1)
    initial = DiseaseClassifier(spec).state_dict()
    weights = []
    for workers in (0, 2):
        torch.manual_seed(1)
        model = DiseaseClassifier(spec)
        task = ClassifierTask(model, store, targets, train, val, 0.1, None, 8, torch.device("cpu"), "fp32", workers)
        fit(model, len(train), task.batch_loss, task.validate, LoopConfig(2, 4, 1e-3, seed=3),
            tmp_path / f"ckpt{workers}.pt", "fp", Selection.of("val_auroc"), loader=task.loader)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], initial[k]) for k in weights[0])  # it trained
