"""Top-k prefilter for Hopfield retrieval over a large memory bank (faiss, or an exact torch scan).

A learned key is an affine map of a fixed memory row, ``k_j = W_k m_j + b_k``, so the score of state ξ is

    ξ·k_j = (W_kᵀ ξ)·m_j + ξ·b_k,

an inner product with the *raw* row m_j plus a term that is the same for every j. The ranking of the
keys, and so the top-k, is therefore an inner-product search of ``W_kᵀ ξ`` over the raw bank: the index is
built once over the frozen bank and stays exact while W_k trains. The softmax is then computed exactly
over the k rows found (keys and values projected for those rows only, so a 1M-row bank never needs a
1M x 4096 value matrix). With ``k >= n`` the result equals the dense retrieval.

Below ``threshold`` rows the index is exact (``IndexFlatIP``); past it, IVF-Flat or HNSW (approximate,
recall reported by ``bench/hopfield_topk.py``; IVF, the default, holds its recall on high-dimensional
banks far better than HNSW's inner-product graph). With a GPU build of faiss and a CUDA bank, flat and IVF
indexes are moved to the GPU.

``kind="torch"`` (issue 19) needs no faiss and ignores ``threshold``: an exact inner-product top-k by a chunked
matmul on the bank's device (:func:`chunked_top_k`): each chunk of ``chunk_rows`` bank rows is scored
against a block of queries and ``torch.topk``-ed, the running best merged with the chunk's. On CUDA the
scan runs in bf16 keeping ``candidate_count`` (at least 2k) rows per query, then the candidates are
re-scored in fp32 (:func:`rescore`), so the returned rows and their order are the fp32 ones; a bf16
rounding error (~2^-8 of a score) can only swap rows tied that closely. Elsewhere the scan runs in the
bank's dtype and is exact as it is. :func:`recall_at_k` scores an approximate search against the exact one.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)

TORCH_CHUNK_ROWS = 262_144  # bank rows scored per matmul of the torch scan
SCORE_BUDGET = 1 << 28  # score-matrix elements per matmul: query blocks of SCORE_BUDGET // chunk_rows
RESCORE_BUDGET = 1 << 26  # gathered fp32 bank elements per re-score block (256 MiB)
MIN_EXTRA_CANDIDATES = 32  # a reduced-precision scan keeps max(2k, k + 32) rows per query for the re-score


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a declared dependency
        raise ImportError("hopfield.top_k > 0 needs faiss: pip install 'amrg[faiss]' (faiss-gpu on a GPU cluster)") from e
    return faiss


def candidate_count(k: int, n: int) -> int:
    """Rows a reduced-precision scan keeps per query for the fp32 re-score: ``max(2k, k + 32)``, at most n."""
    return min(n, max(2 * k, k + MIN_EXTRA_CANDIDATES))


def chunked_top_k(queries: torch.Tensor, bank: torch.Tensor, k: int, chunk_rows: int = TORCH_CHUNK_ROWS
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest inner products ``queries (q, d) · bank (n, d)ᵀ`` per query, as (scores, long ids),
    each ``(q, min(k, n))``, best first, computed in ``bank``'s dtype and device. Memory: one
    ``(q_block, chunk_rows)`` score matrix at a time, ``q_block = SCORE_BUDGET // chunk_rows``."""
    n = bank.shape[0]
    k = min(k, n)
    queries = queries.to(device=bank.device, dtype=bank.dtype)
    block = max(1, SCORE_BUDGET // chunk_rows)
    scores = [torch.empty(0, k, dtype=bank.dtype, device=bank.device)]
    ids = [torch.empty(0, k, dtype=torch.long, device=bank.device)]
    for qs in range(0, len(queries), block):
        q = queries[qs:qs + block]
        best_s = torch.empty(len(q), 0, dtype=bank.dtype, device=bank.device)
        best_i = torch.empty(len(q), 0, dtype=torch.long, device=bank.device)
        for s in range(0, n, chunk_rows):
            part = bank[s:s + chunk_rows]
            top = (q @ part.T).topk(min(k, len(part)), dim=1)
            merged_s, merged_i = torch.cat([best_s, top.values], 1), torch.cat([best_i, top.indices + s], 1)
            keep = merged_s.topk(min(k, merged_s.shape[1]), dim=1).indices
            best_s, best_i = merged_s.gather(1, keep), merged_i.gather(1, keep)
        scores.append(best_s), ids.append(best_i)
    return torch.cat(scores), torch.cat(ids)


def rescore(queries: torch.Tensor, bank: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Of each query's ``candidates (q, c)`` rows of ``bank (n, d)``, the ``min(k, c)`` with the largest fp32
    inner product, best first (long ids ``(q, min(k, c))``); rows gathered in blocks of RESCORE_BUDGET."""
    c = candidates.shape[1]
    k = min(k, c)
    queries = queries.to(device=bank.device, dtype=torch.float32)
    block = max(1, RESCORE_BUDGET // max(1, c * bank.shape[1]))
    out = []
    for qs in range(0, len(queries), block):
        cand = candidates[qs:qs + block]
        rows = bank[cand].float()  # (b, c, d)
        s = (rows @ queries[qs:qs + block].unsqueeze(-1)).squeeze(-1)  # (b, c)
        out.append(cand.gather(1, s.topk(k, dim=1).indices))
    return torch.cat(out) if out else candidates[:, :k]


def recall_at_k(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Share of the exact top-k ids ``exact (q, k)`` that a search found (``found (q, k')``, -1: none),
    row by row: ``Σ_i |found_i ∩ exact_i| / exact.numel()`` (1.0 for an exact search, ties aside)."""
    if exact.numel() == 0:
        return 1.0
    found, exact = found.to(exact.device), exact.long()
    hit = (exact.unsqueeze(-1) == found.long().unsqueeze(-2)).any(-1) & (exact >= 0)
    return float(hit.sum()) / exact.numel()


class MemoryIndex:
    """Inner-product search over the rows of a fixed ``(n, d)`` bank.

    ``kind="torch"``: the exact torch scan (no faiss, any ``threshold``) on ``memory``'s device;
    ``scan_dtype`` its matmul dtype (None: bf16 on CUDA, else ``memory``'s dtype), ``chunk_rows`` its
    chunk. The other kinds are faiss (flat below ``threshold``, else IVF or HNSW)."""

    def __init__(self, memory: torch.Tensor, threshold: int = 100_000, kind: str = "ivf", nlist: int = 0,
                 nprobe: int = 32, hnsw_m: int = 32, ef_search: int = 128, seed: int = 0,
                 chunk_rows: int = TORCH_CHUNK_ROWS, scan_dtype: torch.dtype | None = None):
        self.n, self.d = memory.shape
        if kind == "torch":
            self._init_torch(memory, chunk_rows, scan_dtype)
            return
        faiss = _faiss()
        x = np.ascontiguousarray(memory.detach().float().cpu().numpy())
        n, d = x.shape
        if n < threshold:
            index, self.kind = faiss.IndexFlatIP(d), "flat"
        elif kind == "hnsw":
            index, self.kind = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT), "hnsw"
            self.ef_search = ef_search
        else:
            nlist = nlist or max(1, int(math.sqrt(n)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            sample = x[np.random.default_rng(seed).permutation(n)[: min(n, 64 * nlist)]]
            index.train(sample)
            index.nprobe, self.kind = nprobe, "ivf"
        if memory.is_cuda and hasattr(faiss, "StandardGpuResources") and self.kind != "hnsw":
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, memory.device.index or 0, index)
            self.kind += "-gpu"
        index.add(x)
        self.index = index
        log.info("memory index %s over %d x %d", self.kind, n, d)

    def _init_torch(self, memory: torch.Tensor, chunk_rows: int, scan_dtype: torch.dtype | None) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.kind, self.chunk_rows = "torch", chunk_rows
        self.bank = memory.detach()
        if scan_dtype is None:
            scan_dtype = torch.bfloat16 if memory.is_cuda else memory.dtype
        self.exact = scan_dtype == self.bank.dtype and self.bank.dtype in (torch.float32, torch.float64)
        self.scan = self.bank if scan_dtype == self.bank.dtype else self.bank.to(scan_dtype)
        log.info("memory index torch over %d x %d on %s (scan %s%s)", self.n, self.d, memory.device,
                 scan_dtype, "" if self.exact else ", fp32 re-score")

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Row ids ``(q, k)`` (long, on the queries' device) of the k largest inner products; an
        approximate index may find fewer than k rows, marked -1."""
        if self.kind == "torch":
            k = min(k, self.n)
            if self.exact:
                ids = chunked_top_k(queries.detach(), self.scan, k, self.chunk_rows)[1]
            else:
                cand = chunked_top_k(queries.detach(), self.scan, candidate_count(k, self.n), self.chunk_rows)[1]
                ids = rescore(queries.detach(), self.bank, cand, k)
            return ids.to(queries.device)
        q = queries.detach().float().cpu().numpy()
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)  # the search beam must hold k results
        _, ids = self.index.search(np.ascontiguousarray(q), min(k, self.n))
        return torch.from_numpy(ids).to(queries.device)
