"""Checkpoint selection of the generator (``generator.select``, ``generator.select_decode``): every metric
:meth:`amrg.tasks.GeneratorTask.validate` returns against a hand computation on the reports it decodes
(CE F1 with the labeler and :func:`amrg.metrics.ce_scores`, as the evaluate stage scores; BLEU-4, CIDEr and
R2GenGPT's 0.5 BLEU-4 + 0.5 CIDEr with :func:`amrg.metrics.nlg_scores`; the distinct ratio), validation decoded
with the configured ``decode`` section, and :func:`amrg.train.fit` keeping the epoch with the best chosen metric."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amrg.config import Decode, Hopfield, Llm, ParamsError, load_params, parse_params
from amrg.labels import label
from amrg.metrics import ce_scores, nlg_scores
from amrg.tasks import GeneratorTask
from amrg.train import LoopConfig, Selection, fit

from .test_training import REPORTS, TINY_LLM, make_generator

CPU = torch.device("cpu")
SELECTS = ("val_loss", "val_bleu4", "val_bleu4_cider", "val_ce_f1")
WARM, EPOCHS = 45, 6  # steps of 4 studies, then epochs of 4 one-study steps: reports on their way to the references
# val references with findings the rules labeler reads (effusion, pneumothorax, cardiomegaly, normal)
VAL = ["there is a left pleural effusion .", "no pneumothorax . the heart is enlarged .",
       "the heart is normal . the lungs are clear .", "small right pleural effusion . no pneumothorax ."]


def _task(seed=0, **kw) -> GeneratorTask:
    g = torch.Generator().manual_seed(0)
    vb, rb = torch.randn(12, 24, generator=g), torch.randn(9, 40, generator=g)
    torch.manual_seed(seed)
    gen = make_generator(Llm(**TINY_LLM), vb, rb, Hopfield(dim=16), texts=REPORTS + VAL)
    val = (torch.randn(len(VAL), 6, 24, generator=g), torch.randn(len(VAL), 14, 16, generator=g))
    # trained on the val studies themselves: a few steps write reports with the references' findings
    return GeneratorTask(gen, {"train": val, "val": val}, {"train": VAL, "val": VAL}, 20, 3, CPU, "fp32", **kw)


def _decoded(task: GeneratorTask, decode: Decode) -> list[str]:
    """The val reports decoded by hand, batch by batch as validate batches them."""
    f, fd = task.features["val"]
    task.model.eval()
    with torch.no_grad():
        batches = torch.arange(len(f)).split(task.batch_size)
        return [h for b in batches for h in task.model.generate(f[b], fd[b], decode)]


def _hand(task: GeneratorTask, hyps: list[str]) -> dict[str, float]:
    nlg = nlg_scores(VAL, hyps, meteor=False)
    ce = ce_scores(label(hyps, "rules"), label(VAL, "rules"))  # evaluate's headline: macro over the 14 labels
    return {"val_bleu4": nlg["BLEU_4"], "val_cider": nlg["CIDEr"],
            "val_bleu4_cider": 0.5 * nlg["BLEU_4"] + 0.5 * nlg["CIDEr"], "val_ce_f1": ce["f1"],
            "val_distinct": len(set(hyps)) / len(hyps)}


def _train_a_little(task: GeneratorTask, tmp_path, epochs: int = 60) -> None:
    """Enough steps that the decoded reports are (near) the references, not noise."""
    fit(task.trainee, len(VAL), task.batch_loss, lambda: {"val_loss": 0.0}, LoopConfig(epochs, 4, 3e-3, seed=1),
        tmp_path / "warm.pt", "warm")


def test_validate_scores_the_greedy_reports_as_evaluate_does(tmp_path):
    task = _task()
    _train_a_little(task, tmp_path)
    hyps = _decoded(task, Decode(num_beams=1, max_new_tokens=20, min_new_tokens=1))
    got = task.validate()
    assert set(got) == {"val_loss", *_hand(task, hyps)}
    assert got == pytest.approx({"val_loss": got["val_loss"], **_hand(task, hyps)}, abs=1e-12)
    ref_ce = ce_scores(label(hyps, "rules"), label(VAL, "rules"))
    assert ref_ce["f1"] == ce_scores(label(hyps, "rules"), label(VAL, "rules"), "negative", "all14")["f1"]
    assert got["val_ce_f1"] == ref_ce["f1"] > 0  # the decoded reports name findings of the references
    # the references' labels are computed once, by the configured labeler
    np.testing.assert_array_equal(task.ref_labels, label(VAL, "rules"))


def test_ce_follows_the_configured_convention(tmp_path):
    task = _task(ce_uncertain_as="positive", ce_labels="common5")
    _train_a_little(task, tmp_path)
    hyps = _decoded(task, task.greedy)
    expected = ce_scores(label(hyps, "rules"), label(VAL, "rules"), uncertain_as="positive", labels="common5")["f1"]
    assert task.validate()["val_ce_f1"] == expected


def test_configured_decode_validates_with_the_decode_section(tmp_path):
    decode = Decode(num_beams=2, max_new_tokens=6, min_new_tokens=4, repetition_penalty=2.0)
    task = _task(decode=decode, select_decode="configured")
    _train_a_little(task, tmp_path)
    hyps = _decoded(task, decode)
    greedy = _decoded(task, task.greedy)
    assert hyps != greedy  # the two decodings differ here, so the check below can tell them apart
    assert task.validate() == pytest.approx({"val_loss": task.validate()["val_loss"], **_hand(task, hyps)}, abs=1e-12)
    with pytest.raises(ValueError, match="select_decode"):
        _task(select_decode="configured")  # no decode section to decode with
    with pytest.raises(ValueError, match="select_decode"):
        _task(decode=decode, select_decode="beam")


@pytest.mark.parametrize("select", SELECTS)
def test_fit_keeps_the_epoch_with_the_best_chosen_metric(tmp_path, select):
    task = _task()
    _train_a_little(task, tmp_path, epochs=WARM)  # part way: the reports still change from epoch to epoch
    states = []

    def validate():
        states.append({k: v.detach().clone() for k, v in task.trainee.named_parameters() if v.requires_grad})
        return task.validate()

    res = fit(task.trainee, len(VAL), task.batch_loss, validate, LoopConfig(EPOCHS, 1, 3e-3, seed=1),
              tmp_path / "c.pt", "fp", Selection.of(select))
    scores = [h[select] for h in res.history]
    best = (min if select == "val_loss" else max)(scores)
    epoch = scores.index(best) + 1  # ties keep the earlier epoch
    assert res.best["epoch"] == epoch and res.best[select] == best
    assert res.best_state.keys() == states[epoch - 1].keys()
    assert all(torch.equal(res.best_state[k], states[epoch - 1][k]) for k in res.best_state)
    assert len(set(scores)) > 1  # the metric moves from epoch to epoch: keeping epoch `epoch` is a real choice


def test_select_keys_are_validated():
    g = load_params().generator
    assert (g.select, g.select_decode) == ("val_ce_f1", "greedy")  # the embedded default
    for select in SELECTS:
        assert parse_params({"generator": {"select": select, "select_decode": "configured"}}).generator.select == select
    with pytest.raises(ParamsError, match="generator.select: 'val_cider'"):
        parse_params({"generator": {"select": "val_cider"}})
    with pytest.raises(ParamsError, match="generator.select_decode: 'beam'"):
        parse_params({"generator": {"select_decode": "beam"}})
