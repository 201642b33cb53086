"""Fast fault tests: pickled code is refused by every weights loader, atomic writes, one pipeline run
per workspace (flow-level lock), params overlays validated before anything runs, the shared-remote
config and the deployment files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this runs ``os.system("touch <marker>")``: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "loop": _Payload(marker)}, path)
    # the payload is real: a plain unpickle runs it
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_every_weights_loader_refuses_a_malicious_pickle(tmp_path):
    from amrg.io import load_checkpoint
    from amrg.labels.chexbert import load_state_dict
    from amrg.models.vision import load_backbone_weights

    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global|posix.system"):
        load_checkpoint(path)  # training resume state
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global|posix.system"):
        load_backbone_weights(torch.nn.Linear(2, 2), str(path))  # vision.checkpoint
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict(path)  # labels.chexbert_checkpoint
    assert not marker.exists()  # nothing ran


def test_atomic_writes_leave_no_partial_file_and_keep_the_umask_mode(tmp_path):
    from amrg.io import atomic_path, write_json

    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}  # the old version, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # the temp file is gone
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600: shared workers can read it


HOLDER = """
import sys, time
from flows.dvc_tasks import workspace_lock
with workspace_lock(sys.argv[1], owner="holder"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_second_pipeline_run_in_a_workspace_fails_clearly_or_waits(tmp_path):
    from flows.dvc_tasks import WorkspaceBusy, workspace_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "3"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkspaceBusy, match=r"in use by another pipeline run .*holder.*dvc queue start"):
        with workspace_lock(tmp_path):
            pass
    t0 = time.perf_counter()
    waited = []
    with workspace_lock(tmp_path, wait=True, log=waited.append):
        held_for = time.perf_counter() - t0  # granted only once the holder let go (it holds it 3 s)
    assert waited and "waiting for the workspace lock" in waited[0] and held_for > 1.5
    holder.wait()


def test_a_killed_run_never_leaves_the_workspace_locked(tmp_path):
    from flows.dvc_tasks import workspace_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "60"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # SIGKILL
    holder.wait()
    with workspace_lock(tmp_path):  # free at once
        pass


def test_shared_remote_is_a_relative_sibling_directory():
    """.dvc/config: the default remote is a local directory beside the checkout, no machine path."""
    text = (ROOT / ".dvc/config").read_text()
    from configparser import ConfigParser

    cfg = ConfigParser()
    cfg.read_string(text)
    name = cfg["core"]["remote"]
    url = cfg[f"'remote \"{name}\"'"]["url"]  # DVC writes the section as ['remote "name"']
    assert not os.path.isabs(url) and "://" not in url
    # relative to .dvc/: the sibling of the repository
    assert os.path.normpath(os.path.join(".dvc", url)) == os.path.join("..", "amrg-dvc-remote")


def test_prefect_yaml_deployments():
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert set(deps) >= {"nightly", "sweep", "nightly-process"}
    nightly = deps["nightly"]
    assert nightly["entrypoint"] == "flows/pipeline.py:pipeline"
    assert deps["sweep"]["entrypoint"] == "flows/sweep.py:sweep_flow"
    assert (ROOT / deps["sweep"]["parameters"]["grid"]).is_file()
    assert nightly["schedules"][0]["cron"] and nightly["schedules"][0]["active"] is True
    assert nightly["parameters"]["pull"] is True and nightly["parameters"]["push"] is True
    assert {"params_overlay", "experiment"} <= set(nightly["parameters"])
    jv = nightly["work_pool"]["job_variables"]
    assert jv["container_create_kwargs"]["device_requests"][0]["capabilities"] == [["gpu"]]
    assert deps["nightly-process"]["work_pool"]["name"] == "amrg-process"
    # every parameter is one the flow takes
    import inspect

    from flows.pipeline import pipeline

    accepted = set(inspect.signature(pipeline.fn).parameters)
    assert set(nightly["parameters"]) <= accepted
    # the pool templates ask for GPUs
    docker = json.loads((ROOT / "deploy/docker-gpu-job-template.json").read_text())
    assert docker["job_configuration"]["container_create_kwargs"] == "{{ container_create_kwargs }}"
    k8s = json.loads((ROOT / "deploy/kubernetes-gpu-job-template.json").read_text())
    limits = k8s["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "{{ gpu_count }}"


def test_dockerfile_builds_from_the_repo_alone():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM ${CUDA_IMAGE}" in text and "nvidia/cuda:" in text and "runtime" in text
    torch_line = text.index("pip install torch==2.14.1")
    assert torch_line < text.index('pip install ".[flows,faiss,metrics]"')
    for line in text.splitlines():  # nothing copied from outside the build context
        if line.startswith(("COPY", "ADD")):
            assert ".." not in line and "http" not in line
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignore and "artifacts/" in ignore and ".git/" not in ignore
