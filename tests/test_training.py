"""The shared training loop resumes exactly; the generator trains only what it should."""

import pytest
import torch

from amrg.config import Decode, Hopfield, Llm
from amrg.models.generator import ReportGenerator
from amrg.models.llm import build_llm, load_llm, save_llm_spec
from amrg.train import LoopConfig, StopAfter, fit


def _problem(seed=0):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    loss = lambda m, b: torch.nn.functional.mse_loss(m(x[b]), y[b])  # noqa: E731
    val = lambda: {"val_loss": torch.nn.functional.mse_loss(model.eval()(x), y).item()}  # noqa: E731
    return model, loss, val


def test_killed_run_resumes_to_identical_weights(tmp_path):
    cfg = LoopConfig(epochs=3, batch_size=8, lr=0.01, warmup_steps=2, checkpoint_every=3, seed=5)
    model, loss, val = _problem()
    ref_best, ref_hist = fit(model, 64, loss, val, cfg, tmp_path / "a.pt", "fp")

    model, loss, val = _problem()
    with pytest.raises(StopAfter):
        fit(model, 64, loss, val, cfg, tmp_path / "b.pt", "fp", stop_after_steps=11)  # mid epoch 2
    assert (tmp_path / "b.pt").exists()
    model, loss, val = _problem(seed=123)  # a fresh process: different init, state comes from the checkpoint
    best, hist = fit(model, 64, loss, val, cfg, tmp_path / "b.pt", "fp")
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for k in ref_best:
        torch.testing.assert_close(best[k], ref_best[k])
    assert not (tmp_path / "b.pt").exists()  # done: the checkpoint is consumed


def test_stale_checkpoint_is_ignored(tmp_path):
    cfg = LoopConfig(epochs=1, batch_size=8, lr=0.01, checkpoint_every=2)
    model, loss, val = _problem()
    with pytest.raises(StopAfter):
        fit(model, 64, loss, val, cfg, tmp_path / "c.pt", "old", stop_after_steps=3)
    model, loss, val = _problem()
    _, hist = fit(model, 64, loss, val, cfg, tmp_path / "c.pt", "new")
    assert len(hist) == 1


def test_nonfinite_loss_raises(tmp_path):
    model, _, val = _problem()
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        fit(model, 64, lambda m, b: torch.tensor(float("nan"), requires_grad=True), val,
            LoopConfig(epochs=1, batch_size=8, lr=0.01), tmp_path / "d.pt", "fp")


REPORTS = ["the heart is normal . the lungs are clear .", "no pleural effusion . heart size is normal .",
           "there is a left pleural effusion .", "the lungs are clear . no pneumothorax ."] * 4
PROMPT = "Generate a report ."


def _generator(hop=Hopfield(dim=16, beta=4.0), visual=True, report=True, trainable="full"):
    torch.manual_seed(0)
    llm, tok = build_llm(Llm(source="scratch", trainable="full", hidden_size=32, layers=1, heads=2,
                             intermediate_size=64, min_word_freq=1), REPORTS, PROMPT)
    if trainable == "none":
        for p in llm.parameters():
            p.requires_grad_(False)
    vb = torch.randn(12, 24) if visual else None
    rb = torch.randn(9, 40) if report else None
    return ReportGenerator(llm, tok, 24, 16, vb, rb, hop, PROMPT), tok


def _batch(tok, n=2):
    ids = tok(REPORTS[:n], add_special_tokens=False)["input_ids"]
    width = max(map(len, ids)) + 1
    out = torch.full((n, width), tok.pad_token_id)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, x in enumerate(ids):
        x = x + [tok.eos_token_id]
        out[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    return torch.randn(n, 6, 24), torch.randn(n, 14, 16), out, mask


def test_prefix_layout_follows_eq10():
    gen, tok = _generator()
    f, fd, _, _ = _batch(tok)
    n_prompt = len(tok(PROMPT, add_special_tokens=False)["input_ids"]) + 1  # + BOS
    assert gen.prefix(f, fd).shape == (2, 6 + 14 + 28 + n_prompt, 32)
    gen_v, _ = _generator(report=False)
    assert gen_v.prefix(f, fd).shape[1] == 6 + 14 + 14 + n_prompt
    gen_0, _ = _generator(visual=False, report=False)
    assert gen_0.prefix(f, fd).shape[1] == 6 + 14 + n_prompt


def test_loss_only_on_report_tokens_and_overfits():
    gen, tok = _generator()
    f, fd, ids, mask = _batch(tok)
    # changing a padded position after EOS must not change the loss
    l1 = gen(f, fd, ids, mask)
    ids2 = ids.clone()
    ids2[mask == 0] = 5
    assert gen(f, fd, ids2, mask).item() == pytest.approx(l1.item(), abs=1e-6)
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        loss = gen(f, fd, ids, mask)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    out = gen.generate(f, fd, Decode(num_beams=2, max_new_tokens=20))
    assert out == [REPORTS[0], REPORTS[1]]


def test_frozen_llm_is_not_saved_and_weights_round_trip(tmp_path):
    gen, tok = _generator(trainable="none")
    state = gen.trainable_state_dict()
    assert state and not any(k.startswith("llm.") for k in state)
    assert any(k.startswith("v_hopfield.") for k in state) and any(k.startswith("r_hopfield.") for k in state)
    assert not any("memory" in k for k in state)
    gen2, _ = _generator(trainable="none")
    gen2.load_trainable(state)
    with pytest.raises(ValueError, match="missing"):
        gen2.load_trainable({k: v for k, v in list(state.items())[1:]})


def test_scratch_llm_spec_round_trip(tmp_path):
    cfg = Llm(source="scratch", trainable="full", hidden_size=32, layers=1, heads=2, intermediate_size=64)
    llm, tok = build_llm(cfg, REPORTS, PROMPT)
    save_llm_spec(tmp_path, cfg, llm, tok)
    llm2, tok2 = load_llm(tmp_path, {"source": "scratch", "name": "", "trainable": "full"})
    assert tok2.get_vocab() == tok.get_vocab() and llm2.config.hidden_size == 32
    assert tok2.decode(tok2("the heart is normal .")["input_ids"]) == "the heart is normal ."


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        llm, tok = build_llm(Llm(source="scratch", trainable="full", hidden_size=32, layers=2, heads=2,
                                 intermediate_size=64, min_word_freq=1, gradient_checkpointing=ckpt), REPORTS, PROMPT)
        assert llm.is_activation_checkpointing == ckpt
        gen = ReportGenerator(llm, tok, 24, 16, torch.randn(12, 24), torch.randn(9, 40), Hopfield(dim=16), PROMPT)
        gen.train()
        torch.manual_seed(1)
        gen(*_batch(tok)).backward()
        grads.append({n: p.grad.clone() for n, p in gen.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)
