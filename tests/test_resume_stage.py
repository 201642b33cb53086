"""kill -9 a training stage mid-run, run it again: it resumes from its checkpoint and ends with the
same weights as an uninterrupted run (CPU)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # whole-DAG runs: longer than the global 300 s


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")


def _stage(name, cwd, params):
    return subprocess.Popen([sys.executable, "-m", f"stages.{name}", "--params", str(params)], cwd=cwd,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_train_classifier_survives_kill_9(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(max_studies=16, annotation=str(ROOT / "data/iu_xray/annotation.json"))
    params["classifier"].update(epochs=3, batch_size=4, checkpoint_every=1, warmup_steps=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    ref, run = tmp_path / "ref", tmp_path / "run"
    for d in (ref, run):
        d.mkdir()
        assert _stage("preprocess", d, tmp_path / "params.yaml").wait(timeout=300) == 0

    p = _stage("train_classifier", ref, tmp_path / "params.yaml")
    assert p.wait(timeout=300) == 0, p.stdout.read()

    p = _stage("train_classifier", run, tmp_path / "params.yaml")
    ckpt = run / "checkpoints/train_classifier/state.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "no checkpoint was written before the run ended"
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "artifacts/classifier/model.safetensors").exists()

    p = _stage("train_classifier", run, tmp_path / "params.yaml")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "resuming from" in out
    a = load_file(str(ref / "artifacts/classifier/model.safetensors"))
    b = load_file(str(run / "artifacts/classifier/model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not ckpt.exists()
