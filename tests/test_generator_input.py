"""What the LLM is fed and how it decodes: BOS first, the prompt template's text around the image part
[F, Q, F'] (word by word from the tokenizer's vocabulary), the loss on report tokens + EOS only, the
image-part LayerNorm, the views concatenated or averaged (the visual-token seam), length_penalty and
trust_remote_code reaching HF, and generator specs saved before these fields still loading."""

from __future__ import annotations

import types

import pytest
import torch

from amrg.config import R2GENGPT_TEMPLATE, BankIndex, Decode, Generator, Hopfield, Llm
from amrg.models import llm as llm_module
from amrg.models.features import N_VIEWS, study_features, visual_tokens
from amrg.models.generator import GeneratorSpec, create_generator, enhanced_tokens, split_template
from amrg.models.llm import create_llm, save_llm

from .test_paper_path import _tiny_llama

REPORTS = ["the heart is normal . the lungs are clear .", "no pleural effusion . heart size is normal .",
           "there is a left pleural effusion .", "the lungs are clear . no pneumothorax ."] * 2
PROMPT = "write the report ."
VISUAL_DIM, QUERY_DIM, N_F = 12, 8, 6
# min_word_freq 3: a template word seen once would be <unk> unless the template is in the tokenizer's texts
SCRATCH = Llm(source="scratch", trainable="full", hidden_size=16, layers=1, heads=2, intermediate_size=32,
              min_word_freq=3)


def _spec(**kw) -> GeneratorSpec:
    return GeneratorSpec(SCRATCH, Hopfield(dim=8), BankIndex(), PROMPT, 1, VISUAL_DIM, QUERY_DIM, **kw)


def _banks() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, VISUAL_DIM, generator=g), torch.randn(4, 20, generator=g)


def _generator(seed=0, **kw):
    torch.manual_seed(seed)
    return create_generator(_spec(**kw), *_banks(), train_texts=REPORTS).eval()


def _inputs(b=2, n_f=N_F, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n_f, VISUAL_DIM, generator=g), torch.randn(b, 14, QUERY_DIM, generator=g)


def _rows(gen, words: list[str]) -> torch.Tensor:
    """The LLM's input embeddings of ``words``, looked up in the vocabulary by hand."""
    vocab = gen.tokenizer.get_vocab()
    return gen.llm.get_input_embeddings().weight[[vocab[w] for w in words]]


def _image(gen, f, fd) -> torch.Tensor:
    """[F, Q, F'] from the generator's own modules, before any LayerNorm."""
    return torch.cat([gen.proj_visual(f), gen.proj_query(fd), enhanced_tokens(gen.v_hopfield, gen.r_hopfield, fd)], 1)


@torch.no_grad()
def test_prefix_is_bos_then_the_template_text_around_the_image():
    gen = _generator(prompt_template=R2GENGPT_TEMPLATE)
    f, fd = _inputs()
    prefix = gen.prefix(f, fd)
    before = ["<s>", "human:", "<img>"]  # word-level tokenizer: lower-cased, split on whitespace
    after = ["</img>", *PROMPT.split(), "assistant:"]
    n_img = N_F + 14 + 28
    assert prefix.shape == (2, len(before) + n_img + len(after), 16)
    assert gen.tokenizer.convert_ids_to_tokens(gen.before_ids[:1].tolist()) == [gen.tokenizer.bos_token]
    torch.testing.assert_close(prefix[:, 0], _rows(gen, ["<s>"]).expand(2, -1))  # BOS at position 0
    torch.testing.assert_close(prefix[:, :3], _rows(gen, before).expand(2, -1, -1))
    torch.testing.assert_close(prefix[:, 3:3 + n_img], _image(gen, f, fd))
    torch.testing.assert_close(prefix[:, 3:3 + N_F], gen.proj_visual(f))
    torch.testing.assert_close(prefix[:, 3 + N_F:3 + N_F + 14], gen.proj_query(fd))
    torch.testing.assert_close(prefix[:, 3 + n_img:], _rows(gen, after).expand(2, -1, -1))
    # the template's words were in the scratch tokenizer's texts: none is <unk>
    unk = gen.tokenizer.unk_token_id
    assert unk not in gen.before_ids.tolist() + gen.after_ids.tolist()


@torch.no_grad()
def test_default_template_is_bos_image_prompt():
    """"{image} {prompt}": [BOS, F, Q, F', prompt]; the space next to {image} adds no token."""
    assert split_template("{image} {prompt}", PROMPT) == ("", PROMPT)
    assert split_template(R2GENGPT_TEMPLATE, "go .") == ("Human: <Img>", "</Img> go . \nAssistant:")
    gen = _generator()
    f, fd = _inputs()
    prefix = gen.prefix(f, fd)
    assert prefix.shape[1] == 1 + N_F + 42 + len(PROMPT.split())
    torch.testing.assert_close(prefix[:, 0], _rows(gen, ["<s>"]).expand(2, -1))
    torch.testing.assert_close(prefix[:, 1:1 + N_F + 42], _image(gen, f, fd))
    torch.testing.assert_close(prefix[:, 1 + N_F + 42:], _rows(gen, PROMPT.split()).expand(2, -1, -1))


def test_template_and_views_are_validated():
    assert not Generator().check() and not Generator(prompt_template=R2GENGPT_TEMPLATE, views="mean").check()
    for bad in ("{prompt}", "{image}", "{image} {image} {prompt}", "{image} {prompt} {prompt}"):
        assert any("prompt_template" in e for e in Generator(prompt_template=bad).check()), bad
        with pytest.raises(ValueError, match="exactly once"):
            split_template(bad, PROMPT)
    for kw in ({"tvc_weight": 1.0}, {"rec_weight": 1.0}):  # seed 004's terms are per view
        assert any("views=mean" in e for e in Generator(views="mean", **kw).check())
        assert not any("views" in e for e in Generator(views="concat", **kw).check())


def test_loss_is_on_report_tokens_predicted_from_the_last_prefix_position(monkeypatch):
    gen = _generator(prompt_template=R2GENGPT_TEMPLATE).train()
    tok = gen.tokenizer
    f, fd = _inputs(3)
    ids = tok(REPORTS[:3], add_special_tokens=False)["input_ids"]
    width = max(map(len, ids)) + 1
    report = torch.full((3, width), tok.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, x in enumerate(ids):
        report[i, :len(x) + 1], mask[i, :len(x) + 1] = torch.tensor(x + [tok.eos_token_id]), 1
    opt = torch.optim.AdamW([p for p in gen.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(15):  # away from the init, where every token costs about log(vocab)
        opt.zero_grad()
        gen(f, fd, report, mask).backward()
        opt.step()
    gen.eval()
    seen = {}
    forward = gen.llm.forward
    monkeypatch.setattr(gen.llm, "forward", lambda **kw: (seen.update(kw), forward(**kw))[1])
    with torch.no_grad():
        loss = gen(f, fd, report, mask)
        p = gen.prefix(f, fd).shape[1]
        assert torch.equal(seen["inputs_embeds"][:, 0], _rows(gen, ["<s>"]).expand(3, -1))
        labels = seen["labels"]
        assert (labels[:, :p] == -100).all()  # no loss on any prefix position (BOS, template, image)
        assert torch.equal(labels[:, p:], report.masked_fill(mask == 0, -100))  # report + EOS, no padding
        logits = forward(inputs_embeds=seen["inputs_embeds"], attention_mask=seen["attention_mask"]).logits
    keep = mask.bool()
    # eq. 12: the last prefix position ("assistant:") predicts report token 0, ..., the last report token EOS
    by_hand = torch.nn.functional.cross_entropy(logits[:, p - 1:p - 1 + width][keep], report[keep])
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    late = torch.nn.functional.cross_entropy(logits[:, p:p + width][keep], report[keep])  # one position late
    assert late.item() != pytest.approx(loss.item(), rel=1e-2)


@torch.no_grad()
def test_embed_norm_normalises_exactly_the_image_part():
    gen = _generator(prompt_template=R2GENGPT_TEMPLATE, embed_norm=True)
    plain = _generator(prompt_template=R2GENGPT_TEMPLATE)
    g = torch.Generator().manual_seed(3)
    gen.embed_norm.weight.copy_(torch.rand(16, generator=g) + 0.5)
    gen.embed_norm.bias.copy_(torch.randn(16, generator=g))
    assert "embed_norm.weight" in gen.trainable_state_dict() and plain.embed_norm is None
    f, fd = _inputs()
    prefix, n_img = gen.prefix(f, fd), N_F + 42
    x = _image(gen, f, fd)  # one LayerNorm over every row of [F, Q, F'], by hand
    want = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    want = want * gen.embed_norm.weight + gen.embed_norm.bias
    torch.testing.assert_close(prefix[:, 3:3 + n_img], want)
    text = _rows(gen, ["<s>", "human:", "<img>"]), _rows(gen, ["</img>", *PROMPT.split(), "assistant:"])
    torch.testing.assert_close(prefix[:, :3], text[0].expand(2, -1, -1))  # the text rows as they are
    torch.testing.assert_close(prefix[:, 3 + n_img:], text[1].expand(2, -1, -1))
    # the same modules without the norm feed the raw rows (the generators share their seeded init)
    torch.testing.assert_close(plain.prefix(f, fd)[:, 3:3 + n_img], x)
    assert not torch.allclose(x, want, atol=1e-2)


def test_views_concat_or_mean_at_the_visual_token_seam():
    grid, c, b = (4, 2), 5, 3
    tokens = torch.randn(b * N_VIEWS, grid[0] * grid[1], c)  # study-major: study s has rows 2s, 2s + 1
    v0, v1 = tokens[0::2], tokens[1::2]
    concat = visual_tokens(tokens, grid, b, 1, "concat")
    assert concat.shape == (b, 2 * 8, c)
    torch.testing.assert_close(concat, torch.cat([v0, v1], 1))
    torch.testing.assert_close(visual_tokens(tokens, grid, b, 1, "mean"), (v0 + v1) / 2)
    # pool 2 on the 4 x 2 grid: cell (i, 0) is the mean of grid rows 2i, 2i + 1 (tokens 4i .. 4i + 3), T = 2
    pooled = torch.stack([tokens[:, 4 * i:4 * i + 4].mean(1) for i in range(2)], 1)
    torch.testing.assert_close(visual_tokens(tokens, grid, b, 2, "concat"),
                               torch.cat([pooled[0::2], pooled[1::2]], 1))
    torch.testing.assert_close(visual_tokens(tokens, grid, b, 2, "mean"), (pooled[0::2] + pooled[1::2]) / 2)

    # the stage-1 path: the classifier's tokens of each study's two views through the seam
    class Stage1(torch.nn.Module):
        encoder = types.SimpleNamespace(grid=grid)

        def features(self, pixels):
            flat = pixels.float().flatten(1)[:, :8 * c]
            return flat.reshape(len(pixels), 8, c), flat[:, :14 * 2].reshape(len(pixels), 14, 2)

    pixels = torch.randint(0, 256, (6, 8, 8), dtype=torch.uint8)
    view_rows = torch.tensor([[0, 1], [2, 3], [4, 4]]).numpy()  # the last study has one view, repeated
    args = (Stage1(), pixels, view_rows, 1, torch.device("cpu"), "fp32", 2)
    (f_cat, fd), (f_mean, fd_mean) = study_features(*args, "concat"), study_features(*args, "mean")
    t = Stage1().features(pixels)[0]
    assert f_cat.shape == (3, 16, c) and f_mean.shape == (3, 8, c)
    torch.testing.assert_close(f_mean, (t[view_rows[:, 0]] + t[view_rows[:, 1]]) / 2)
    torch.testing.assert_close(f_cat, torch.cat([t[view_rows[:, 0]], t[view_rows[:, 1]]], 1))
    torch.testing.assert_close(fd, fd_mean)  # F_d is averaged over the views either way
    with torch.no_grad():  # the generator takes the T averaged tokens as its visual tokens
        gen = _generator(views="mean")
        assert gen.prefix(*_inputs(n_f=8)).shape[1] == 1 + 8 + 42 + len(PROMPT.split())


def test_length_penalty_reaches_beam_search(monkeypatch):
    gen = _generator()
    seen = []
    generate = gen.llm.generate
    monkeypatch.setattr(gen.llm, "generate", lambda **kw: (seen.append(kw), generate(**kw))[1])
    f, fd = _inputs()
    out = gen.generate(f, fd, Decode(num_beams=3, max_new_tokens=4, length_penalty=-2.5, backend="hf"))
    assert len(out) == 2 and seen[-1]["length_penalty"] == -2.5 and seen[-1]["num_beams"] == 3
    gen.generate(f, fd, Decode(num_beams=1, max_new_tokens=4, length_penalty=2.0, backend="hf"))
    assert "length_penalty" not in seen[-1]  # greedy: HF has no use for it
    assert Decode(length_penalty=-1.0).check() == []
    assert Decode(length_penalty=float("nan")).check() and Decode(length_penalty=float("inf")).check()


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_is_passed_to_the_tokenizer_and_the_model(tmp_path, monkeypatch, trust):
    _tiny_llama(tmp_path / "llm")
    seen = {}
    for name in ("AutoTokenizer", "AutoModelForCausalLM"):
        cls = getattr(llm_module, name)
        load = cls.from_pretrained

        def spy(*a, _load=load, _name=name, **kw):
            seen[_name] = kw.get("trust_remote_code")
            return _load(*a, **kw)
        monkeypatch.setattr(cls, "from_pretrained", spy)
    model, _ = create_llm(Llm(source="pretrained", name=str(tmp_path / "llm"), trust_remote_code=trust))
    assert seen == {"AutoTokenizer": trust, "AutoModelForCausalLM": trust}
    assert model.config.model_type == "llama"


def test_old_spec_dicts_load_with_the_defaults():
    spec = _spec(prompt_template=R2GENGPT_TEMPLATE, embed_norm=True, views="mean")
    assert GeneratorSpec.from_dict(spec.to_dict()) == spec
    old = spec.to_dict()
    for k in ("prompt_template", "embed_norm", "views"):
        del old[k]
    del old["llm"]["trust_remote_code"]
    again = GeneratorSpec.from_dict(old)
    assert (again.prompt_template, again.embed_norm, again.views) == ("{image} {prompt}", False, "concat")
    assert again.llm.trust_remote_code is False
    assert again == _spec()


@torch.no_grad()
def test_template_and_norm_rebuild_from_the_saved_generator(tmp_path):
    """The spec carries the template and the norm: the saved scratch tokenizer knows the template's words
    and the rebuilt generator feeds the LLM exactly the trained prefix."""
    spec = _spec(prompt_template=R2GENGPT_TEMPLATE, embed_norm=True)
    trained = _generator(prompt_template=R2GENGPT_TEMPLATE, embed_norm=True)
    trained.embed_norm.bias.add_(0.3)
    save_llm(tmp_path, spec.llm, trained.llm, trained.tokenizer)
    torch.manual_seed(7)
    again = create_generator(GeneratorSpec.from_dict(spec.to_dict()), *_banks(), saved=tmp_path).eval()
    again.load_trainable(trained.trainable_state_dict())
    assert torch.equal(again.before_ids, trained.before_ids) and torch.equal(again.after_ids, trained.after_ids)
    f, fd = _inputs()
    assert torch.equal(again.prefix(f, fd), trained.prefix(f, fd))


@torch.no_grad()
def test_a_tokenizer_without_bos_starts_with_the_template_text():
    """Qwen's tokenizers have no BOS token: the prefix then starts with the template's text (as HF's own
    tokenization of such a model adds none)."""
    import copy

    from amrg.models.generator import ReportGenerator

    gen = _generator(prompt_template=R2GENGPT_TEMPLATE)
    tok = copy.deepcopy(gen.tokenizer)
    tok.bos_token = None
    assert tok.bos_token_id is None
    torch.manual_seed(0)
    no_bos = ReportGenerator(gen.llm, tok, VISUAL_DIM, QUERY_DIM, *_banks(), Hopfield(dim=8), PROMPT,
                             template=R2GENGPT_TEMPLATE).eval()
    assert no_bos.before_ids.tolist() == gen.before_ids[1:].tolist()
    f, fd = _inputs()
    torch.testing.assert_close(no_bos.prefix(f, fd)[:, :2], _rows(gen, ["human:", "<img>"]).expand(2, -1, -1))
    assert no_bos.prefix(f, fd).shape[1] == gen.prefix(f, fd).shape[1] - 1
