"""Hopfield retrieval at scale: dense softmax over the whole bank vs faiss top-k + exact softmax.

For each bank size N it builds the index the pipeline would build (``amrg.models.memory_index``:
flat below ``--threshold`` rows, IVF or HNSW above), reports the recall of the exact top-k of the
learned keys and the throughput of a full ``HopfieldRetrieval`` forward (queries/s), dense and top-k,
in the same process. Banks are clustered Gaussians (sentence embeddings are far from isotropic).

    python bench/hopfield_topk.py                         # N = 7k, 100k, 1M on CPU, paper widths
    python bench/hopfield_topk.py --sizes 7000 --device cuda

Dense at 1M needs the 1M x out value matrix in memory (16 GB at out=4096): it is skipped past
``--dense-max`` rows and reported as such.
"""

from __future__ import annotations

import argparse
import time

import torch

from amrg.models.hopfield import HopfieldRetrieval
from amrg.models.memory_index import recall_at_k

from _timing import timed  # bench/ is on sys.path when a bench runs as a script


def clustered(n: int, d: int, seed: int, centres: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    out = torch.empty(n, d)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        out[s:s + m] = c[torch.randint(0, centres, (m,), generator=g)] + 0.5 * torch.randn(m, d, generator=g)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[7_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=768, help="bank width (Bio_ClinicalBERT 768)")
    ap.add_argument("--hidden", type=int, default=768, help="hopfield.dim")
    ap.add_argument("--out", type=int, default=4096, help="LLM hidden size")
    ap.add_argument("--queries", type=int, default=6 * 14, help="batch x 14 diseases (paper batch 6)")
    ap.add_argument("--top-k", type=int, default=128)
    ap.add_argument("--threshold", type=int, default=100_000)
    ap.add_argument("--kind", default="ivf", choices=["ivf", "hnsw", "torch"],
                    help="torch: the exact chunked torch scan (no faiss, any --threshold)")
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--dense-max", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()} dim={a.dim} hidden={a.hidden} out={a.out} "
          f"queries={a.queries} top_k={a.top_k} beta=4")
    print(f"{'N':>9} {'index':>9} {'build s':>8} {'recall':>7} {'dense q/s':>10} {'top-k q/s':>10} {'ratio':>6}")
    for n in a.sizes:
        bank = clustered(n, a.dim, seed=1).to(device)
        h = HopfieldRetrieval(a.dim, bank, a.hidden, a.out, beta=4.0, top_k=a.top_k,
                              index={"threshold": a.threshold, "kind": a.kind, "nprobe": a.nprobe}).to(device).eval()
        q = clustered(a.queries, a.dim, seed=2).to(device).reshape(1, a.queries, a.dim)
        with torch.no_grad():
            t = time.perf_counter()
            ids = h.candidates(h.q_proj(q))
            build = time.perf_counter() - t
            # exact top-k of the learned scores, in chunks
            xi0 = h.q_proj(q)[0]
            scores = torch.cat([xi0 @ h.k_proj(bank[s:s + 100_000]).T for s in range(0, n, 100_000)], dim=1)
            exact = scores.topk(a.top_k, dim=-1).indices
            recall = recall_at_k(ids[0], exact)
            top_k_s = timed(lambda: h(q), a.repeats, device)
            dense_s = None
            if n <= a.dense_max:
                h.top_k = 0
                dense_s = timed(lambda: h(q), a.repeats, device)
        dense = f"{a.queries / dense_s:10.1f}" if dense_s else f"{'skipped':>10}"
        ratio = f"{dense_s / top_k_s:6.1f}" if dense_s else f"{'-':>6}"
        print(f"{n:>9} {h._index.kind:>9} {build:8.1f} {recall:7.3f} {dense} {a.queries / top_k_s:10.1f} {ratio}",
              flush=True)
        h = bank = scores = None  # freed before the next bank is drawn


if __name__ == "__main__":
    main()
