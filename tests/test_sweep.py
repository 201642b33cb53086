"""flows/sweep.py: grid parsing and validation (every point checked with amrg.config.parse_params, like
a pipeline overlay), ``-S`` arguments, queue status parsing, the comparison table from
``dvc exp show --json``, and the whole Prefect flow on a tiny git+dvc project (this project's params.yaml,
one stage reading three of its keys and writing a metric with a CI), run in a subprocess with its own
Prefect home; a second sweep with the same names replaces the experiments and takes the stage from the
run-cache. Seed tables (``seeds:``): names, validation, per-system rows and the ``mean ± sd over N seeds``
rows, checked against a hand computation, offline and on the toy repository."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

GRID = {
    "name": "toy",
    "metrics": {"score": "model.score", "double": "out/other.json:double"},
    "tables": {
        "t_a": {"title": "a sweep", "grid": {"decode.num_beams": [1, 3]}, "set": {"hopfield.beta": 2.0}},
        "t_b": {"points": [{"hopfield.beta": 0.5, "hopfield.visual": False}]},
    },
}
TRAIN = """\
import json, pathlib, sys, yaml
p = yaml.safe_load(open("params.yaml"))
with open(sys.argv[1], "a") as runs:  # outside the repo: one line per run of the stage
    runs.write("run\\n")
seed = p["runtime"]["seed"]
score = p["decode"]["num_beams"] * p["hopfield"]["beta"] + (0 if p["hopfield"]["visual"] else 10) + 0.5 * seed * seed
base = {"most_frequent": {"score": 1.0}, "nearest_neighbour": {"score": 3.0 - seed}}
ci = {name: {"score": {"lo": s["score"] - 1, "hi": s["score"] + 1}} for name, s in {"model": {"score": score}, **base}.items()}
pathlib.Path("out").mkdir(exist_ok=True)
json.dump({"model": {"score": score}, "baselines": base, "ci95": ci}, open("out/metrics.json", "w"))
json.dump({"double": 2 * score}, open("out/other.json", "w"))
"""


def _grid(tmp_path: Path, doc: dict = GRID) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_grid_points_and_set_args(tmp_path):
    from amrg.metrics.registry import HEADLINE, label
    from flows.sweep import SweepConfigError, SweepError, load_grid, set_args, validate_points

    g = load_grid(_grid(tmp_path))
    assert g.experiments() == [("toy-t-a-01", "t_a", {"hopfield.beta": 2.0, "decode.num_beams": 1}),
                               ("toy-t-a-02", "t_a", {"hopfield.beta": 2.0, "decode.num_beams": 3}),
                               ("toy-t-b-01", "t_b", {"hopfield.beta": 0.5, "hopfield.visual": False})]
    assert set_args({"hopfield.visual": False, "hopfield.beta": 2.0, "x": "a b"}) == \
        ["-S", "hopfield.visual=false", "-S", "hopfield.beta=2.0", "-S", "x=a b"]
    assert list(load_grid(_grid(tmp_path), ["t_b"]).tables) == ["t_b"]
    with pytest.raises(SweepConfigError, match=r"unknown table\(s\) \['nope'\]"):
        load_grid(_grid(tmp_path), ["nope"])
    with pytest.raises(SweepConfigError, match="no points"):
        load_grid(_grid(tmp_path, {"tables": {"t": {"title": "x"}}}))
    assert issubclass(SweepConfigError, SweepError)
    # the default metric columns are the registry's headline, not a list of names kept here
    assert load_grid(_grid(tmp_path, {"tables": GRID["tables"]})).metrics == {label(k): f"model.{k}" for k in HEADLINE}
    # every point is validated as the pipeline validates an overlay: keys in params.yaml ...
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    validate_points(g, params)
    del raw["hopfield"]["visual"]
    params.write_text(yaml.safe_dump(raw))
    with pytest.raises(SweepConfigError, match=r"toy-t-b-01 .*hopfield.visual not in"):
        validate_points(g, params)
    # ... and the merged params valid for amrg.config.parse_params: types, ranges, unknown keys
    params.write_text((ROOT / "params.yaml").read_text())
    bad = {"tables": {"t": {"grid": {"hopfield.beta": [4.0, -1]}, "points": [{"cam.tua": 0.4}, {"decode.num_beams": "x"}]}}}
    with pytest.raises(SweepConfigError) as exc:
        validate_points(load_grid(_grid(tmp_path, bad)), params)
    msg = str(exc.value)
    assert "hopfield.beta must be > 0" in msg and "cam.tua: unknown key" in msg and "decode.num_beams: expected int" in msg
    # the failing points are named (points first, then the grid); beta 4.0 is fine
    assert all(f"grid-t-0{i} " in msg for i in (1, 2, 4)) and "grid-t-03" not in msg
    # the repository's own grid is valid against params.yaml
    paper = load_grid(ROOT / "sweeps" / "paper_tables.yaml")
    validate_points(paper, ROOT / "params.yaml")
    assert set(paper.tables) == {"table_iv", "table_v", "table_vi", "table_vii", "table_viii", "table_ix", "table_x"}


def test_parse_queue_status():
    from flows.sweep import parse_queue_status

    text = """Task     Name    Created    Status
0cb2251  toy-1   11:35 AM   Running
db709ab  toy-1   11:30 AM   Success
8a005f5  toy-2   Nov 22, 2026   Failed
1234567  None    11:36 AM   Queued

Worker status: 1 active, 2 idle"""
    status, workers = parse_queue_status(text)
    assert status == {"toy-1": "Running", "toy-2": "Failed", "None": "Queued"}  # newest row of a name wins
    assert workers == (1, 2)


def test_collect_and_tables(tmp_path):
    from flows.sweep import collect, load_grid, to_csv, to_markdown

    g = load_grid(_grid(tmp_path))

    def exp(name, a, score, state="success"):
        data = {"params": {"params.yaml": {"data": {"decode": {"num_beams": a}, "hopfield": {"beta": 2.0, "visual": True}}}},
                "metrics": {"out/metrics.json": {"data": {"model": {"score": score},
                                                          "ci95": {"model": {"score": {"lo": 0.5, "hi": 9.5}}}}},
                            "out/other.json": {"data": {"double": 2 * score}}}}
        return {"name": name, "revs": [{"name": name, "data": data, "error": None}], "executor": {"state": state}}

    show = [{"rev": "workspace", "name": None, "data": {}, "experiments": None},
            {"rev": "abc1234", "name": "main", "data": exp("main", 1, 2.0)["revs"][0]["data"],
             "experiments": [exp("toy-t-a-02", 3, 6.0), exp("toy-t-a-01", 1, 2.0, "failed")]}]
    rows = collect(show, g)
    assert [(r["table"], r["experiment"], r["state"]) for r in rows] == [
        ("baseline", "main", "committed"), ("t_a", "toy-t-a-01", "failed"), ("t_a", "toy-t-a-02", "success"),
        ("t_b", "toy-t-b-01", "missing")]
    r = rows[2]
    assert (r["decode.num_beams"], r["hopfield.beta"], r["score"], r["double"]) == (3, 2.0, 6.0, 12.0)
    assert (r["score lo"], r["score hi"]) == (0.5, 9.5) and "double lo" not in r
    md = to_markdown(rows, g)
    assert "## a sweep (`t_a`)" in md and "| toy-t-a-02 | success | 2 | 3 | 6 [0.5, 9.5] | 12 |" in md
    lines = list(csv.DictReader(to_csv(rows).splitlines()))
    assert lines[2]["experiment"] == "toy-t-a-02" and float(lines[2]["score"]) == 6.0


SEEDS = {"name": "toy", "metrics": {"score": "model.score", "double": "out/other.json:double"},
         "tables": {"rep": {"title": "reproduction", "seeds": [0, 1, 2],
                            "set": {"hopfield.beta": 2.0, "decode.num_beams": 1, "hopfield.visual": True}}}}


def _sd(xs: list[float]) -> float:
    """Sample standard deviation by hand: sqrt(sum (x - mean)^2 / (n - 1))."""
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_seed_grid(tmp_path):
    from flows.sweep import SweepConfigError, load_grid, validate_points

    g = load_grid(_grid(tmp_path, SEEDS))
    assert g.seeds == {"rep": [0, 1, 2]}
    point = {"hopfield.beta": 2.0, "decode.num_beams": 1, "hopfield.visual": True}
    assert g.experiments() == [(f"toy-rep-s{s}", "rep", {**point, "runtime.seed": s}) for s in (0, 1, 2)]
    assert g.seed_groups("rep") == [(point, [("toy-rep-s0", 0), ("toy-rep-s1", 1), ("toy-rep-s2", 2)])]
    validate_points(g, ROOT / "params.yaml")  # runtime.seed is a key of params.yaml
    # no grid/points: the one configuration of params.yaml; `seeds: N` is 0..N-1; several points get -NN-
    g = load_grid(_grid(tmp_path, {"tables": {"r": {"seeds": 2, "grid": {"hopfield.beta": [1.0, 2.0]}}}}))
    assert [n for n, _, _ in g.experiments()] == ["grid-r-01-s0", "grid-r-01-s1", "grid-r-02-s0", "grid-r-02-s1"]
    assert [c for c, _ in g.seed_groups("r")] == [{"hopfield.beta": 1.0}, {"hopfield.beta": 2.0}]
    assert load_grid(_grid(tmp_path, {"tables": {"r": {"seeds": [3]}}})).experiments() == [
        ("grid-r-s3", "r", {"runtime.seed": 3})]
    for bad, msg in (([], "non-empty list"), ([1, -1], "non-empty list"), ([True], "non-empty list"),
                     ([1, 1], "repeated seed"), ("0..4", "non-empty list")):
        with pytest.raises(SweepConfigError, match=msg):
            load_grid(_grid(tmp_path, {"tables": {"r": {"seeds": bad}}}))
    with pytest.raises(SweepConfigError, match="runtime.seed is given by `seeds`"):
        load_grid(_grid(tmp_path, {"tables": {"r": {"seeds": [0], "set": {"runtime.seed": 1}}}}))
    # the repository's seeds grid: the committed configuration, seeds 0..4, the registry's headline columns
    repo_grid = load_grid(ROOT / "sweeps" / "seeds.yaml")
    validate_points(repo_grid, ROOT / "params.yaml")
    assert list(repo_grid.seeds.values()) == [[0, 1, 2, 3, 4]] and len(repo_grid.experiments()) == 5
    assert load_grid(ROOT / "sweeps" / "seeds.yaml").metrics == load_grid(_grid(tmp_path, {"tables": GRID["tables"]})).metrics


def test_seed_summary_offline(tmp_path):
    """Per-seed, per-system rows and `mean ± sd` rows from a `dvc exp show --json` of three seed runs (one
    failed: not counted) against a hand computation."""
    from flows.sweep import collect, load_grid, to_csv, to_markdown

    g = load_grid(_grid(tmp_path, {**SEEDS, "tables": {"rep": {**SEEDS["tables"]["rep"], "seeds": [0, 1, 2, 3]}}}))
    model = {0: 2.0, 1: 2.5, 2: 4.0, 3: 99.0}
    nn = {0: 3.0, 1: 2.0, 2: 1.0, 3: 99.0}

    def exp(seed, state="success"):
        m, n = model[seed], nn[seed]
        metrics = {"model": {"score": m}, "baselines": {"most_frequent": {"score": 1.0}, "nearest_neighbour": {"score": n}},
                   "ci95": {"model": {"score": {"lo": m - 1, "hi": m + 1}}, "nearest_neighbour": {"score": {"lo": n - 1, "hi": n + 1}}}}
        data = {"params": {"params.yaml": {"data": {"runtime": {"seed": seed}, "decode": {"num_beams": 1},
                                                    "hopfield": {"beta": 2.0, "visual": True}}}},
                "metrics": {"out/metrics.json": {"data": metrics}, "out/other.json": {"data": {"double": 2 * m}}}}
        name = f"toy-rep-s{seed}"
        return {"name": name, "revs": [{"name": name, "data": data, "error": None}], "executor": {"state": state}}

    show = [{"rev": "abc1234", "name": "main", "data": {}, "experiments": [exp(0), exp(1), exp(2), exp(3, "failed")]}]
    rows = collect(show, g)
    assert rows[0]["table"] == "baseline"
    rep = [r for r in rows if r["table"] == "rep"]
    # per system: the four seed runs, then the mean ± sd row over the three that succeeded
    assert [(r["system"], r["experiment"]) for r in rep] == [
        (s, e) for s in ("model", "most_frequent", "nearest_neighbour")
        for e in ("toy-rep-s0", "toy-rep-s1", "toy-rep-s2", "toy-rep-s3", "mean ± sd over 3 seeds")]
    agg = {r["system"]: r for r in rep if r["state"] == "aggregate"}
    ok = [2.0, 2.5, 4.0]
    assert agg["model"]["score"] == pytest.approx(sum(ok) / 3) and agg["model"]["score sd"] == pytest.approx(_sd(ok))
    assert agg["model"]["double"] == pytest.approx(2 * sum(ok) / 3) and agg["model"]["double sd"] == pytest.approx(2 * _sd(ok))
    assert (agg["nearest_neighbour"]["score"], agg["nearest_neighbour"]["score sd"]) == (pytest.approx(2.0), pytest.approx(1.0))
    assert (agg["most_frequent"]["score"], agg["most_frequent"]["score sd"]) == (1.0, 0.0)
    assert agg["most_frequent"]["double"] is None  # out/other.json is the model's only
    assert agg["model"]["runtime.seed"] == "0,1,2" and agg["model"]["seeds"] == 3
    seed_row = next(r for r in rep if r["system"] == "nearest_neighbour" and r["experiment"] == "toy-rep-s1")
    assert (seed_row["score"], seed_row["score lo"], seed_row["score hi"], seed_row["runtime.seed"]) == (2.0, 1.0, 3.0, 1)
    assert "score lo" not in next(r for r in rep if r["system"] == "most_frequent")  # no CI in the file
    md = to_markdown(rows, g)
    sd = f"{_sd(ok):.4g}"
    assert "| experiment | state | hopfield.beta | decode.num_beams | hopfield.visual | runtime.seed | system | score | double |" in md
    assert f"| mean ± sd over 3 seeds | aggregate | 2 | 1 | True | 0,1,2 | model | 2.833 ± {sd} | 5.667 ± {2 * _sd(ok):.4g} |" in md
    assert "| toy-rep-s1 | success | 2 | 1 | True | 1 | nearest_neighbour | 2 [1, 3] |  |" in md
    assert "| mean ± sd over 3 seeds | aggregate | 2 | 1 | True | 0,1,2 | most_frequent | 1 ± 0 |  |" in md
    assert "| main |" not in md.split("## reproduction")[1]  # the committed row is not one of the seeds
    lines = list(csv.DictReader(to_csv(rows).splitlines()))
    got = next(r for r in lines if r["state"] == "aggregate" and r["system"] == "model")
    assert float(got["score"]) == pytest.approx(sum(ok) / 3) and float(got["score sd"]) == pytest.approx(_sd(ok))
    # one seed: a mean without an sd
    one = load_grid(_grid(tmp_path, {**SEEDS, "tables": {"rep": {**SEEDS["tables"]["rep"], "seeds": [0]}}}))
    rows = collect([{"rev": "abc1234", "name": "main", "data": {}, "experiments": [exp(0)]}], one)
    agg = next(r for r in rows if r["state"] == "aggregate" and r["system"] == "model")
    assert (agg["score"], agg["score sd"]) == (2.0, None) and "2 (one seed: no sd)" in to_markdown(rows, one)


@pytest.fixture
def toy_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text(TRAIN)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["decode"]["num_beams"] = 1  # the toy score is num_beams * beta: the expected values below assume 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    py = shlex.quote(sys.executable)
    runs = shlex.quote(str(tmp_path / "train-runs.txt"))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"train": {"cmd": f"{py} train.py {runs}", "deps": ["train.py"],
                             "params": ["decode.num_beams", "hopfield.beta", "hopfield.visual", "runtime.seed"],
                             "outs": ["out"]}},
        "metrics": ["out/metrics.json", "out/other.json"]}, sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PYTHONPATH": str(ROOT)}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "toy"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    return repo, env


RUN_FLOW = """\
import json, sys
from prefect.client.orchestration import get_client
from flows.sweep import sweep_flow
rows = sweep_flow(grid=sys.argv[1], repo=sys.argv[2], jobs=2, poll_seconds=1.0)
with get_client(sync_client=True) as client:
    arts = [a for a in client.read_artifacts() if a.key == "sweep-toy"]
print("RESULT " + json.dumps({"rows": rows, "artifact": arts[0].data if arts else None}, default=str))
"""


@pytest.mark.slow
def test_sweep_flow_end_to_end(toy_repo, tmp_path):
    repo, env = toy_repo
    small = {**GRID, "tables": {**GRID["tables"], "t_a": {**GRID["tables"]["t_a"], "grid": {"decode.num_beams": [3]}}}}
    grid = _grid(tmp_path, small)  # two experiments in two tables, run by two queue workers at once
    p = subprocess.run([sys.executable, "-c", RUN_FLOW, str(grid), str(repo)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    got = {r["experiment"]: r for r in out["rows"]}
    # score = num_beams * beta (+ 10 without the visual memory); the baseline is the committed HEAD (never
    # reproduced: no metric)
    assert got["toy-t-a-01"]["score"] == 6.0 and got["toy-t-a-01"]["state"] == "success"
    assert got["toy-t-b-01"]["score"] == 10.5 and got["toy-t-b-01"]["double"] == 21.0
    assert got["toy-t-a-01"]["score lo"] == 5.0 and got["master"]["state"] == "committed"
    table = json.loads(out["artifact"]) if isinstance(out["artifact"], str) else out["artifact"]
    assert {r["experiment"] for r in table} == {"master", "toy-t-a-01", "toy-t-b-01"}
    folder = repo / "artifacts" / "sweeps" / "toy"
    assert "| toy-t-a-01 | success | 2 | 3 | 6 [5, 7] | 12 |" in (folder / "comparison.md").read_text()
    rows = list(csv.DictReader((folder / "comparison.csv").read_text().splitlines()))
    assert {r["experiment"] for r in rows} == {"toy-t-a-01", "toy-t-b-01", "master"}
    # the experiments are real DVC experiments of the repo: `dvc exp show` lists them with the metric
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--csv"], cwd=repo, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert "toy-t-a-01" in shown and "model.score" in shown
    runs = tmp_path / "train-runs.txt"
    assert runs.read_text().count("run") == 2  # one run per experiment

    # the same sweep again: same names, replaced without --force, so the stage comes from the run-cache
    p = subprocess.run([sys.executable, "-c", RUN_FLOW, str(grid), str(repo)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert {r["experiment"]: (r["state"], r.get("score")) for r in out["rows"]} == {
        "master": ("committed", None), "toy-t-a-01": ("success", 6.0), "toy-t-b-01": ("success", 10.5)}
    assert runs.read_text().count("run") == 2  # restored, not rerun


@pytest.mark.slow
def test_seed_sweep_end_to_end(toy_repo, tmp_path):
    """Three seeds of one configuration as real DVC experiments; the `mean ± sd` rows (model and both
    baselines) equal a hand computation from the per-seed metrics the stage wrote."""
    repo, env = toy_repo
    p = subprocess.run([sys.executable, "-c", RUN_FLOW, str(_grid(tmp_path, SEEDS)), str(repo)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    rows = [r for r in out["rows"] if r["table"] == "rep"]
    runs = {(r["experiment"], r["system"]): r for r in rows if r["state"] == "success"}
    # the stage: model 1 * 2.0 + 0.5 seed^2, nearest_neighbour 3 - seed, most_frequent 1
    assert {k: v["score"] for k, v in runs.items() if k[1] == "model"} == {
        ("toy-rep-s0", "model"): 2.0, ("toy-rep-s1", "model"): 2.5, ("toy-rep-s2", "model"): 4.0}
    assert runs[("toy-rep-s2", "model")]["runtime.seed"] == 2 and runs[("toy-rep-s2", "model")]["score lo"] == 3.0
    agg = {r["system"]: r for r in rows if r["state"] == "aggregate"}
    assert set(agg) == {"model", "most_frequent", "nearest_neighbour"}
    for system, r in agg.items():
        per_seed = [runs[(f"toy-rep-s{s}", system)]["score"] for s in (0, 1, 2)]
        assert r["experiment"] == "mean ± sd over 3 seeds" and r["seeds"] == 3
        assert r["score"] == pytest.approx(sum(per_seed) / 3) and r["score sd"] == pytest.approx(_sd(per_seed))
    assert agg["model"]["score"] == pytest.approx(8.5 / 3) and agg["nearest_neighbour"]["score sd"] == pytest.approx(1.0)
    table = json.loads(out["artifact"]) if isinstance(out["artifact"], str) else out["artifact"]
    assert sum(r["state"] == "aggregate" for r in table) == 3
    md = (repo / "artifacts" / "sweeps" / "toy" / "comparison.md").read_text()
    assert f"| mean ± sd over 3 seeds | aggregate | 2 | 1 | True | 0,1,2 | model | 2.833 ± {_sd([2.0, 2.5, 4.0]):.4g} |" in md
    assert "| toy-rep-s1 | success | 2 | 1 | True | 1 | nearest_neighbour | 2 [1, 3] |  |" in md
    assert (tmp_path / "train-runs.txt").read_text().count("run") == 3  # one run per seed
