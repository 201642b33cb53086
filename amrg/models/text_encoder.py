"""Sentence encoder for the report bank: any HF encoder or decoder LM (paper: Bio_ClinicalBERT; Table VIII:
Llama-2, Vicuna, Orca-2, InternLM), pooled over the last hidden states (:func:`pool_hidden`).

Pooling (``banks.report.pooling``): ``mean`` of the non-padding tokens (attention-mask weighted, the
default), ``last`` real token (the summary position of a causal LM), or ``cls``: the first token (BERT's
[CLS]; the released code's choice; under a causal LM the first token is BOS, which sees nothing else, so
every sentence would get the same vector). No normalisation. Sentences are encoded in batches sorted by length
to minimise padding, padded on the right. A tokenizer without a pad token (Llama) pads with its EOS
(else UNK) token: padding is masked out of every pooling. A causal-LM checkpoint loads as its base model
(``AutoModel``: ``LlamaForCausalLM`` weights -> ``LlamaModel``; a remote-code ``AutoModel`` that maps to a
``*ForCausalLM`` class is reduced to its ``base_model``), which returns the last hidden states.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from ..io import progress
from .hub import resolve_model_ref

POOLINGS = ("mean", "last", "cls")


def set_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token its EOS token as one (else UNK); raise if it has neither."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if fallback is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no pad, eos or unk token to pad with")
    tokenizer.pad_token = fallback


def pool_hidden(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Sentence vectors ``(B, D)`` from right-padded last hidden states ``(B, L, D)`` and the attention
    mask ``(B, L)``: ``mean`` over the real tokens, the ``last`` real token, or the first (``cls``)."""
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    if pooling == "last":
        last = (mask.sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "cls":
        return hidden[:, 0]
    raise ValueError(f"unknown pooling {pooling!r}: one of {POOLINGS}")


class SentenceEncoder:
    """``dtype``: the weights' dtype (the stage passes bf16 on CUDA when ``runtime.precision`` is bf16);
    the vectors are always float32."""

    def __init__(self, ref: str, device: torch.device, max_length: int = 64, pooling: str = "mean",
                 trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}: one of {POOLINGS}")
        path = resolve_model_ref(ref)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        set_pad_token(self.tokenizer)
        self.tokenizer.padding_side = "right"  # `last` reads position mask.sum() - 1
        model = AutoModel.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        if model.get_output_embeddings() is not None:  # a LM head model: encode with its base model
            model = model.base_model
        self.model = model.to(device).eval()
        self.device, self.max_length, self.pooling = device, max_length, pooling
        self.dim = self.model.config.hidden_size

    @torch.inference_mode()
    def encode(self, sentences: list[str], batch_size: int = 128) -> np.ndarray:
        order = np.argsort([len(s) for s in sentences], kind="stable")
        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        starts = range(0, len(sentences), batch_size)
        for start in progress(starts, "encode sentences", total=len(sentences), unit="sentences",
                              count=lambda s: min(batch_size, len(sentences) - s)):
            idx = order[start:start + batch_size]
            enc = self.tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            out[idx] = pool_hidden(hidden, enc["attention_mask"], self.pooling).cpu().numpy()
        return out
