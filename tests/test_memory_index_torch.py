"""The torch top-k index (issue 19, ``banks.index.kind: torch``): a chunked matmul + topk equal to faiss's
exact IndexFlatIP and to a dense argsort, the bf16 scan's fp32 re-score, k > n, recall_at_k, and the same
Hopfield retrieval as the faiss flat path."""

import importlib.util

import pytest
import torch

from amrg.models.hopfield import HopfieldRetrieval
from amrg.models.memory_index import (MemoryIndex, candidate_count, chunked_top_k, recall_at_k,
                                      rescore)

HAVE_FAISS = importlib.util.find_spec("faiss") is not None


def _data(n=1000, d=16, q=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(q, d, generator=g)


def _dense(queries, bank, k):
    return (queries.double() @ bank.double().T).argsort(dim=1, descending=True)[:, :k]


@pytest.mark.parametrize("chunk_rows", [1000, 97, 7])  # one chunk, uneven chunks, chunks smaller than k
def test_torch_top_k_equals_dense_argsort_in_order(chunk_rows):
    bank, q = _data()
    index = MemoryIndex(bank, kind="torch", chunk_rows=chunk_rows)
    assert index.kind == "torch" and index.exact
    got = index.search(q, 10)
    assert got.dtype == torch.long and got.shape == (40, 10)
    assert torch.equal(got, _dense(q, bank, 10))
    scores, ids = chunked_top_k(q, bank, 10, chunk_rows)
    torch.testing.assert_close(scores, (q @ bank.T).gather(1, ids))
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first


def test_torch_equals_faiss_flat():
    pytest.importorskip("faiss")
    bank, q = _data(n=3000, d=24, q=64, seed=1)
    flat, torch_ = MemoryIndex(bank), MemoryIndex(bank, kind="torch", threshold=10, chunk_rows=512)
    assert flat.kind == "flat" and torch_.kind == "torch"  # torch ignores the threshold
    assert torch.equal(torch_.search(q, 16), flat.search(q, 16))  # continuous data: no ties


def test_k_beyond_the_bank_returns_every_row_as_faiss_does():
    bank, q = _data(n=12, q=5)
    got = MemoryIndex(bank, kind="torch", chunk_rows=5).search(q, 50)
    assert got.shape == (5, 12) and torch.equal(got, _dense(q, bank, 12))
    if HAVE_FAISS:
        assert torch.equal(MemoryIndex(bank).search(q, 50), got)


def test_bf16_scan_with_fp32_rescore_is_exact():
    bank, q = _data(n=2000, d=32, q=30, seed=2)
    bf16 = MemoryIndex(bank, kind="torch", chunk_rows=300, scan_dtype=torch.bfloat16)
    assert not bf16.exact and bf16.scan.dtype == torch.bfloat16 and bf16.bank.dtype == torch.float32
    want = _dense(q, bank, 8)
    assert torch.equal(bf16.search(q, 8), want)
    # the bf16 scores alone do reorder some rows: the re-score is what makes it exact
    raw = chunked_top_k(q, bank.bfloat16(), 8, 300)[1]
    assert not torch.equal(raw, want)
    assert candidate_count(8, 2000) == 40 and candidate_count(100, 2000) == 200 and candidate_count(8, 20) == 20
    cand = torch.stack([torch.randperm(2000, generator=torch.Generator().manual_seed(i))[:50] for i in range(30)])
    scores = (q @ bank.T).gather(1, cand)
    assert torch.equal(rescore(q, bank, cand, 5), cand.gather(1, scores.topk(5, dim=1).indices))


def test_queries_come_back_on_their_device_and_as_long():
    bank, q = _data(n=50, q=3)
    index = MemoryIndex(bank.double(), kind="torch")
    got = index.search(q, 4)  # float32 queries against a float64 bank
    assert got.device == q.device and got.dtype == torch.long and torch.equal(got, _dense(q, bank.double(), 4))
    assert index.search(q[:0], 4).shape == (0, 4)
    assert MemoryIndex(bank, kind="torch", scan_dtype=torch.bfloat16).search(q[:0], 4).shape == (0, 4)
    with pytest.raises(ValueError, match="chunk_rows"):
        MemoryIndex(bank, kind="torch", chunk_rows=0)


def test_recall_at_k_by_hand():
    exact = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(exact.flip(1), exact) == 1.0  # order does not matter
    assert recall_at_k(torch.tensor([[1, 2, 9, -1], [8, 0, 0, 0]]), exact) == 3 / 8
    assert recall_at_k(torch.tensor([[1, 2, 3, 4, 5, 6], [5, 6, 7, 1, 2, 3]]), exact) == 7 / 8  # a wider search


@pytest.mark.parametrize("normalize,heads", [(False, 1), (True, 2)])
def test_hopfield_through_the_torch_index_equals_the_faiss_flat_path(normalize, heads):
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    mem = torch.randn(300, 12)
    h = HopfieldRetrieval(query_dim=7, memory=mem, hidden_dim=6, out_dim=5, top_k=9, index={"kind": "torch"},
                          normalize=normalize, heads=heads, steps=2)
    q = torch.randn(2, 14, 7)
    out = h(q)
    assert h._index.kind == "torch"
    ids = h.candidates(h.q_proj(h.norm_state(q)))
    h._index, h.index_options = None, {"threshold": 100_000}  # rebuild as faiss IndexFlatIP
    torch.testing.assert_close(h(q), out, rtol=1e-5, atol=1e-6)
    assert h._index.kind == "flat"
    assert torch.equal(h.candidates(h.q_proj(h.norm_state(q))).sort(-1).values, ids.sort(-1).values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 scan is the CUDA default")
def test_cuda_bank_scans_in_bf16_and_returns_the_fp32_top_k():
    bank, q = _data(n=300_000, d=64, q=100, seed=3)
    index = MemoryIndex(bank.cuda(), kind="torch", chunk_rows=65_536)
    assert index.scan.dtype == torch.bfloat16 and not index.exact
    got = index.search(q.cuda(), 10)
    assert got.is_cuda and torch.equal(got.cpu(), _dense(q, bank, 10))
