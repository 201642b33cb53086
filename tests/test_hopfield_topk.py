"""Hopfield retrieval over a faiss top-k of the bank: exact candidate search through the raw bank,
equal to dense retrieval when the candidates cover the bank, gradients through the gathered rows,
approximate indexes with measured recall."""

import math

import pytest
import torch

from amrg.config import Hopfield, Llm
from amrg.models.hopfield import HopfieldRetrieval
from amrg.models.memory_index import MemoryIndex
from tests.test_training import TINY_LLM, make_generator

pytest.importorskip("faiss")


def _module(n=40, d_m=12, top_k=5, steps=1, beta=4.0, seed=0, **index):
    torch.manual_seed(seed)
    mem = torch.randn(n, d_m)
    return HopfieldRetrieval(query_dim=7, memory=mem, hidden_dim=6, out_dim=5, beta=beta, steps=steps,
                             top_k=top_k, index=index), mem


def test_candidates_are_the_dense_top_k_of_the_learned_keys():
    h, mem = _module(top_k=6)
    q = torch.randn(3, 14, 7)
    xi0 = h.q_proj(q)
    dense_scores = xi0 @ h.k_proj(mem).T  # includes the key bias, which shifts every score equally
    want = dense_scores.topk(6, dim=-1).indices.sort(-1).values
    got = h.candidates(xi0).sort(-1).values
    assert got.shape == (3, 14, 6)
    assert torch.equal(got, want)


@pytest.mark.parametrize("steps", [1, 3])
def test_top_k_covering_the_bank_equals_dense(steps):
    h, _ = _module(n=30, top_k=0, steps=steps)
    q = torch.randn(2, 14, 7)
    dense = h(q)
    h.top_k = 30  # force the indexed path with every row a candidate
    torch.testing.assert_close(h(q), dense, rtol=1e-5, atol=1e-6)


def test_top_k_matches_dense_when_the_softmax_is_peaked():
    h, _ = _module(n=200, top_k=0, beta=400.0)
    q = torch.randn(2, 14, 7)
    dense = h(q)
    h.top_k = 4
    torch.testing.assert_close(h(q), dense, rtol=1e-4, atol=1e-5)


def test_top_k_path_trains_every_projection():
    h, _ = _module(top_k=5)
    h(torch.randn(2, 14, 7)).square().sum().backward()
    for name in ("q_proj", "k_proj", "v_proj"):
        assert getattr(h, name).weight.grad.abs().sum() > 0, name


def test_top_k_not_smaller_than_bank_falls_back_to_dense():
    h, _ = _module(n=10, top_k=10)
    assert h.top_k == 0 and h._index is None


def _clustered(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, d, generator=g)
    return centres[torch.randint(0, 64, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("kind,options", [("ivf", {"nlist": 16, "nprobe": 8}), ("hnsw", {"hnsw_m": 16, "ef_search": 64})])
def test_approximate_indexes_recall_the_exact_top_k(kind, options):
    mem, q = _clustered(4000, 16), _clustered(50, 16, seed=1)
    exact = MemoryIndex(mem)  # below threshold: flat, exact
    approx = MemoryIndex(mem, threshold=1000, kind=kind, **options)
    assert exact.kind == "flat" and approx.kind == kind
    want = (q @ mem.T).topk(10, dim=-1).indices
    assert torch.equal(exact.search(q, 10).sort(-1).values, want.sort(-1).values)
    got = approx.search(q, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want)) / want.numel()
    assert recall >= 0.9, recall


def test_missing_candidates_are_masked_out():
    h, mem = _module(n=20, top_k=4)
    q = torch.randn(1, 2, 7)
    xi0 = h.q_proj(q)
    ids = h.candidates(xi0)
    h.candidates = lambda xi: torch.cat([ids[..., :2], torch.full_like(ids[..., :2], -1)], dim=-1)  # noqa: E731
    keys, values = h.k_proj(mem[ids[..., :2]]), h.v_proj(mem[ids[..., :2]])
    w = torch.softmax(h.beta * (keys @ xi0.unsqueeze(-1)).squeeze(-1) / math.sqrt(6), dim=-1)
    torch.testing.assert_close(h(q), (w.unsqueeze(-2) @ values).squeeze(-2))


def test_generator_with_top_k_memories_runs_and_learns():
    reports = ["the heart is normal .", "there is a left pleural effusion ."] * 4
    torch.manual_seed(0)
    model = make_generator(Llm(**TINY_LLM), torch.randn(50, 10), torch.randn(40, 12), Hopfield(dim=8, top_k=3),
                           visual_dim=16, query_dim=16, prompt="go", texts=reports, index={"threshold": 100_000})
    tok = model.tokenizer
    assert model.v_hopfield.top_k == 3 and model.r_hopfield.top_k == 3
    rows = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in reports[:2]]
    ids = torch.full((2, max(map(len, rows))), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    f, fd = torch.randn(2, 4, 16), torch.randn(2, 14, 16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = model(f, fd, ids, mask)
        loss.backward()
        if step == 0:  # the retrieval over each query's 3 candidates is trained, through both memories
            assert model.r_hopfield._index.kind == "flat"
            for h in (model.v_hopfield, model.r_hopfield):
                for name in ("q_proj", "k_proj", "v_proj"):
                    assert getattr(h, name).weight.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert all(map(math.isfinite, losses))
    assert losses[-1] < 0.5 * losses[0], losses
