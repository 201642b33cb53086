"""Tests of flows/: dvc.yaml -> stage order (plain Python), and the Prefect flow end to end on a
temporary git+dvc repo (one Prefect test harness per session; those tests are marked slow)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.dvc_tasks import (
    DvcResult,
    DvcStageError,
    TransientDvcError,
    classify_failure,
    is_transient_failure,
    load_stages,
    stage_graph,
    stage_order,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_dvc_yaml(directory: Path, doc: dict) -> Path:
    path = directory / "dvc.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def assert_topological(order: list[str], graph: dict[str, list[str]]) -> None:
    assert sorted(order) == sorted(graph) and len(order) == len(set(order))
    pos = {name: i for i, name in enumerate(order)}
    for stage, ups in graph.items():
        for up in ups:
            assert pos[up] < pos[stage], f"{up} must run before {stage}: {order}"


# -- stage_order / stage_graph (no Prefect) ---------------------------------------------------------

def test_stage_order_diamond(tmp_path):
    doc = {"stages": {
        # the sink is defined first; dict-form deps/outs; a dep under a directory out; a wdir
        "report": {"cmd": "x", "deps": ["out/left.txt", {"out/right": {"cache": False}}, "src/report.py"],
                   "outs": [{"report.md": {"cache": False}}]},
        "left": {"cmd": "x", "deps": ["data/raw/part1.csv"], "outs": ["out/left.txt"]},
        "right": {"cmd": "x", "wdir": "data", "deps": ["raw"], "outs": ["../out/right"],
                  "metrics": [{"../out/right_metrics.json": {"cache": False}}]},
        "fetch": {"cmd": "x", "outs": ["data/raw"]},
        "lonely": {"cmd": "x", "deps": ["src/lonely.py"], "outs": ["lonely.txt"]},
    }}
    path = write_dvc_yaml(tmp_path, doc)
    graph = stage_graph(path)
    assert graph == {"report": ["left", "right"], "left": ["fetch"], "right": ["fetch"],
                     "fetch": [], "lonely": []}
    order = stage_order(path)
    assert_topological(order, graph)
    assert order == ["fetch", "left", "right", "report", "lonely"]  # ties keep dvc.yaml order
    assert load_stages(path)["right"].metrics == ("out/right_metrics.json",)


def test_stage_order_cycle(tmp_path):
    doc = {"stages": {
        "a": {"cmd": "x", "deps": ["b.txt"], "outs": ["a.txt"]},
        "b": {"cmd": "x", "deps": ["a.txt"], "outs": ["b.txt"]},
        "c": {"cmd": "x", "deps": ["a.txt"], "outs": ["c.txt"]},
        "d": {"cmd": "x", "outs": ["d.txt"]},
    }}
    with pytest.raises(ValueError, match=r"cycle.*a, b, c.*(a -> b -> a|b -> a -> b)"):
        stage_order(write_dvc_yaml(tmp_path, doc))
    self_loop = {"stages": {"s": {"cmd": "x", "deps": ["dir/in.txt"], "outs": ["dir"]}}}
    with pytest.raises(ValueError, match="s -> s"):
        stage_order(write_dvc_yaml(tmp_path, self_loop))


def test_foreach_not_implemented(tmp_path):
    doc = {"stages": {"many": {"foreach": ["a", "b"], "do": {"cmd": "echo ${item}"}}}}
    with pytest.raises(NotImplementedError, match="many.*foreach/matrix"):
        stage_order(write_dvc_yaml(tmp_path, doc))


def test_repo_dvc_yaml_order():
    path = REPO_ROOT / "dvc.yaml"
    if not path.is_file():
        pytest.skip("no dvc.yaml in the repo yet")
    names = list(yaml.safe_load(path.read_text())["stages"])
    order, graph = stage_order(path), stage_graph(path)
    assert sorted(order) == sorted(names) and len(order) == len(names)
    assert_topological(order, graph)
    # our edges agree with DVC's own graph (edges there point downstream -> upstream)
    from dvc.repo import Repo

    with Repo(str(REPO_ROOT)) as repo:
        dvc_edges = {(u.name, d.name) for d, u in repo.index.graph.edges
                     if u.name in graph and d.name in graph}  # drop .dvc-file stages
    assert dvc_edges == {(u, d) for d, ups in graph.items() for u in ups}


def test_failure_classification():
    def result(rc, *errors):
        return DvcResult(["repro"], rc, list(errors), list(errors), False)

    lock = result(1, "ERROR: Unable to acquire lock. Most likely another DVC process is running")
    busy = result(1, "ERROR: '.dvc/tmp/rwlock' is busy, it is being blocked by: (PID 12: dvc repro)")
    tempfail = result(255, "ERROR: failed to reproduce 's': failed to run: python x.py, exited with 75")
    crash = result(255, "ERROR: failed to reproduce 's': failed to run: python x.py, exited with 1")
    for r in (lock, busy, tempfail):
        exc = classify_failure("s", r)
        assert isinstance(exc, TransientDvcError)
        assert is_transient_failure(None, None, SimpleNamespace(data=exc, message=""))
    exc = classify_failure("s", crash)
    assert type(exc) is DvcStageError and "stage 's'" in str(exc)
    assert not is_transient_failure(None, None, SimpleNamespace(data=exc, message=""))


# -- Prefect --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory):
    """PREFECT_HOME in a temp dir, set before prefect is first imported (so ~/.prefect is untouched)."""
    home = str(tmp_path_factory.mktemp("prefect-home"))
    saved = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    os.environ["PREFECT_HOME"] = home
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.settings import PREFECT_HOME, temporary_settings

    with temporary_settings(updates={PREFECT_HOME: home}):
        yield home
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="session")
def prefect_harness(prefect_home):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


STEPS = '''\
import json, os, pathlib, sys
step = sys.argv[1]
if step == "prepare":
    pathlib.Path("data").mkdir(exist_ok=True)
    pathlib.Path("data/prep.txt").write_text("prepared\\n")
elif step == "train":
    marker = pathlib.Path(sys.argv[2])  # outside the repo: one line per attempt
    attempts = marker.read_text().count("\\n") if marker.exists() else 0
    marker.write_text("x\\n" * (attempts + 1))
    mode = os.environ.get("FLOW_TEST_TRAIN_MODE", "flaky")
    if mode == "broken":
        raise SystemExit(1)
    if mode == "flaky" and attempts == 0:
        raise SystemExit(75)  # EX_TEMPFAIL: transient, the flow retries
    pathlib.Path("model").mkdir(exist_ok=True)
    pathlib.Path("model/model.txt").write_text(pathlib.Path("data/prep.txt").read_text() + "trained\\n")
elif step == "evaluate":
    pathlib.Path("eval").mkdir(exist_ok=True)
    metrics = {"model": {"BLEU_4": 0.25, "ce": {"f1": 0.5}}, "phantom_images": True}
    pathlib.Path("eval/metrics.json").write_text(json.dumps(metrics))
'''
OUTPUTS = ("data/prep.txt", "model/model.txt", "eval/metrics.json")


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    """A git+dvc repo with prepare -> train -> evaluate; evaluate is defined first (out of order)."""
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))
    repo, marker = tmp_path / "repo", tmp_path / "train-attempts.txt"
    repo.mkdir()
    (repo / "steps.py").write_text(STEPS)
    py = shlex.quote(sys.executable)
    write_dvc_yaml(repo, {"stages": {
        "evaluate": {"cmd": f"{py} steps.py evaluate", "deps": ["steps.py", "model"],
                     "metrics": [{"eval/metrics.json": {"cache": False}}]},
        "prepare": {"cmd": f"{py} steps.py prepare", "deps": ["steps.py"], "outs": ["data/prep.txt"]},
        "train": {"cmd": f"{py} steps.py train {shlex.quote(str(marker))}",
                  "deps": ["steps.py", "data/prep.txt"], "outs": [{"model": {"cache": True}}]},
    }})
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    return SimpleNamespace(path=repo, marker=marker)


def attempts(marker: Path) -> int:
    return marker.read_text().count("\n") if marker.exists() else 0


@pytest.mark.slow
def test_flow_end_to_end(prefect_harness, dvc_repo, capsys):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.pipeline import METRICS_ARTIFACT_KEY, main, pipeline

    repo = dvc_repo.path
    expected = {"model.BLEU_4": 0.25, "model.ce.f1": 0.5, "phantom_images": True}
    assert pipeline(repo=str(repo), retries=2, retry_delay_seconds=0) == expected
    assert all((repo / p).is_file() for p in OUTPUTS)
    assert attempts(dvc_repo.marker) == 2  # exit 75 once, then retried
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[METRICS_ARTIFACT_KEY])))
    assert len(arts) == 1 and arts[0].type == "table"
    table = json.loads(arts[0].data) if isinstance(arts[0].data, str) else arts[0].data
    assert {r["metric"]: r["value"] for r in table} == expected

    # second run, through the CLI: DVC skips every stage, nothing is rewritten
    mtimes = {p: (repo / p).stat().st_mtime_ns for p in OUTPUTS}
    capsys.readouterr()
    assert main(["--repo", str(repo), "--retries", "0"]) == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert {p: (repo / p).stat().st_mtime_ns for p in OUTPUTS} == mtimes
    assert attempts(dvc_repo.marker) == 2


@pytest.mark.slow
def test_flow_permanent_failure_stops_downstream(prefect_harness, dvc_repo, monkeypatch):
    from flows.pipeline import PipelineStageFailed, pipeline

    monkeypatch.setenv("FLOW_TEST_TRAIN_MODE", "broken")
    with pytest.raises(PipelineStageFailed, match=r"stage 'train' failed; not run: evaluate"):
        pipeline(repo=str(dvc_repo.path), retries=2, retry_delay_seconds=0)
    assert attempts(dvc_repo.marker) == 1  # exit 1 is deterministic: no retry
    assert (dvc_repo.path / "data/prep.txt").is_file()
    assert not (dvc_repo.path / "model").exists()
    assert not (dvc_repo.path / "eval/metrics.json").exists()


def test_cli_unknown_stage(prefect_home, dvc_repo, capsys):
    from flows.pipeline import main, select_stages

    assert select_stages(["prepare", "train", "evaluate"], ["evaluate", "prepare"]) == ["prepare", "evaluate"]
    with pytest.raises(SystemExit) as exc:
        main(["--repo", str(dvc_repo.path), "--stages", "prepare,nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown stage(s): nope" in err and "valid stages: prepare, train, evaluate" in err


def _dvc(args, cwd):
    p = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


@pytest.mark.slow
def test_flow_shares_stages_through_the_remote(prefect_harness, dvc_repo, tmp_path, monkeypatch):
    """Worker 1 computes (the flaky stage retried once), pushes with --run-cache and saves an
    experiment; worker 2, a fresh workspace on the same remote, restores every stage and runs none."""
    from flows.pipeline import pipeline

    monkeypatch.setenv("GIT_AUTHOR_NAME", "t")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "t@t")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "t")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@t")
    remote = tmp_path / "remote"
    repo1, repo2 = dvc_repo.path, tmp_path / "repo2"
    _dvc(["remote", "add", "-d", "shared", str(remote)], repo1)
    subprocess.run(["git", "add", "-A"], cwd=repo1, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo1, check=True)
    subprocess.run(["git", "clone", "-q", str(repo1), str(repo2)], check=True)

    expected = {"model.BLEU_4": 0.25, "model.ce.f1": 0.5, "phantom_images": True}
    assert pipeline(repo=str(repo1), retries=2, retry_delay_seconds=0, pull=True, push=True,
                    experiment="first") == expected
    assert attempts(dvc_repo.marker) == 2  # exit 75 once, retried, then ran
    assert (remote / "runs").is_dir()  # the run-cache reached the remote
    assert "first" in _dvc(["exp", "list"], repo1)

    assert pipeline(repo=str(repo2), retries=0, pull=True, push=True) == expected
    assert attempts(dvc_repo.marker) == 2  # worker 2 restored `train`: it never ran
    assert all((repo2 / p).is_file() for p in OUTPUTS)
    assert (repo2 / "model/model.txt").read_text() == (repo1 / "model/model.txt").read_text()


@pytest.mark.slow
def test_flow_refuses_a_busy_workspace(prefect_harness, dvc_repo):
    from flows.dvc_tasks import WorkspaceBusy, workspace_lock
    from flows.pipeline import pipeline

    with workspace_lock(dvc_repo.path, owner="another run"):
        with pytest.raises(WorkspaceBusy, match="in use by another pipeline run"):
            pipeline(repo=str(dvc_repo.path), retries=0)
    assert attempts(dvc_repo.marker) == 0 and not (dvc_repo.path / "data/prep.txt").exists()


@pytest.mark.slow
def test_prefect_yaml_registers_against_a_server(prefect_harness, tmp_path):
    """`prefect deploy --all` of prefect.yaml against the harness's API: with the GPU (docker) and
    process pools created, the nightly, sweep and process deployments register with their cron,
    parameters and GPU job variables.
    (A worker executing a scheduled run end to end: bench/prefect_deploy.py.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    for path in ("prefect.yaml", "flows", "deploy"):
        src = REPO_ROOT / path
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / path)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="amrg-process", type="process"), overwrite=True)
        template = json.loads((REPO_ROOT / "deploy/docker-gpu-job-template.json").read_text())
        client.create_work_pool(WorkPoolCreate(name="amrg-gpu", type="docker", base_job_template=template),
                                overwrite=True)
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(REPO_ROOT))
    p = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    with get_client(sync_client=True) as client:
        deps = {d.name: d for d in client.read_deployments()}
    nightly, proc = deps["nightly"], deps["nightly-process"]
    assert nightly.work_pool_name == "amrg-gpu" and proc.work_pool_name == "amrg-process"
    assert [(s.schedule.cron, s.active) for s in nightly.schedules] == [("0 2 * * *", True)]
    assert nightly.parameters["pull"] is True and nightly.parameters["push"] is True
    assert "params_overlay" in nightly.parameter_openapi_schema["properties"]
    gpu = nightly.job_variables["container_create_kwargs"]["device_requests"][0]
    assert gpu["capabilities"] == [["gpu"]] and gpu["count"] == -1
    assert nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/amrg"
    assert proc.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(tmp_path)
    sweep = deps["sweep"]  # flows/sweep.py:sweep_flow
    assert sweep.work_pool_name == "amrg-gpu" and sweep.parameters["grid"] == "sweeps/paper_tables.yaml"
    assert [s.active for s in sweep.schedules] == [False]
