"""``python -m flows.show`` (what was ``amrg show``) inside a real, tiny git+dvc repository: this project's
params.yaml, a preprocess stage whose data dep is templated from it (``${data.annotation}``) and an
evaluate stage writing a metrics.json with CIs. The stage table comes from DVC (up to date, then a
changed dep), the data version from dvc.lock, the metrics as the one headline table."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.show import main

ROOT = Path(__file__).resolve().parents[1]

STEPS = '''\
import json, pathlib, sys
step = sys.argv[1]
if step == "preprocess":
    pathlib.Path("artifacts/preprocess").mkdir(parents=True, exist_ok=True)
    json.dump({"studies": {"train": 2, "val": 1, "test": 7}, "skipped": 1},
              open("artifacts/preprocess/stats.json", "w"))
else:
    scores = {"BLEU_4": 0.1, "METEOR": 0.2, "ROUGE_L": 0.3, "CIDEr": 0.4, "ce": {"f1": 0.5}}
    ci = {k: {"lo": v - 0.01, "hi": v + 0.03} for k, v in scores.items() if k not in ("ce", "METEOR")}
    pathlib.Path("artifacts/eval").mkdir(parents=True, exist_ok=True)
    json.dump({"phantom_images": True, "n_test": 7, "model": scores, "baselines": {"most_frequent": scores},
               "ci95": {"model": {**ci, "ce": {"f1": {"lo": 0.4, "hi": 0.6}}}},
               "ce_convention": {"headline": "macro average"}}, open("artifacts/eval/metrics.json", "w"))
    pathlib.Path("artifacts/eval/report.html").write_text("<html></html>")
'''


@pytest.fixture
def workspace(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    annotation = yaml.safe_load((repo / "params.yaml").read_text())["data"]["annotation"]
    (repo / annotation).parent.mkdir(parents=True)
    (repo / annotation).write_text('{"train": [], "val": [], "test": []}\n')
    (repo / "steps.py").write_text(STEPS)
    py = shlex.quote(sys.executable)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "preprocess": {"cmd": f"{py} steps.py preprocess", "deps": ["steps.py", "${data.annotation}"],
                       "params": ["data.max_studies"], "outs": ["artifacts/preprocess"]},
        "evaluate": {"cmd": f"{py} steps.py evaluate", "deps": ["steps.py", "artifacts/preprocess"],
                     "params": ["decode.num_beams"], "outs": ["artifacts/eval"]},
    }}, sort_keys=False))
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "repro", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "run"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return repo, annotation


def test_show_in_a_dvc_repo(workspace, capsys):
    repo, annotation = workspace
    assert main(["--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("commit   ") and lines[0].endswith(" run")  # committed, nothing uncommitted
    assert "params.yaml  sha256 " in lines[1]
    assert f"data     iu_xray: {annotation} md5 " in out and "  = dvc.lock; images PHANTOM" in out
    assert "studies {'train': 2, 'val': 1, 'test': 7}, skipped 1" in out
    # the stage table: DVC's stages in DVC's order, each as `dvc status` sees it
    stages = lines[lines.index("stages   (dvc status)") + 1:][:2]
    assert [line.split() for line in stages] == [["preprocess", "up", "to", "date"], ["evaluate", "up", "to", "date"]]
    # the metrics: one compact table, model and baselines x headline metrics, CIs in brackets
    assert "PHANTOM IMAGES, 7 test studies; brackets: 95% bootstrap CI" in out
    model = next(line for line in lines if line.lstrip().startswith("| model"))
    assert "0.100 [0.090, 0.130]" in model and "0.500 [0.400, 0.600]" in model and "| 0.200 |" in model.replace("  ", " ")
    assert any(line.lstrip().startswith("| most_frequent") for line in lines)
    assert "CE: macro average" in out and "report.html" in out

    # the annotation changes: DVC says preprocess has a changed dep, the data line says != dvc.lock
    (repo / annotation).write_text('{"train": [{"id": "x"}], "val": [], "test": []}\n')
    assert main(["--repo", str(repo), "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["stages"] == {"preprocess": f"changed deps: {annotation} (modified)", "evaluate": "up to date"}
    assert state["data"]["locked"] != state["data"]["md5"] and state["uncommitted"] == 1
    assert [r["system"] for r in state["metrics"]["table"]] == ["model", "most_frequent"]
    assert main(["--repo", str(repo)]) == 0
    assert "!= dvc.lock" in capsys.readouterr().out


def test_show_bad_params_and_no_metrics(workspace, capsys):
    repo, _ = workspace
    shutil.rmtree(repo / "artifacts" / "eval")
    assert main(["--repo", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "no evaluation yet: run `dvc repro`" in out
    assert "evaluate             changed outs: artifacts/eval (deleted)" in out
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["hopfield"]["beta"] = -1
    (repo / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["--repo", str(repo)]) == 2
    assert "hopfield.beta must be > 0" in capsys.readouterr().err


def test_amrg_cli_has_no_show():
    """The library knows no DVC: `amrg show` is gone (python -m flows.show replaces it)."""
    from amrg.cli import main as amrg_main

    with pytest.raises(SystemExit) as exc:
        amrg_main(["show"])
    assert exc.value.code == 2
    text = (ROOT / "amrg" / "cli.py").read_text()
    assert "dvc.lock" not in text and "dvc status" not in text
