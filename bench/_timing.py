"""Wall-clock timing shared by the benches: one warm-up call, then the mean over ``repeats`` calls,
synchronised with the GPU when the work runs on CUDA."""

from __future__ import annotations

import time

import torch


def timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after one warm-up call (which builds lazy state such as indexes)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats
