"""Report-bank encoders for Table VIII: BERT and decoder LMs (no pad token, causal-LM checkpoints,
remote code, bf16), each pooling (``banks.report.pooling``) checked against the model's own hidden
states. Tiny models saved in tmp_path; nothing downloaded."""

import json
import sys

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModel, BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM,
                          LlamaModel, PreTrainedTokenizerFast)

from amrg.models.text_encoder import SentenceEncoder, pool_hidden, set_pad_token

WORDS = ["the", "heart", "is", "normal", "lungs", "clear", ".", "no", "effusion"]
SENTENCES = ["the heart is normal .", "lungs clear", "no effusion", "the lungs are clear ."]  # "are": unknown


def llama_tokenizer(**special) -> PreTrainedTokenizerFast:
    """A word-level tokenizer like Llama's in what matters here: BOS/EOS/UNK, no pad token, left padding."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = special or dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **special)


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=3 + len(WORDS), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)


def save_llama(path, causal: bool):
    torch.manual_seed(0)
    model = (LlamaForCausalLM if causal else LlamaModel)(llama_config())
    model.save_pretrained(path)
    llama_tokenizer().save_pretrained(path)
    return model.eval()


def save_bert(path):
    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    model = BertModel(BertConfig(vocab_size=5 + len(WORDS), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=48))
    model.save_pretrained(path)
    return model.eval()


def by_hand(model, tokenizer, sentence: str, pooling: str) -> torch.Tensor:
    """One sentence alone (no padding) through the model: the pooled vector its hidden states give."""
    with torch.no_grad():
        h = model(**tokenizer(sentence, return_tensors="pt")).last_hidden_state[0].float()
    return {"mean": h.mean(0), "last": h[-1], "cls": h[0]}[pooling]


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
@pytest.mark.parametrize("kind", ["bert", "llama", "llama_causal"])
def test_each_pooling_equals_the_models_hidden_states(tmp_path, kind, pooling):
    ref = save_bert(tmp_path / kind) if kind == "bert" else save_llama(tmp_path / kind, causal=kind == "llama_causal")
    enc = SentenceEncoder(str(tmp_path / kind), torch.device("cpu"), max_length=16, pooling=pooling)
    base = ref.model if kind == "llama_causal" else ref  # a causal-LM checkpoint is encoded by its base model
    if kind != "bert":
        assert isinstance(enc.model, LlamaModel) and enc.tokenizer.pad_token == "</s>"
        for k, v in base.state_dict().items():
            assert torch.equal(enc.model.state_dict()[k], v), k
    assert enc.tokenizer.padding_side == "right"
    out = enc.encode(SENTENCES, batch_size=4)  # one batch: the short sentences are padded
    assert out.shape == (4, base.config.hidden_size) and out.dtype == np.float32
    for i, s in enumerate(SENTENCES):
        torch.testing.assert_close(torch.from_numpy(out[i]), by_hand(base, enc.tokenizer, s, pooling),
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(enc.encode(SENTENCES, batch_size=1), out, rtol=1e-4, atol=1e-5)


def test_pool_hidden_by_hand_on_right_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool_hidden(hidden, mask, "mean"), torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    torch.testing.assert_close(pool_hidden(hidden, mask, "last"), torch.tensor([[2.0, 3.0], [10.0, 11.0]]))
    torch.testing.assert_close(pool_hidden(hidden, mask, "cls"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool_hidden(hidden, mask, "max")


def test_pad_token_fallback_is_eos_then_unk():
    tok = llama_tokenizer()
    set_pad_token(tok)
    assert tok.pad_token == "</s>"
    tok = llama_tokenizer(unk_token="<unk>")
    set_pad_token(tok)
    assert tok.pad_token == "<unk>"
    tok = llama_tokenizer(pad_token="<s>", eos_token="</s>")
    set_pad_token(tok)
    assert tok.pad_token == "<s>"  # a tokenizer's own pad token is kept
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0})))
    with pytest.raises(ValueError, match="no pad, eos or unk"):
        set_pad_token(tok)


def test_bf16_weights_give_float32_vectors_close_to_fp32(tmp_path):
    save_llama(tmp_path / "llama", causal=True)
    fp32 = SentenceEncoder(str(tmp_path / "llama"), torch.device("cpu"), pooling="last")
    bf16 = SentenceEncoder(str(tmp_path / "llama"), torch.device("cpu"), pooling="last", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    a, b = fp32.encode(SENTENCES), bf16.encode(SENTENCES)
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    np.testing.assert_allclose(b, a, rtol=0.1, atol=0.1)
    for i, s in enumerate(SENTENCES):  # exactly the bf16 model's own last hidden state
        torch.testing.assert_close(torch.from_numpy(b[i]), by_hand(bf16.model, bf16.tokenizer, s, "last"))


REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote_lm"
'''
REMOTE_MODEL = '''from transformers import LlamaForCausalLM

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
'''


def test_trust_remote_code_loads_a_checkpoints_own_code_and_encodes_with_its_base_model(tmp_path, monkeypatch):
    """Like InternLM: the checkpoint ships its modelling code, and its ``AutoModel`` is a causal-LM class
    (an LM head on a base model); the encoder refuses it unless trusted, then pools the base model's states."""
    import transformers.dynamic_module_utils as dyn

    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # the copied code stays in tmp_path
    monkeypatch.setattr(sys, "path", list(sys.path))
    path = tmp_path / "remote"
    save_llama(path, causal=True)
    (path / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (path / "modeling_tiny.py").write_text(REMOTE_MODEL)
    cfg = json.loads((path / "config.json").read_text())
    cfg |= {"model_type": "tiny_remote_lm", "architectures": ["TinyRemoteForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_tiny.TinyRemoteConfig",
                         "AutoModel": "modeling_tiny.TinyRemoteForCausalLM"}}
    (path / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceEncoder(str(path), torch.device("cpu"))
    enc = SentenceEncoder(str(path), torch.device("cpu"), pooling="mean", trust_remote_code=True)
    full = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
    assert type(full).__name__ == "TinyRemoteForCausalLM" and isinstance(enc.model, LlamaModel)
    out = enc.encode(SENTENCES, batch_size=4)
    for i, s in enumerate(SENTENCES):
        torch.testing.assert_close(torch.from_numpy(out[i]), by_hand(full.model, enc.tokenizer, s, "mean"),
                                   rtol=1e-4, atol=1e-5)


def test_an_unknown_pooling_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="pooling"):
        SentenceEncoder(str(tmp_path / "nothing"), torch.device("cpu"), pooling="max")
