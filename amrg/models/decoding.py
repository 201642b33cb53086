"""Native decoding for the report generator (issue 19, "Generation"): the same tokens as HF ``generate``, faster.

:func:`generate` decodes from a prefix of embeddings (``inputs_embeds``, what
:meth:`amrg.models.generator.ReportGenerator.prefix` builds) with greedy search (``decode.num_beams == 1``) or
beam search (``> 1``), ``decode.repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``,
``max_new_tokens`` and ``length_penalty`` with HF's semantics (transformers 5.x ``GenerationMixin._sample`` /
``_beam_search``, ``early_stopping=False``), and returns what HF returns for an ``inputs_embeds`` input: the
new tokens only, ``pad`` after EOS. With ``inputs_embeds`` HF's ``input_ids`` hold the generated tokens only, so
the repetition penalty and the n-gram ban see those alone (never the prompt).

How it is faster: the prefix runs once (eagerly; under beam search once per study, not once per beam, its keys
and values then copied to every beam); the one-token steps read a static KV cache (transformers
``StaticCache``) sized prefix + ``max_new_tokens``, kept across calls of the same shape, so on CUDA with
``decode.compile`` the step is compiled once (``torch.compile(mode="reduce-overhead")``: CUDA graphs) and a
smaller last batch is padded to the cached batch instead of recompiling. On CPU it runs eagerly. Beam search
reorders the cache rows in place each step (``index_select`` + ``copy_``: the compiled graph's buffers keep
their addresses). The only Python loop is over decode steps; it exits as soon as every sequence is done
(greedy: all hit EOS; beam: HF's stopping heuristic says no running beam can beat a finished one).

A model whose cache is not a plain full-attention one (sliding-window or linear-attention layers, remote code
without ``cache`` support) raises :class:`NotImplementedError` naming ``decode.backend: hf``. Left padding is
not supported (the generator's prefixes are of equal length). Only ``decode``'s settings apply: processors that
a pretrained LM's own ``generation_config`` adds in HF (``bad_words_ids``, ``suppress_tokens``, forced tokens)
are not. Each new cache shape compiles anew (dynamo's recompile limit applies).

:func:`generate_sharded` splits a generation job over the ranks of a data-parallel group (:mod:`amrg.dist`) and
gathers the strings back in study order; :func:`bench_decode` and :func:`memory_bound_floor_tok_s` measure the
native path against the memory-bandwidth roofline.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
from torch.nn import functional as F

# HF's "minus infinity" for beams that must not be picked (a finite number: scores stay comparable)
NEG = -1.0e9
FALLBACK = "set decode.backend: hf to decode with HF generate instead"


# ---------------------------------------------------------------------------------------------------------------
# logits processors (HF semantics, batched)

def repetition_penalty(scores: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (HF ``RepetitionPenaltyLogitsProcessor``): the score of every token already in
    ``generated`` (N, t) is divided by ``penalty`` when positive and multiplied by it when negative."""
    if penalty == 1.0 or generated.shape[1] == 0:
        return scores
    seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def ban_repeated_ngrams(scores: torch.Tensor, generated: torch.Tensor, n: int) -> torch.Tensor:
    """No n-gram twice (HF ``NoRepeatNGramLogitsProcessor``): a token that would complete an n-gram already in
    ``generated`` (N, t) scores -inf."""
    t = generated.shape[1]
    if n <= 0 or t < n:
        return scores
    prefix = generated[:, t + 1 - n:]  # the last n - 1 tokens
    windows = generated.unfold(1, n, 1)  # (N, t - n + 1, n)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1)
    vocab = scores.shape[-1]
    banned = scores.new_zeros((scores.shape[0], vocab + 1), dtype=torch.bool)  # column `vocab`: no ban
    banned.scatter_(1, torch.where(matches, windows[..., -1], vocab), True)
    return scores.masked_fill(banned[:, :vocab], float("-inf"))


def mask_eos_before_min(scores: torch.Tensor, step: int, min_new_tokens: int, eos: torch.Tensor) -> torch.Tensor:
    """``min_new_tokens``: EOS scores -inf while fewer than ``min_new_tokens`` tokens are generated (HF
    ``MinLengthLogitsProcessor`` / ``MinNewTokensLengthLogitsProcessor``, the prompt length being 0)."""
    if step >= min_new_tokens:
        return scores
    is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos)
    return scores.masked_fill(is_eos, float("-inf"))


def process(scores: torch.Tensor, generated: torch.Tensor, decode, eos: torch.Tensor) -> torch.Tensor:
    """HF's logits-processor list for ``decode``, in HF's order."""
    scores = repetition_penalty(scores, generated, float(decode.repetition_penalty))
    scores = ban_repeated_ngrams(scores, generated, int(decode.no_repeat_ngram_size))
    return mask_eos_before_min(scores, generated.shape[1], int(decode.min_new_tokens), eos)


def beam_score(sum_logprobs: torch.Tensor, length: int, length_penalty: float) -> torch.Tensor:
    """A finished beam's score (HF ``BeamSearch``): sum of token log-probabilities / length ** length_penalty."""
    return sum_logprobs / (length ** length_penalty)


# ---------------------------------------------------------------------------------------------------------------
# the static-cache decoder

def _unsupported(why: str) -> NotImplementedError:
    return NotImplementedError(f"native decoding does not support this LLM ({why}); {FALLBACK}")


class StaticDecoder:
    """A static KV cache of ``rows`` sequences x ``max_len`` positions for ``llm`` and its one-token step,
    compiled (CUDA graphs) when ``compiled``. Kept per LLM by :func:`_decoder` and reused by later calls of the
    same shape (a compiled step is recorded once)."""

    def __init__(self, llm, rows: int, max_len: int, dtype: tuple[torch.dtype, torch.dtype], device: torch.device,
                 compiled: bool):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        try:
            self.cache = StaticCache(config=llm.config, max_cache_len=max_len)
        except Exception as e:  # a config without the layer layout the cache needs
            raise _unsupported(f"no static cache for its config: {e}") from e
        if not all(type(layer) is StaticLayer for layer in self.cache.layers):
            raise _unsupported("its static cache has sliding-window or linear-attention layers")
        self.llm, self.rows, self.max_len, self.dtype, self.device, self.compiled = (
            llm, rows, max_len, dtype, device, compiled)
        self.mask = torch.ones((rows, max_len), dtype=torch.long, device=device)
        self._step = torch.compile(self._forward, mode="reduce-overhead", dynamic=False) if compiled else self._forward

    def fits(self, rows: int, beams: int, max_len: int, dtype: tuple[torch.dtype, torch.dtype],
             device: torch.device, compiled: bool) -> bool:
        """Whether this cache serves a call of ``rows`` sequences, ``beams`` per study (fewer rows are padded
        up to ``self.rows`` with whole studies)."""
        return (rows <= self.rows and self.rows % beams == 0 and max_len == self.max_len and dtype == self.dtype
                and device == self.device and compiled == self.compiled)

    def load_prefix(self, prefix_cache, repeats: int) -> int:
        """Copy the prefix's keys and values (a ``DynamicCache`` of B rows) into the static cache, each row
        ``repeats`` times (one per beam); the next step writes position P. Returns P."""
        layers = prefix_cache.layers
        if len(layers) != len(self.cache.layers):
            raise _unsupported(f"{len(layers)} prefix cache layers for {len(self.cache.layers)} static ones")
        p = layers[0].keys.shape[2]
        for static, dynamic in zip(self.cache.layers, layers):
            keys, values = (x.repeat_interleave(repeats, dim=0) for x in (dynamic.keys, dynamic.values))
            if keys.shape[0] != self.rows:  # the batch was padded: the prefix too (copies of row 0)
                keys, values = (torch.cat([x, x[:1].expand(self.rows - x.shape[0], *x.shape[1:])])
                                for x in (keys, values))
            if not static.is_initialized:
                static.lazy_initialization(keys, values)
            static.keys[:, :, :p].copy_(keys)
            static.values[:, :, :p].copy_(values)
            static.cumulative_length.fill_(p)
        return p

    def reorder(self, rows: torch.Tensor, length: int) -> None:
        """Beam search: row i of the cache becomes row ``rows[i]`` (the first ``length`` positions), in place."""
        for layer in self.cache.layers:
            for x in (layer.keys, layer.values):
                x[:, :, :length].copy_(x[:, :, :length].index_select(0, rows))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.llm(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                        use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """Next-token logits (rows, V) float32 after feeding ``ids`` (rows,) at ``position``."""
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        positions = torch.full((self.rows, 1), position, dtype=torch.long, device=self.device)
        # a copy: a CUDA graph's output buffer is overwritten by the next replay
        return self._step(ids[:, None], positions).to(dtype=torch.float32, copy=True)


# the LLM keeps its decoder in its instance dict (as HF keeps its compiled call): freed with the LLM
DECODER_ATTR = "_amrg_static_decoder"


def _decoder(llm, rows: int, beams: int, max_len: int, dtype: tuple[torch.dtype, torch.dtype],
             device: torch.device, compiled: bool) -> StaticDecoder:
    """The LLM's kept decoder when it fits, else a new one (replacing it: one cache per LLM)."""
    dec = vars(llm).get(DECODER_ATTR)
    if dec is None or not dec.fits(rows, beams, max_len, dtype, device, compiled):
        release(llm)  # free the old cache first
        dec = vars(llm)[DECODER_ATTR] = StaticDecoder(llm, rows, max_len, dtype, device, compiled)
    return dec


def release(llm) -> None:
    """Free the static cache (and compiled step) kept for ``llm``."""
    vars(llm).pop(DECODER_ATTR, None)


def _prefill(llm, inputs_embeds: torch.Tensor):
    """Run the prefix once: its last position's logits (B, V) float32 and its ``DynamicCache``."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=llm.config)
    mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    try:
        out = llm(inputs_embeds=inputs_embeds, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
    except TypeError as e:  # a forward without transformers 5's `cache` / `logits_to_keep`
        raise _unsupported(f"its forward rejects the cache arguments: {e}") from e
    if not cache.layers or not all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers):
        raise _unsupported("its forward does not fill a transformers cache passed as `cache`")
    return out.logits[:, -1].to(dtype=torch.float32, copy=True), cache


def _kv_dtypes(cache) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of a cache's keys and values (they differ under autocast: RoPE keeps keys fp32)."""
    return cache.layers[0].keys.dtype, cache.layers[0].values.dtype


def _eos_tensor(eos_token_id, device) -> torch.Tensor:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def generate(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, decode, *, eos_token_id,
             pad_token_id) -> torch.LongTensor:
    """The new tokens (B, T) for the prefixes ``inputs_embeds`` (B, P, hidden): what ``llm.generate(
    inputs_embeds=..., do_sample=False, ...)`` returns for ``decode`` (:class:`amrg.config.Decode`), pad after
    EOS. ``attention_mask`` must be all ones (or None). ``pad_token_id`` None: EOS pads, as in HF."""
    if eos_token_id is None:
        raise ValueError("native decoding needs an eos_token_id")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(f"native decoding does not support padded prefixes; {FALLBACK}")
    device, batch, beams = inputs_embeds.device, inputs_embeds.shape[0], int(decode.num_beams)
    eos = _eos_tensor(eos_token_id, device)
    pad = int(eos[0]) if pad_token_id is None else int(pad_token_id)
    compiled = decode.compile and device.type == "cuda"
    first, prefix_cache = _prefill(llm, inputs_embeds)
    max_len = inputs_embeds.shape[1] + int(decode.max_new_tokens)
    dec = _decoder(llm, batch * beams, beams, max_len, _kv_dtypes(prefix_cache), device, compiled)
    position = dec.load_prefix(prefix_cache, beams)
    padded = dec.rows // beams  # a batch smaller than the kept cache's runs padded with copies of row 0
    first = torch.cat([first, first[:1].expand(padded - batch, -1)]).repeat_interleave(beams, dim=0)
    run = _greedy if beams == 1 else _beam_search
    tokens, length = run(dec, first, position, decode, eos, pad, padded)
    return tokens[:batch, :int(length[:batch].max())]  # HF stops when the last (real) sequence ends


def _greedy(dec: StaticDecoder, logits: torch.Tensor, position: int, decode, eos: torch.Tensor, pad: int,
            batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``_sample`` without sampling: argmax of the processed logits; a finished row emits ``pad``. Returns
    the tokens (batch, max_new_tokens) and each row's length up to its EOS."""
    steps = int(decode.max_new_tokens)
    out = torch.full((batch, steps), pad, dtype=torch.long, device=logits.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=logits.device)
    length = torch.full((batch,), steps, dtype=torch.long, device=logits.device)  # tokens up to EOS
    for t in range(steps):
        if t:
            logits = dec.step(out[:, t - 1], position + t - 1)
        token = process(logits, out[:, :t], decode, eos).argmax(dim=-1)
        token = torch.where(unfinished, token, pad)
        out[:, t] = token
        ended = unfinished & torch.isin(token, eos)
        length = torch.where(ended, t + 1, length)
        unfinished &= ~ended
        if not bool(unfinished.any()):
            break
    return out, length


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """HF ``_gather_beams``: ``x[b, index[b, j], ...]``."""
    return torch.take_along_dim(x, index.view(*index.shape, *[1] * (x.dim() - 2)), dim=1)


def _beam_search(dec: StaticDecoder, logits: torch.Tensor, position: int, decode, eos: torch.Tensor, pad: int,
                 batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``_beam_search`` (``early_stopping=False``, one returned sequence): per step the top
    ``max(2, 1 + n_eos) * K`` continuations over all beams, the best K unfinished keep running, those among the
    top K that end (EOS or the length limit) join the K best finished hypotheses with :func:`beam_score`;
    a study is done when its best running beam cannot beat its worst finished one (HF's heuristic). Returns
    each study's best hypothesis (batch, max_new_tokens) and its length."""
    k, steps, device = int(decode.num_beams), int(decode.max_new_tokens), logits.device
    lp = float(decode.length_penalty)
    keep = max(2, 1 + eos.numel()) * k
    top_k_mask = torch.arange(keep, device=device) < k
    fill = pad if pad else int(eos[0])  # HF: `pad_token_id or eos_token_id[0]`
    running = torch.full((batch, k, steps), fill, dtype=torch.long, device=device)
    running_scores = torch.zeros((batch, k), dtype=torch.float32, device=device)
    running_scores[:, 1:] = NEG  # only the first beam's continuations at step 0 (the beams are identical)
    done, done_scores = running.clone(), torch.full((batch, k), NEG, dtype=torch.float32, device=device)
    done_length = torch.zeros((batch, k), dtype=torch.long, device=device)
    finished = torch.zeros((batch, k), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    row_offset = torch.arange(batch, device=device)[:, None] * k
    vocab = logits.shape[-1]
    for t in range(steps):
        if t:
            logits = dec.step(running[:, :, t - 1].reshape(-1), position + t - 1)
        logprobs = process(F.log_softmax(logits, dim=-1), running[:, :, :t].reshape(batch * k, t), decode, eos)
        logprobs = (logprobs.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, k * vocab)
        top_scores, top_index = torch.topk(logprobs, keep)
        source = top_index // vocab  # the beam each continuation extends
        candidates = _take(running, source)
        candidates[:, :, t] = top_index % vocab
        ends = torch.isin(candidates[:, :, t], eos) | (t + 1 >= steps)

        # the K best unfinished continuations run on
        open_scores = top_scores + ends.to(torch.float32) * NEG
        best_open = torch.topk(open_scores, k)[1]
        running, running_scores = _take(candidates, best_open), _take(open_scores, best_open)
        cache_rows = _take(source + row_offset, best_open).reshape(-1)

        # those of the top K that end compete with the finished hypotheses
        just_done = ends & top_k_mask[None, :]
        scores = beam_score(top_scores, t + 1, lp)
        scores = scores + (~improvable).to(torch.float32) * NEG
        scores = scores + (~just_done) * NEG
        merged = torch.topk(torch.cat([done_scores, scores], dim=1), k)[1]
        done = _take(torch.cat([done, candidates], dim=1), merged)
        done_scores = _take(torch.cat([done_scores, scores], dim=1), merged)
        done_length = _take(torch.cat([done_length, torch.full_like(ends, t + 1, dtype=torch.long)], dim=1), merged)
        finished = _take(torch.cat([finished, just_done], dim=1), merged)

        improvable = improvable & _can_improve(running_scores, done_scores, finished, t + 1, lp)
        if not bool(improvable.any()) or bool(ends.all()):
            break
        dec.reorder(cache_rows, position + t)
    return done[:, 0], done_length[:, 0]


def _can_improve(running_scores: torch.Tensor, done_scores: torch.Tensor, finished: torch.Tensor, length: int,
                 lp: float) -> torch.Tensor:
    """HF's ``early_stopping=False`` heuristic (B, 1): the best running beam, scored at the current length,
    beats the worst finished hypothesis (or not all K hypotheses are finished yet)."""
    best = beam_score(running_scores[:, :1], length, lp)
    worst = torch.where(finished, torch.min(done_scores, dim=1, keepdim=True)[0], NEG)
    return torch.any(best > worst, dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------------
# data-parallel generation

def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share [start, stop) of ``n`` items; shares differ by at most one item."""
    return n * rank // world, n * (rank + 1) // world


def generate_sharded(run_generate: Callable[[int, int], list[str]], n: int, ctx=None) -> list[str]:
    """Data-parallel generation of items [0, n): this rank generates ``run_generate(start, stop)`` for its
    contiguous share (:func:`shard_bounds`), then every rank receives all ``n`` strings in item order
    (``all_gather_object``). ``ctx``: :func:`amrg.dist.context` by default; one process runs everything."""
    from .. import dist

    ctx = dist.context() if ctx is None else ctx
    start, stop = shard_bounds(n, ctx.rank, ctx.world)
    mine = list(run_generate(start, stop)) if stop > start else []
    if len(mine) != stop - start:
        raise ValueError(f"run_generate({start}, {stop}) returned {len(mine)} strings")
    if ctx.world == 1:
        return mine
    import torch.distributed as torch_dist

    parts: list = [None] * ctx.world
    torch_dist.all_gather_object(parts, mine)
    return [s for part in parts for s in part]


# ---------------------------------------------------------------------------------------------------------------
# throughput

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_decode(llm, batch: int, prefix_len: int, new_tokens: int, decode, repeats: int = 1) -> float:
    """Generated tokens per second (``batch * new_tokens / seconds``, beams not counted) of the native path on
    random prefixes of ``prefix_len`` positions, exactly ``new_tokens`` steps each (EOS masked until then),
    after one untimed warm-up call (compilation, CUDA-graph recording); the mean of ``repeats`` timed calls."""
    param = next(llm.parameters())
    decode = dataclasses.replace(decode, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    g = torch.Generator(device="cpu").manual_seed(0)
    embeds = torch.randn(batch, prefix_len, llm.config.hidden_size, generator=g).to(param.device, param.dtype)
    eos = llm.config.eos_token_id if llm.config.eos_token_id is not None else 0
    eos = eos if isinstance(eos, int) else list(eos)[0]

    def once():
        return generate(llm, embeds, None, decode, eos_token_id=eos, pad_token_id=eos)

    once()
    _sync(param.device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    _sync(param.device)
    return batch * new_tokens * repeats / (time.perf_counter() - start)


def memory_bound_floor_tok_s(llm, batch: int, seq_len: int, bandwidth_bytes_s: float) -> float:
    """The memory-bandwidth roofline of decoding, in generated tokens per second: one step must read every
    weight once and the KV cache of ``batch`` sequences of ``seq_len`` positions, so it takes at least
    ``bytes / bandwidth_bytes_s`` seconds (the floor on step time) and yields ``batch`` tokens:

        tok/s <= batch / ((weight_bytes + kv_bytes) / bandwidth_bytes_s)
        kv_bytes = batch * seq_len * layers * 2 (K and V) * kv_heads * head_dim * bytes per element

    ``weight_bytes`` counts every parameter at its stored size except an input-embedding table not shared with
    the output head (a step reads only ``batch`` of its rows). The KV cache is taken in the weights' dtype.
    ``bandwidth_bytes_s``: the accelerator's memory bandwidth (e.g. 4.8e12 for an H200)."""
    cfg = llm.config.get_text_config(decoder=True) if hasattr(llm.config, "get_text_config") else llm.config
    embedding = llm.get_input_embeddings().weight
    output = llm.get_output_embeddings()
    tied = output is not None and output.weight is embedding
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.parameters() if tied or p is not embedding)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_bytes = batch * seq_len * cfg.num_hidden_layers * 2 * kv_heads * head_dim * embedding.element_size()
    return batch / ((weight_bytes + kv_bytes) / bandwidth_bytes_s)
