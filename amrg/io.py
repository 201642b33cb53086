"""Atomic artifact writes, resumable training checkpoints, device/seed helpers, progress of long loops.

Every writer goes to a temporary file in the destination directory, fsyncs it and renames it over
the target, so an interrupted stage never leaves a truncated artifact at an output path.
Weights load through safetensors or ``torch.load(weights_only=True)``: loading never runs code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, write_json  # noqa: F401  (one implementation; importable without torch)

log = logging.getLogger(__name__)
T = TypeVar("T")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def write_parquet(path: str | Path, table: pa.Table | dict) -> None:
    if isinstance(table, dict):
        table = pa.table(table)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns, memory_map=True)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(path), device=device)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save a resumable training state (tensors, numbers, strings, nested dicts/lists) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing pickled code (weights_only)."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- runtime
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` / ``None``: CUDA when visible, else CPU; otherwise ``torch.device(device)``
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...). A CUDA device without CUDA is a ``RuntimeError``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device={device} but no CUDA device is visible; set runtime.device=auto or cpu")
    return dev


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; fp32 (a no-op context) otherwise."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def setup_runtime(runtime: Any) -> torch.device:
    """Seed, set threads, pick the device (this rank's under a launcher); returns it.
    ``runtime`` is :class:`amrg.config.Runtime`."""
    seed_everything(runtime.seed)
    if runtime.num_threads:
        torch.set_num_threads(runtime.num_threads)
    from .dist import init

    device = init(resolve_device(runtime.device))  # joins the process group under torchrun
    log.info("device=%s precision=%s seed=%d", device, runtime.precision, runtime.seed)
    return device


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("AMRG_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ----------------------------------------------------------------------------- progress
def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             count: Callable[[T], int] | None = None, mininterval: float = 5.0) -> Iterator[T]:
    """Iterate ``iterable`` with a tqdm bar on rank 0 and, once it is exhausted, one INFO log line
    ``"<desc>: N <unit> in S s (R <unit>/s)"`` (rank 0 only; no line when the loop is left early).

    ``count(item)`` is how many ``unit`` one item stands for (e.g. ``len`` of a batch, so a loop over
    batches counts sentences); ``total`` is then in ``unit`` too (default ``len(iterable)`` when it has
    one and ``count`` is not given). The bar redraws at most every ``mininterval`` seconds and does not
    stay in the log (``leave=False``): the log line does.
    """
    from tqdm import tqdm

    from .dist import context

    main = context().is_main
    if total is None and count is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    n, t0 = 0, time.perf_counter()
    with tqdm(total=total, desc=desc, unit=unit, mininterval=mininterval, leave=False, disable=not main) as bar:
        for item in iterable:
            k = 1 if count is None else int(count(item))
            yield item
            n += k
            bar.update(k)
    if main:
        seconds = time.perf_counter() - t0
        log.info("%s: %d %s in %.1f s (%.1f %s/s)", desc, n, unit, seconds, n / max(seconds, 1e-9), unit)
