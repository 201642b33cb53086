"""Vision Mamba (issue 17): the chunked S6 scan against the sequential loop, the mixer against transformers'
MambaMixer and against a transcription of MambaXray-VL's bidirectional / 4-way forward, causality, the
release's state-dict names through the converter, VisionEncoder and GradCAM on it, and (gpu) mamba_ssm."""

import argparse
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

from amrg.convert_mambaxray import ConversionError, convert, main as convert_main
from amrg.io import load_tensors
from amrg.models.mamba import (MambaMixer, column_major_order, cuda_selective_scan, selective_scan,
                               selective_scan_ref)
from amrg.models.vim import create_vim, resample_pos_embed  # importing it registers amrg_vim_* in timm
from amrg.models.vision import VisionEncoder


def _scan_inputs(b, d, n, L, dtype=torch.float64, seed=0, decay=3.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(u=r(b, d, L), delta=r(b, d, L), A=-decay * torch.rand(d, n, generator=g, dtype=dtype),
                B=r(b, n, L), C=r(b, n, L), D=r(d), z=r(b, d, L), delta_bias=r(d), delta_softplus=True)


# ----------------------------------------------------------------------------- the scan
@pytest.mark.parametrize("L", [1, 7, 37, 64])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_chunked_scan_equals_the_sequential_loop(L, chunk):
    kw = _scan_inputs(2, 5, 3, L, seed=L * 100 + chunk)
    y_ref, h_ref = selective_scan_ref(**kw, return_last_state=True)
    y, h = selective_scan(**kw, return_last_state=True, chunk=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_chunked_scan_gradients_equal_the_loop_and_large_decays_stay_finite():
    kw = _scan_inputs(1, 3, 2, 23, seed=5)
    leaves = {k: v.requires_grad_(True) for k, v in kw.items() if isinstance(v, torch.Tensor)}
    (selective_scan(**kw, chunk=8) ** 2).sum().backward()
    got = {k: v.grad.clone() for k, v in leaves.items()}
    for v in leaves.values():
        v.grad = None
    (selective_scan_ref(**kw) ** 2).sum().backward()
    for k, v in leaves.items():
        torch.testing.assert_close(got[k], v.grad, rtol=1e-9, atol=1e-9, msg=k)
    # float32, a decay of up to e^-600 per step: exp of a difference of cumulative sums would overflow
    big = {k: (v.detach().float() if isinstance(v, torch.Tensor) else v)
           for k, v in _scan_inputs(2, 4, 3, 40, decay=200.0).items()}
    big["delta"] = big["delta"] + 3.0
    y = selective_scan(**big, chunk=16)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, selective_scan_ref(**big), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the mixer
def test_forward_mixer_matches_transformers_mamba_mixer():
    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=16, state_size=4, expand=2, conv_kernel=4, time_step_rank=3, use_bias=False,
                      use_conv_bias=True, num_hidden_layers=1)
    hf = HFMambaMixer(cfg, layer_idx=0).eval()
    with torch.no_grad():  # non-trivial A, D and biases
        hf.A_log.add_(0.3 * torch.randn_like(hf.A_log))
        hf.D.add_(torch.randn_like(hf.D))
        hf.conv1d.bias.normal_()
    ours = MambaMixer(16, d_state=4, d_conv=4, expand=2, dt_rank=3, scan="forward", scan_chunk=4).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())  # the same names
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(3, 11, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


def _release_direction(mixer, xz, s):
    """``mamba_inner_fn_no_out_proj`` of the release on xz (B, 2D, L): conv, projections, scan with the z gate."""
    x, z = xz.chunk(2, dim=1)
    L = x.shape[-1]
    x = F.silu(getattr(mixer, f"conv1d{s}")(x)[..., :L])
    dt, B, C = torch.split(getattr(mixer, f"x_proj{s}")(x.transpose(1, 2)),
                           [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
    dt_proj = getattr(mixer, f"dt_proj{s}")
    return selective_scan_ref(x, dt_proj.weight @ dt.transpose(1, 2), -torch.exp(getattr(mixer, f"A{s}_log")),
                              B.transpose(1, 2), C.transpose(1, 2), getattr(mixer, f"D{s}"), z=z,
                              delta_bias=dt_proj.bias, delta_softplus=True)


def _release_forward(mixer, h):
    """MambaXray-VL's ``Mamba.forward`` (arm/Finetuning/mamba_simple.py), v2 (``/2``) and v3 (``/4``), as written."""
    b, L, d = h.shape  # xz = rearrange(W_in @ rearrange(h, "b l d -> d (b l)"), "d (b l) -> b d l")
    xz = (mixer.in_proj.weight @ h.reshape(b * L, d).T).reshape(-1, b, L).permute(1, 0, 2)
    out = _release_direction(mixer, xz, "")
    out_b = _release_direction(mixer, xz.flip([-1]), "_b")
    if mixer.scan == "bi":
        return F.linear(((out + out_b.flip([-1])) / 2).transpose(1, 2), mixer.out_proj.weight)
    B, D, L = xz.shape
    tp = L // 2
    cls, xc = xz[:, :, tp:tp + 1], torch.cat([xz[:, :, :tp], xz[:, :, tp + 1:]], dim=-1)
    side = int(np.sqrt(L))
    xc = xc.reshape(B, D, side, side).permute(0, 1, 3, 2).reshape(B, D, -1)
    xc = torch.cat((xc[:, :, :tp], cls, xc[:, :, tp:]), dim=-1)
    out_c = _release_direction(mixer, xc, "_c")
    out_c_b = _release_direction(mixer, xc.flip([-1]), "_c_b")
    out_c = out_c + out_c_b.flip([-1])
    cls, out_c = out_c[:, :, tp:tp + 1], torch.cat([out_c[:, :, :tp], out_c[:, :, tp + 1:]], dim=-1)
    out_c = out_c.reshape(B, mixer.d_inner, side, side).permute(0, 1, 3, 2).reshape(B, mixer.d_inner, -1)
    out_c = torch.cat((out_c[:, :, :tp], cls, out_c[:, :, tp:]), dim=-1)
    out = out + out_b.flip([-1])
    return F.linear(((out + out_c) / 4.0).transpose(1, 2), mixer.out_proj.weight)


@pytest.mark.parametrize("scan", ["bi", "4way"])
def test_bi_and_4way_mixers_equal_the_release_forward(scan):
    torch.manual_seed(1)
    mixer = MambaMixer(12, d_state=4, scan=scan, scan_chunk=5).double()
    h = torch.randn(2, 17, 12, dtype=torch.float64)  # 4 x 4 patches + a middle class token at 8 = L // 2
    with torch.no_grad():
        torch.testing.assert_close(mixer(h, grid=(4, 4), cls_index=8), _release_forward(mixer, h),
                                   rtol=1e-10, atol=1e-10)


def test_column_order_keeps_the_class_token_in_place():
    assert column_major_order((2, 3), None).tolist() == [0, 3, 1, 4, 2, 5]
    # patches 0..5 at sequence positions 0, 1, 2, (cls 3), 4, 5, 6
    assert column_major_order((2, 3), 3).tolist() == [0, 4, 1, 3, 5, 2, 6]
    assert column_major_order((2, 3), 0).tolist() == [0, 1, 4, 2, 5, 3, 6]


def _perturbed_outputs(mixer, t, **kw):
    torch.manual_seed(2)
    x = torch.randn(2, 12, mixer.d_model)
    x2 = x.clone()
    x2[:, t] += torch.randn(mixer.d_model)
    with torch.no_grad():
        return mixer(x, **kw), mixer(x2, **kw)


def test_forward_scan_is_causal():
    mixer = MambaMixer(16, d_state=4, scan="forward", scan_chunk=4).eval()
    t = 6
    a, b = _perturbed_outputs(mixer, t)
    assert torch.equal(a[:, :t], b[:, :t])  # a later token never changes an earlier output
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=(0, 2)).min() > 1e-6  # and it does change its own and later ones


@pytest.mark.parametrize("scan", ["bi", "4way"])
def test_bidirectional_mixers_are_not_causal(scan):
    mixer = MambaMixer(16, d_state=4, scan=scan).eval()
    a, b = _perturbed_outputs(mixer, 11, grid=(3, 4) if scan == "4way" else None)
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-6


def test_pretrain_encoder_is_causal_over_patches():
    model = create_vim("tiny", "pretrain", img_size=64).eval()  # one scan, no class token: ARM's encoder
    x = torch.randn(1, 3, 64, 64)
    x2 = x.clone()
    x2[..., 32:48, 16:32] += 1.0  # patch (2, 1) = token 9 of the row-major 4 x 4 grid
    with torch.no_grad():
        a, b = model.forward_features(x), model.forward_features(x2)
    assert a.shape == (1, 16, 64) and model.num_prefix_tokens == 0
    assert torch.equal(a[:, :9], b[:, :9]) and (a[:, 9] - b[:, 9]).abs().max() > 1e-4


# ----------------------------------------------------------------------------- the model
def test_vision_encoder_gives_tokens_and_grid_with_the_class_token_moved_to_the_front():
    torch.manual_seed(0)
    enc = VisionEncoder("amrg_vim_tiny_pz16", img_size=64).eval()
    assert enc.grid == (4, 4) and enc.num_prefix == 1 and enc.num_features == 64
    pixels = torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8)
    seen = []
    hook = enc.model.norm_f.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        tokens = enc(pixels)
        feats = enc.model.forward_features(enc.normalise(pixels))
    hook.remove()
    assert tokens.shape == (2, 16, 64)
    inner = seen[-1]  # sequence order inside the model: 8 patches, cls, 8 patches
    torch.testing.assert_close(feats[:, 0], inner[:, 8])
    torch.testing.assert_close(tokens, torch.cat([inner[:, :8], inner[:, 9:]], dim=1))
    assert VisionEncoder("amrg_vim_tiny_pz16", img_size=224).grid == (14, 14)


def test_pos_embed_resample_keeps_the_class_slot():
    pe = torch.randn(1, 17, 8)  # 4 x 4 + middle cls at 8
    assert resample_pos_embed(pe, (4, 4), "middle") is pe
    big = resample_pos_embed(pe, (6, 6), "middle")
    assert big.shape == (1, 37, 8) and torch.equal(big[:, 18], pe[:, 8])
    first = resample_pos_embed(pe, (2, 2), "first")
    assert first.shape == (1, 5, 8) and torch.equal(first[:, 0], pe[:, 0])
    # a constant patch embedding stays constant (bicubic of a constant), the class slot excluded
    flat = torch.cat([torch.ones(1, 8, 8), torch.full((1, 1, 8), 5.0), torch.ones(1, 8, 8)], dim=1)
    out = resample_pos_embed(flat, (5, 5), "middle")
    assert out[0, 12].eq(5.0).all() and torch.allclose(torch.cat([out[:, :12], out[:, 13:]], 1), torch.ones(1, 25, 8))


def _mae_sincos(dim, size):
    """MAE's get_2d_sincos_pos_embed (util/pos_embed.py of the release), transcribed in numpy."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), 0)
    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], axis=1)


def test_fixed_sincos_pos_embed_is_mae_s():
    model = create_vim("tiny", "pretrain", img_size=64)
    assert not model.pos_embed.requires_grad
    np.testing.assert_allclose(model.pos_embed[0].detach().numpy(), _mae_sincos(64, 4), atol=1e-6)


def test_gradcam_runs_on_vim_and_gives_a_non_constant_map():
    torch.manual_seed(0)
    enc = VisionEncoder("amrg_vim_tiny_pz16", img_size=64)

    class Head(nn.Module):  # grad-cam passes (B, 1, H, W) float pixels
        def __init__(self):
            super().__init__()
            self.enc, self.fc = enc, nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(self.enc.feature_grid(x[:, 0]).mean(dim=(2, 3)))

    model = Head().eval()
    x = torch.randint(0, 256, (2, 1, 64, 64)).float()
    cam = GradCAM(model=model, target_layers=[enc.feature_map])
    try:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    finally:
        cam.activations_and_grads.release()
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()
    assert maps.reshape(2, -1).std(1).min() > 1e-3


def test_disease_classifier_runs_on_vim():
    """The Q-Former reads the Vim tokens like any timm family's (tokens, grid) and gradients reach the encoder."""
    from amrg.models.classifier import ClassifierSpec, DiseaseClassifier
    torch.manual_seed(0)
    model = DiseaseClassifier(ClassifierSpec("amrg_vim_tiny_pz16", {}, 64, 32, 1, 4))
    logits = model(torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8))
    assert logits.shape == (2, 14) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert model.encoder.model.layers[0].mixer.A_c_b_log.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the converter
def _fake_lightning(monkeypatch):
    """Lightning's AttributeDict under its real module path (lightning is not installed here)."""
    names = ["lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"]
    mods = {n: types.ModuleType(n) for n in names}
    attr = type("AttributeDict", (dict,), {"__module__": names[-1]})
    mods[names[-1]].AttributeDict = attr
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    return attr, names


def test_release_style_checkpoints_convert_and_load_strict(tmp_path, monkeypatch):
    torch.manual_seed(3)
    src = create_vim("tiny", img_size=64).eval()  # finetune: 4-way, middle cls, learned pos_embed
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.1 * torch.randn_like(p))
    attr, names = _fake_lightning(monkeypatch)
    # a stage-2/3 checkpoint: visual_encoder.* beside another module, Lightning hparams, DDP prefix
    state = {f"module.visual_encoder.{k}": v for k, v in src.state_dict().items()}
    state["module.llama_proj.weight"] = torch.randn(4, 64)
    torch.save({"model": state, "config": attr(vision_model="x", type="tiny"), "epoch": 3, "step": 10},
               tmp_path / "sft.pth")
    for n in names:  # not importable at load time: the stand-in reads it
        monkeypatch.delitem(sys.modules, n)
    summary = convert(tmp_path / "sft.pth", tmp_path / "sft.safetensors", preset="tiny", img_size=64)
    assert summary["dropped"] == {"other_modules": 1, "arm_decoder_or_head": 0}
    assert summary["metadata_entries"] == ["config", "epoch", "step"]
    dst = create_vim("tiny", img_size=64).eval()
    dst.load_state_dict(load_tensors(tmp_path / "sft.safetensors"), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst.forward_features(x), src.forward_features(x))
    # through the one encoder factory, and resampled to another size on conversion
    enc = VisionEncoder("amrg_vim_tiny_pz16", img_size=64, checkpoint=str(tmp_path / "sft.safetensors"))
    torch.testing.assert_close(enc.model.pos_embed, src.pos_embed)
    convert(tmp_path / "sft.pth", tmp_path / "sft96.safetensors", preset="tiny", img_size=96)
    create_vim("tiny", img_size=96).load_state_dict(load_tensors(tmp_path / "sft96.safetensors"), strict=True)

    # a stage-1 ARM checkpoint: the bare encoder beside the ARM decoder, argparse args
    arm = create_vim("tiny", "pretrain", img_size=64)
    state = dict(arm.state_dict())
    state.update({"ar_token": torch.zeros(1, 1, 8), "dec_pos_embed": torch.zeros(1, 16, 8), "mask": torch.ones(8, 8),
                  "enc2dec.weight": torch.zeros(32, 256), "dec_block.0.mlp.fc1.weight": torch.zeros(4, 8),
                  "norm_1.weight": torch.ones(64), "ar_pred.bias": torch.zeros(768)})
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
                "args": argparse.Namespace(model="arm_base_pz16", blr=1.5e-4)}, tmp_path / "arm.pth")
    summary = convert(tmp_path / "arm.pth", tmp_path / "arm.safetensors", preset="tiny", variant="pretrain",
                      img_size=64)
    assert summary["dropped"]["arm_decoder_or_head"] == 7
    create_vim("tiny", "pretrain", img_size=64).load_state_dict(load_tensors(tmp_path / "arm.safetensors"),
                                                               strict=True)


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_converter_refuses_anything_but_tensors(tmp_path, capsys):
    good = create_vim("tiny", img_size=64).state_dict()
    cases = {
        "pickled_object": ({"model": {**good, "layers.0.mixer.D": _Payload()}}, "weights_only"),
        "non_tensor_value": ({"model": {**good, "layers.0.mixer.D": [1.0, 2.0]}}, "non-tensor"),
        "unexpected_key": ({"model": {**good, "layers.9.mixer.D": torch.ones(64)}}, "unexpected"),
        "missing_key": ({k: v for k, v in good.items() if k != "norm_f.weight"}, "missing"),
        "wrong_shape": ({**good, "layers.0.mixer.D": torch.ones(3)}, "wrong shape"),
    }
    for name, (obj, why) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        with pytest.raises(ConversionError, match=why):
            convert(tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors", preset="tiny", img_size=64)
        assert not (tmp_path / f"{name}.safetensors").exists()
    assert "this ran" not in capsys.readouterr().out
    rc = convert_main([str(tmp_path / "pickled_object.pth"), str(tmp_path / "x.safetensors"), "--preset", "tiny"])
    assert rc == 1 and "convert failed" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------------------- mamba_ssm (gpu)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(cuda_selective_scan() is None, reason="mamba_ssm's selective_scan_fn does not import")
def test_torch_scan_matches_mamba_ssm_kernel():
    kw = {k: (v.float().cuda() if isinstance(v, torch.Tensor) else v) for k, v in _scan_inputs(2, 64, 16, 197).items()}
    torch.testing.assert_close(selective_scan(**kw), cuda_selective_scan()(**kw), rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    ours = MambaMixer(64, d_state=16, scan="4way", backend="torch").cuda()
    kernel = MambaMixer(64, d_state=16, scan="4way", backend="cuda").cuda()
    kernel.load_state_dict(ours.state_dict())
    x = torch.randn(2, 197, 64, device="cuda", requires_grad=True)
    a, b = ours(x, grid=(14, 14), cls_index=98), kernel(x, grid=(14, 14), cls_index=98)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    ga, = torch.autograd.grad(a.square().sum(), x)
    gb, = torch.autograd.grad(b.square().sum(), x)
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-3)
