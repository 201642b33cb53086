"""The generator-side vision encoder (``generator_vision``, seed 002 C0/C4) and ``generator.query_tokens``, through
the ``train_generator`` stage itself on a tiny workspace (the classifier, banks and stats of
:func:`tests._tiny_run.build_tiny_run`, six studies of random pixels): the default run is the committed
stage's, weight for weight; a trainable timm encoder gets gradient, changes, is saved and rebuilt by
``load_run`` into the model that was trained; a frozen one is cached and unchanged; ``pretrained`` reads the
pre-training chain's backbone + encoder.json and says how to make them when absent; without query tokens the
prefix is 14 tokens shorter and generation still works."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from amrg.config import Decode, GeneratorVision
from amrg.inference import load_run
from amrg.io import load_tensors, read_json, save_tensors, write_json, write_parquet
from amrg.labels.schema import LABEL_COLUMNS, TARGET_COLUMNS
from amrg.layout import Layout, MissingArtifacts
from amrg.models.features import VISION_WEIGHTS, visual_tokens
from amrg.models.load import build_generator_vision
from amrg.models.vision import VisionEncoder
from amrg.tasks import GeneratorTask

from ._tiny_run import ROOT, build_tiny_run

CPU = torch.device("cpu")
SIZE = 224  # the tiny run's classifier reads 224 px
VIM = "amrg_vim_tiny_pz16"
VIM_SIZE = 32  # the encoder's own size: the stage resizes the 224-px views on the device (2 x 2 tokens)
REPORTS = ["the heart is enlarged .", "the lungs are clear .", "no pneumothorax .",
           "mild pulmonary edema .", "the heart is enlarged . the lungs are clear .", "small left effusion ."]
SPLITS = ["train"] * 4 + ["val"] * 2
GREEDY = Decode(num_beams=1, max_new_tokens=4, min_new_tokens=1)
# the committed stage's (HEAD 53179a0) default run of this workspace: sum of its saved weights, of their squares,
# and the kept epoch's val loss (recomputed by running that commit's stages/train_generator.py on it)
HEAD_DEFAULT = (195.9149537772082, 262.79946473796497, 2.8246476650238037)


def _workspace(tmp: Path) -> tuple[Layout, Path]:
    """The tiny run's classifier/banks + preprocess outputs of six two-view studies; the params file of a
    one-epoch tiny generator."""
    root = build_tiny_run(tmp / "artifacts")
    layout = Layout(root, tmp / "checkpoints")
    n = len(REPORTS)
    zeros = {c: [0.0] * n for c in (*LABEL_COLUMNS, *TARGET_COLUMNS)}
    write_parquet(layout.studies, {"id": [f"s{i}" for i in range(n)], "split": SPLITS, "report": REPORTS, **zeros})
    write_parquet(layout.images, {"study_id": [f"s{i // 2}" for i in range(2 * n)], "view": [i % 2 for i in range(2 * n)],
                                  "split": [SPLITS[i // 2] for i in range(2 * n)]})
    g = torch.Generator().manual_seed(0)
    np.save(layout.pixels, torch.randint(0, 256, (2 * n, SIZE, SIZE), generator=g, dtype=torch.uint8).numpy())
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["runtime"].update(device="cpu")
    p["llm"].update(hidden_size=32, layers=1, heads=2, intermediate_size=64, min_word_freq=1)
    p["hopfield"].update(dim=16)
    p["generator"].update(epochs=2, batch_size=2, max_report_tokens=6, warmup_steps=0, select="val_loss",
                          balance=0.0, prompt="Generate a report .", visual_pool=4)
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(p))
    return layout, params


def _set(params: Path, section: str, **kw) -> None:
    p = yaml.safe_load(params.read_text())
    p[section].update(kw)
    params.write_text(yaml.safe_dump(p))


def _train(layout: Layout, params: Path) -> dict:
    from stages.train_generator import main

    main(["--params", str(params), "--artifacts", str(layout.root), "--checkpoints", str(layout.checkpoints)])
    return read_json(layout.stage_dir("train_generator") / "metrics.json")


def _views(layout: Layout) -> tuple[torch.Tensor, np.ndarray]:
    pixels = torch.from_numpy(np.load(layout.pixels))
    return pixels, np.arange(2 * len(REPORTS)).reshape(-1, 2)


def _timm(trainable: bool, **kw) -> dict:
    return dict(source="timm", name=VIM, kwargs={"img_size": VIM_SIZE}, trainable=trainable, **kw)


def test_default_run_is_the_committed_stage(tmp_path):
    layout, params = _workspace(tmp_path)
    metrics = _train(layout, params)
    w = load_tensors(layout.generator_weights)
    spec = read_json(layout.generator_config)["spec"]
    assert spec["vision"] is None and spec["query_tokens"] is True
    assert not (layout.stage_dir("train_generator") / VISION_WEIGHTS).exists()
    assert metrics["generator_vision"] == "classifier" and metrics["vision_trainable_parameters"] == 0
    # llm.trainable full: every parameter of the generator is trained and saved, so the two counts agree
    assert metrics["vision_parameters"] == 0 and metrics["total_parameters"] == metrics["trainable_parameters"] > 0
    got = (sum(float(v.double().sum()) for v in w.values()), sum(float(v.double().square().sum()) for v in w.values()),
           metrics["best_val_loss"])
    assert got == pytest.approx(HEAD_DEFAULT, rel=1e-6)


def test_trainable_timm_encoder_is_trained_saved_and_rebuilt(tmp_path):
    layout, params = _workspace(tmp_path)
    _set(params, "generator_vision", **_timm(True, lr=1e-2))
    # the encoder the stage starts from: built from the same params and seed, before training
    start = build_generator_vision(GeneratorVision(**_timm(True, lr=1e-2)), layout, SIZE, 4, "concat", 0)[1]
    metrics = _train(layout, params)
    n_vim = sum(p.numel() for p in start.parameters())
    assert metrics["generator_vision"] == "timm" and metrics["vision_trainable_parameters"] == n_vim > 0
    n_generator = sum(v.numel() for v in load_tensors(layout.generator_weights).values())
    assert metrics["trainable_parameters"] == n_generator + n_vim  # the generator's weights and the trained encoder's
    saved = load_tensors(layout.stage_dir("train_generator") / VISION_WEIGHTS)
    before = start.encoder.state_dict()
    assert saved.keys() == before.keys()
    changed = [k for k in saved if not torch.equal(saved[k], before[k])]
    assert len(changed) > len(saved) // 2, "the encoder's weights barely moved: no gradient reached it"
    assert not (layout.checkpoints / "train_generator" / "features" / "train" / "F.npy").exists()

    run = load_run(layout, CPU)
    assert run.vision is not None and run.spec.vision.name == VIM and run.spec.vision.image_size == VIM_SIZE
    pixels, view_rows = _views(layout)
    f, fd = run.features(pixels, view_rows, 4)
    # F by hand: the saved encoder on each view resized to 32 px, pooled and concatenated as the classifier's
    enc = VisionEncoder(VIM, img_size=VIM_SIZE).eval()
    enc.load_state_dict(saved)
    small = torch.nn.functional.interpolate(pixels.float().unsqueeze(1), size=(VIM_SIZE, VIM_SIZE), mode="bilinear",
                                            antialias=True, align_corners=False).squeeze(1)
    with torch.no_grad():
        hand = visual_tokens(enc(small[view_rows.reshape(-1)]), enc.grid, len(view_rows), 4, "concat")
    assert f.shape == (len(REPORTS), 2 * 1, enc.num_features) and torch.allclose(f, hand, atol=1e-5)
    # F_d is the classifier's (the generator-side encoder does not touch it)
    with torch.no_grad():
        _, fd_hand = run.classifier.features(pixels[view_rows.reshape(-1)])
    assert torch.allclose(fd, fd_hand.reshape(len(REPORTS), 2, *fd_hand.shape[1:]).mean(1), atol=1e-5)
    # the rebuilt generator + encoder is the trained one: the kept weights give the same val loss and reports
    reports = run.generate(f, fd, GREEDY, 4)
    assert len(reports) == len(REPORTS) and all(isinstance(r, str) for r in reports)
    task = GeneratorTask(run.generator, {"train": (None, fd[:4]), "val": (None, fd[4:])},
                         {"train": REPORTS[:4], "val": REPORTS[4:]}, 6, 2, CPU, "fp32", vision=run.vision,
                         view_pixels={"train": (pixels, view_rows[:4]), "val": (pixels, view_rows[4:])})
    assert task.validate()["val_loss"] == pytest.approx(metrics["best_val_loss"], rel=1e-5)


def test_trainable_encoder_gets_its_gradient_and_lr(tmp_path):
    """One training step through the task's trainee: the encoder's parameters receive a gradient, and
    fit puts them in their own param group at generator_vision.lr."""
    from amrg.models.generator import GeneratorSpec, create_generator
    from amrg.train import LoopConfig, param_groups

    layout, _ = _workspace(tmp_path)
    spec, tower = build_generator_vision(GeneratorVision(**_timm(True)), layout, SIZE, 4, "concat", 0)
    run = load_run(layout, CPU)
    gspec = GeneratorSpec(**{**run.spec.__dict__, "visual_dim": tower.width, "vision": spec})
    gen = create_generator(gspec, None, None, train_texts=REPORTS)
    pixels, view_rows = _views(layout)
    fd = torch.randn(len(REPORTS), 14, run.spec.query_dim)
    task = GeneratorTask(gen, {"train": (None, fd[:4]), "val": (None, fd[4:])},
                         {"train": REPORTS[:4], "val": REPORTS[4:]}, 6, 2, CPU, "fp32", vision=tower,
                         view_pixels={"train": (pixels, view_rows[:4]), "val": (pixels, view_rows[4:])})
    batch = next(iter(task.loader([torch.tensor([0, 2])])))
    assert torch.equal(batch[1], pixels[view_rows[[0, 2]].reshape(-1)].reshape(2, 2, SIZE, SIZE))
    loss, _ = task.batch_loss(task.trainee, batch)
    loss.backward()
    grads = [p.grad for p in tower.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    names = [n for n, p in task.trainee.named_parameters() if p.requires_grad]
    params = [p for p in task.trainee.parameters() if p.requires_grad]
    groups = param_groups(names, params, LoopConfig(1, 2, 1e-4, lr_by_prefix={"vision.": 3e-5}))
    vision_group = next(g for g in groups if g.get("lr") == 3e-5)
    assert {id(p) for p in vision_group["params"]} == {id(p) for p in tower.parameters()}


def test_frozen_timm_encoder_is_cached_and_unchanged(tmp_path):
    layout, params = _workspace(tmp_path)
    _set(params, "generator_vision", **_timm(False))
    start = build_generator_vision(GeneratorVision(**_timm(False)), layout, SIZE, 4, "concat", 0)[1]
    metrics = _train(layout, params)
    assert metrics["vision_trainable_parameters"] == 0 and metrics["vision_parameters"] > 0
    saved = load_tensors(layout.stage_dir("train_generator") / VISION_WEIGHTS)
    assert all(torch.equal(saved[k], v) for k, v in start.encoder.state_dict().items())
    run = load_run(layout, CPU)
    pixels, view_rows = _views(layout)
    f, _ = run.features(pixels, view_rows, 4)
    with torch.no_grad():
        hand = start(pixels[view_rows.reshape(-1)].reshape(len(REPORTS), 2, SIZE, SIZE))
    assert torch.allclose(f, hand, atol=1e-5)  # the cached F was this frozen encoder's (the run trained on it)


def test_pretrained_encoder_reads_the_chain_and_errors_clearly_when_absent(tmp_path):
    layout, params = _workspace(tmp_path)
    _set(params, "generator_vision", source="pretrained")
    _set(params, "pretrain_contrastive", enabled=True)
    with pytest.raises(MissingArtifacts, match=r"dvc repro pretrain_contrastive.*") as err:
        _train(layout, params)
    assert "pretrain_contrastive.enabled" in str(err.value) and "pretrain_vision.objective" in str(err.value)

    # the chain's output: a fine-tune-form tiny Vim backbone (timm model keys) and its encoder.json
    torch.manual_seed(3)
    kwargs = {"scan": "4way", "cls_position": "middle"}
    backbone = VisionEncoder(VIM, img_size=VIM_SIZE, **kwargs)
    weights, meta = layout.pretrained_encoder()
    save_tensors(weights, backbone.model.state_dict())
    write_json(meta, {"name": VIM, "kwargs": kwargs, "image_size": VIM_SIZE, "form": "finetune"})
    metrics = _train(layout, params)
    assert metrics["generator_vision"] == "pretrained" and metrics["vision_trainable_parameters"] == 0
    spec = read_json(layout.generator_config)["spec"]["vision"]
    assert spec == {"source": "pretrained", "name": VIM, "kwargs": kwargs, "image_size": VIM_SIZE, "trainable": False}
    saved = load_tensors(layout.stage_dir("train_generator") / VISION_WEIGHTS)
    assert all(torch.equal(saved[k], v) for k, v in backbone.state_dict().items())  # the backbone, frozen
    weights.unlink(), meta.unlink()  # inference does not depend on the pre-training outputs
    run = load_run(layout, CPU)
    pixels, view_rows = _views(layout)
    assert len(run.generate(*run.features(pixels, view_rows, 4), GREEDY, 4)) == len(REPORTS)


def test_without_query_tokens_the_prefix_is_14_shorter_and_generates(tmp_path):
    layout, params = _workspace(tmp_path)
    pixels, view_rows = _views(layout)
    lengths = {}
    for on in (True, False):
        _set(params, "generator", query_tokens=on)
        _train(layout, params)
        run = load_run(layout, CPU)
        assert run.spec.query_tokens is on and (run.generator.proj_query is None) is (not on)
        f, fd = run.features(pixels, view_rows, 4)
        with torch.no_grad():
            prefix = run.generator.prefix(f, fd)
            if not on:  # [BOS, F, F', prompt] by hand: Q's 14 rows are the only ones missing
                g = run.generator
                enhanced = torch.stack([g.v_hopfield(fd), g.r_hopfield(fd)], 2).flatten(1, 2)
                image = torch.cat([g.proj_visual(f), enhanced], 1)
                assert torch.allclose(prefix[:, 1:1 + image.shape[1]], image, atol=1e-6)
        lengths[on] = prefix.shape[1]
        assert len(run.generate(f, fd, GREEDY, 4)) == len(REPORTS)
    assert lengths[True] - lengths[False] == 14
    assert not any(k.startswith("proj_query") for k in load_tensors(layout.generator_weights))


def test_old_spec_without_the_new_fields_loads(tmp_path):
    layout, _ = _workspace(tmp_path)
    cfg = read_json(layout.generator_config)
    for key in ("vision", "query_tokens"):  # a config.json written before these fields existed
        del cfg["spec"][key]
    write_json(layout.generator_config, cfg)
    run = load_run(layout, CPU)
    assert run.vision is None and run.spec.query_tokens is True and run.generator.proj_query is not None
    assert math.isfinite(float(run.features(*_views(layout), 4)[0].sum()))
    json.dumps(run.spec.to_dict())
