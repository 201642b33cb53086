"""The shared training loop resumes exactly; the generator trains only what it should."""

import pytest
import torch

from amrg.config import Decode, Hopfield, Llm
from amrg.io import load_checkpoint, load_tensors, save_tensors
from amrg.models.generator import ReportGenerator
from amrg.models.llm import create_llm, save_llm
from amrg.train import LoopConfig, fit

REPORTS = ["the heart is normal . the lungs are clear .", "no pleural effusion . heart size is normal .",
           "there is a left pleural effusion .", "the lungs are clear . no pneumothorax ."] * 4
PROMPT = "Generate a report ."
TINY_LLM = dict(source="scratch", trainable="full", hidden_size=32, layers=1, heads=2, intermediate_size=64,
                min_word_freq=1)


def make_generator(llm: Llm, visual_bank: torch.Tensor | None, report_bank: torch.Tensor | None, hopfield: Hopfield,
                   *, visual_dim: int = 24, query_dim: int = 16, prompt: str = PROMPT, texts=REPORTS,
                   index: dict | None = None) -> ReportGenerator:
    """The one place the generator tests build an LLM and a ReportGenerator (test_hopfield_topk and
    test_paper_path import it): ``llm`` is the LLM section (a scratch LM's tokenizer is trained on
    ``texts``), the banks are the switched-on memories (None: off)."""
    model, tokenizer = create_llm(llm, train_texts=texts if llm.source == "scratch" else None, prompt=prompt)
    return ReportGenerator(model, tokenizer, visual_dim, query_dim, visual_bank, report_bank, hopfield, prompt,
                           index)


def _problem(seed=0):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    loss = lambda m, b: torch.nn.functional.mse_loss(m(x[b]), y[b])  # noqa: E731
    val = lambda: {"val_loss": torch.nn.functional.mse_loss(model.eval()(x), y).item()}  # noqa: E731
    return model, loss, val


class Killed(Exception):
    """Stands for a kill -9 in the middle of a training step (the process dies inside ``batch_loss``)."""


def _killed_at_step(loss, step):
    """``loss`` that dies during optimizer step ``step`` (1-based, one batch per step)."""
    calls = [0]

    def batch_loss(m, b):
        calls[0] += 1
        if calls[0] == step:
            raise Killed(f"killed in step {step}")
        return loss(m, b)
    return batch_loss


def test_killed_run_resumes_to_identical_weights(tmp_path):
    cfg = LoopConfig(epochs=3, batch_size=8, lr=0.01, warmup_steps=2, checkpoint_every=3, seed=5)
    ref_model, loss, val = _problem()
    ref = fit(ref_model, 64, loss, val, cfg, tmp_path / "a.pt", "fp")

    model, loss, val = _problem()
    with pytest.raises(Killed):
        fit(model, 64, _killed_at_step(loss, 12), val, cfg, tmp_path / "b.pt", "fp")
    # 8 steps per epoch: the last checkpoint is step 9, epoch 2 batch 1 (steps 10-11 are lost)
    loop = load_checkpoint(tmp_path / "b.pt")["loop"]
    assert (loop["step"], loop["epoch"], loop["batch"]) == (9, 1, 1)
    model, loss, val = _problem(seed=123)  # a fresh process: different init, state comes from the checkpoint
    res = fit(model, 64, loss, val, cfg, tmp_path / "b.pt", "fp")
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert res.best["epoch"] == ref.best["epoch"]
    for k in ref.best_state:
        torch.testing.assert_close(res.best_state[k], ref.best_state[k])
    for k, v in model.state_dict().items():  # the final weights, not only the kept epoch's
        torch.testing.assert_close(v, ref_model.state_dict()[k])
    assert not (tmp_path / "b.pt").exists()  # done: the checkpoint is consumed


def test_stale_checkpoint_is_ignored(tmp_path):
    cfg = LoopConfig(epochs=1, batch_size=8, lr=0.01, checkpoint_every=2)
    model, loss, val = _problem()
    old = LoopConfig(epochs=1, batch_size=8, lr=0.5, checkpoint_every=2)  # other params: another fingerprint
    with pytest.raises(Killed):
        fit(model, 64, _killed_at_step(loss, 4), val, old, tmp_path / "c.pt", "old")
    assert load_checkpoint(tmp_path / "c.pt")["loop"]["step"] == 2
    model, loss, val = _problem()
    res = fit(model, 64, loss, val, cfg, tmp_path / "c.pt", "new")
    clean_model, loss, val = _problem()
    fit(clean_model, 64, loss, val, cfg, tmp_path / "d.pt", "new")
    assert len(res.history) == 1
    for k, v in model.state_dict().items():  # trained from scratch, not from the stale lr=0.5 state
        torch.testing.assert_close(v, clean_model.state_dict()[k])


def test_nonfinite_loss_raises(tmp_path):
    model, _, val = _problem()
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        fit(model, 64, lambda m, b: torch.tensor(float("nan"), requires_grad=True), val,
            LoopConfig(epochs=1, batch_size=8, lr=0.01), tmp_path / "d.pt", "fp")


def _generator(hop=Hopfield(dim=16, beta=4.0), visual=True, report=True, trainable="full"):
    """A tiny generator; the same arguments give the same weights and banks."""
    g = torch.Generator().manual_seed(0)
    vb = torch.randn(12, 24, generator=g) if visual else None
    rb = torch.randn(9, 40, generator=g) if report else None
    torch.manual_seed(0)
    gen = make_generator(Llm(**{**TINY_LLM, "trainable": trainable}), vb, rb, hop)
    return gen, gen.tokenizer


def _batch(tok, n=2):
    ids = tok(REPORTS[:n], add_special_tokens=False)["input_ids"]
    width = max(map(len, ids)) + 1
    out = torch.full((n, width), tok.pad_token_id)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, x in enumerate(ids):
        x = x + [tok.eos_token_id]
        out[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    return torch.randn(n, 6, 24), torch.randn(n, 14, 16), out, mask


def _prompt_embeddings(gen, tok):
    """The prompt's token embeddings, from the tokenizer (not the model's stored ids)."""
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"]
    return gen.llm.get_input_embeddings()(torch.tensor(ids))


def _bos_embedding(gen, tok):
    return gen.llm.get_input_embeddings()(torch.tensor(tok.bos_token_id))


@torch.no_grad()
def test_prefix_layout_follows_eq10():
    """eq. 10 in the default template: [BOS, F (6 visual tokens), Q (14), F' (per disease k: V-Hopfield row,
    R-Hopfield row), prompt] (the template's text: tests/test_generator_input.py)."""
    gen, tok = _generator()
    f, fd, _, _ = _batch(tok)
    prompt = _prompt_embeddings(gen, tok)
    n_prompt = len(prompt)
    prefix = gen.prefix(f, fd)
    assert prefix.shape == (2, 1 + 6 + 14 + 28 + n_prompt, 32)
    torch.testing.assert_close(prefix[:, 0], _bos_embedding(gen, tok).expand(2, -1))
    torch.testing.assert_close(prefix[:, 1:7], gen.proj_visual(f))
    torch.testing.assert_close(prefix[:, 7:21], gen.proj_query(fd))
    v, r = gen.v_hopfield(fd), gen.r_hopfield(fd)
    assert v.shape == r.shape == (2, 14, 32) and not torch.allclose(v, r)
    for k in range(14):  # eq. 8-9, interleaved per disease
        torch.testing.assert_close(prefix[:, 21 + 2 * k], v[:, k])
        torch.testing.assert_close(prefix[:, 22 + 2 * k], r[:, k])
    torch.testing.assert_close(prefix[:, 49:], prompt.expand(2, -1, -1))
    # the same layout with one memory, and with none (Table IV ablations)
    gen_v, _ = _generator(report=False)
    prefix = gen_v.prefix(f, fd)
    assert prefix.shape[1] == 1 + 6 + 14 + 14 + n_prompt
    torch.testing.assert_close(prefix[:, 0], _bos_embedding(gen_v, tok).expand(2, -1))
    torch.testing.assert_close(prefix[:, 1:7], gen_v.proj_visual(f))
    torch.testing.assert_close(prefix[:, 7:21], gen_v.proj_query(fd))
    torch.testing.assert_close(prefix[:, 21:35], gen_v.v_hopfield(fd))
    torch.testing.assert_close(prefix[:, 35:], _prompt_embeddings(gen_v, tok).expand(2, -1, -1))
    gen_0, _ = _generator(visual=False, report=False)
    prefix = gen_0.prefix(f, fd)
    assert prefix.shape[1] == 1 + 6 + 14 + n_prompt
    torch.testing.assert_close(prefix[:, 21:], _prompt_embeddings(gen_0, tok).expand(2, -1, -1))


def test_enhanced_tokens_interleave_v_and_r_per_disease():
    from amrg.models.generator import enhanced_tokens

    gen, _ = _generator()
    fd = torch.randn(3, 14, 16)
    with torch.no_grad():
        v, r = gen.v_hopfield(fd), gen.r_hopfield(fd)
        both = enhanced_tokens(gen.v_hopfield, gen.r_hopfield, fd)
        assert both.shape == (3, 28, 32)
        torch.testing.assert_close(both[:, 0::2], v)
        torch.testing.assert_close(both[:, 1::2], r)
        torch.testing.assert_close(enhanced_tokens(gen.v_hopfield, None, fd), v)
        torch.testing.assert_close(enhanced_tokens(None, gen.r_hopfield, fd), r)
    assert enhanced_tokens(None, None, fd) is None


def test_loss_is_eq12_cross_entropy_over_report_tokens_only():
    """The loss is a hand cross-entropy over the report tokens (EOS included, padding excluded), from
    the LLM's own logits on [prefix, report]; prefix and prompt positions carry no loss."""
    gen, tok = _generator()
    f, fd, ids, mask = _batch(tok, n=3)
    assert (mask == 0).any()  # the batch has padding after EOS
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(20):  # away from the init, where every token's loss is about log(vocab)
        opt.zero_grad()
        gen(f, fd, ids, mask).backward()
        opt.step()
    gen.eval()
    loss = gen(f, fd, ids, mask)
    with torch.no_grad():
        prefix = gen.prefix(f, fd)
        p, n = prefix.shape[1], ids.shape[1]
        embeds = torch.cat([prefix, gen.llm.get_input_embeddings()(ids)], dim=1)
        attn = torch.cat([torch.ones(3, p, dtype=mask.dtype), mask], dim=1)
        logits = gen.llm(inputs_embeds=embeds, attention_mask=attn).logits.float()
    # position t predicts token t+1: positions p-1 (the last prompt token) .. p+n-2 predict report tokens 0 .. n-1
    keep = mask.bool()
    by_hand = torch.nn.functional.cross_entropy(logits[:, p - 1:p + n - 1][keep], ids[keep])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    # the comparison is sharp: reading the logits one position late (the last prefix position not
    # predicting the first report token), or also scoring the prompt (each prompt token predicting the
    # next one), gives another number
    late = torch.nn.functional.cross_entropy(logits[:, p:p + n][keep], ids[keep])
    assert late.item() != pytest.approx(loss.item(), rel=1e-2)
    prompt = torch.tensor(tok(PROMPT, add_special_tokens=False)["input_ids"])  # the prefix's last rows
    q = p - len(prompt)
    with_prompt = torch.nn.functional.cross_entropy(
        torch.cat([logits[:, q:p - 1].reshape(-1, logits.shape[-1]), logits[:, p - 1:p + n - 1][keep]]),
        torch.cat([prompt[1:].repeat(3), ids[keep]]))
    assert with_prompt.item() != pytest.approx(loss.item(), rel=1e-2)


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
    f, fd, ids, mask = _batch(tok)
    llm_before = {k: v.clone() for k, v in gen.llm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # move the trainable weights away from a fresh model's init
        opt.zero_grad()
        gen(f, fd, ids, mask).backward()
        opt.step()
    state = gen.trainable_state_dict()
    assert state and not any(k.startswith("llm.") for k in state)
    assert any(k.startswith("v_hopfield.") for k in state) and any(k.startswith("r_hopfield.") for k in state)
    assert not any("memory" in k for k in state)
    assert set(state) == {n for n, p in gen.named_parameters() if p.requires_grad}
    for k, v in gen.llm.state_dict().items():
        assert torch.equal(v, llm_before[k]), k  # frozen: not trained, so not saved
    save_tensors(tmp_path / "weights.safetensors", state)  # as the train_generator stage writes them

    gen2, _ = _generator(trainable="none")  # the same frozen LLM and banks, untrained projections
    gen.eval()
    gen2.eval()
    with torch.no_grad():
        want_loss, want_prefix = gen(f, fd, ids, mask), gen.prefix(f, fd)
        assert gen2(f, fd, ids, mask).item() != pytest.approx(want_loss.item(), rel=1e-4)
    gen2.load_trainable(load_tensors(tmp_path / "weights.safetensors"))
    for k, v in gen2.state_dict().items():
        assert torch.equal(v, gen.state_dict()[k]), k  # trainable and frozen tensors, and the banks
    with torch.no_grad():
        torch.testing.assert_close(gen2.prefix(f, fd), want_prefix, rtol=0, atol=0)
        torch.testing.assert_close(gen2(f, fd, ids, mask), want_loss, rtol=0, atol=0)
    decode = Decode(num_beams=1, max_new_tokens=8)
    assert gen2.generate(f, fd, decode) == gen.generate(f, fd, decode)
    with pytest.raises(ValueError, match="missing"):
        gen2.load_trainable({k: v for k, v in list(state.items())[1:]})
    with pytest.raises(ValueError, match="unexpected"):
        gen2.load_trainable({**state, "llm.lm_head.weight": gen.llm.lm_head.weight})


def test_scratch_llm_spec_round_trip(tmp_path):
    cfg = Llm(source="scratch", trainable="full", hidden_size=32, layers=1, heads=2, intermediate_size=64)
    llm, tok = create_llm(cfg, train_texts=REPORTS, prompt=PROMPT)
    save_llm(tmp_path, cfg, llm, tok)
    llm2, tok2 = create_llm(cfg, saved=tmp_path)
    assert tok2.get_vocab() == tok.get_vocab() and llm2.config.hidden_size == 32
    assert tok2.decode(tok2("the heart is normal .")["input_ids"]) == "the heart is normal ."


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        gen = make_generator(Llm(**{**TINY_LLM, "layers": 2, "gradient_checkpointing": ckpt}), torch.randn(12, 24),
                             torch.randn(9, 40), Hopfield(dim=16))
        assert gen.llm.is_activation_checkpointing == ckpt
        gen.train()
        torch.manual_seed(1)
        gen(*_batch(gen.tokenizer)).backward()
        grads.append({n: p.grad.clone() for n, p in gen.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6)
