"""Tests of the CheXbert labeler loader (amrg.labels.chexbert) on a tiny random BERT in CheXbert's layout.

No hub access: the tokenizer (a small WordPiece vocabulary) and config.json are written to tmp_path, and
the checkpoint is written in the release layout ``{"model_state_dict": {"module." + key: tensor}, ...}``.
The expected labels come from a BERT forward written here by hand (no transformers model), one report at a
time without padding, tokenised by the pure-Python WordPiece tokenizer.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import transformers
from transformers import BertConfig

from amrg.labels import CHEXPERT_14, LABELERS, MODEL_LABELERS, chexbert, label

try:  # transformers >= 5: BertTokenizer is the `tokenizers` backend, the pure-Python one is "Legacy"
    from transformers import BertTokenizerLegacy as SlowBertTokenizer
except ImportError:  # transformers 4.x
    from transformers import BertTokenizer as SlowBertTokenizer

COL = {name: i for i, name in enumerate(CHEXPERT_14)}
# src/constants.py CONDITIONS of github.com/stanfordmlgroup/CheXbert (the head order)
CHEXBERT_CONDITIONS = ['Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity',
                       'Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis',
                       'Pneumothorax', 'Pleural Effusion', 'Pleural Other', 'Fracture',
                       'Support Devices', 'No Finding']
HEAD = {name: j for j, name in enumerate(CHEXBERT_CONDITIONS)}
VALUE = {0: math.nan, 1: 1.0, 2: 0.0, 3: -1.0}  # CheXbert class -> our value

WORDS = ("the heart size is normal lungs are clear no pleural effusion or pneumothorax there mild "
         "cardio ##megaly edema pulmonary focal consolidation airspace disease left right lower lobe "
         "opacity with small stable and of a in bibasilar atelectasis").split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
MAX_POS = 40  # < 512: the loader must cut at config.max_position_embeddings

REPORTS = [
    "The heart size is normal. The lungs are clear.",
    "Mild cardiomegaly.",
    "",
    "No pleural effusion or pneumothorax.",
    "   \n\t ",
    "Left lower lobe opacity with small pleural effusion. Pulmonary edema. XYZZY unknown words!",
    "The lungs are clear",
    # longer than MAX_POS tokens: truncated to [CLS] + 38 tokens + [SEP]
    "There is bibasilar atelectasis and focal airspace consolidation in the right lower lobe. " * 4,
    "Stable mild cardiomegaly. No focal consolidation.\nThe   lungs are clear.",
]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer dir with config.json, state dict without 'module.', config)."""
    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = d / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    if hasattr(transformers, "BertTokenizerLegacy"):
        fast = transformers.BertTokenizer(vocab=str(vocab))
    else:
        fast = transformers.BertTokenizerFast(vocab_file=str(vocab))
    fast.save_pretrained(d)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_POS, hidden_act="gelu")
    config.save_pretrained(d)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in transformers.BertModel(config).state_dict().items():
        if "LayerNorm.weight" in k:
            state["bert." + k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # large random weights so that [CLS] depends on the text
            state["bert." + k] = 0.5 * torch.randn(v.shape, generator=g)
    for j in range(14):
        n = 2 if j == 13 else 4
        state[f"linear_heads.{j}.weight"] = torch.randn((n, 32), generator=g)
        state[f"linear_heads.{j}.bias"] = 0.1 * torch.randn((n,), generator=g)
    return d, state, config


def write_ckpt(path, state, **extra):
    torch.save({"epoch": 3, "model_state_dict": {"module." + k: v for k, v in state.items()},
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 2e-5, "betas": (0.9, 0.999)}]},
                **extra}, path)
    return path


def run(reports, ckpt, tok_dir, **kw):
    return label(reports, labeler="chexbert", chexbert_checkpoint=str(ckpt), chexbert_tokenizer=str(tok_dir),
                 device="cpu", **kw)


# ----------------------------------------------------------------------------- hand computation
def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def hand_logits(ids: list[int], s: dict, cfg: BertConfig) -> list[torch.Tensor]:
    """BERT encoder + CheXbert heads for one unpadded sequence, from the raw weights."""
    lin = lambda x, p: x @ s[p + ".weight"].T + s[p + ".bias"]  # noqa: E731
    t = torch.tensor(ids)
    e = "bert.embeddings."
    x = s[e + "word_embeddings.weight"][t] + s[e + "position_embeddings.weight"][: len(ids)] \
        + s[e + "token_type_embeddings.weight"][0]
    x = _ln(x, s[e + "LayerNorm.weight"], s[e + "LayerNorm.bias"], cfg.layer_norm_eps)
    nh, dh = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    for i in range(cfg.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").view(-1, nh, dh).transpose(0, 1)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1)
        ctx = (att @ v).transpose(0, 1).reshape(-1, cfg.hidden_size)
        x = _ln(x + lin(ctx, p + "attention.output.dense"), s[p + "attention.output.LayerNorm.weight"],
                s[p + "attention.output.LayerNorm.bias"], cfg.layer_norm_eps)
        h = lin(x, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))  # exact GELU
        x = _ln(x + lin(h, p + "output.dense"), s[p + "output.LayerNorm.weight"], s[p + "output.LayerNorm.bias"],
                cfg.layer_norm_eps)
    cls = x[0]
    return [lin(cls, f"linear_heads.{j}") for j in range(14)]


def hand_ids(reports, tok_dir) -> list[list[int]]:
    """CheXbert's encoding (src/bert_tokenizer.py) with the pure-Python tokenizer, cut at MAX_POS."""
    slow = SlowBertTokenizer(vocab_file=str(tok_dir / "vocab.txt"))
    out = []
    for text in reports:
        pieces = slow.tokenize(" ".join(text.split()))
        ids = [slow.cls_token_id, *slow.convert_tokens_to_ids(pieces)][: MAX_POS - 1] + [slow.sep_token_id]
        out.append(ids if pieces else [])
    return out


def hand_labels(reports, tok_dir, state, cfg):
    """Expected (N, 14) labels and the smallest top-1 margin of any head (to rule out near ties)."""
    out = np.full((len(reports), 14), np.nan, dtype=np.float32)
    margin = math.inf
    for r, ids in enumerate(hand_ids(reports, tok_dir)):
        if not ids:
            continue
        with torch.no_grad():
            logits = hand_logits(ids, state, cfg)
        for j, lg in enumerate(logits):
            top2 = torch.topk(lg, 2).values
            margin = min(margin, float(top2[0] - top2[1]))
            out[r, COL[CHEXBERT_CONDITIONS[j]]] = VALUE[int(lg.argmax())]
    return out, margin


def same(a, b):
    return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)


# ----------------------------------------------------------------------------- tests
def test_registered_and_head_order():
    assert "chexbert" in LABELERS and "chexbert" in MODEL_LABELERS and LABELERS["rules"] is not None
    assert list(chexbert.CHEXBERT_CONDITIONS) == CHEXBERT_CONDITIONS
    assert sorted(CHEXBERT_CONDITIONS) == sorted(CHEXPERT_14)
    assert [CHEXPERT_14[c] for c in chexbert.HEAD_TO_SCHEMA] == CHEXBERT_CONDITIONS
    classes = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 1, 0], [3] * 13 + [1]])
    got = chexbert.classes_to_labels(classes)
    assert got.dtype == np.float32 and got.shape == (2, 14)
    for j, name in enumerate(CHEXBERT_CONDITIONS):
        assert same(got[0, COL[name]], VALUE[int(classes[0, j])])
    assert got[1, COL["No Finding"]] == 1.0 and np.all(np.delete(got[1], COL["No Finding"]) == -1.0)


def test_matches_hand_forward(tiny, tmp_path):
    tok_dir, state, cfg = tiny
    ckpt = write_ckpt(tmp_path / "chexbert.pth", state)
    expected, margin = hand_labels(REPORTS, tok_dir, state, cfg)
    loaded = chexbert.load(ckpt, tok_dir, "cpu")
    ids = chexbert.encode(loaded.tokenizer, REPORTS, loaded.max_len)
    assert ids == hand_ids(REPORTS, tok_dir)
    assert len(ids[7]) == MAX_POS and ids[7][-1] == loaded.tokenizer.sep_token_id  # truncated, [SEP] kept
    assert margin > 1e-3, "random weights gave a near tie; pick another seed"
    for bs in (1, 2, 64):  # padding, length sorting and batch boundaries must not change anything
        got = run(REPORTS, ckpt, tok_dir, batch_size=bs)
        assert got.shape == (len(REPORTS), 14) and got.dtype == np.float32
        assert set(np.unique(got[~np.isnan(got)])) <= {-1.0, 0.0, 1.0}
        assert same(got, expected), f"batch_size={bs}\n{got}\n{expected}"
    assert np.all(np.isnan(got[[2, 4]]))  # "" and white space: all-NaN rows
    nf = got[:, COL["No Finding"]]
    assert set(nf[~np.isnan(nf)]) <= {1.0}  # No Finding is 1 or NaN, never 0 / -1
    # the tiny random model must actually discriminate between reports, or this test proves little
    filled = [i for i in range(len(REPORTS)) if i not in (2, 4)]
    assert len({tuple(np.nan_to_num(got[i], nan=9).tolist()) for i in filled}) > 2


def test_forced_classes(tiny, tmp_path):
    tok_dir, state, _ = tiny
    forced = {"Cardiomegaly": 1, "Edema": 3, "Pleural Effusion": 2, "Lung Opacity": 0, "Lung Lesion": 1,
              "Support Devices": 2, "No Finding": 0}
    s = dict(state)
    for name, k in forced.items():
        j = HEAD[name]
        w = torch.zeros_like(state[f"linear_heads.{j}.weight"])
        b = torch.zeros_like(state[f"linear_heads.{j}.bias"])
        b[k] = 100.0
        s[f"linear_heads.{j}.weight"], s[f"linear_heads.{j}.bias"] = w, b
    got = run(["Mild cardiomegaly.", "The lungs are clear.", ""], write_ckpt(tmp_path / "forced.pth", s), tok_dir)
    for r in (0, 1):
        row = dict(zip(CHEXPERT_14, got[r].tolist()))
        assert row["Cardiomegaly"] == 1.0 and row["Edema"] == -1.0 and row["Pleural Effusion"] == 0.0
        assert math.isnan(row["Lung Opacity"]) and row["Lung Lesion"] == 1.0  # the swapped pair
        assert row["Support Devices"] == 0.0 and math.isnan(row["No Finding"])
    assert np.all(np.isnan(got[2]))
    j = HEAD["No Finding"]
    s[f"linear_heads.{j}.bias"] = torch.tensor([0.0, 100.0])
    got = run(["The lungs are clear."], write_ckpt(tmp_path / "nf.pth", s), tok_dir)
    assert got[0, COL["No Finding"]] == 1.0


def test_wrong_keys(tiny, tmp_path):
    tok_dir, state, _ = tiny
    s = {k: v for k, v in state.items() if not k.startswith("linear_heads.13.")}
    s["classifier.weight"] = torch.zeros(2, 32)
    with pytest.raises(ValueError) as e:
        run(["Mild cardiomegaly."], write_ckpt(tmp_path / "bad.pth", s), tok_dir)
    msg = str(e.value)
    assert "missing keys: linear_heads.13.bias, linear_heads.13.weight" in msg
    assert "unexpected keys: classifier.weight" in msg
    s = dict(state)
    s["linear_heads.13.weight"] = torch.zeros(4, 32)  # a 4-class No Finding head
    with pytest.raises(ValueError, match=r"shape mismatch.*linear_heads\.13\.weight"):
        run(["Mild cardiomegaly."], write_ckpt(tmp_path / "shape.pth", s), tok_dir)
    # without the DataParallel prefix (bare state dict) and with transformers 3.x/4.x's position_ids buffer
    s = dict(state)
    s["bert.embeddings.position_ids"] = torch.arange(MAX_POS)[None]
    bare = tmp_path / "bare.pth"
    torch.save(s, bare)
    ref = run(REPORTS, write_ckpt(tmp_path / "ref.pth", state), tok_dir)
    assert same(run(REPORTS, bare, tok_dir), ref)


_PWNED = []


def _pwn():
    _PWNED.append(1)
    return "pwned"


class _Evil:
    def __reduce__(self):
        return (_pwn, ())


def test_pickle_with_code_refused(tiny, tmp_path):
    tok_dir, state, _ = tiny
    ckpt = write_ckpt(tmp_path / "evil.pth", state, hook=_Evil())
    with pytest.raises(ValueError, match="weights_only"):
        run(["Mild cardiomegaly."], ckpt, tok_dir)
    assert _PWNED == []


def test_inputs_cache_and_options(tiny, tmp_path, monkeypatch):
    tok_dir, state, _ = tiny
    ckpt = write_ckpt(tmp_path / "c.pth", state)
    with pytest.raises(TypeError, match=r"reports\[1\].*int"):
        run(["ok", 3], ckpt, tok_dir)
    with pytest.raises(TypeError, match="sequence of strings"):
        run("Mild cardiomegaly.", ckpt, tok_dir)
    with pytest.raises(ValueError, match="chexbert_checkpoint"):
        label(["x"], labeler="chexbert")
    with pytest.raises(FileNotFoundError):
        run(["x"], tmp_path / "nope.pth", tok_dir)
    with pytest.raises(ValueError, match="batch_size"):
        run(["x"], ckpt, tok_dir, batch_size=0)
    empty = run([], ckpt, tok_dir)
    assert empty.shape == (0, 14) and empty.dtype == np.float32
    # the rule labeler ignores the CheXbert options
    assert same(label(["Mild cardiomegaly."], chexbert_checkpoint="unused"), label(["Mild cardiomegaly."]))

    chexbert.clear_cache()
    calls = []
    real = chexbert.load_state_dict
    monkeypatch.setattr(chexbert, "load_state_dict", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = run(REPORTS, ckpt, tok_dir)
    b = run(REPORTS[:2], ckpt, tok_dir, batch_size=1)
    assert len(calls) == 1 and same(a[:2], b)  # loaded once
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a rewritten checkpoint is reloaded
    run(["x"], ckpt, tok_dir)
    assert len(calls) == 2
    chexbert.clear_cache()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny, tmp_path):
    tok_dir, state, _ = tiny
    ckpt = write_ckpt(tmp_path / "g.pth", state)
    cpu = run(REPORTS, ckpt, tok_dir)
    gpu = label(REPORTS, labeler="chexbert", chexbert_checkpoint=str(ckpt), chexbert_tokenizer=str(tok_dir),
                device="cuda")
    assert same(cpu, gpu)
    bf16 = label(REPORTS, labeler="chexbert", chexbert_checkpoint=str(ckpt), chexbert_tokenizer=str(tok_dir),
                 device="auto", precision="bf16")
    assert bf16.shape == cpu.shape and bf16.dtype == np.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_device_option_reaches_chexbert(tiny, tmp_path):
    """label(..., device=) is passed to CheXbert and resolved by amrg.io.resolve_device (runtime.device)."""
    tok_dir, state, _ = tiny
    ckpt = write_ckpt(tmp_path / "d.pth", state)
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        label(["Mild cardiomegaly."], labeler="chexbert", chexbert_checkpoint=str(ckpt),
              chexbert_tokenizer=str(tok_dir), device="cuda")
    assert chexbert.load(ckpt, tok_dir, "cpu").device == torch.device("cpu")
    chexbert.clear_cache()
