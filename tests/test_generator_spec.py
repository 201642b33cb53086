"""The generator spec beside its weights: the dtype policy, the spec round trip, and one factory that
rebuilds exactly what training fitted (same weights, same LLM dtype, same outputs)."""

from __future__ import annotations

import torch

from amrg.config import BankIndex, Hopfield, Llm
from amrg.io import load_tensors, save_tensors, write_json
from amrg.layout import Layout
from amrg.models.generator import GeneratorSpec, create_generator, llm_dtype
from amrg.models.llm import save_llm

from .test_paper_path import _tiny_llama

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
REPORTS = ["the heart is normal .", "the lungs are clear .", "the heart is enlarged ."]


def test_llm_dtype_policy():
    frozen, lora, full = Llm(trainable="none"), Llm(trainable="lora"), Llm(source="scratch", trainable="full")
    assert [llm_dtype(c, "bf16", CUDA) for c in (frozen, lora, full)] == ["bf16", "bf16", "fp32"]
    assert {llm_dtype(c, p, d) for c in (frozen, lora, full) for p, d in (("bf16", CPU), ("fp32", CUDA))} == {"fp32"}


def test_spec_round_trip_and_rebuild_in_the_trained_dtype(tmp_path):
    _tiny_llama(tmp_path / "llm")
    spec = GeneratorSpec(Llm(source="pretrained", name=str(tmp_path / "llm"), trainable="none"), Hopfield(dim=8),
                         BankIndex(nprobe=4), "generate a report .", 2, 16, 8, dtype="bf16")
    assert GeneratorSpec.from_dict(spec.to_dict()) == spec
    banks = torch.randn(5, 16), torch.randn(4, 24)
    torch.manual_seed(0)
    trained = create_generator(spec, *banks, train_texts=REPORTS)
    assert {p.dtype for p in trained.llm.parameters()} == {torch.bfloat16}  # a frozen LLM is held in bf16
    with torch.no_grad():
        trained.proj_visual[1].weight.add_(0.5)
    layout = Layout(tmp_path / "artifacts")
    save_tensors(layout.generator_weights, trained.trainable_state_dict())
    save_llm(layout.stage_dir("train_generator"), spec.llm, trained.llm, trained.tokenizer)
    write_json(layout.generator_config, {"spec": spec.to_dict()})

    torch.manual_seed(1)  # a different init: everything trained must come from the files
    again = create_generator(GeneratorSpec.from_dict(spec.to_dict()), *banks, saved=layout.stage_dir("train_generator"))
    again.load_trainable(load_tensors(layout.generator_weights))
    assert {p.dtype for p in again.llm.parameters()} == {torch.bfloat16}
    f, fd = torch.randn(2, 3, 16), torch.randn(2, 14, 8)
    trained.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(trained.prefix(f, fd), again.prefix(f, fd))


def test_scratch_lm_rebuilt_from_its_saved_tokenizer_and_config(tmp_path):
    spec = GeneratorSpec(Llm(source="scratch", trainable="full", hidden_size=16, layers=1, heads=2,
                             intermediate_size=32, min_word_freq=1), Hopfield(dim=8), BankIndex(), "go .", 1, 16, 8)
    bank = torch.randn(4, 24)
    trained = create_generator(spec, None, bank, train_texts=REPORTS)
    save_llm(tmp_path, spec.llm, trained.llm, trained.tokenizer)
    again = create_generator(spec, None, bank, saved=tmp_path)
    again.load_trainable(trained.trainable_state_dict())
    assert again.tokenizer.get_vocab() == trained.tokenizer.get_vocab()
    ids = torch.tensor([trained.tokenizer("the heart is normal .", add_special_tokens=False)["input_ids"] + [2]])
    f, fd = torch.randn(1, 3, 16), torch.randn(1, 14, 8)
    trained.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(trained(f, fd, ids, torch.ones_like(ids)), again(f, fd, ids, torch.ones_like(ids)))
