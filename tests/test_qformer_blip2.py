"""The Q-Former options (``qformer.kind``: scratch | blip2) and where eq. 11's orthogonality applies
(``classifier.ortho_on``), on tiny random models built here (nothing downloaded)."""

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel, Blip2Config, Blip2Model, Blip2QFormerModel, Blip2VisionConfig, OPTConfig

from amrg.io import save_tensors, write_json
from amrg.models.classifier import ClassifierSpec, DiseaseClassifier, classifier_loss
from amrg.models.load import load_classifier
from amrg.models.qformer import Blip2QFormer, blip2_config, build_qformer, orthogonality_loss
from amrg.tasks import ClassifierTask

TINY = dict(patch_size=16, embed_dim=32, depths=[2], num_heads=[2])  # Swin: 196 tokens of 32


def blip2_spec(**kw) -> ClassifierSpec:
    return ClassifierSpec("swin_tiny_patch4_window7_224", TINY, 224, 32, 2, 2, 14, "blip2", 2, **kw)


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_blip2_qformer_builds_runs_trains_one_step_and_reloads_from_its_spec(tmp_path):
    torch.manual_seed(0)
    model = DiseaseClassifier(blip2_spec())
    qf = model.qformer
    assert isinstance(qf, Blip2QFormer) and isinstance(qf.model, Blip2QFormerModel)
    cfg = qf.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.cross_attention_frequency,
            cfg.encoder_hidden_size, cfg.intermediate_size) == (32, 2, 2, 2, 32, 128)
    # cross-attention every 2nd layer: layer 0 reads the image tokens, layer 1 does not
    assert [hasattr(layer, "crossattention") for layer in qf.model.encoder.layer] == [True, False]
    assert qf.queries.shape == (14, 32) and model.spec.qformer_config["hidden_size"] == 32

    x, y = pixels(4), (torch.rand(4, 14) > 0.5).float()
    logits, fd = model(x, with_features=True)
    assert logits.shape == (4, 14) and fd.shape == (4, 14, 32)
    torch.testing.assert_close(logits, (fd * model.head_weight).sum(-1) + model.head_bias)

    task = ClassifierTask(model, x, y, np.arange(4), np.arange(4), 0.1, None, 4, torch.device("cpu"), "fp32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    task.batch_loss(model, (x, y)).backward()
    assert qf.queries.grad is not None and qf.token_proj[1].weight.grad.abs().sum() > 0
    assert qf.model.encoder.layer[0].crossattention.attention.key.weight.grad.abs().sum() > 0
    opt.step()
    after = model.state_dict()
    for k in ("qformer.queries", "qformer.token_proj.1.weight",
              "qformer.model.encoder.layer.1.output_query.dense.weight"):
        assert not torch.equal(before[k], after[k]), k

    # the stage's outputs: the spec (with the full Q-Former config) + the weights; load_classifier rebuilds it
    out = tmp_path / "classifier"
    save_tensors(out / "model.safetensors", model.state_dict())
    write_json(out / "config.json", {"spec": model.spec.to_dict(), "uncertain_as": "negative"})
    loaded = load_classifier(out, torch.device("cpu"))
    assert isinstance(loaded.qformer, Blip2QFormer) and loaded.spec == model.spec
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_scratch_spec_writes_the_keys_it_always_had_and_old_configs_load():
    old = {"vision_name": "swin_tiny_patch4_window7_224", "vision_kwargs": TINY, "img_size": 224, "qformer_dim": 32,
           "qformer_layers": 1, "qformer_heads": 4, "n_queries": 14}
    spec = ClassifierSpec(**old)
    assert spec.qformer_kind == "scratch" and spec.to_dict() == old
    assert set(blip2_spec().to_dict()) == set(old) | {"qformer_kind", "qformer_cross_attention_frequency",
                                                       "qformer_config"}
    with pytest.raises(ValueError, match="kind=scratch"):
        build_qformer(32, "scratch", pretrained="somewhere")


def test_blip2_weights_from_a_local_dir_give_identical_outputs(tmp_path):
    torch.manual_seed(1)
    ref = Blip2QFormerModel(blip2_config(32, 2, 2, 2)).eval()
    ref.save_pretrained(tmp_path / "qformer")
    model = DiseaseClassifier(blip2_spec(), qformer_pretrained=str(tmp_path / "qformer")).eval()
    qf = model.qformer
    for k, v in ref.state_dict().items():
        assert torch.equal(qf.model.state_dict()[k], v), k
    tokens = torch.randn(3, 196, 32)
    with torch.no_grad():
        want = ref(query_embeds=qf.queries.expand(3, -1, -1), encoder_hidden_states=qf.token_proj(tokens))
        torch.testing.assert_close(qf(tokens), want.last_hidden_state, rtol=0, atol=0)
    assert model.spec.qformer_config["_name_or_path"] == str(tmp_path / "qformer")  # provenance in the spec
    # the size params must be the checkpoint's
    with pytest.raises(ValueError, match="qformer.layers: 2"):
        build_qformer(32, "blip2", 32, 3, 2, 14, 2, pretrained=str(tmp_path / "qformer"))


def test_blip2_qformer_weights_from_a_whole_blip2_checkpoint(tmp_path):
    """A BLIP-2 checkpoint keeps the Q-Former under ``qformer.``: loaded as is, transformers would
    initialise every weight randomly; here they are the checkpoint's."""
    torch.manual_seed(2)
    qc = blip2_config(32, 2, 2, 2).to_dict() | {"encoder_hidden_size": 24}
    full = Blip2Model(Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
        qformer_config=qc, num_query_tokens=4,
        text_config=OPTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=50,
                              word_embed_proj_dim=16)))
    full.save_pretrained(tmp_path / "blip2")
    qf = build_qformer(32, "blip2", 32, 2, 2, 14, 2, pretrained=str(tmp_path / "blip2"))
    assert qf.model.config.encoder_hidden_size == 24 and qf.token_proj[1].out_features == 24
    want = {k.removeprefix("qformer."): v for k, v in full.state_dict().items() if k.startswith("qformer.")}
    got = qf.model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert qf.model.training  # like any new module; fit switches modes

    # a checkpoint of another model has no Q-Former weights: refused, not silently random
    BertModel(BertConfig(vocab_size=20, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not in the checkpoint"):
        build_qformer(32, "blip2", 32, 1, 2, 14, 2, pretrained=str(tmp_path / "bert"))


def test_orthogonality_on_features_and_on_queries_by_hand():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    queries = torch.tensor([e1, e2, e1])  # one parallel pair of 3: off-diagonal cos² sum 2 over 3·2 entries
    assert orthogonality_loss(queries).item() == pytest.approx(2 / 6)
    features = torch.stack([queries, torch.ones(3, 2)])  # image 2: every pair parallel -> 1
    assert orthogonality_loss(features).item() == pytest.approx((2 / 6 + 1.0) / 2)
    assert orthogonality_loss(features[:1]).item() == pytest.approx(orthogonality_loss(queries).item())

    logits = torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    bce = -np.mean([np.log(0.5), np.log(1 / (1 + np.exp(-2))), np.log(1 - 1 / (1 + np.exp(1))),
                    np.log(1 / (1 + np.exp(-1))), np.log(0.5), np.log(0.5)])
    loss, parts = classifier_loss(logits, targets, features, 0.5)
    assert parts["ortho"] == pytest.approx(2 / 3) and loss.item() == pytest.approx(bce + 0.5 * 2 / 3, rel=1e-6)
    loss, parts = classifier_loss(logits, targets, queries, 0.5)
    assert parts["ortho"] == pytest.approx(1 / 3) and loss.item() == pytest.approx(bce + 0.5 / 3, rel=1e-6)


@pytest.mark.parametrize("kind", ["scratch", "blip2"])
def test_the_task_applies_orthogonality_where_ortho_on_says_and_reports_its_terms(kind):
    torch.manual_seed(3)
    spec = blip2_spec() if kind == "blip2" else ClassifierSpec("swin_tiny_patch4_window7_224", TINY, 224, 32, 1, 4)
    model = DiseaseClassifier(spec).eval()  # no dropout: the loss is a function of the weights
    x, y = pixels(3, seed=4), (torch.rand(3, 14) > 0.5).float()
    logits, fd = model(x, with_features=True)
    for on, rows in (("queries", model.qformer.queries), ("features", fd)):
        task = ClassifierTask(model, x, y, np.arange(3), np.arange(3), 0.3, None, 3, torch.device("cpu"), "fp32",
                              ortho_on=on)
        want, parts = classifier_loss(logits, y, rows, 0.3)
        torch.testing.assert_close(task.batch_loss(model, (x, y)), want)
        task.batch_loss(model, (x[:1], y[:1]))  # a second batch of 1: the record is the image-weighted mean
        one = classifier_loss(logits[:1], y[:1], fd[:1] if on == "features" else rows, 0.3)[1]
        row = task.validate()
        assert row["train_ortho"] == pytest.approx((3 * parts["ortho"] + one["ortho"]) / 4, rel=1e-5)
        assert row["train_bce"] == pytest.approx((3 * parts["bce"] + one["bce"]) / 4, rel=1e-5)
        assert "train_ortho" not in task.validate()  # reset: nothing trained since
    with pytest.raises(ValueError, match="ortho_on"):
        ClassifierTask(model, x, y, np.arange(3), np.arange(3), 0.3, None, 3, torch.device("cpu"), "fp32",
                       ortho_on="both")
