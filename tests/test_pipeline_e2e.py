"""End to end: `dvc repro` of the whole DAG on a tiny profile in a temp copy of the repo.

Checks every declared output exists and is readable, a second repro runs nothing, a decoding param
reruns `evaluate` alone, and `--single-item --force mine_cam` reruns that stage alone.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "data": {"max_studies": 12},
    "classifier": {"epochs": 1, "batch_size": 8},
    "cam": {"max_per_disease": 4, "batch_size": 8, "n_overlays": 1},
    "banks": {"report": {"size": 30}},
    "generator": {"epochs": 1, "batch_size": 4},
    "decode": {"num_beams": 1, "max_new_tokens": 12},
}


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def _run(args, cwd, env):
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(args)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(("artifacts/", "checkpoints/")):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    (dst / "dvc.lock").unlink(missing_ok=True)
    params = _merge(yaml.safe_load((dst / "params.yaml").read_text()), TINY)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    _run(["git", "init", "-q"], dst, env)
    return dst, env


def test_dvc_repro_tiny_profile(repo):
    dst, env = repo
    dvc = [sys.executable, "-m", "dvc"]
    first = _run(dvc + ["repro"], dst, env)
    stages = list(yaml.safe_load((dst / "dvc.yaml").read_text())["stages"])
    assert sorted(_ran(first)) == sorted(stages)

    # every declared output exists and is readable
    for stage in yaml.safe_load((dst / "dvc.yaml").read_text())["stages"].values():
        for out in stage["outs"]:
            path = dst / out
            assert path.is_dir() and any(path.iterdir()), out
            for f in path.rglob("*"):
                if f.suffix == ".parquet":
                    assert pq.read_table(f).num_rows > 0, f
                elif f.suffix == ".json":
                    json.loads(f.read_text())
                elif f.suffix == ".safetensors":
                    assert load_file(str(f)), f
    metrics = json.loads((dst / "artifacts/eval/metrics.json").read_text())
    assert metrics["phantom_images"] is True and metrics["n_test"] == 12
    for key in ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert 0.0 <= metrics["model"][key] <= 10.0
    assert {"precision", "recall", "f1"} <= set(metrics["model"]["ce"])
    assert "most_frequent" in metrics["baselines"]
    stats = json.loads((dst / "artifacts/preprocess/stats.json").read_text())
    assert stats["studies"] == {"train": 12, "val": 12, "test": 12} and stats["phantom_images"]

    # a second repro runs nothing
    assert _ran(_run(dvc + ["repro"], dst, env)) == []

    # a decoding knob reruns evaluate alone
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["decode"]["max_new_tokens"] = 10
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(dvc + ["repro"], dst, env)) == ["evaluate"]

    # forcing one stage reruns that stage alone
    assert _ran(_run(dvc + ["repro", "--single-item", "--force", "mine_cam"], dst, env)) == ["mine_cam"]


def test_unknown_param_fails_before_compute(repo):
    dst, env = repo
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["cam"]["tua"] = 0.4
    bad = dst / "bad_params.yaml"
    bad.write_text(yaml.safe_dump(params))
    p = subprocess.run([sys.executable, "-m", "stages.mine_cam", "--params", str(bad)], cwd=dst, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "cam.tua: unknown key" in p.stderr
