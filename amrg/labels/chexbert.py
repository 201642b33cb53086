"""CheXbert labeler (Smit et al., EMNLP 2020): a BERT-base encoder with 14 linear heads on [CLS].

Loads the original release checkpoint (``chexbert.pth`` of github.com/stanfordmlgroup/CheXbert) and
labels reports with the same output convention as :mod:`amrg.labels.rules`: float32 ``(N, 14)`` in
:data:`~amrg.labels.schema.CHEXPERT_14` order, 1 positive, 0 negative, -1 uncertain, NaN blank.

Checkpoint layout (``src/models/bert_labeler.py``, ``src/label.py``, ``src/constants.py`` of that repo)
----------------------------------------------------------------------------------------------------------
* ``torch.save({"epoch": int, "model_state_dict": ..., "optimizer_state_dict": ...})`` of a model wrapped
  in ``nn.DataParallel``, so every key starts with ``module.``.
* ``module.bert.*``: a ``BertModel`` (bert-base-uncased layout, pooler included, unused).
* ``module.linear_heads.{0..12}.{weight,bias}``: ``Linear(hidden, 4)``, classes 0 blank, 1 positive,
  2 negative, 3 uncertain; ``module.linear_heads.13.*``: ``Linear(hidden, 2)``, classes 0 blank,
  1 positive (No Finding). Each head reads the dropout-ed [CLS] vector of the last layer.
* Head ``j`` is the ``j``-th entry of CheXbert's ``CONDITIONS`` (:data:`CHEXBERT_CONDITIONS`), which is
  *not* our order: Lung Opacity and Lung Lesion are swapped and No Finding is last.

Inference follows CheXbert's ``label.py``: white space collapsed, WordPiece with the bert-base-uncased
tokenizer, ``[CLS] ... [SEP]`` cut at 512 tokens (511 + ``[SEP]``), argmax per head. One deviation: a
report with no tokens (empty / white space) gets an all-NaN row without running the model (CheXbert runs
``[CLS] [SEP]`` through it), as the rule labeler does.

Old checkpoints saved by transformers 3.x-4.30 also carry the buffer ``bert.embeddings.position_ids``;
it is dropped (transformers rebuilds it). Any other missing or unexpected key is a ``ValueError``.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .rules import _check as _check_reports
from .schema import CHEXPERT_14, N_LABELS

CHEXBERT_CONDITIONS: tuple[str, ...] = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
)
"""CheXbert's head order (``src/constants.py`` ``CONDITIONS``): head ``j`` predicts this observation."""

HEAD_TO_SCHEMA: tuple[int, ...] = tuple(CHEXPERT_14.index(c) for c in CHEXBERT_CONDITIONS)
"""Column of :data:`CHEXPERT_14` written by CheXbert head ``j``."""

N_HEADS = 14
CLASS_VALUES: tuple[float, ...] = (math.nan, 1.0, 0.0, -1.0)
"""Value of CheXbert class ``k`` (0 blank, 1 positive, 2 negative, 3 uncertain); No Finding uses 0 and 1."""

DEFAULT_TOKENIZER = "bert-base-uncased"
MAX_TOKENS = 512
_IGNORED_BUFFERS = ("bert.embeddings.position_ids",)  # persistent in transformers 3.x-4.30 only

_CACHE: dict[tuple, "_Loaded"] = {}
_CACHE_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- model
def _build_module(config: Any):
    """``nn.Module`` with CheXbert's attribute names (``bert``, ``dropout``, ``linear_heads``)."""
    import torch
    from transformers import BertModel

    class CheXbert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = BertModel(config, add_pooling_layer=True)
            self.dropout = torch.nn.Dropout(0.1)
            h = config.hidden_size
            self.linear_heads = torch.nn.ModuleList(
                [torch.nn.Linear(h, 4) for _ in range(N_HEADS - 1)] + [torch.nn.Linear(h, 2)])

        def forward(self, input_ids, attention_mask):
            cls = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
            cls = self.dropout(cls)
            return [head(cls) for head in self.linear_heads]

    return CheXbert()


def load_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The model state dict of a CheXbert checkpoint, ``module.`` stripped (``weights_only`` load).

    Accepts the release format (``{"model_state_dict": ..., ...}``) or a bare state dict.
    """
    import torch

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # unpickling refused (code in the pickle) or not a torch file
        raise ValueError(f"cannot load CheXbert checkpoint {os.fspath(path)!r} with weights_only=True: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(ckpt, dict) and "model_state_dict" in ckpt:
        ckpt = ckpt["model_state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{os.fspath(path)!r} is neither a CheXbert checkpoint ({{'model_state_dict': ...}}) "
                         "nor a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt.items()}


def _few(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_state_dict(model: Any, state: dict) -> dict:
    """``state`` without ignorable buffers; ``ValueError`` naming missing / unexpected / misshapen keys."""
    state = {k: v for k, v in state.items() if k not in _IGNORED_BUFFERS}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if not problems:
        bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
               if tuple(state[k].shape) != tuple(v.shape)]
        if bad:
            problems.append(f"shape mismatch (checkpoint != config): {_few(bad, 3)}")
    if problems:
        raise ValueError("checkpoint does not fit the CheXbert layout (bert.* + linear_heads.0-13 after "
                         "stripping 'module.'): " + "; ".join(problems))
    return state


# ----------------------------------------------------------------------------- loading and cache
class _Loaded:
    def __init__(self, model: Any, tokenizer: Any, device: Any, max_len: int) -> None:
        self.model, self.tokenizer, self.device, self.max_len = model, tokenizer, device, max_len


def load(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None, device: Any = None) -> _Loaded:
    """Load (or take from the cache) the CheXbert model + tokenizer on ``device``.

    ``tokenizer``: a local directory or hub id holding the bert-base-uncased tokenizer *and* its
    ``config.json`` (the encoder is built from that config, its weights come from the checkpoint).
    ``device``: ``None`` / ``"auto"`` (CUDA when visible, else CPU) or a torch device string, resolved by
    :func:`amrg.io.resolve_device` (a CUDA device without CUDA is a ``RuntimeError``).
    The cache key is (checkpoint path, its mtime and size, tokenizer, device).
    """
    from transformers import AutoTokenizer, BertConfig

    from ..io import resolve_device

    path = Path(checkpoint).expanduser().resolve()
    st = path.stat()  # FileNotFoundError for a wrong path
    tok_id = os.fspath(tokenizer) if tokenizer is not None else DEFAULT_TOKENIZER
    dev = resolve_device(device)
    key = (str(path), st.st_mtime_ns, st.st_size, tok_id, str(dev))
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        config = BertConfig.from_pretrained(tok_id)
        tok = AutoTokenizer.from_pretrained(tok_id)
        model = _build_module(config)
        state = check_state_dict(model, load_state_dict(path, map_location="cpu"))
        model.load_state_dict(state, strict=True)
        model.to(dev).eval()
        max_len = min(MAX_TOKENS, int(config.max_position_embeddings))
        loaded = _Loaded(model, tok, dev, max_len)
        _CACHE[key] = loaded
        return loaded


def clear_cache() -> None:
    """Forget every loaded model (frees its memory once no one else holds it)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# ----------------------------------------------------------------------------- labelling
def _normalise(text: str) -> str:
    return " ".join(text.split())  # CheXbert: strip, newlines -> space, collapse white space


def encode(tokenizer: Any, reports: Sequence[str], max_len: int = MAX_TOKENS) -> list[list[int]]:
    """Token ids ``[CLS] ... [SEP]`` per report, cut at ``max_len`` (``[SEP]`` kept last);
    ``[]`` for a report without tokens."""
    if not reports:
        return []
    enc = tokenizer([_normalise(t) for t in reports], add_special_tokens=True, truncation=True,
                    max_length=max_len)["input_ids"]
    return [list(ids) if len(ids) > 2 else [] for ids in enc]


def classes_to_labels(classes: np.ndarray) -> np.ndarray:
    """``(N, 14)`` CheXbert classes in head order -> float32 ``(N, 14)`` 1/0/-1/NaN in CHEXPERT_14 order."""
    classes = np.asarray(classes)
    out = np.full((classes.shape[0], N_LABELS), np.nan, dtype=np.float32)
    values = np.asarray(CLASS_VALUES, dtype=np.float32)
    for j, col in enumerate(HEAD_TO_SCHEMA):
        out[:, col] = values[classes[:, j]]  # No Finding head: class 0 -> NaN, 1 -> 1.0
    return out


def label_reports(reports: Sequence[str], *, checkpoint: str | os.PathLike | None = None,
                  tokenizer: str | os.PathLike | None = None, device: Any = None, batch_size: int = 64,
                  precision: str = "fp32") -> np.ndarray:
    """CheXbert labels; float32 ``(N, 14)`` in CHEXPERT_14 order (1 / 0 / -1 / NaN).

    Reports are run in batches of ``batch_size`` sorted by token length (little padding), under
    ``torch.inference_mode``; ``precision="bf16"`` autocasts the encoder to bfloat16 on CUDA (ignored on
    CPU; argmaxes may then differ from fp32 on near ties).
    """
    reports = _check_reports(reports)
    if checkpoint is None:
        raise ValueError("labeler 'chexbert' needs chexbert_checkpoint=<path to the CheXbert release "
                         "checkpoint chexbert.pth>; without a checkpoint, allowed: rules")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    out = np.full((len(reports), N_LABELS), np.nan, dtype=np.float32)
    if not reports:
        return out
    import torch

    from ..io import progress

    m = load(checkpoint, tokenizer, device)
    ids = encode(m.tokenizer, reports, m.max_len)
    todo = sorted((i for i, x in enumerate(ids) if x), key=lambda i: -len(ids[i]))
    if not todo:
        return out
    pad = m.tokenizer.pad_token_id or 0
    classes = np.zeros((len(todo), N_HEADS), dtype=np.int64)
    use_bf16 = precision == "bf16" and m.device.type == "cuda"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
        starts = range(0, len(todo), batch_size)
        for s in progress(starts, "label reports (chexbert)", total=len(todo), unit="reports",
                          count=lambda s: min(batch_size, len(todo) - s)):
            chunk = todo[s:s + batch_size]
            width = len(ids[chunk[0]])  # longest first
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                x[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1
            logits = m.model(x.to(m.device), mask.to(m.device))
            pred = torch.stack([lg.float().argmax(dim=1) for lg in logits], dim=1)
            classes[s:s + len(chunk)] = pred.cpu().numpy()
    out[todo] = classes_to_labels(classes)
    return out


__all__ = ["CHEXBERT_CONDITIONS", "CLASS_VALUES", "DEFAULT_TOKENIZER", "HEAD_TO_SCHEMA", "MAX_TOKENS",
           "check_state_dict", "classes_to_labels", "clear_cache", "encode", "label_reports", "load",
           "load_state_dict"]
