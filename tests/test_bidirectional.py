"""Seed 004's bidirectional objectives (amrg.models.bidirectional): each loss against a hand
computation, the gradients reach exactly the modules they should (never the LLM), weights 0 build
nothing and train exactly as before, generation is the same with and without the heads, the terms are
logged per epoch, and the ablation grid is a valid sweep."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from amrg.config import Decode, Generator, Hopfield, Llm, ParamsError, load_params, parse_params
from amrg.io import load_tensors, save_tensors
from amrg.models import bidirectional as bd
from amrg.tasks import GeneratorTask
from amrg.train import LoopConfig, fit

from .test_paper_path import _tiny_bert
from .test_training import REPORTS, TINY_LLM, make_generator

CPU = torch.device("cpu")
N_VIEWS, GRID, VISUAL_DIM, QUERY_DIM = 2, (2, 3), 24, 16
T = GRID[0] * GRID[1]  # visual tokens per view
PATCH = 2


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("bert")
    _tiny_bert(path)
    return str(path)


def _generator(trainable="full", seed=0, **llm):
    g = torch.Generator().manual_seed(0)
    vb, rb = torch.randn(12, VISUAL_DIM, generator=g), torch.randn(9, 40, generator=g)
    torch.manual_seed(seed)
    return make_generator(Llm(**{**TINY_LLM, "trainable": trainable, **llm}), vb, rb, Hopfield(dim=16))


def _cfg(bert, **kw) -> Generator:
    return Generator(tvc_text_encoder=bert, tvc_prompt="the lungs are", rec_patch=PATCH, rec_dim=16, rec_heads=2, **kw)


def _aux(gen, bert, **kw):
    return bd.build_auxiliary(_cfg(bert, **{"tvc_weight": 1.0, "rec_weight": 1.0, **kw}), gen, N_VIEWS, GRID, 0)


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {s: (torch.randn(n, N_VIEWS * T, VISUAL_DIM, generator=g), torch.randn(n, 14, QUERY_DIM, generator=g))
             for s in ("train", "val")}
    reports = {"train": REPORTS[:n], "val": REPORTS[n:2 * n]}
    pixels = torch.randint(0, 256, (2 * N_VIEWS * n, 12, 18), dtype=torch.uint8, generator=g)
    rows = {"train": torch.arange(N_VIEWS * n).reshape(n, N_VIEWS),
            "val": torch.arange(N_VIEWS * n, 2 * N_VIEWS * n).reshape(n, N_VIEWS)}
    size = (GRID[0] * PATCH, GRID[1] * PATCH)
    targets = {s: bd.reconstruction_targets(pixels, rows[s], size) for s in rows}
    return feats, reports, targets, pixels, rows


def _text(aux, texts):
    return aux.tokenize(texts)


# ---- weights 0: nothing built, training exactly as before ------------------------------------------


def test_default_builds_nothing_and_is_plain_vtc():
    g = load_params().generator  # the embedded default
    assert (g.vtc_weight, g.tvc_weight, g.rec_weight) == (1.0, 0.0, 0.0)
    gen = _generator()
    rng = torch.get_rng_state()
    assert bd.build_auxiliary(g, gen, N_VIEWS, GRID, 0) is None
    assert torch.equal(torch.get_rng_state(), rng)  # no RNG drawn
    feats, reports, *_ = _data()
    task = GeneratorTask(gen, feats, reports, 20, 4, CPU, "fp32")
    assert task.trainee is gen and task.terms == [] and task.text is None


def _old_path(model, feats, reports, max_tokens, batch_size):
    """The generator task's batch loss and validation before the bidirectional objectives existed."""
    from amrg.metrics import nlg_scores
    from amrg.tasks import tokenize_reports

    ids = {s: tokenize_reports(model.tokenizer, t, max_tokens) for s, t in reports.items()}
    greedy = Decode(num_beams=1, max_new_tokens=max_tokens, min_new_tokens=1)

    def loss(net, split, b):
        (f, fd), (tok, mask) = feats[split], ids[split]
        width = int(mask[b].sum(1).max())
        return net(f[b], fd[b], tok[b, :width], mask[b, :width]).float(), int(mask[b].sum())

    @torch.no_grad()
    def validate():
        model.eval()
        f, fd = feats["val"]
        total, n_tokens, hyps = 0.0, 0, []
        for b in torch.arange(len(f)).split(batch_size):
            lo, n = loss(model, "val", b)
            total, n_tokens = total + float(lo) * n, n_tokens + n
            hyps += model.generate(f[b], fd[b], greedy)
        return {"val_loss": total / max(n_tokens, 1),
                "val_bleu4": nlg_scores(reports["val"], hyps, meteor=False)["BLEU_4"]}

    return (lambda net, b: loss(net, "train", b)), validate


def test_weights_zero_train_bit_for_bit_as_before(tmp_path):
    """tvc = rec = 0 (also given explicitly): the same history and the same kept weights as the
    generator task before the objectives existed (the stage output check in the report: the same bytes)."""
    feats, reports, *_ = _data()
    cfg = LoopConfig(epochs=2, batch_size=4, lr=3e-3, warmup_steps=1, seed=3)
    runs = []
    for how in ("old", "default", "explicit"):
        gen = _generator()
        torch.manual_seed(11)  # the training RNG stream (dropout-free LM: only the batch order, seeded)
        if how == "old":
            batch_loss, validate = _old_path(gen, feats, reports, 20, 4)
            res = fit(gen, 8, batch_loss, validate, cfg, tmp_path / f"{how}.pt", "fp")
        else:
            g = Generator() if how == "default" else Generator(vtc_weight=1.0, tvc_weight=0.0, rec_weight=0.0)
            aux = bd.build_auxiliary(g, gen, N_VIEWS, GRID, 0)
            task = GeneratorTask(gen, feats, reports, 20, 4, CPU, "fp32", vtc_weight=g.vtc_weight,
                                 tvc_weight=g.tvc_weight, rec_weight=g.rec_weight, aux=aux)
            res = fit(task.trainee, 8, task.batch_loss, task.validate, cfg, tmp_path / f"{how}.pt", "fp")
            assert task.split_state(res.best_state)[0] is res.best_state
        runs.append(res)
    for res in runs[1:]:
        # the same floats; the same keys (no per-term columns) beside the later selection metrics (test_selection)
        assert [{k: h[k] for k in runs[0].history[0]} for h in res.history] == runs[0].history
        assert set(res.history[0]) - set(runs[0].history[0]) == {"val_cider", "val_bleu4_cider", "val_ce_f1",
                                                                 "val_distinct"}
        assert res.best_state.keys() == runs[0].best_state.keys()
        for k in res.best_state:
            assert torch.equal(res.best_state[k], runs[0].best_state[k]), k
    assert set(runs[0].history[0]) == {"epoch", "train_loss", "val_loss", "val_bleu4"}


def test_building_the_heads_leaves_the_global_rng_alone(bert):
    gen = _generator()
    rng = torch.get_rng_state()
    a = _aux(gen, bert)
    assert torch.equal(torch.get_rng_state(), rng)
    b = _aux(gen, bert)  # and they are a function of the seed
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k


# ---- the losses by hand ------------------------------------------------------------------------------


@pytest.mark.parametrize("teacher", [True, False])
def test_tvc_is_eq2_on_the_llm_hidden_states_recomputed_by_hand(bert, teacher):
    """E_g recomputed one (study, view) at a time with no padding, through the LLM's ordinary forward:
    [report embeddings E_t, view token, prompt, E_v,<T (or the queries)] -> last hidden -> read-out."""
    gen = _generator()
    aux = _aux(gen, bert, tvc_teacher_forcing=teacher)
    tvc = aux.tvc
    with torch.no_grad():  # a non-trivial view token, queries and read-out
        tvc.view.weight.normal_()
        if tvc.queries is not None:
            tvc.queries.normal_()
    aux.eval()
    texts = ["the heart is normal .", "the lungs are clear . the heart is normal ."]  # different lengths: padding
    ids, mask = _text(aux, texts)
    assert (mask == 0).any()
    visual = gen.visual_embeds(torch.randn(2, N_VIEWS * T, VISUAL_DIM))
    with torch.no_grad():
        e_g, target = tvc(gen.llm, ids, mask, visual)
        assert e_g.shape == target.shape == visual.shape and torch.equal(target, visual)
        prompt_ids = gen.tokenizer("the lungs are", add_special_tokens=False)["input_ids"]
        prompt = gen.llm.get_input_embeddings()(torch.tensor(prompt_ids))
        by_hand = torch.zeros_like(e_g)
        for s, text in enumerate(texts):
            one = tvc.tokenizer(text, return_tensors="pt")
            e_t = tvc.mapper(tvc.encoder(**one).last_hidden_state)[0]
            for v in range(N_VIEWS):
                ev = visual[s, v * T:(v + 1) * T]
                tail = ev[:-1] if teacher else tvc.queries
                seq = torch.cat([e_t, tvc.view.weight[v:v + 1], prompt, tail]).unsqueeze(0)
                h = gen.llm(inputs_embeds=seq, output_hidden_states=True).hidden_states[-1][0, -T:]
                by_hand[s, v * T:(v + 1) * T] = tvc.readout(h)
        torch.testing.assert_close(e_g, by_hand, rtol=1e-4, atol=1e-5)
        loss = bd.tvc_loss(e_g, target)
        # eq. 2: squared L2 over the width, mean over the tokens (and the studies)
        tokens = [(s, i) for s in range(2) for i in range(N_VIEWS * T)]
        want = sum(((visual[s, i] - by_hand[s, i]) ** 2).sum() for s, i in tokens) / len(tokens)
        assert loss.item() == pytest.approx(want.item(), rel=1e-4)


def test_tvc_teacher_forcing_is_causal_and_views_are_separate(bert):
    gen = _generator()
    aux = _aux(gen, bert)
    aux.eval()
    ids, mask = _text(aux, REPORTS[:2])
    visual = gen.visual_embeds(torch.randn(2, N_VIEWS * T, VISUAL_DIM)).detach()
    with torch.no_grad():
        base, _ = aux.tvc(gen.llm, ids, mask, visual)
        for j in range(T):  # perturb E_v,j of view 1: E_g,i of view 1 changes only for i > j; view 0 never
            moved = visual.clone()
            moved[:, T + j] += 1.0
            e_g, _ = aux.tvc(gen.llm, ids, mask, moved)
            torch.testing.assert_close(e_g[:, :T + j + 1], base[:, :T + j + 1], rtol=0, atol=1e-6)
            if j + 1 < T:
                assert not torch.allclose(e_g[:, T + j + 1:], base[:, T + j + 1:])


def test_rec_targets_are_the_views_area_downsampled_and_rec_is_pixel_mse(bert):
    feats, reports, targets, pixels, rows = _data(n=2)
    size = (GRID[0] * PATCH, GRID[1] * PATCH)  # (4, 6) from (12, 18): 3x3 pixel blocks
    t = targets["train"]
    assert t.shape == (2, N_VIEWS, *size)
    for s in range(2):
        for v in range(N_VIEWS):
            img = pixels[rows["train"][s, v]].double() / 255.0
            blocks = img.reshape(size[0], 3, size[1], 3).mean(dim=(1, 3))  # the explicit 3x3 block means
            torch.testing.assert_close(t[s, v].double(), blocks, rtol=0, atol=1e-6)
    gen = _generator()
    aux = _aux(gen, bert, rec_depth=0)  # depth 0: per-token head, checked patch by patch
    visual = gen.visual_embeds(feats["train"][0])
    with torch.no_grad():
        out = aux.rec(visual)
        assert out.shape == t.shape
        rec = aux.rec
        tokens = rec.head(rec.norm(rec.mapper(visual.reshape(2, N_VIEWS, T, -1)) + rec.pos))  # (2, V, T, p*p)
        for i in range(T):  # token i (row-major) is the patch at grid cell (i // gw, i % gw)
            r, c = divmod(i, GRID[1])
            patch = out[:, :, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH]
            torch.testing.assert_close(patch, tokens[:, :, i].reshape(2, N_VIEWS, PATCH, PATCH))
        assert bd.rec_loss(out, t).item() == pytest.approx(((out.double() - t.double()) ** 2).mean().item(), rel=1e-6)


# ---- gradients ---------------------------------------------------------------------------------------


def _grads(module: torch.nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


@pytest.mark.parametrize("trainable", ["full", "lora"])
@pytest.mark.parametrize("stop_grad", [False, True])
def test_tvc_gradients_reach_the_text_side_and_the_visual_mapper_never_the_llm(bert, stop_grad, trainable):
    gen = _generator(trainable=trainable, gradient_checkpointing=True)  # checkpointing must not leak either
    aux = _aux(gen, bert, rec_weight=0.0, tvc_stop_grad=stop_grad)
    trainee = aux.wrap(gen).train()
    f, fd = torch.randn(2, N_VIEWS * T, VISUAL_DIM), torch.randn(2, 14, QUERY_DIM)
    out = trainee(f, fd, *_report_batch(gen), text=_text(aux, REPORTS[:2]))
    out["tvc"].backward()
    llm = _grads(gen.llm)
    assert not any(llm.values()), [n for n, g in llm.items() if g]  # the LLM: no gradient from TVC
    assert all(p.grad is None for p in gen.llm.parameters())
    tvc = _grads(aux.tvc)
    assert all(tvc.values()), [n for n, g in tvc.items() if not g]  # text encoder, T-mapper, view, read-out
    assert all(_grads(gen.proj_visual).values()) != stop_grad  # the visual mapper: only through the target
    assert not any(_grads(gen.proj_query).values()) and not any(_grads(gen.v_hopfield).values())


def test_tvc_frozen_text_encoder_and_queries(bert):
    gen = _generator()
    aux = _aux(gen, bert, rec_weight=0.0, tvc_text_trainable=False, tvc_teacher_forcing=False, tvc_readout="hidden")
    assert aux.tvc.readout is None and aux.tvc.queries is not None
    trainee = aux.wrap(gen).train()
    assert not aux.tvc.encoder.training  # a frozen encoder stays in eval mode (no dropout)
    out = trainee(torch.randn(2, N_VIEWS * T, VISUAL_DIM), torch.randn(2, 14, QUERY_DIM), *_report_batch(gen),
                  text=_text(aux, REPORTS[:2]))
    out["tvc"].backward()
    assert all(p.grad is None for p in aux.tvc.encoder.parameters())
    assert all(_grads(aux.tvc.mapper).values()) and aux.tvc.queries.grad.abs().sum() > 0


def test_llm_gradient_is_the_vtc_gradient_alone(bert):
    """With every term on, the LLM's gradient equals that of VTC alone: TVC and REC add nothing to it."""
    feats, reports, targets, *_ = _data(n=4)
    f, fd = feats["train"]
    grads = []
    for on in (False, True):
        gen = _generator()
        gen.train()
        if on:
            aux = _aux(gen, bert)
            out = aux.wrap(gen)(f, fd, *_report_batch(gen, 4), text=_text(aux, REPORTS[:4]),
                                rec_target=targets["train"])
            (out["vtc"] + out["tvc"] + out["rec"]).backward()
            assert _grads(aux.rec) and all(_grads(aux.rec).values())
        else:
            gen(f, fd, *_report_batch(gen, 4)).backward()
        grads.append({n: p.grad.clone() for n, p in gen.llm.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def _report_batch(gen, n=2):
    from amrg.tasks import tokenize_reports

    return tokenize_reports(gen.tokenizer, REPORTS[:n], 20)


# ---- training through fit: terms logged, weights apart, no inference cost ----------------------------


def test_fit_logs_each_term_and_keeps_the_heads_out_of_the_generator_weights(bert, tmp_path):
    feats, reports, targets, *_ = _data(n=4)
    gen = _generator()
    aux = _aux(gen, bert)
    task = GeneratorTask(gen, feats, {"train": REPORTS[:4], "val": REPORTS[4:8]}, 20, 4, CPU, "fp32",
                         tvc_weight=1.0, rec_weight=0.5, aux=aux, rec_targets=targets)
    res = fit(task.trainee, 4, task.batch_loss, task.validate, LoopConfig(epochs=2, batch_size=4, lr=1e-3),
              tmp_path / "s.pt", "fp")
    for h in res.history:
        assert {"train_vtc", "train_tvc", "train_rec", "val_vtc", "val_tvc", "val_rec"} <= set(h)
        assert h["val_loss"] == h["val_vtc"]  # selection still on the report loss
        # one batch per epoch: the epoch's train loss is the weighted sum of its terms
        assert h["train_loss"] == pytest.approx(h["train_vtc"] + h["train_tvc"] + 0.5 * h["train_rec"], rel=1e-6)
    weights, heads = task.split_state(res.best_state)
    assert set(weights) == set(gen.trainable_state_dict())  # what weights.safetensors holds, as without TVC/REC
    assert heads and all(k.startswith(("aux.tvc.", "aux.rec.")) for k in heads)

    # generation: a generator rebuilt from the saved generator weights alone gives the same prefix and reports
    save_tensors(tmp_path / "weights.safetensors", weights)
    fresh = _generator(seed=5)
    fresh.load_trainable(load_tensors(tmp_path / "weights.safetensors"))
    gen.eval(), fresh.eval()
    f, fd = feats["val"]
    decode = Decode(num_beams=1, max_new_tokens=8)
    with torch.no_grad():
        assert torch.equal(gen.prefix(f, fd), fresh.prefix(f, fd))
        assert gen.generate(f, fd, decode) == fresh.generate(f, fd, decode)
        plain = _generator()  # never trained with the heads: the same prefix length (no extra tokens)
        assert plain.prefix(f, fd).shape == gen.prefix(f, fd).shape


def test_two_ranks_follow_one_process(bert, monkeypatch):
    """fit weights each rank by its token share; the task rescales TVC/REC so that the sum over 2 simulated
    ranks is the gradient one process computes on the whole batch."""
    from amrg import dist, tasks

    feats, reports, targets, *_ = _data(n=4)

    def grads_of(world_batches):
        gen = _generator()
        aux = _aux(gen, bert)
        task = GeneratorTask(gen, feats, {"train": REPORTS[:4], "val": REPORTS[4:8]}, 20, 4, CPU, "fp32",
                             tvc_weight=1.0, rec_weight=1.0, aux=aux, rec_targets=targets)
        task.trainee.eval()  # no dropout: the same function on every "rank"
        world = len(world_batches)
        sizes = [(len(b), int(task.ids["train"][1][b].sum())) for b in world_batches]
        total = torch.tensor(sizes, dtype=torch.float64).sum(0)
        for rank, b in enumerate(world_batches):
            monkeypatch.setattr(tasks.dist, "context", lambda r=rank: dist.Context(r, world))
            monkeypatch.setattr(tasks.dist, "all_reduce_sum", lambda x: total.clone())
            loss, count = task.batch_loss(task.trainee, b)
            (loss * (count * world / float(total[1])) / world).backward()  # fit's weight, DDP's average
        return {n: p.grad.clone() for n, p in task.trainee.named_parameters() if p.grad is not None}

    one, two = grads_of([torch.arange(4)]), grads_of([torch.tensor([0]), torch.tensor([1, 2, 3])])
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6)


# ---- params and the sweep ------------------------------------------------------------------------------


def test_params_validation():
    base = dataclasses.asdict(load_params())
    for bad, msg in (({"tvc_weight": -1.0}, "tvc_weight must be >= 0"),
                     ({"vtc_weight": 0.0}, "all 0"),
                     ({"rec_dim": 30, "rec_heads": 4}, "divisible"),
                     ({"tvc_readout": "mlp"}, "tvc_readout"),
                     ({"tvc_prompt": " ", "tvc_view_token": False}, "tvc_prompt")):
        with pytest.raises(ParamsError, match=msg):
            parse_params({**base, "generator": {**base["generator"], **bad}})
    assert parse_params({**base, "generator": {**base["generator"], "vtc_weight": 0.0, "tvc_weight": 1.0}})


def test_ablation_grid_is_a_valid_sweep():
    from flows.sweep import load_grid, validate_points

    grid = load_grid(Path("sweeps/bidirectional.yaml"))
    validate_points(grid, Path("params.yaml"))
    points = [p for _, _, p in grid.experiments()]
    weights = {(p.get("generator.tvc_weight", 0.0), p.get("generator.rec_weight", 0.0)) for p in points}
    assert weights == {(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)}  # VTC; +TVC; +REC; all three
    assert {k.split(".")[0] for p in points for k in p} == {"generator"}  # upstream stages stay cached
