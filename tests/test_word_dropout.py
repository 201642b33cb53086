"""Word dropout (generator.word_dropout): what the LLM reads under teacher forcing, never what it predicts."""

import torch

from amrg.config import ParamsError, parse_params
from amrg.tasks import word_dropout


def test_off_at_zero_and_only_real_tokens_are_replaced():
    ids = torch.arange(1, 41).reshape(4, 10)
    mask = torch.ones_like(ids)
    mask[:, 7:] = 0  # padding
    assert word_dropout(ids, mask, 0.0, unk_id=0) is None
    torch.manual_seed(0)
    out = word_dropout(ids, mask, 0.5, unk_id=0)
    changed = out != ids
    assert not changed[:, 7:].any()  # padding stays padding
    assert (out[changed] == 0).all() and changed[:, :7].any() and not changed[:, :7].all()
    # the same draws as torch.rand on the ids' shape: reproducible under the seeded global RNG
    torch.manual_seed(0)
    expect = (torch.rand(ids.shape) < 0.5) & (mask > 0)
    assert torch.equal(changed, expect)


def test_rate_is_the_share_of_replaced_tokens():
    ids = torch.ones(200, 200, dtype=torch.long)
    torch.manual_seed(1)
    out = word_dropout(ids, torch.ones_like(ids), 0.3, unk_id=0)
    assert abs((out == 0).float().mean().item() - 0.3) < 0.01


def test_range_is_validated():
    for bad in (-0.1, 1.0):
        try:
            parse_params({"generator": {"word_dropout": bad}})
        except ParamsError as e:
            assert "generator.word_dropout" in str(e)
        else:
            raise AssertionError(f"word_dropout={bad} accepted")


@torch.no_grad()
def test_the_generator_reads_input_ids_and_predicts_report_ids():
    from amrg.tasks import tokenize_reports

    from .test_generator_input import REPORTS, _generator, _inputs

    gen = _generator()
    f, fd = _inputs(b=2)
    ids, mask = tokenize_reports(gen.tokenizer, REPORTS[:2], 20)
    read = ids.masked_fill(torch.zeros_like(ids, dtype=torch.bool).index_fill_(1, torch.tensor([1]), True) & (mask > 0),
                           gen.tokenizer.unk_token_id)
    plain, same, dropped = gen(f, fd, ids, mask), gen(f, fd, ids, mask, input_ids=ids), gen(f, fd, ids, mask, input_ids=read)
    assert torch.equal(plain, same) and not torch.allclose(plain, dropped)
    # by hand: the LLM fed the corrupted embeddings, scored against the clean targets
    prefix = gen.prefix(f, fd)
    embeds = torch.cat([prefix, gen.embed(read)], 1)
    logits = gen.llm(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(prefix.shape[:2], dtype=torch.long), mask], 1)).logits
    p = prefix.shape[1]
    pred = logits[:, p - 1:-1]
    expect = torch.nn.functional.cross_entropy(pred[mask > 0], ids[mask > 0])
    assert torch.allclose(dropped, expect, atol=1e-5)
