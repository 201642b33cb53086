"""The language model: any HF causal LM (id or local dir), or a Llama-architecture LM built from scratch.

``llm.source = pretrained`` loads ``llm.name`` (paper: ``meta-llama/Llama-2-7b-hf``) with its tokenizer.
``llm.source = scratch`` builds a ``LlamaForCausalLM`` of the configured size and trains a word-level
tokenizer on the *training* reports (plus the words of the prefix's fixed text: the prompt template
with its prompt): the embedded default. ``llm.trust_remote_code`` lets a pretrained LM's repository
run its own code (InternLM and other models outside transformers). Both are then
driven identically through ``inputs_embeds`` by :class:`~amrg.models.generator.ReportGenerator`.
``llm.trainable = none`` freezes every LLM weight (paper); ``lora`` adds trainable low-rank adapters
(``peft``; ``llm.lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_targets``) to a frozen base, and only
the adapters are saved; ``full`` trains every weight (tiny scratch LM only).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..io import write_text
from .hub import resolve_model_ref

SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_word_tokenizer(texts: list[str], min_freq: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (lower-cased, whitespace split) over ``texts``; words rarer than ``min_freq`` -> <unk>."""
    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(min_frequency=min_freq, special_tokens=list(SPECIAL.values()))
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def scratch_config(cfg, vocab_size: int, tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       intermediate_size=cfg.intermediate_size, max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


def create_llm(cfg, dtype: torch.dtype = torch.float32, *, train_texts: list[str] | None = None, prompt: str = "",
               saved: Path | None = None):
    """The one LLM factory: (model, tokenizer) for ``cfg`` (:class:`amrg.config.Llm`), frozen or
    LoRA-wrapped as ``cfg.trainable`` says. A pretrained LM (HF id or local dir) loads in ``dtype``;
    a scratch LM is built from the tokenizer and config saved in ``saved`` (a trained generator
    directory, see :func:`save_llm`), or, for training, with a tokenizer trained on ``train_texts`` and
    ``prompt``, the prefix's fixed text (the template's words with the prompt; counted ``min_word_freq``
    times, so none of its words becomes <unk>)."""
    if cfg.source == "pretrained":
        model, tokenizer = _load_pretrained(cfg.name, dtype, cfg.trust_remote_code)
    elif saved is not None:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(saved / "tokenizer")
        model = LlamaForCausalLM(LlamaConfig.from_dict(json.loads((saved / "llm_config.json").read_text()))).to(dtype)
    elif train_texts:
        tokenizer = train_word_tokenizer(list(train_texts) + [prompt] * cfg.min_word_freq, cfg.min_word_freq)
        model = LlamaForCausalLM(scratch_config(cfg, len(tokenizer), tokenizer)).to(dtype)
    else:
        raise ValueError("llm.source=scratch needs the training reports to build its tokenizer")
    return _set_trainable(model, cfg), tokenizer


def _load_pretrained(name: str, dtype: torch.dtype, trust_remote_code: bool):
    path = resolve_model_ref(name)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer


def _set_trainable(model, cfg):
    """Freeze or unfreeze the LM as ``cfg.trainable`` says; ``lora`` wraps it with adapters."""
    for p in model.parameters():
        p.requires_grad_(cfg.trainable == "full")
    if getattr(cfg, "gradient_checkpointing", False):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM"))
    return model


def save_llm(out_dir: Path, cfg, model, tokenizer) -> None:
    """Save what rebuilding the LLM needs besides trainable weights: the tokenizer and config of a
    scratch LM, or nothing for a pretrained one (its reference is in the generator spec; a 7B base is
    never copied)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.source == "scratch":
        tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out_dir))  # saved whole, then renamed in place
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)
        tmp.rename(out_dir / "tokenizer")
        write_text(out_dir / "llm_config.json", json.dumps(model.config.to_dict(), indent=1))
