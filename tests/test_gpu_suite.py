"""bench/gpu_suite.py (issue 19): the self-check passes and catches a broken decoder, the --tiny suite (the GPU
run's code at tiny shapes) writes every figure with finite values, and the figures' arithmetic (ratios, the
CheXpert extrapolation, goals, the bandwidth table) is the one documented."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
suite = importlib.import_module("gpu_suite")

CPU = torch.device("cpu")


def expected_names(s) -> set[str]:
    return ({f"greedy_b{b}" for b in s.greedy_batches} | {f"beam3_b{s.beam_batch}", "chexpert_greedy_min",
            "chexpert_beam3_min", "classifier_step", "generator_step", "cam_native"}
            | {f"hopfield_{kind}_{n}" for n in s.hop_banks for kind in ("topk", "recall")})


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    assert suite.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_tiny_suite_writes_every_figure_finite(tiny_result):
    r = tiny_result
    assert r["torch"] == torch.__version__ and r["device"].startswith("cpu") and r["shapes"] == "tiny"
    assert r["total_s"] > 0 and r["bandwidth_bytes_s"] > 0 and r["bandwidth_source"] == "measured device copy"
    figs = {f["name"]: f for f in r["figures"]}
    assert set(figs) == expected_names(suite.SHAPES["tiny"])
    for f in figs.values():
        assert f["error"] is None, f
        for key in ("value", "anchor", "ratio"):
            assert math.isfinite(f[key]) and f[key] > 0, (f["name"], key, f[key])
        assert (f["passed"] is None) == (f["goal"] is None)


def test_tiny_suite_figures_are_consistent(tiny_result):
    s = suite.SHAPES["tiny"]
    figs = {f["name"]: f for f in tiny_result["figures"]}
    for name in ("greedy_b4", "greedy_b8", "beam3_b4", "classifier_step", "generator_step", "cam_native"):
        f = figs[name]
        assert f["ratio"] == pytest.approx(f["value"] / f["anchor"])
    # CheXpert minutes from the largest greedy batch's native and HF rates, new_tokens per study
    greedy = figs[f"greedy_b{max(s.greedy_batches)}"]
    c = figs["chexpert_greedy_min"]
    assert c["value"] == pytest.approx(11_562 / (greedy["value"] / s.new_tokens) / 60)
    assert c["anchor"] == pytest.approx(11_562 / (greedy["extra"]["hf_default_tok_s"] / s.new_tokens) / 60)
    assert c["ratio"] == pytest.approx(c["anchor"] / c["value"])
    assert figs["chexpert_beam3_min"]["value"] == pytest.approx(11_562 / (figs["beam3_b4"]["value"] / s.new_tokens) / 60)
    # on CPU in fp32 the torch index is exact, and the plain-torch anchor computes the native GradCAM's maps
    assert all(figs[f"hopfield_recall_{n}"]["value"] == 1.0 for n in s.hop_banks)
    assert figs["cam_native"]["extra"]["max_abs_diff_vs_anchor"] < 1e-3
    assert figs["generator_step"]["extra"]["peak_memory_mb"] > 0
    assert figs["hopfield_topk_5000"]["goal"] is None  # the 50k img/s goal is the 1M-row bank's


def test_broken_decode_fails_the_self_check(monkeypatch, capsys, tmp_path):
    real = suite.decoding.generate

    def off_by_one(*args, **kwargs):
        out = real(*args, **kwargs)
        out[:, -1] = (out[:, -1] + 1) % 5
        return out

    monkeypatch.setattr(suite.decoding, "generate", off_by_one)
    with pytest.raises(suite.SelfCheckFailed, match=r"num_beams=1\).*\n.*num_beams=3"):
        suite.self_check(CPU)
    out = tmp_path / "never.json"
    assert suite.main(["--tiny", "--device", "cpu", "--out", str(out), "--only", "cam"]) == 2
    assert "self-check failed" in capsys.readouterr().err and not out.exists()


def test_broken_gradcam_fails_the_self_check(monkeypatch):
    real = suite.CamMiner.__call__

    def shifted(self, pixels, diseases):
        cam = real(self, pixels, diseases)
        return cam * 0.9 if self.native else cam

    monkeypatch.setattr(suite.CamMiner, "__call__", shifted)
    with pytest.raises(suite.SelfCheckFailed, match="GradCAM differs"):
        suite.self_check(CPU)


def test_goal_and_chexpert_arithmetic():
    assert suite.Goal("ratio", ">=", 0.75).met(value=0.0, ratio=0.75)
    assert not suite.Goal("ratio", ">=", 0.75).met(value=1e9, ratio=0.7499)
    assert suite.Goal("value", "<=", 7.8).met(value=7.8, ratio=0.0)
    assert not suite.Goal("value", "<=", 7.8).met(value=7.81, ratio=99.0)
    # 11,562 studies x 100 tokens in one minute
    assert suite.chexpert_minutes(11_562 * 100 / 60, 100) == pytest.approx(1.0)
    f = suite.figure("x", 3.0, "tok/s", 4.0, "floor", suite.Goal("ratio", ">=", 0.75))
    assert f.ratio == 0.75 and f.passed is True


@pytest.mark.parametrize("name,bw", [("NVIDIA H200", 4.8e12), ("NVIDIA H100 80GB HBM3", 3.35e12),
                                     ("NVIDIA A100-SXM4-80GB", 2.0e12)])
def test_bandwidth_table(monkeypatch, name, bw):
    monkeypatch.setattr(suite, "device_name", lambda device: name)
    got, source = suite.bandwidth(CPU, suite.SHAPES["tiny"])
    assert got == bw and source.startswith("table")


def test_unknown_device_measures_a_copy(monkeypatch):
    monkeypatch.setattr(suite, "device_name", lambda device: "NVIDIA H100 PCIe")  # not in the table
    bw, source = suite.bandwidth(CPU, suite.SHAPES["tiny"])
    assert source == "measured device copy" and 1e8 < bw < 1e13


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown --only"):
        suite.parse_only("decode,warp")
    assert suite.parse_only(None) == list(suite.GROUPS)
    with pytest.raises(SystemExit, match="paper shapes need a CUDA device"):
        suite.run_suite(tiny=False, device=CPU)


def test_one_group_runs_alone(tmp_path):
    out = tmp_path / "cam.json"
    assert suite.main(["--tiny", "--device", "cpu", "--out", str(out), "--only", "cam"]) == 0
    assert [f["name"] for f in json.loads(out.read_text())["figures"]] == ["cam_native"]


class _Net(torch.nn.Module):
    def __init__(self, convs: int):
        super().__init__()
        self.encoder = torch.nn.Sequential(*[torch.nn.Conv2d(3, 3, 3) for _ in range(convs)], torch.nn.Linear(3, 3))


def test_channels_last_only_for_conv_encoders_on_cuda():
    from stages.train_classifier import is_conv_model, memory_layout

    swin = suite.build_classifier(suite.SHAPES["tiny"], CPU)
    assert not is_conv_model(swin.encoder)  # one Conv2d: the patch embedding
    assert is_conv_model(_Net(2).encoder) and not is_conv_model(_Net(1).encoder)
    net = _Net(2)
    before = [p.stride() for p in net.parameters()]
    assert memory_layout(net, CPU) is net and [p.stride() for p in net.parameters()] == before  # CPU: unchanged
    if torch.cuda.is_available():
        conv = memory_layout(_Net(2).cuda(), torch.device("cuda")).encoder[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_self_check_on_cuda():
    suite.self_check(torch.device("cuda"))
