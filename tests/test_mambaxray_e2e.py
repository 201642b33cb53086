"""End to end: seed 002's MambaXray-VL chain (configs/mambaxray-tiny.yaml over the tiny profile) under
`dvc repro`: every stage runs, a second repro runs nothing, and a pre-training knob reruns exactly the
stages downstream of it — never the classifier, CAM or banks, whose encoder is not the generator's."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from ._workspace import make_workspace, run, stages_ran

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_mambaxray_chain_runs_and_reruns_only_what_depends_on_pretraining(tmp_path):
    overlay = yaml.safe_load((ROOT / "configs" / "mambaxray-tiny.yaml").read_text())
    dst = make_workspace(tmp_path / "repo", overlay)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               CUDA_VISIBLE_DEVICES="")
    dvc = [sys.executable, "-m", "dvc"]
    first = run(dvc + ["repro"], dst, env)
    stages = list(yaml.safe_load((dst / "dvc.yaml").read_text())["stages"])
    assert sorted(stages_ran(first)) == sorted(stages)

    art = dst / "artifacts"
    arm = json.loads((art / "pretrain/vision/metrics.json").read_text())
    clip = json.loads((art / "pretrain/contrastive/metrics.json").read_text())
    assert arm["epochs"] == 2 and clip["init"] == "pretrain_vision", (arm, clip)
    encoder = json.loads((art / "pretrain/contrastive/encoder.json").read_text())
    assert encoder["name"] == "amrg_vim_tiny_pz16" and encoder["form"] == "finetune"
    # the generator trained the pre-trained encoder and saved it: its weights moved off the pre-trained ones
    gen = json.loads((art / "generator/config.json").read_text())["spec"]
    assert gen["vision"]["source"] == "pretrained", gen.get("vision")
    before = load_file(str(art / "pretrain/contrastive/backbone.safetensors"))
    after = {k.removeprefix("model."): v for k, v in load_file(str(art / "generator/vision.safetensors")).items()}
    common = [k for k in before if k in after]
    assert len(common) == len(before) == len(after)  # the whole encoder, under its VisionEncoder prefix
    assert common and any((before[k] - after[k]).abs().max() > 0 for k in common)
    ev = json.loads((art / "eval/metrics.json").read_text())
    assert ev["generation"]["device"] == "cpu" and ev["model"]["BLEU_4"] >= 0

    # nothing changed: nothing runs but the always-changed index stage (its manifest comes out the same)
    assert stages_ran(run(dvc + ["repro"], dst, env)) == ["index"]

    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["pretrain_contrastive"]["epochs"] = 1
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = stages_ran(run(dvc + ["repro"], dst, env))
    assert sorted(again) == sorted(["index", "pretrain_contrastive", "train_generator", "evaluate", "score"])
