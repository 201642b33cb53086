"""Native decoding (issue 19): token for token what HF ``generate`` returns from ``inputs_embeds`` (greedy and
beam search, repetition penalty, n-gram ban, min/max new tokens, length penalty, early EOS, a reused and padded
static cache, bf16, LoRA), its logits processors against HF's, the unsupported-model error, the roofline
formula, and data-parallel generation gathered in study order (one process and two gloo processes)."""

from __future__ import annotations

import copy
import dataclasses
import types
import warnings

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor)

from amrg import dist
from amrg.config import Decode
from amrg.models import decoding

VOCAB, HIDDEN, PREFIX = 64, 32, 6
EOS, PAD = 7, 63  # with lm_head x30 some studies end after a few tokens, others run to max_new_tokens


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked next-token distributions: non-trivial, varied sequences
    return model


def _embeds(batch=4, seed=1, dtype=torch.float32):
    return torch.randn(batch, PREFIX, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


@torch.no_grad()
def _hf(model, embeds, d: Decode, eos=EOS, pad=PAD) -> torch.Tensor:
    beams = {"length_penalty": d.length_penalty} if d.num_beams > 1 else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                              num_beams=d.num_beams, max_new_tokens=d.max_new_tokens,
                              min_new_tokens=d.min_new_tokens, repetition_penalty=d.repetition_penalty,
                              no_repeat_ngram_size=d.no_repeat_ngram_size, do_sample=False, eos_token_id=eos,
                              pad_token_id=pad, **beams)


def _native(model, embeds, d: Decode, eos=EOS, pad=PAD) -> torch.Tensor:
    return decoding.generate(model, embeds, None, d, eos_token_id=eos, pad_token_id=pad)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and torch.equal(a, b), f"native {a.tolist()}\n    hf {b.tolist()}"


CASES = [  # num_beams, max_new, min_new, repetition_penalty, no_repeat_ngram_size, length_penalty, seed
    (1, 17, 1, 1.0, 0, 1.0, 1), (1, 17, 4, 1.3, 0, 1.0, 2), (1, 5, 1, 1.0, 3, 1.0, 1), (1, 20, 4, 1.3, 3, 1.0, 2),
    (1, 1, 1, 1.0, 0, 1.0, 1),
    (3, 17, 1, 1.0, 0, 1.0, 1), (3, 17, 1, 1.0, 0, 0.5, 2), (3, 17, 1, 1.0, 0, 2.0, 2), (3, 5, 4, 1.3, 3, 1.0, 1),
    (3, 20, 4, 1.3, 3, 2.0, 2), (3, 20, 1, 1.3, 0, 0.5, 1), (3, 12, 2, 1.0, 3, 2.0, 1), (3, 1, 1, 1.0, 0, 1.0, 2),
    (4, 15, 2, 1.3, 3, 1.0, 2), (1, 20, 8, 1.0, 0, 1.0, 9), (3, 20, 8, 1.0, 0, 1.0, 9), (3, 20, 1, 1.0, 0, 2.0, 9),
]


@pytest.mark.parametrize("beams,max_new,min_new,rep,ngram,lp,seed", CASES)
def test_native_matches_hf_generate(llm, beams, max_new, min_new, rep, ngram, lp, seed):
    d = Decode(num_beams=beams, max_new_tokens=max_new, min_new_tokens=min_new, repetition_penalty=rep,
               no_repeat_ngram_size=ngram, length_penalty=lp)
    _same(_native(llm, _embeds(seed=seed), d), _hf(llm, _embeds(seed=seed), d))


def test_the_cases_are_not_degenerate(llm):
    """Every knob changes HF's tokens on these inputs (so the equality above tests it), and some studies end
    early while others run to max_new_tokens."""
    base = Decode(num_beams=3, max_new_tokens=20, min_new_tokens=1)
    for seed, kw in [(2, {"repetition_penalty": 1.3}), (2, {"no_repeat_ngram_size": 3}), (9, {"min_new_tokens": 8}),
                     (2, {"length_penalty": 0.5}), (9, {"length_penalty": 2.0})]:
        a, b = (_hf(llm, _embeds(seed=seed), d) for d in (base, dataclasses.replace(base, **kw)))
        assert a.shape != b.shape or not torch.equal(a, b), kw
    greedy = _hf(llm, _embeds(seed=1), Decode(num_beams=1, max_new_tokens=17))
    ended = (greedy == EOS).any(dim=1)
    assert ended.any() and not ended.all() and greedy.shape[1] == 17
    assert (greedy[ended][:, -1] == PAD).all()


def test_special_tokens_like_hf(llm):
    """pad None (EOS pads), pad id 0 (beam search then fills with EOS, as HF) and two EOS ids."""
    d1, d3 = Decode(num_beams=1, max_new_tokens=15, min_new_tokens=2), Decode(num_beams=3, max_new_tokens=15)
    for eos, pad in [(EOS, None), (EOS, 0), ([EOS, 3], PAD)]:
        for d in (d1, d3):
            _same(_native(llm, _embeds(), d, eos, pad), _hf(llm, _embeds(), d, eos, pad))


def _count_steps(monkeypatch) -> list[int]:
    """Record the positions of the one-token steps (the prefix pass is not one)."""
    calls, step = [], decoding.StaticDecoder.step

    def counted(self, ids, position):
        calls.append(position)
        return step(self, ids, position)

    monkeypatch.setattr(decoding.StaticDecoder, "step", counted)
    return calls


def test_exits_when_every_sequence_is_done(llm, monkeypatch):
    calls = _count_steps(monkeypatch)
    d = Decode(num_beams=1, max_new_tokens=40)
    emb = _embeds(batch=2, seed=1)
    out = _native(llm, emb, d)
    _same(out, _hf(llm, emb, d))
    assert (out == EOS).any(dim=1).all() and out.shape[1] < 40
    assert len(calls) == out.shape[1] - 1  # the first token comes from the prefix pass
    calls.clear()
    d = Decode(num_beams=3, max_new_tokens=40)
    out = _native(llm, emb, d)
    _same(out, _hf(llm, emb, d))
    assert len(calls) < 39  # the beam heuristic stopped before the length limit


def test_a_kept_cache_is_reused_and_padded(llm):
    """Later calls reuse the static cache (stale positions must not leak) and a smaller batch runs padded."""
    for beams in (1, 3):
        d = Decode(num_beams=beams, max_new_tokens=12, min_new_tokens=2, repetition_penalty=1.3)
        for batch, seed in [(4, 5), (4, 6), (2, 7)]:
            _same(_native(llm, _embeds(batch, seed), d), _hf(llm, _embeds(batch, seed), d))
            assert vars(llm)[decoding.DECODER_ATTR].rows == 4 * beams
    decoding.release(llm)
    assert decoding.DECODER_ATTR not in vars(llm)


def test_bf16_weights_and_autocast(llm):
    bf16 = copy.deepcopy(llm).to(torch.bfloat16)
    for beams in (1, 3):
        d = Decode(num_beams=beams, max_new_tokens=12)
        _same(_native(bf16, _embeds(dtype=torch.bfloat16), d), _hf(bf16, _embeds(dtype=torch.bfloat16), d))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _same(_native(llm, _embeds(), d), _hf(llm, _embeds(), d))


def test_lora_wrapped_llm(llm):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(llm), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the output
    lora.eval()
    for beams in (1, 3):
        d = Decode(num_beams=beams, max_new_tokens=12)
        want = _hf(lora, _embeds(), d)
        assert not torch.equal(want, _hf(llm, _embeds(), d))
        _same(_native(lora, _embeds(), d), want)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_processors_match_hf(n):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(6, 10, generator=g) * 3
    ids = torch.randint(0, 4, (6, 7), generator=g)  # a small alphabet: repeated n-grams
    torch.testing.assert_close(decoding.repetition_penalty(scores.clone(), ids, 1.5),
                               RepetitionPenaltyLogitsProcessor(1.5)(ids, scores.clone()), rtol=0, atol=0)
    assert torch.equal(decoding.ban_repeated_ngrams(scores, ids, n), NoRepeatNGramLogitsProcessor(n)(ids, scores))
    eos = torch.tensor([2])
    for t in (2, 4):
        assert torch.equal(decoding.mask_eos_before_min(scores, t, 3, eos),
                           MinNewTokensLengthLogitsProcessor(0, 3, 2)(ids[:, :t], scores))
    assert decoding.ban_repeated_ngrams(scores, ids[:, :1], 2) is scores  # no complete n-gram yet


class _NoCacheLM(torch.nn.Module):
    """A causal LM without transformers 5's cache arguments (e.g. old remote code)."""

    def __init__(self, config):
        super().__init__()
        self.config, self.head = config, torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, inputs_embeds=None, attention_mask=None):
        return types.SimpleNamespace(logits=self.head(inputs_embeds))


def test_unsupported_llm_names_the_hf_fallback(llm):
    with pytest.raises(NotImplementedError, match="decode.backend: hf"):
        _native(_NoCacheLM(llm.config), _embeds(), Decode(num_beams=1))
    mask = torch.ones(4, PREFIX, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="decode.backend: hf"):
        decoding.generate(llm, _embeds(), mask, Decode(), eos_token_id=EOS, pad_token_id=PAD)


def test_report_generator_native_backend_decodes_the_same_reports():
    from .test_generator_input import _generator, _inputs

    gen = _generator()
    f, fd = _inputs(b=3)
    for beams in (1, 3):
        d = Decode(num_beams=beams, max_new_tokens=10, repetition_penalty=1.3)
        native = dataclasses.replace(d, backend="native", compile=True)
        assert gen.generate(f, fd, native) == gen.generate(f, fd, d)


def test_memory_bound_floor_by_hand(llm):
    # untied input embeddings are not read whole per step; lm_head, attention, MLP and norms are
    layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32  # q, o 32x32; k, v 32x16; MLP; two norms
    weights = (VOCAB * HIDDEN + 2 * layer + HIDDEN) * 4  # lm_head, 2 layers, final norm; fp32
    kv = 3 * 50 * 2 * 2 * 2 * 8 * 4  # batch 3, 50 positions, 2 layers, K and V, 2 kv heads, head_dim 8, fp32
    assert decoding.memory_bound_floor_tok_s(llm, 3, 50, 1e9) == pytest.approx(3 / ((weights + kv) / 1e9))


def test_bench_decode_runs_exactly_new_tokens(llm, monkeypatch):
    calls = _count_steps(monkeypatch)
    tok_s = decoding.bench_decode(llm, 2, PREFIX, 9, Decode(num_beams=1))
    assert tok_s > 0 and len(calls) == 2 * 8  # warm-up + timed call, 8 steps after the prefix pass each
    decoding.release(llm)


# ---------------------------------------------------------------------------------------------------------------
# data-parallel generation

def test_shards_are_contiguous_and_cover_the_range():
    for n, world in [(5, 2), (7, 3), (1, 2), (0, 2), (8, 4)]:
        bounds = [decoding.shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_one_process_generates_everything():
    calls = []
    out = decoding.generate_sharded(lambda a, b: calls.append((a, b)) or [f"r{i}" for i in range(a, b)], 5)
    assert out == [f"r{i}" for i in range(5)] and calls == [(0, 5)]
    with pytest.raises(ValueError, match="returned 1 strings"):
        decoding.generate_sharded(lambda a, b: ["x"], 3, dist.Context())


def _worker(rank, world, init_file, out_dir, sizes):
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = {}
    for n in sizes:
        calls = []
        out = decoding.generate_sharded(lambda a, b: calls.append((a, b)) or [f"study{i}@{rank}" for i in range(a, b)],
                                        n)
        result[n] = {"out": out, "calls": calls}
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.shutdown()


@pytest.mark.timeout(120)
def test_two_gloo_processes_gather_in_study_order(tmp_path):
    sizes = [5, 1]  # 1: rank 0's share is empty
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path, sizes), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for n in sizes:
        cut = n // 2  # rank 0 generates [0, n//2), rank 1 the rest
        want = [f"study{i}@{0 if i < cut else 1}" for i in range(n)]
        assert got[0][n]["out"] == got[1][n]["out"] == want
        assert got[0][n]["calls"] == ([(0, cut)] if cut else []) and got[1][n]["calls"] == [(cut, n)]
