"""Workers sharing one DVC remote, kill -9 during every stage, and two runs in one workspace.

One tiny-profile git repo (``origin``, dvc.lock not committed) is cloned twice beside a shared local
remote: the committed ``.dvc/config`` points at ``../amrg-dvc-remote``, the clones' common sibling.

* ``worker1`` runs the DAG with a ``kill -9`` of the whole ``dvc repro`` process group inside every
  stage (a shim on PYTHONPATH pauses the stage at a chosen point: mid-write, mid-epoch after a
  checkpoint, mid-way through CAM mining); every rerun goes on from where the last one died, and no
  output path ever shows a truncated file. It then pushes with ``--run-cache``.
* ``worker2`` pulls and reproduces: every stage is restored from the run-cache, none is run.
* Two ``dvc repro`` in one workspace: the second fails at once with DVC's lock message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from ._workspace import make_workspace


ROOT = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "faults"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # whole-DAG runs: longer than the global 300 s

# the smoke overlay (configs/tiny.yaml) with a checkpoint after every step, so a kill lands mid-epoch
CHECKPOINT_EVERY_STEP = {"classifier": {"checkpoint_every": 1}, "generator": {"checkpoint_every": 1}}
# cheaper evaluation (evaluate runs twice here: once killed, once to the end)
SPEEDUPS = {"evaluate": {"meteor": False, "bootstrap": 0, "report_samples": 1}}
STAGES = ["preprocess", "train_classifier", "mine_cam", "encode_visual_bank", "encode_report_bank",
          "train_generator", "evaluate"]  # each killed once below
# dvc.yaml's stages but the always-changed index, in pipeline order (with the two no-op pre-training stages)
ALL_STAGES = [s for s in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"] if s != "index"]
# (stage, fault): where each stage is stopped before its process group gets SIGKILL
FAULTS = [
    ("preprocess", "write|2"),                            # images.parquet renamed, pixels.npy only a temp
    ("train_classifier", "checkpoint|1"),                 # mid-epoch 1 of 1, right after a checkpoint
    ("mine_cam", "call|amrg.cam:CamMiner.__call__|2"),    # CAM of batch 2 of 3: mid-way through mining
    ("encode_visual_bank", "write|1"),                    # bank computed, bank.safetensors only a temp
    ("encode_report_bank", "write|1"),
    ("train_generator", "checkpoint|6"),                  # after its 4 feature files, batch 2 of 3 (of 1 epoch)
    ("evaluate", "write|1"),                              # predictions/metrics only a temp
]


def _env(tmp: Path, **extra) -> dict:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               CUDA_VISIBLE_DEVICES="", DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    env.pop("PYTHONPATH", None)
    env.pop("AMRG_FAULT", None)
    env.update(extra)
    return env


def _run(args, cwd, env, ok=True, timeout=900):
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if ok:
        assert p.returncode == 0, f"{' '.join(map(str, args))} failed:\n{out[-6000:]}"
    return out if ok else (p.returncode, out)


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


DVC = [sys.executable, "-m", "dvc"]


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _is_temp(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(".tmp")


def _assert_complete(path: Path) -> None:
    """A file at an output path is whole: it parses completely with its format's reader."""
    suffix = path.suffix
    if suffix == ".parquet":
        pq.read_table(path)
    elif suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".safetensors":
        load_file(str(path))
    elif suffix == ".png":
        with Image.open(path) as im:
            im.load()
    elif path.name == "manifest.tsv":  # the index stage's: comment lines, then path, size, stamp
        lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
        assert lines and all(len(line.split("\t")) == 3 for line in lines), path
    elif suffix == ".tsv":
        lines = path.read_text().splitlines()
        assert lines and all(len(line.split("\t")) == 2 for line in lines), path
    elif suffix == ".npy":  # the pixel store: a header and every row it announces
        rows = np.load(path, mmap_mode="r")
        assert rows.size and path.stat().st_size >= rows.offset + rows.nbytes, path


def _check_outputs(ws: Path) -> tuple[int, int]:
    """(complete files, hidden temp files) under artifacts/; raises on any truncated file."""
    complete = temps = 0
    for p in _files(ws / "artifacts").values() if (ws / "artifacts").exists() else []:
        if _is_temp(p):
            temps += 1
            continue
        _assert_complete(p)
        complete += 1
    return complete, temps


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """origin (git, tiny profile, committed .dvc/config with the sibling remote) + helpers."""
    tmp = tmp_path_factory.mktemp("cluster")
    origin = make_workspace(tmp / "origin", CHECKPOINT_EVERY_STEP, SPEEDUPS, exclude=("tests/", "bench/"))
    env = _env(tmp)
    _run(["git", "add", "-A"], origin, env)
    _run(["git", "commit", "-qm", "tiny profile"], origin, env)
    remote = _run(DVC + ["remote", "list"], origin, env)
    assert "../amrg-dvc-remote" in remote or "amrg-dvc-remote" in remote, remote
    return tmp, env


def _clone(tmp: Path, name: str, env: dict) -> Path:
    _run(["git", "clone", "-q", str(tmp / "origin"), str(tmp / name)], tmp, env)
    return tmp / name


@pytest.fixture(scope="module")
def worker1(cluster):
    """A worker that is killed with -9 inside every stage, reruns until done, then pushes."""
    tmp, env = cluster
    ws = _clone(tmp, "worker1", env)
    marker = tmp / "fault-marker"
    events, outputs = [], []
    for stage, fault in FAULTS:
        marker.unlink(missing_ok=True)
        fenv = dict(env, PYTHONPATH=str(SHIM), AMRG_FAULT=f"{stage}|{fault}", AMRG_FAULT_MARKER=str(marker))
        log = tmp / f"worker1-{stage}.log"
        with open(log, "w") as fh:
            p = subprocess.Popen(DVC + ["repro"], cwd=ws, env=fenv, stdout=fh, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            deadline = time.time() + 600
            while not marker.exists() and p.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            paused = marker.read_text().strip() if marker.exists() else None
            if paused is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                pytest.fail(f"stage {stage} never reached fault {fault}:\n{log.read_text()[-6000:]}")
            complete, temps = _check_outputs(ws)  # while paused: nothing truncated is visible
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        complete_after, _ = _check_outputs(ws)  # and after the kill
        events.append({"stage": stage, "fault": fault, "paused": paused, "complete": complete,
                       "temps": temps, "complete_after": complete_after, "rc": p.returncode})
        outputs.append(log.read_text())
    out = _run(DVC + ["repro"], ws, env)  # the last rerun: no fault
    outputs.append(out)
    push = _run(DVC + ["push", "--run-cache"], ws, env)
    return {"ws": ws, "events": events, "outputs": outputs, "push": push}


def test_kill9_during_every_stage_rerun_completes(worker1):
    events, outputs, ws = worker1["events"], worker1["outputs"], worker1["ws"]
    assert [e["stage"] for e in events] == STAGES
    assert all(e["rc"] == -signal.SIGKILL for e in events)
    # the kills really happened where intended
    assert "pixels.npy" in events[0]["paused"] and "before rename" in events[0]["paused"]
    assert "checkpoints/train_classifier/state.pt" in events[1]["paused"]
    assert "CamMiner.__call__" in events[2]["paused"]
    assert "banks/visual/bank.safetensors" in events[3]["paused"]
    assert "banks/report/bank.safetensors" in events[4]["paused"]
    assert "checkpoints/train_generator/state.pt" in events[5]["paused"]
    assert "artifacts/eval/" in events[6]["paused"]
    # a temp file was pending at every write fault, yet the output path never showed it
    assert all(events[i]["temps"] >= 1 for i in (0, 3, 4, 6))
    # every rerun first finishes the stage killed last time, then goes on (earlier stages are not rerun)
    for i, stage in enumerate(STAGES):
        ran = [s for s in _ran(outputs[i]) if s != "index"]  # the data manifest is listed on every repro
        assert ran[-1] == stage, (stage, ran)
        if i:
            assert ran[0] == STAGES[i - 1], (stage, ran)
    # training stages resumed from their checkpoint instead of starting over
    assert "resuming from checkpoints/train_classifier/state.pt" in outputs[2]
    assert re.search(r"resuming from checkpoints/train_generator/state.pt at epoch 0 batch 2", outputs[6])
    assert _ran(outputs[-1]) == ["index", "evaluate", "score"]
    # the finished workspace: every declared output whole, no stray temp files, nothing left to run
    complete, temps = _check_outputs(ws)
    assert complete > 20 and temps == 0
    assert not any((ws / "checkpoints").rglob("state.pt"))
    status = _run(DVC + ["status"], ws, _env(ws.parent))
    assert status.split() == ["index:", "always", "changed"], status  # DVC's mark of the manifest stage only
    metrics = json.loads((ws / "artifacts/eval/metrics.json").read_text())
    assert metrics["n_test"] == 12 and metrics["phantom_images"] is True


def test_resumed_training_matches_uninterrupted(worker1, tmp_path):
    """The generator killed mid-epoch and resumed ends with the weights of a straight run on the same
    inputs (the classifier's case is tests/test_resume_stage.py)."""
    ws = worker1["ws"]
    ref = tmp_path / "ref"
    shutil.copytree(ws, ref, ignore=shutil.ignore_patterns(".git", "checkpoints", "cache"))
    weights = "generator/weights.safetensors"
    (ref / "artifacts" / weights).unlink()
    out = _run([sys.executable, "-m", "stages.train_generator"], ref, _env(tmp_path))
    assert "resuming from" not in out
    a, b = load_file(str(ws / "artifacts" / weights)), load_file(str(ref / "artifacts" / weights))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.fixture(scope="module")
def worker2(cluster, worker1):
    """A second clone beside the same remote: pull + repro, nothing committed but the code."""
    tmp, env = cluster
    ws = _clone(tmp, "worker2", env)
    assert not (ws / "dvc.lock").exists()  # nothing committed: only the run-cache can tell
    t0 = time.perf_counter()
    _run(DVC + ["pull", "--run-cache", "--allow-missing"], ws, env)
    out = _run(DVC + ["repro", "--pull"], ws, env)
    return {"ws": ws, "out": out, "seconds": time.perf_counter() - t0}


def test_second_clone_restores_from_run_cache(cluster, worker1, worker2):
    """worker2 computes nothing: `dvc pull --run-cache` + `dvc repro --pull` restore every stage."""
    tmp, _ = cluster
    assert (tmp / "amrg-dvc-remote" / "runs").is_dir()  # the shared sibling remote got the run-cache
    out, ws = worker2["out"], worker2["ws"]
    assert _ran(out) == ["index"]  # only the manifest of the inputs is listed again (always changed)
    restored = re.findall(r"Stage '([^']+)' is cached - skipping run, checking out outputs", out)
    assert restored == ALL_STAGES, out
    assert "stages.preprocess: stage preprocess" not in out  # no stage process started
    a, b = _files(worker1["ws"] / "artifacts"), _files(ws / "artifacts")
    assert a.keys() == b.keys()
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    print(f"worker2 restored {len(b)} files of {len(ALL_STAGES)} stages in {worker2['seconds']:.1f}s")


def test_two_repros_in_one_workspace(cluster, worker2):
    """While one `dvc repro` runs a stage, a second one in the same workspace fails at once with DVC's
    lock message and writes nothing; the first then finishes normally."""
    tmp, env = cluster
    ws = worker2["ws"]
    # (the index stage lists the inputs on every repro, whatever else is running: it reads no artifact)
    before = {k: p.stat().st_mtime_ns for k, p in _files(ws / "artifacts").items()
              if "banks/visual" not in k and not k.startswith("index/")}
    marker, release = tmp / "w2-marker", tmp / "w2-release"
    fenv = dict(env, PYTHONPATH=str(SHIM), AMRG_FAULT="encode_visual_bank|write|1", AMRG_FAULT_MARKER=str(marker),
                AMRG_FAULT_RELEASE=str(release))
    first = subprocess.Popen(DVC + ["repro", "--force", "--single-item", "encode_visual_bank"], cwd=ws, env=fenv,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not marker.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), first.communicate()[0]
        t0 = time.perf_counter()
        # mine_cam would rewrite artifacts/cam, which the running stage reads
        rc, out = _run(DVC + ["repro", "--force", "--single-item", "mine_cam"], ws, env, ok=False)
        waited = time.perf_counter() - t0
        assert rc != 0 and "is busy, it is being blocked by" in out and f"PID {first.pid}" in out, out
        rc2, out2 = _run(DVC + ["repro"], ws, env, ok=False)  # the whole DAG: stops at train_classifier
        assert rc2 != 0 and ("is busy" in out2 or "Unable to acquire lock" in out2), out2
        assert _ran(out) == [] and _ran(out2) in ([], ["index"])
        assert waited < 60  # refused at once, not after the running stage
    finally:
        release.touch()
        rest = first.communicate(timeout=300)[0]
    assert first.returncode == 0, rest
    after = {k: p.stat().st_mtime_ns for k, p in _files(ws / "artifacts").items()
             if "banks/visual" not in k and not k.startswith("index/")}
    assert after == before  # the refused runs wrote nothing
    assert _check_outputs(ws)[1] == 0
