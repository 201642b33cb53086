"""Sentence encoder for the report bank: any HF encoder (paper: Bio_ClinicalBERT), mean pooling.

Pooling: mean of the last hidden states over non-padding tokens (attention-mask weighted), no
normalisation. Sentences are encoded in batches sorted by length to minimise padding.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from ..io import progress
from .hub import resolve_model_ref


class SentenceEncoder:
    def __init__(self, ref: str, device: torch.device, max_length: int = 64):
        path = resolve_model_ref(ref)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.max_length = device, max_length
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
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[idx] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()
        return out
