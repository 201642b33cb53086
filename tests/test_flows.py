"""Tests of flows/: the stage graph and order as DVC builds them (templated and foreach stages included),
params overlays (validated, never written), the headline metrics table, prefect.yaml, and the Prefect
flow end to end on a temporary git+dvc repo whose stages are trivial Python steps (one Prefect test
harness per session; those tests are marked slow). An overlay run is a temporary DVC experiment: the
tests check that params.yaml stays byte-identical, also when the flow is killed with SIGKILL mid-stage."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.dvc_tasks import (
    DvcPipelineError,
    DvcResult,
    DvcStageError,
    TransientDvcError,
    classify_failure,
    failed_stage,
    is_transient_failure,
    params_overlay,
    read_metrics,
    set_args,
    stage_graph,
    stage_order,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_dvc_yaml(directory: Path, doc: dict) -> Path:
    path = directory / "dvc.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def dvc_init(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=directory, check=True,
                   env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    return directory


def assert_topological(order: list[str], graph: dict[str, list[str]]) -> None:
    assert sorted(order) == sorted(graph) and len(order) == len(set(order))
    pos = {name: i for i, name in enumerate(order)}
    for stage, ups in graph.items():
        for up in ups:
            assert pos[up] < pos[stage], f"{up} must run before {stage}: {order}"


# -- stage graph and order: DVC's own (no Prefect) --------------------------------------------------

def test_stage_order_diamond_templated_and_foreach(tmp_path):
    repo = dvc_init(tmp_path / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump({"paths": {"left": "out/left.txt", "raw": "data/raw"}}))
    write_dvc_yaml(repo, {"stages": {
        # the sink is defined first; dict-form outs; templated deps and outs (params.yaml vars);
        # a dep under a directory out; a wdir; a foreach stage
        "report": {"cmd": "x", "deps": ["${paths.left}", "out/right", "src/report.py"],
                   "outs": [{"report.md": {"cache": False}}]},
        "left": {"cmd": "x", "deps": ["${paths.raw}/part1.csv"], "outs": ["${paths.left}"]},
        "right": {"cmd": "x", "wdir": "data", "deps": ["raw"], "outs": ["../out/right"],
                  "metrics": [{"../out/right_metrics.json": {"cache": False}}]},
        "fetch": {"cmd": "x", "outs": ["${paths.raw}"]},
        "lonely": {"cmd": "x", "deps": ["src/lonely.py"], "outs": ["lonely.txt"]},
        "many": {"foreach": ["a", "b"], "do": {"cmd": "echo ${item}", "deps": ["lonely.txt"],
                                               "outs": ["${item}.txt"]}},
    }})
    graph = stage_graph(repo)
    assert graph == {"report": ["left", "right"], "left": ["fetch"], "right": ["fetch"], "fetch": [],
                     "lonely": [], "many@a": ["lonely"], "many@b": ["lonely"]}
    order = stage_order(repo)
    assert_topological(order, graph)
    assert order == ["fetch", "left", "right", "report", "lonely", "many@a", "many@b"]  # ties: dvc.yaml order


def test_stage_order_cycle(tmp_path):
    repo = dvc_init(tmp_path / "cycle")
    write_dvc_yaml(repo, {"stages": {
        "a": {"cmd": "x", "deps": ["b.txt"], "outs": ["a.txt"]},
        "b": {"cmd": "x", "deps": ["a.txt"], "outs": ["b.txt"]},
        "c": {"cmd": "x", "deps": ["a.txt"], "outs": ["c.txt"]},
        "d": {"cmd": "x", "outs": ["d.txt"]},
    }})
    with pytest.raises(DvcPipelineError, match=r"dependency and an output in stages: .*(a, .*b|b, .*a)"):
        stage_order(repo)
    assert issubclass(DvcPipelineError, ValueError)
    write_dvc_yaml(repo, {"stages": {"s": {"cmd": "x", "deps": ["dir/in.txt"], "outs": ["dir"]}}})
    with pytest.raises(DvcPipelineError, match=r"dependency and an output in stage: .*s\b"):
        stage_order(repo)
    write_dvc_yaml(repo, {"stages": {"t": {"cmd": "x", "deps": ["${nope.path}"], "outs": ["t.txt"]}}})
    with pytest.raises(DvcPipelineError, match="nope"):  # an unknown template variable: DVC's message
        stage_order(repo)


def test_repo_dvc_yaml_order():
    path = REPO_ROOT / "dvc.yaml"
    if not path.is_file():
        pytest.skip("no dvc.yaml in the repo yet")
    names = list(yaml.safe_load(path.read_text())["stages"])
    order, graph = stage_order(REPO_ROOT), stage_graph(REPO_ROOT)
    assert sorted(order) == sorted(names) and len(order) == len(names)
    assert_topological(order, graph)
    # our edges agree with DVC's own graph (edges there point downstream -> upstream)
    from dvc.repo import Repo

    with Repo(str(REPO_ROOT)) as repo:
        dvc_edges = {(u.name, d.name) for d, u in repo.index.graph.edges
                     if u.name in graph and d.name in graph}  # drop .dvc-file stages
    assert dvc_edges == {(u, d) for d, ups in graph.items() for u in ups}
    # the flow runs exactly DVC's stages: `dvc dag` lists the same
    p = subprocess.run([sys.executable, "-m", "dvc", "dag", "--md"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert p.returncode == 0 and all(name in p.stdout for name in order)


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
    assert failed_stage(crash) == "s" and failed_stage(lock) is None


# -- params overlay: validated, never written --------------------------------------------------------

def test_params_overlay_is_validated_and_never_written(tmp_path):
    from amrg.config import ParamsError

    original = (REPO_ROOT / "params.yaml").read_bytes()
    (tmp_path / "params.yaml").write_bytes(original)
    assert params_overlay(tmp_path, {"hopfield.beta": 8.0, "cam": {"tau": 0.4}}) == {"hopfield.beta": 8.0,
                                                                                     "cam.tau": 0.4}
    assert params_overlay(tmp_path, {"hopfield": {"beta": 4.0}}) == {}  # the value it already has
    for bad, message in [({"hopfield.beta": "eight"}, "hopfield.beta: expected float"),
                         ({"hopfield.beta": -1}, r"hopfield.beta must be > 0"),
                         ({"cam.tua": 0.4}, "cam.tua: unknown key"),
                         ({"generator.epochs": 0}, "generator.epochs must be > 0"),
                         ({"cam.tau.x": 1}, "cam.tau: expected float")]:
        with pytest.raises(ParamsError, match=message):
            params_overlay(tmp_path, bad)
    # a key valid for the schema but absent from params.yaml: `dvc exp run -S` only overrides keys
    raw = yaml.safe_load(original)
    del raw["hopfield"]["top_k"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError, match=r"hopfield.top_k not in params.yaml"):
        params_overlay(tmp_path, {"hopfield.top_k": 4})
    (tmp_path / "params.yaml").write_bytes(original)
    (tmp_path / "overlay.yaml").write_text("decode:\n  max_new_tokens: 20\n")
    assert params_overlay(tmp_path, "overlay.yaml") == {"decode.max_new_tokens": 20}
    with pytest.raises(FileNotFoundError, match="params overlay 'nope.yaml' not found"):
        params_overlay(tmp_path, "nope.yaml")
    assert (tmp_path / "params.yaml").read_bytes() == original  # nothing here writes params.yaml
    # the repository's smoke profile is a valid overlay; as -S arguments
    tiny = params_overlay(REPO_ROOT, "configs/tiny.yaml")
    assert tiny["data.max_studies"] == 12
    assert set_args({"data.max_studies": 12, "hopfield.visual": False, "data.images_dir": None}) == \
        ["-S", "data.max_studies=12", "-S", "hopfield.visual=false", "-S", "data.images_dir=null"]


# -- the headline table -------------------------------------------------------------------------------

def test_headline_table():
    from amrg.metrics.registry import HEADLINE, label
    from amrg.metrics.table import caption, headline_table, to_markdown

    scores = {"BLEU_1": 0.3, "BLEU_4": 0.1, "METEOR": 0.2, "ROUGE_L": 0.3, "CIDEr": 0.4,
              "ce": {"precision": 0.45, "recall": 0.55, "f1": 0.5, "micro": {"f1": 0.9}}, "per_label": {"x": 1}}
    ci = {k: {"lo": v - 0.01, "hi": v + 0.03} for k, v in scores.items() if k in ("BLEU_1", "BLEU_4", "ROUGE_L", "CIDEr")}
    metrics = {"phantom_images": True, "n_test": 7, "nlg_protocol": {"tokenizer": "r2gen"}, "model": scores,
               "baselines": {"most_frequent": {"BLEU_4": 0.05, "ce": {"f1": 0.1}}},
               "ci95": {"model": {**ci, "ce": {"f1": {"lo": 0.4, "hi": 0.6}}}}}
    rows = headline_table(metrics)
    assert [r["system"] for r in rows] == ["model", "most_frequent"]
    assert list(rows[0]) == ["system", *map(label, HEADLINE)]  # the registry's headline, in its order
    assert rows[0]["BLEU-4"] == "0.100 [0.090, 0.130]" and rows[0]["CE F1"] == "0.500 [0.400, 0.600]"
    assert rows[0]["METEOR"] == "0.200" and rows[0]["CE P"] == "0.450"  # no CI for them
    assert rows[1]["BLEU-4"] == "0.050" and rows[1]["METEOR"] == "-"
    assert caption(metrics) == "PHANTOM IMAGES, 7 test studies; brackets: 95% bootstrap CI"
    md = to_markdown(rows).splitlines()
    assert len(md) == 4 and md[0].startswith("| system") and "0.100 [0.090, 0.130]" in md[2]
    assert headline_table({"model": {"BLEU_4": 0.1}})[0] == {"system": "model", "BLEU-4": "0.100"}
    assert headline_table({"accuracy": 0.9}) == []


# -- prefect.yaml -------------------------------------------------------------------------------------

def test_prefect_yaml_deployments_have_concurrency_limit_1():
    """Overlapping runs of one deployment queue in Prefect (deployment-level concurrency) instead of
    taking a GPU container and then blocking on the workspace lock."""
    doc = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    assert doc["deployments"]
    for d in doc["deployments"]:
        assert d.get("concurrency_limit") == 1, d["name"]


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
import json, os, pathlib, sys, time
import yaml
step = sys.argv[1]
if step == "prepare":
    annotation = yaml.safe_load(open("params.yaml"))["data"]["annotation"]
    pathlib.Path("data").mkdir(exist_ok=True)
    pathlib.Path("data/prep.txt").write_text(pathlib.Path(annotation).read_text())
elif step == "train":
    marker = pathlib.Path(sys.argv[2])  # outside the repo: one line per attempt
    attempts = marker.read_text().count("\\n") if marker.exists() else 0
    marker.write_text("x\\n" * (attempts + 1))
    mode = os.environ.get("FLOW_TEST_TRAIN_MODE", "flaky")
    if mode == "broken":
        raise SystemExit(1)
    if mode == "flaky" and attempts == 0:
        raise SystemExit(75)  # EX_TEMPFAIL: transient, the flow retries
    if mode == "block":
        time.sleep(120)  # killed by the test
    beta = yaml.safe_load(open("params.yaml"))["hopfield"]["beta"]
    pathlib.Path("model").mkdir(exist_ok=True)
    pathlib.Path("model/model.txt").write_text(pathlib.Path("data/prep.txt").read_text() + f"beta {beta}\\n")
elif step == "evaluate":
    beta = float(pathlib.Path("model/model.txt").read_text().split("beta ")[-1])
    bleu = beta / 40
    pathlib.Path("eval").mkdir(exist_ok=True)
    metrics = {"model": {"BLEU_4": bleu, "ce": {"f1": 0.5}}, "baselines": {"most_frequent": {"BLEU_4": 0.05}},
               "ci95": {"model": {"BLEU_4": {"lo": bleu - 0.05, "hi": bleu + 0.05}}},
               "phantom_images": True, "n_test": 3, "nlg_protocol": {"tokenizer": "r2gen"}}
    pathlib.Path("eval/metrics.json").write_text(json.dumps(metrics))
'''
OUTPUTS = ("data/prep.txt", "model/model.txt", "eval/metrics.json")
# beta 4 (params.yaml): BLEU-4 = 0.1
EXPECTED = [{"system": "model", "BLEU-4": "0.100 [0.050, 0.150]", "CE F1": "0.500"},
            {"system": "most_frequent", "BLEU-4": "0.050", "CE F1": "-"}]


def _git_env(monkeypatch) -> None:
    for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(k, "t")
    for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(k, "t@t")


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    """A git+dvc repo with prepare -> train -> evaluate (evaluate defined first, out of order), this
    project's params.yaml, and the annotation dep templated from it (``${data.annotation}``)."""
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))
    _git_env(monkeypatch)
    repo, marker = tmp_path / "repo", tmp_path / "train-attempts.txt"
    repo.mkdir()
    (repo / "steps.py").write_text(STEPS)
    shutil.copy(REPO_ROOT / "params.yaml", repo / "params.yaml")
    annotation = repo / yaml.safe_load((repo / "params.yaml").read_text())["data"]["annotation"]
    annotation.parent.mkdir(parents=True)
    annotation.write_text('{"train": [], "val": [], "test": []}\n')
    py = shlex.quote(sys.executable)
    write_dvc_yaml(repo, {"stages": {
        "evaluate": {"cmd": f"{py} steps.py evaluate", "deps": ["steps.py", "model"],
                     "metrics": [{"eval/metrics.json": {"cache": False}}]},
        "prepare": {"cmd": f"{py} steps.py prepare", "deps": ["steps.py", "${data.annotation}"],
                    "outs": ["data/prep.txt"]},
        "train": {"cmd": f"{py} steps.py train {shlex.quote(str(marker))}", "params": ["hopfield.beta"],
                  "deps": ["steps.py", "data/prep.txt"], "outs": [{"model": {"cache": True}}]},
    }})
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    return SimpleNamespace(path=repo, marker=marker)


def commit_all(repo: Path, message: str = "init") -> None:
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=repo, check=True)


def attempts(marker: Path) -> int:
    return marker.read_text().count("\n") if marker.exists() else 0


def read_table_artifact() -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from flows.pipeline import METRICS_ARTIFACT_KEY

    with get_client(sync_client=True) as client:  # the newest (one harness serves the whole session)
        arts = client.read_artifacts(sort=ArtifactSort.CREATED_DESC, limit=1,
                                     artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[METRICS_ARTIFACT_KEY])))
    assert arts and arts[0].type == "table"
    return json.loads(arts[0].data) if isinstance(arts[0].data, str) else arts[0].data


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flow_end_to_end(prefect_harness, dvc_repo, capsys):
    from flows.pipeline import main, pipeline

    repo = dvc_repo.path
    result = pipeline(repo=str(repo), retries=2, retry_delay_seconds=0)
    assert result["table"] == EXPECTED and result["metrics"] == "eval/metrics.json"  # metrics as DVC lists them
    assert result["caption"] == "PHANTOM IMAGES, 3 test studies; brackets: 95% bootstrap CI"
    assert all((repo / p).is_file() for p in OUTPUTS)
    assert attempts(dvc_repo.marker) == 2  # exit 75 once, then retried
    assert read_table_artifact() == EXPECTED  # one compact table: systems x headline metrics, no dump

    # second run, through the CLI: DVC skips every stage, nothing is rewritten; the same table is printed
    mtimes = {p: (repo / p).stat().st_mtime_ns for p in OUTPUTS}
    capsys.readouterr()
    assert main(["--repo", str(repo), "--retries", "0"]) == 0
    out = capsys.readouterr().out
    assert "eval/metrics.json: PHANTOM IMAGES" in out and "| model         | 0.100 [0.050, 0.150] |" in out
    assert {p: (repo / p).stat().st_mtime_ns for p in OUTPUTS} == mtimes
    assert attempts(dvc_repo.marker) == 2
    assert read_metrics(repo, "evaluate")["eval/metrics.json"]["model"]["BLEU_4"] == 0.1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flow_permanent_failure_stops_downstream(prefect_harness, dvc_repo, monkeypatch):
    from flows.pipeline import PipelineStageFailed, pipeline

    monkeypatch.setenv("FLOW_TEST_TRAIN_MODE", "broken")
    with pytest.raises(PipelineStageFailed, match=r"stage 'train' failed; not run: evaluate"):
        pipeline(repo=str(dvc_repo.path), retries=2, retry_delay_seconds=0)
    assert attempts(dvc_repo.marker) == 1  # exit 1 is deterministic: no retry
    assert (dvc_repo.path / "data/prep.txt").is_file()
    assert not (dvc_repo.path / "model").exists()
    assert not (dvc_repo.path / "eval/metrics.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cli_validation_errors(prefect_harness, dvc_repo, capsys):
    """Validation happens once, in the flow, before anything runs; the CLI turns it into exit code 2."""
    from flows.pipeline import main, select_stages

    assert select_stages(["prepare", "train", "evaluate"], ["evaluate", "prepare"]) == ["prepare", "evaluate"]
    params = (dvc_repo.path / "params.yaml").read_bytes()
    for argv, message in ((["--stages", "prepare,nope"], "unknown stage(s): nope; valid stages: prepare, train, evaluate"),
                          (["-S", "hopfield.beta=-1"], "hopfield.beta must be > 0"),
                          (["--params-overlay", "nope.yaml"], "params overlay 'nope.yaml' not found")):
        with pytest.raises(SystemExit) as exc:
            main(["--repo", str(dvc_repo.path), *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    assert attempts(dvc_repo.marker) == 0 and not (dvc_repo.path / "data/prep.txt").exists()
    assert (dvc_repo.path / "params.yaml").read_bytes() == params


def _dvc(args, cwd):
    p = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flow_shares_stages_through_the_remote(prefect_harness, dvc_repo, tmp_path):
    """Worker 1 computes (the flaky stage retried once), pushes with --run-cache and saves an
    experiment; worker 2, a fresh workspace on the same remote, restores every stage and runs none."""
    from flows.pipeline import pipeline

    remote = tmp_path / "remote"
    repo1, repo2 = dvc_repo.path, tmp_path / "repo2"
    _dvc(["remote", "add", "-d", "shared", str(remote)], repo1)
    commit_all(repo1)
    subprocess.run(["git", "clone", "-q", str(repo1), str(repo2)], check=True)

    assert pipeline(repo=str(repo1), retries=2, retry_delay_seconds=0, pull=True, push=True,
                    experiment="first")["table"] == EXPECTED
    assert attempts(dvc_repo.marker) == 2  # exit 75 once, retried, then ran
    assert (remote / "runs").is_dir()  # the run-cache reached the remote
    assert "first" in _dvc(["exp", "list"], repo1)

    assert pipeline(repo=str(repo2), retries=0, pull=True, push=True)["table"] == EXPECTED
    assert attempts(dvc_repo.marker) == 2  # worker 2 restored `train`: it never ran
    assert all((repo2 / p).is_file() for p in OUTPUTS)
    assert (repo2 / "model/model.txt").read_text() == (repo1 / "model/model.txt").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flow_refuses_a_busy_workspace(prefect_harness, dvc_repo):
    from flows.dvc_tasks import WorkspaceBusy, workspace_lock
    from flows.pipeline import pipeline

    with workspace_lock(dvc_repo.path, owner="another run"):
        with pytest.raises(WorkspaceBusy, match="in use by another pipeline run"):
            pipeline(repo=str(dvc_repo.path), retries=0)
    assert attempts(dvc_repo.marker) == 0 and not (dvc_repo.path / "data/prep.txt").exists()


def _snapshot(repo: Path) -> dict[str, bytes]:
    """Every file of the workspace outside .git and .dvc (params.yaml, dvc.lock, outputs)."""
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and p.relative_to(repo).parts[0] not in (".git", ".dvc")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_overlay_runs_as_a_temporary_experiment(prefect_harness, dvc_repo):
    """An overlay never writes the workspace: the stages run in DVC's temporary copy, the result is the
    named experiment (its metrics in the table), params.yaml / dvc.lock / outputs stay as they were."""
    from flows.pipeline import PipelineConfigError, pipeline

    repo = dvc_repo.path
    commit_all(repo)
    before = _snapshot(repo)
    result = pipeline(repo=str(repo), retries=2, retry_delay_seconds=0, params_overlay={"hopfield.beta": 8.0},
                      experiment="beta8")
    assert result["experiment"] == "beta8"
    assert result["table"][0] == {"system": "model", "BLEU-4": "0.200 [0.150, 0.250]", "CE F1": "0.500"}
    assert read_table_artifact()[0]["BLEU-4"] == "0.200 [0.150, 0.250]"
    assert attempts(dvc_repo.marker) == 2  # the flaky stage failed once (exit 75): the experiment was retried
    assert _snapshot(repo) == before  # not one byte of the workspace changed
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo, capture_output=True,
                           text=True, check=True).stdout
    exps = {e["name"]: e for base in json.loads(shown[shown.index("["):]) for e in base.get("experiments") or []}
    assert exps["beta8"]["revs"][0]["data"]["params"]["params.yaml"]["data"]["hopfield"]["beta"] == 8.0

    # the same overlay again, as a file: the experiment is replaced; unchanged stages come from the run-cache
    (repo / "beta8.yaml").write_text("hopfield:\n  beta: 8.0\n")
    commit_all(repo, "overlay file")
    before = _snapshot(repo)
    assert pipeline(repo=str(repo), retries=0, params_overlay="beta8.yaml",
                    experiment="beta8")["table"][0]["BLEU-4"].startswith("0.200")
    assert attempts(dvc_repo.marker) == 2 and _snapshot(repo) == before

    with pytest.raises(PipelineConfigError, match="hopfield.beta must be > 0"):
        pipeline(repo=str(repo), retries=0, params_overlay={"hopfield.beta": -1.0})
    assert attempts(dvc_repo.marker) == 2 and _snapshot(repo) == before


KILLED_FLOW = """\
import sys
from flows.pipeline import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_overlay_run_killed_mid_stage_leaves_params_untouched(prefect_harness, dvc_repo):
    """``kill -9`` of the flow while a stage of the overlay run is running: params.yaml (and every other
    workspace file) is byte-identical to before, during the run and after it."""
    from prefect.settings import PREFECT_API_URL

    from flows.dvc_tasks import workspace_lock

    repo = dvc_repo.path
    commit_all(repo)
    before = _snapshot(repo)
    params = (repo / "params.yaml").read_bytes()
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO_ROOT),
           "FLOW_TEST_TRAIN_MODE": "block"}
    flow = subprocess.Popen([sys.executable, "-c", KILLED_FLOW, "--repo", str(repo), "--retries", "0",
                             "-S", "hopfield.beta=8", "--experiment", "killed"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while attempts(dvc_repo.marker) == 0:  # the train stage is running (it blocks)
            assert flow.poll() is None, "the flow ended before the stage ran"
            assert time.monotonic() < deadline, "the train stage never started"
            time.sleep(0.5)
        assert (repo / "params.yaml").read_bytes() == params  # not even during the run
        os.kill(flow.pid, signal.SIGKILL)
        assert flow.wait(timeout=30) == -signal.SIGKILL
        assert (repo / "params.yaml").read_bytes() == params
        assert _snapshot(repo) == before
    finally:
        try:
            os.killpg(flow.pid, signal.SIGKILL)  # the orphaned `dvc exp run` and its stage
        except ProcessLookupError:
            pass
    time.sleep(1)
    assert (repo / "params.yaml").read_bytes() == params and _snapshot(repo) == before
    with workspace_lock(repo):  # the kernel released the killed flow's lock
        pass


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_prefect_yaml_registers_against_a_server(prefect_harness, tmp_path):
    """`prefect deploy --all` of prefect.yaml against the harness's API: with the GPU (docker) and
    process pools created, the nightly, sweep and process deployments register with their cron,
    parameters, GPU job variables and a concurrency limit of 1.
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
    for name in ("nightly", "sweep", "nightly-process"):  # deployment-level concurrency: one run at a time
        assert deps[name].global_concurrency_limit is not None and deps[name].global_concurrency_limit.limit == 1
