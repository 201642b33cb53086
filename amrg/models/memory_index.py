"""Top-k prefilter for Hopfield retrieval over a large memory bank (faiss).

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
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss is a declared dependency
        raise ImportError("hopfield.top_k > 0 needs faiss: pip install 'amrg[faiss]' (faiss-gpu on a GPU cluster)") from e
    return faiss


class MemoryIndex:
    """Inner-product search over the rows of a fixed ``(n, d)`` bank."""

    def __init__(self, memory: torch.Tensor, threshold: int = 100_000, kind: str = "ivf", nlist: int = 0,
                 nprobe: int = 32, hnsw_m: int = 32, ef_search: int = 128, seed: int = 0):
        faiss = _faiss()
        x = np.ascontiguousarray(memory.detach().float().cpu().numpy())
        n, d = x.shape
        self.n, self.d = n, d
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

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """Row ids ``(q, k)`` (long, on the queries' device) of the k largest inner products; an
        approximate index may find fewer than k rows, marked -1."""
        q = queries.detach().float().cpu().numpy()
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.ef_search, k)  # the search beam must hold k results
        _, ids = self.index.search(np.ascontiguousarray(q), min(k, self.n))
        return torch.from_numpy(ids).to(queries.device)
