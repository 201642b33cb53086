"""RadGraph F1: entity / relation overlap between the RadGraph graphs of a generated and a reference report.

Extraction (a model turns each report into a graph) is kept apart from scoring (pure Python on the graphs):

* :class:`RadGraphExtractor` runs the ``radgraph`` package's model from a **local** directory only and
  returns annotations; it never downloads anything.
* :func:`score_annotations` scores annotations in the package's published JSON format::

      {"text": "...", "entities": {"1": {"tokens": "effusion", "label": "Observation::definitely present",
                                         "start_ix": 3, "end_ix": 3, "relations": [["located_at", "2"]]}, ...}}

* :func:`radgraph_scores` does both for parallel lists of references and hypotheses.

Scores (per study, then the corpus value is the plain mean over studies, in study order)
---------------------------------------------------------------------------------------
``simple`` / ``partial`` / ``complete`` are the three reward levels of the ``radgraph`` package's
``F1RadGraph`` (Delbrouck et al., EMNLP Findings 2022; ``radgraph/rewards.py``, version 0.1.18), matched
exactly (``tests/test_radgraph.py`` runs the package's own ``compute_reward`` on the same graphs):

* ``simple`` (RG_E): set of ``(tokens, label)`` over all entities;
* ``partial`` (RG_ER, the one most papers report as "F1-RadGraph"): ``(tokens, label)`` for an entity
  without relations, ``(tokens, label, True)`` for one with at least one outgoing relation;
* ``complete`` (RG_ER-bar): ``(tokens, label)`` for an entity without relations, and for every
  relation of an entity ``(tokens.lower(), label, relation type, target tokens.lower())`` (the package
  lower-cases only these relation tuples, so we do too);
* F1 of the two sets with precision ``|H & R| / |H|`` (0 if H is empty), recall ``|H & R| / |R|`` (0 if
  R is empty), F1 0 when P + R = 0;
* a study whose hypothesis **or** reference graph has no entity scores 0 on all three levels (the
  package's ``compute_reward``), and so does one whose hypothesis or reference text is empty
  (``F1RadGraph`` skips those; :class:`RadGraphExtractor` returns an empty graph for them without running
  the model; a whitespace-only text counts as empty here, which the package does not special-case).

``entity`` / ``relation`` / ``combined`` are the "RadGraph F1" of CXR-Report-Metric (Yu et al., Patterns
2023), which ReXrank uses (its RadCliQ component ``radgraph_combined``); matched to
``CXRMetric/radgraph_evaluate_model.py`` (``parse_entity_relation``, ``compute_f1``) and
``CXRMetric/run_eval.py`` (``add_radgraph_col``) of rajpurkarlab/CXR-Report-Metric:

* ``entity``: F1 over the set of ``(tokens, label)`` (the same set as ``simple``);
* ``relation``: F1 over the set of ``((tokens, label), (target tokens, target label), relation type)``
  (no lower-casing);
* same P / R / F1 formula, but **no** "no entity -> 0" rule beyond it: empty sets simply give P or R = 0,
  so two graphs without relations score relation F1 = 0;
* ``combined`` = (entity + relation) / 2 per study.

Comparability: CXR-Report-Metric extracts with the RadGraph v1 DyGIE++ checkpoint and the same
tokenisation regex as this package's ``model_type="radgraph"`` (``radgraph/utils.py:preprocess_reports``);
``entity`` / ``relation`` / ``combined`` are therefore only ReXrank-comparable with a ``radgraph`` (v1)
model. ``partial`` is usually reported with ``radgraph-xl`` (package >= 0.1.0) or the older v1 model;
the provenance records which model type produced a score.

Bootstrap: every score is a per-study mean, so a resample's value is the weighted mean of the per-study
values (:func:`mean_replicates`, with ``amrg.metrics.bootstrap.resample_weights``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..models.hub import resolve_model_ref
from .bootstrap import mean_replicates  # noqa: F401  (per-study replicates; re-exported)
from .provenance import describe, file_sha256, model_ref_fields

REWARD_LEVELS: tuple[str, ...] = ("simple", "partial", "complete")
CXR_METRIC_KEYS: tuple[str, ...] = ("entity", "relation", "combined")
KEYS: tuple[str, ...] = REWARD_LEVELS + CXR_METRIC_KEYS
# the radgraph package's model types for chest X-ray reports (it also knows "echograph", for echo reports)
MODEL_TYPES: tuple[str, ...] = ("radgraph", "radgraph-xl", "modern-radgraph-xl")
MODEL_PARAM = "score.radgraph_model"
MODEL_TYPE_PARAM = "score.radgraph_model_type"
BASE_MODEL_PARAM = "score.radgraph_base_model"
_MODEL_FILES = ("config.json", "weights.th", "vocabulary")
_ARCHIVE_HINT = ("the extracted <model_type>.tar.gz archive of the StanfordAIMI/RRG_scorers hub repository "
                 "(a directory with config.json, weights.th and vocabulary/)")

Annotation = dict[str, Any]


# --------------------------------------------------------------------------------------------- scoring
def _f1(hyp: set, ref: set) -> float:
    """The package's (and CXR-Report-Metric's) set F1: P = |H&R|/|H|, R = |H&R|/|R|, each 0 on an empty set."""
    tp = len(hyp & ref)
    p = tp / len(hyp) if hyp else 0.0
    r = tp / len(ref) if ref else 0.0
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _entities(ann: Annotation) -> dict[str, dict[str, Any]]:
    ents = ann.get("entities")
    if not isinstance(ents, dict):
        raise ValueError(f"a RadGraph annotation needs an 'entities' dict; got {type(ents).__name__}")
    return ents


def _target(ents: dict[str, dict[str, Any]], rel: Sequence[Any]) -> dict[str, Any]:
    try:
        return ents[rel[1]]
    except KeyError:
        raise ValueError(f"relation {list(rel)!r} points to entity id {rel[1]!r}, which the annotation lacks "
                         f"(ids: {sorted(ents)})") from None


def _simple_set(ann: Annotation) -> set:
    return {(e["tokens"], e["label"]) for e in _entities(ann).values()}


def _partial_set(ann: Annotation) -> set:
    return {(e["tokens"], e["label"], True) if e["relations"] else (e["tokens"], e["label"])
            for e in _entities(ann).values()}


def _complete_set(ann: Annotation) -> set:
    ents = _entities(ann)
    out: set = set()
    for e in ents.values():
        if not e["relations"]:
            out.add((e["tokens"], e["label"]))
        for rel in e["relations"]:
            out.add((e["tokens"].lower(), e["label"], rel[0], _target(ents, rel)["tokens"].lower()))
    return out


def _relation_set(ann: Annotation) -> set:
    ents = _entities(ann)
    out: set = set()
    for e in ents.values():
        for rel in e["relations"]:
            t = _target(ents, rel)
            out.add(((e["tokens"], e["label"]), (t["tokens"], t["label"]), rel[0]))
    return out


def reward(hyp: Annotation, ref: Annotation) -> tuple[float, float, float]:
    """``(simple, partial, complete)`` F1 of one study, as ``radgraph.rewards.compute_reward(..., "all")``."""
    if not _entities(hyp) or not _entities(ref):
        return 0.0, 0.0, 0.0
    return (_f1(_simple_set(hyp), _simple_set(ref)), _f1(_partial_set(hyp), _partial_set(ref)),
            _f1(_complete_set(hyp), _complete_set(ref)))


def cxr_metric_f1(hyp: Annotation, ref: Annotation) -> tuple[float, float, float]:
    """``(entity, relation, combined)`` F1 of one study, as CXR-Report-Metric / ReXrank compute them."""
    ent = _f1(_simple_set(hyp), _simple_set(ref))
    rel = _f1(_relation_set(hyp), _relation_set(ref))
    return ent, rel, (ent + rel) / 2


def study_scores(hyp: Annotation, ref: Annotation) -> dict[str, float]:
    """All six per-study values ``{simple, partial, complete, entity, relation, combined}``."""
    return dict(zip(KEYS, reward(hyp, ref) + cxr_metric_f1(hyp, ref)))


def score_annotations(ref_annotations: Sequence[Annotation], hyp_annotations: Sequence[Annotation]
                      ) -> dict[str, Any]:
    """Corpus RadGraph F1 from per-study graphs (pure Python, no model).

    Returns ``{"simple", "partial", "complete", "entity", "relation", "combined": corpus mean,
    "per_study": {key: [value per study, in the given study order]}, "n": number of studies}``.
    """
    if len(ref_annotations) != len(hyp_annotations) or not ref_annotations:
        raise ValueError(f"need as many reference as hypothesis annotations, at least one "
                         f"(got {len(ref_annotations)} and {len(hyp_annotations)})")
    per = {k: [] for k in KEYS}
    for ref, hyp in zip(ref_annotations, hyp_annotations):
        for k, v in study_scores(hyp, ref).items():
            per[k].append(float(v))
    out: dict[str, Any] = {k: float(np.mean(v)) for k, v in per.items()}
    out["per_study"] = per
    out["n"] = len(ref_annotations)
    return out


# ------------------------------------------------------------------------------------------ extraction
@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """No request to the HF hub while the block runs: transformers then reads only local files / the cache."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _special_template(tok: Any, pair: bool) -> list[list[int]]:
    """The special-token ids a tokenizer puts around one segment (``[prefix, suffix]``) or two
    (``[prefix, middle, suffix]``), read off the tokenizer's own output for dummy segments."""
    cache = tok.__dict__.setdefault("_amrg_special_templates", {})
    if pair not in cache:
        a = tok("a", add_special_tokens=False)["input_ids"]
        b = tok("b", add_special_tokens=False)["input_ids"]
        full = tok("a", "b", add_special_tokens=True)["input_ids"] if pair else tok("a", add_special_tokens=True)["input_ids"]
        i = next(k for k in range(len(full)) if full[k:k + len(a)] == a)
        rest = full[i + len(a):]
        if not pair:
            cache[pair] = [full[:i], rest]
        else:
            j = next(k for k in range(len(rest)) if rest[k:k + len(b)] == b)
            cache[pair] = [full[:i], rest[:j], rest[j + len(b):]]
    return cache[pair]


def _encode_plus(self: Any, text: Any, text_pair: Any = None, **kwargs: Any) -> Any:
    return self(text, text_pair, **kwargs)


def _build_inputs_with_special_tokens(self: Any, ids0: list[int], ids1: list[int] | None = None) -> list[int]:
    if ids1 is None:
        pre, post = _special_template(self, False)
        return pre + list(ids0) + post
    pre, mid, post = _special_template(self, True)
    return pre + list(ids0) + mid + list(ids1) + post


@contextlib.contextmanager
def _transformers5_compat() -> Iterator[None]:
    """Give tokenizers back the two transformers-4 methods the radgraph package's vendored AllenNLP calls.

    transformers 5 removed ``encode_plus`` (now ``__call__`` with the same arguments) and, for
    tokenizers-backed ("fast") tokenizers, ``build_inputs_with_special_tokens``. While the block runs,
    both are added to ``PreTrainedTokenizerBase`` **only if missing**: ``encode_plus`` calls ``__call__``;
    ``build_inputs_with_special_tokens`` wraps the ids in the special tokens the tokenizer itself adds
    (read off its output for dummy segments, so it is the tokenizer's own template, not a guess). Nothing
    changes under transformers 4, and the methods are removed again afterwards."""
    from transformers import PreTrainedTokenizerBase as Base

    added = []
    for name, fn in (("encode_plus", _encode_plus),
                     ("build_inputs_with_special_tokens", _build_inputs_with_special_tokens)):
        if not any(name in vars(c) for c in Base.__mro__):
            setattr(Base, name, fn)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            delattr(Base, name)


def _find_model_dir(path: Path, model_type: str | None) -> tuple[Path, str]:
    """The directory holding config.json / weights.th / vocabulary, and its model type."""
    def complete(p: Path) -> bool:
        return all((p / f).exists() for f in _MODEL_FILES)

    if complete(path):
        mt = model_type or path.name
        if mt not in MODEL_TYPES:
            raise ValueError(f"cannot tell the RadGraph model type of {path} from its name; set {MODEL_TYPE_PARAM} "
                             f"to one of {list(MODEL_TYPES)}")
        return path, mt
    # the package's own cache layout: <model_cache_dir>/<model_type>/
    candidates = [model_type] if model_type else [m for m in MODEL_TYPES if complete(path / m)]
    for mt in candidates:
        if complete(path / mt):
            if len(candidates) > 1:
                raise ValueError(f"{path} holds several RadGraph models {candidates}; set {MODEL_TYPE_PARAM}")
            return path / mt, mt
    missing = [f for f in _MODEL_FILES if not (path / f).exists()]
    raise FileNotFoundError(f"no RadGraph model at {path} (missing {missing}); set {MODEL_PARAM} to {_ARCHIVE_HINT}, "
                            f"or to the package's cache directory that holds <model_type>/")


class RadGraphExtractor:
    """RadGraph annotations from a local ``radgraph`` package model; never downloads.

    ``model_dir``: a directory with the extracted model archive (``config.json``, ``weights.th``,
    ``vocabulary/``), or the package's cache directory holding ``<model_type>/``; ``pkg:`` references are
    resolved by :func:`amrg.models.hub.resolve_model_ref`. ``model_type`` (``radgraph`` = v1,
    ``radgraph-xl``, ``modern-radgraph-xl``) defaults to the directory's name; it also selects the
    package's tokenisation of the report text.

    The model's config names its base transformer (e.g. a BiomedBERT hub id) whose tokenizer and config
    (not weights: those are in ``weights.th``) the package loads by that name. ``base_model`` points that
    name at a local directory instead; without it they must already be in the local HF cache. Either way
    hub access is switched off while the package loads and runs, so a missing file fails instead of
    downloading.

    The package's model directory is never written to: a private staging directory of symlinks (and the
    config, rewritten when ``base_model`` is given) is what the package reads, because the package's
    vocabulary loader creates a lock file next to the vocabulary.
    """

    def __init__(self, model_dir: str | None, model_type: str | None = None, base_model: str | None = None,
                 device: str = "cpu", chunk_size: int = 64):
        if not model_dir:
            raise ValueError(f"RadGraph F1 needs a local RadGraph model: set {MODEL_PARAM} to {_ARCHIVE_HINT}")
        try:
            import radgraph  # noqa: F401
        except ImportError as e:
            raise ImportError(f"RadGraph F1 needs the 'radgraph' package (pip install 'amrg[metrics]', or "
                              f"radgraph>=0.1.18), or unset {MODEL_PARAM}: {e}") from e
        self.model_ref = str(model_dir)
        path = Path(resolve_model_ref(self.model_ref)).expanduser()
        self.model_dir, self.model_type = _find_model_dir(path, model_type)
        self.base_model_ref = base_model or None
        self.base_model = str(Path(resolve_model_ref(base_model)).expanduser().resolve()) if base_model else None
        if self.base_model and not Path(self.base_model).is_dir():
            raise FileNotFoundError(f"{BASE_MODEL_PARAM}={base_model!r} is not a local directory")
        self.device, self.chunk_size = device, max(1, int(chunk_size))
        self._staging = tempfile.TemporaryDirectory(prefix="amrg-radgraph-")
        cache = self._stage(Path(self._staging.name))
        from radgraph import RadGraph

        cuda = -1 if str(device).startswith("cpu") else int(str(device).partition(":")[2] or 0)
        try:
            with _hub_offline(), _transformers5_compat():
                self._model = RadGraph(model_type=self.model_type, model_cache_dir=str(cache), cuda=cuda)
        except OSError as e:  # a base tokenizer / config not found locally
            raise OSError(f"RadGraph could not load its base transformer {self.base_names} from local files "
                          f"(hub access is off): set {BASE_MODEL_PARAM} to a local directory with that model's "
                          f"tokenizer and config, or put it in the HF cache: {e}") from e

    def _stage(self, root: Path) -> Path:
        """``root/<model_type>/`` with links to the weights and vocabulary files and the (rewritten) config."""
        dst = root / self.model_type
        (dst / "vocabulary").mkdir(parents=True)
        os.symlink(self.model_dir.resolve() / "weights.th", dst / "weights.th")
        for f in (self.model_dir / "vocabulary").iterdir():
            if not f.name.startswith("."):
                os.symlink(f.resolve(), dst / "vocabulary" / f.name)
        cfg = json.loads((self.model_dir / "config.json").read_text())
        bert_cfgs = [cfg.get("dataset_reader", {}).get("token_indexers", {}).get("bert", {}),
                     cfg.get("model", {}).get("embedder", {}).get("token_embedders", {}).get("bert", {})]
        self.base_names = sorted({c["model_name"] for c in bert_cfgs if "model_name" in c})
        if self.base_model:
            for c in bert_cfgs:
                if "model_name" in c:
                    c["model_name"] = self.base_model
        (dst / "config.json").write_text(json.dumps(cfg))
        return root

    def __call__(self, texts: Sequence[str]) -> list[Annotation]:
        """One annotation per text, in order; an empty (or whitespace-only) text gets an empty graph."""
        from ..io import progress

        out: list[Annotation | None] = [None] * len(texts)
        todo = []
        for i, t in enumerate(texts):
            if t is None or not str(t).strip():
                out[i] = {"text": "", "entities": {}}
            else:
                todo.append(i)
        chunks = [todo[k:k + self.chunk_size] for k in range(0, len(todo), self.chunk_size)]
        for chunk in progress(chunks, "radgraph extraction", total=len(todo), unit="reports", count=len):
            with _hub_offline(), _transformers5_compat():
                res = self._model([str(texts[i]) for i in chunk])
            for j, i in enumerate(chunk):
                if str(j) not in res:
                    raise RuntimeError(f"the radgraph package returned no annotation for text {i} "
                                       f"({str(texts[i])[:80]!r}); it logs the error above")
                ann = res[str(j)]
                out[i] = {"text": ann.get("text", ""), "entities": ann.get("entities", {})}
        return out  # type: ignore[return-value]

    def provenance(self) -> dict[str, Any]:
        return radgraph_provenance(self)


def radgraph_provenance(extractor: RadGraphExtractor | None = None, **extra: Any) -> dict[str, Any]:
    """JSON-able description of how the RadGraph scores were made (package, model, weight checksum, keys)."""
    prov = describe(
        "radgraph", "RadGraph F1", "radgraph",
        keys={"simple": "RG_E (F1RadGraph reward_level='simple')",
              "partial": "RG_ER (F1RadGraph reward_level='partial'; usually reported as F1-RadGraph)",
              "complete": "RG_ER-bar (F1RadGraph reward_level='complete')",
              "entity": "CXR-Report-Metric / ReXrank RadGraph entity F1",
              "relation": "CXR-Report-Metric / ReXrank RadGraph relation F1",
              "combined": "CXR-Report-Metric / ReXrank radgraph_combined = (entity + relation) / 2"},
        aggregation="mean over studies of the per-study F1",
        empty_text="an empty hypothesis or reference scores 0 (no model run)",
    )
    if extractor is not None:
        prov.update(model_type=extractor.model_type, **model_ref_fields(extractor.model_ref),
                    weights_sha256={"weights.th": file_sha256(extractor.model_dir / "weights.th"),
                                    "config.json": file_sha256(extractor.model_dir / "config.json")},
                    base_model=extractor.base_model_ref or extractor.base_names,
                    rexrank_comparable_model=extractor.model_type == "radgraph")
    prov.update(extra)
    return prov


def radgraph_scores(refs: Sequence[str], hyps: Sequence[str], extractor: Callable[[Sequence[str]], list[Annotation]],
                    ref_annotations: Sequence[Annotation] | None = None) -> dict[str, Any]:
    """Extract graphs for ``hyps`` (and ``refs`` unless ``ref_annotations`` are given) and score them.

    ``extractor`` is a :class:`RadGraphExtractor` (or any callable texts -> annotations). Pass
    ``ref_annotations`` to reuse the reference graphs across systems scored on the same test split.
    Returns :func:`score_annotations`'s dict; per-study values are in study order."""
    if len(refs) != len(hyps):
        raise ValueError(f"need as many references as hypotheses (got {len(refs)} and {len(hyps)})")
    ref_ann = list(ref_annotations) if ref_annotations is not None else extractor(list(refs))
    if len(ref_ann) != len(refs):
        raise ValueError(f"got {len(ref_ann)} reference annotations for {len(refs)} references")
    return score_annotations(ref_ann, extractor(list(hyps)))
