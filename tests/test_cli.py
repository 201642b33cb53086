"""``amrg generate`` on a tiny run built here (random weights, a classifier biased towards Cardiomegaly),
and its error messages. (The workspace summary that was ``amrg show`` is ``python -m flows.show``,
tested in a real DVC repo by tests/test_flow_show.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from amrg.cli import main
from amrg.inference import load_run
from amrg.layout import Layout, MissingArtifacts
from amrg.models.generator import GeneratorSpec, ReportGenerator
from amrg.config import Decode
from tests._tiny_run import RUN_DECODE, build_tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("run"))


def test_run_rebuilds_the_trained_generator(run_dir):
    """load_run rebuilds the generator from its spec in the spec's dtype, with the trained weights."""
    run = load_run(Layout(run_dir), torch.device("cpu"))
    assert run.spec == GeneratorSpec.from_dict(json.loads((run_dir / "generator" / "config.json").read_text())["spec"])
    assert run.spec.dtype == "fp32" and next(run.generator.llm.parameters()).dtype == torch.float32
    saved = {k: v for k, v in __import__("safetensors.torch", fromlist=["x"]).load_file(
        str(run_dir / "generator" / "weights.safetensors")).items()}
    state = run.generator.trainable_state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = [d / "frontal.png", d / "lateral.jpg"]
    Image.fromarray(rng.integers(0, 255, (300, 260), dtype=np.uint8)).save(paths[0])  # not square: resized
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(paths[1])  # RGB: to gray
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def params_file(tmp_path_factory) -> str:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["decode"].update(max_new_tokens=6, num_beams=1)
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(yaml.safe_dump(p))
    return str(path)


def test_generate_reports_labels_and_cam(run_dir, images, params_file, tmp_path, capsys):
    cams = tmp_path / "cams"
    assert main(["generate", *images, "--run", str(run_dir), "--params", params_file, "--json",
                 "--cam-dir", str(cams)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["images"] for r in out] == images  # one report per image by default
    for k, r in enumerate(out):
        assert isinstance(r["report"], str) and r["phantom_trained"] is True
        assert r["predicted"][0][0] == "Cardiomegaly" and r["predicted"][0][1] > 0.99 and len(r["predicted"]) == 1
        assert [(c["label"], c["image"]) for c in r["cam"]] == [("Cardiomegaly", k)]
        c = r["cam"][0]
        assert 0 <= c["peak"][0] <= 1 and 0 <= c["peak"][1] <= 1 and c["where"]
        assert Image.open(c["overlay"]).size == (224, 224)

    # --study: both images are the views of one study -> one report, a CAM on each view
    assert main(["generate", *images, "--run", str(run_dir), "--params", params_file, "--json", "--study"]) == 0
    (study,) = json.loads(capsys.readouterr().out)
    assert [(c["label"], c["image"]) for c in study["cam"]] == [("Cardiomegaly", 0), ("Cardiomegaly", 1)]

    # text output names the labels, where CAM points, and the report
    assert main(["generate", images[0], "--run", str(run_dir), "--params", params_file]) == 0
    captured = capsys.readouterr()
    assert "predicted labels (p > 0.5): Cardiomegaly 1.00" in captured.out
    assert "gradcam Cardiomegaly on" in captured.out and "of the image (peak x" in captured.out
    assert "report: " in captured.out and "PHANTOM" in captured.err


def test_generate_uses_the_runs_own_decode_settings(run_dir, images, params_file, tmp_path, capsys, monkeypatch):
    seen = []
    original = ReportGenerator.generate

    def spy(self, f, fd, decode):
        seen.append(decode)
        return original(self, f, fd, decode)

    monkeypatch.setattr(ReportGenerator, "generate", spy)
    ws = tmp_path / "ws"  # a workspace params.yaml with other settings is ignored
    ws.mkdir()
    (ws / "params.yaml").write_text(Path(params_file).read_text())
    monkeypatch.chdir(ws)
    assert main(["generate", images[0], "--run", str(run_dir), "--json"]) == 0
    assert seen == [RUN_DECODE]
    capsys.readouterr()
    assert main(["generate", images[0], "--run", str(run_dir), "--params", params_file, "--json"]) == 0
    assert seen[-1] == Decode(**yaml.safe_load(Path(params_file).read_text())["decode"])
    capsys.readouterr()

    # no params file where one is named, or a run without its resolved params: an error, never defaults
    assert main(["generate", images[0], "--run", str(run_dir), "--params", str(tmp_path / "typo.yaml")]) == 2
    assert "typo.yaml not found" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    (bare / "eval" / "params.json").unlink()
    assert main(["generate", images[0], "--run", str(bare)]) == 1
    assert "dvc repro evaluate" in capsys.readouterr().err


def test_generate_errors(run_dir, images, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Image.open(images[0]).tobytes()[:100])  # not an image file
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(images[0]).read_bytes()[:200])
    for bad, msg in ((tmp_path / "missing.png", "image not found"), (corrupt, "cannot read image"),
                     (truncated, "cannot read image")):
        assert main(["generate", images[0], str(bad), "--run", str(run_dir)]) == 2
        assert msg in capsys.readouterr().err

    # artifacts not built yet: say which stage to run (the first missing in pipeline order)
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial)
    for rel, stage in (("generator/weights.safetensors", "train_generator"),
                       ("banks/visual/bank.safetensors", "encode_visual_bank"),
                       ("classifier/model.safetensors", "train_classifier")):
        (partial / rel).unlink()
        assert main(["generate", images[0], "--run", str(partial)]) == 1
        err = capsys.readouterr().err
        assert f"`dvc repro {stage}`" in err and rel in err
    with pytest.raises(MissingArtifacts, match="dvc repro train_classifier"):
        load_run(Layout(tmp_path / "nothing"), torch.device("cpu"))
    assert Layout(tmp_path).stage_of(tmp_path / "banks" / "report" / "rows.parquet") == "encode_report_bank"

