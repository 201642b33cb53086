"""Resumable, chunked production of the pixel store: decode (or draw) images in a process pool, chunk by chunk.

The image jobs of a dataset (one per image, in the order of ``images.parquet``) are cut into chunks of
``chunk`` jobs. Each chunk is made in a worker process, which writes ``chunk-K.npy`` (the uint8 images
that worked, in job order) and then ``chunk-K.json`` (the jobs that failed, with their reason): the JSON
is the chunk's completion mark (with the images' CRC-32), each file renamed into place when whole. A
killed run leaves finished chunks in the work directory; the next run with the same jobs (same ``fingerprint``) makes only the rest, and the
chunks are then concatenated in order, so the result is byte-identical to an uninterrupted run for any
chunk size, worker count or interruption point. Memory is one chunk per worker, never the dataset
(:data:`START_METHOD`).
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing as mp
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..atomic import atomic_path, write_json
from .images import ImageError, decode_image
from .phantoms import draw_phantom

log = logging.getLogger(__name__)

Error = tuple[int, str, str]  # (job index, reason, detail)
Maker = Callable[[Sequence], tuple[np.ndarray, list[Error]]]
FINGERPRINT = "fingerprint"
# Workers are forks of this process, made with the collector's objects frozen (gc.freeze, Python's advice
# for fork without exec): a worker's collections never write to the parent's objects, so the pages of the
# studies of a 377k-image dataset stay shared instead of being copied into every worker. A chunk's
# jobs reach the worker pickled. (forkserver / spawn would re-import the stage, torch included, per worker.)
START_METHOD = "fork"


def _stack(images: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(images) if images else np.zeros((0, size, size), np.uint8)


def decode_chunk(rels: Sequence[str], root: str, size: int) -> tuple[np.ndarray, list[Error]]:
    """Decode image files ``rels`` below ``root`` to uint8 ``size x size``; failures are returned, not raised."""
    ok, errors = [], []
    for i, rel in enumerate(rels):
        try:
            ok.append(decode_image(root, rel, size))
        except ImageError as e:
            errors.append((i, e.reason, e.detail))
    return _stack(ok, size), errors


def phantom_chunk(jobs: Sequence[tuple], size: int) -> tuple[np.ndarray, list[Error]]:
    """Draw phantom radiographs ``draw_phantom(labels, view, size, seed)`` for jobs ``(labels, view, seed)``."""
    return _stack([draw_phantom(labels, view, size, seed) for labels, view, seed in jobs], size), []


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int
    jobs: Sequence

    def paths(self, workdir: Path) -> tuple[Path, Path]:
        return workdir / f"chunk-{self.index:06d}.npy", workdir / f"chunk-{self.index:06d}.json"


def _crc(pixels: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1))


def _make(make: Maker, chunk: Chunk, workdir: Path) -> int:
    """Make one chunk and write it; not fsynced (a worker's time is the decode's): a chunk found finished
    by a later run is checked against the CRC-32 its mark records (:func:`_intact`) and remade if it differs."""
    pixels, errors = make(chunk.jobs)
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    npy, done = chunk.paths(workdir)
    with atomic_path(npy, fsync=False) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, pixels)
    write_json(done, {"start": chunk.start, "jobs": len(chunk.jobs), "errors": errors, "crc32": _crc(pixels)},
               fsync=False)
    return chunk.index


def _intact(chunk: Chunk, workdir: Path) -> bool:
    """Whether a chunk of an earlier run is finished and whole (after a crash or power loss it may not be)."""
    npy, done = chunk.paths(workdir)
    try:
        mark = json.loads(done.read_text())
        return mark["jobs"] == len(chunk.jobs) and _crc(np.load(npy)) == mark["crc32"]
    except (OSError, ValueError, KeyError, EOFError):
        return False


def produce(jobs: Sequence, make: Maker, workdir: Path, chunk: int, workers: int, fingerprint: str,
            desc: str = "images") -> tuple[list[Path], list[Error]]:
    """Make every chunk of ``jobs`` not already finished in ``workdir`` (under the same ``fingerprint``), over
    ``workers`` processes (1: in this process). Returns the chunk files in job order and every failed
    job (global index, reason, detail). ``make`` must be picklable (a module-level function or partial)."""
    from ..io import progress

    workdir = Path(workdir)
    mark = workdir / FINGERPRINT
    if workdir.exists() and (not mark.is_file() or mark.read_text() != fingerprint):
        log.info("discarding %s: its chunks are of other inputs", workdir)
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mark.write_text(fingerprint)
    chunks = [Chunk(k, s, jobs[s:s + chunk]) for k, s in enumerate(range(0, len(jobs), chunk))]
    todo = [c for c in chunks if not _intact(c, workdir)]
    if len(todo) < len(chunks):
        log.info("resuming: %d of %d chunks already made in %s", len(chunks) - len(todo), len(chunks), workdir)

    def finished():
        if workers <= 1 or len(todo) <= 1:
            for c in todo:
                _make(make, c, workdir)
                yield c
            return
        gc.freeze()
        try:
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context(START_METHOD)) as pool:
                futures = {pool.submit(_make, make, c, workdir): c for c in todo}
                for fut in as_completed(futures):
                    fut.result()
                    yield futures[fut]
        finally:
            gc.unfreeze()

    for _ in progress(finished(), desc, total=sum(len(c.jobs) for c in todo), unit="images",
                      count=lambda c: len(c.jobs)):
        pass
    errors: list[Error] = []
    for c in chunks:
        done = json.loads(c.paths(workdir)[1].read_text())
        errors += [(c.start + i, reason, detail) for i, reason, detail in done["errors"]]
    return [c.paths(workdir)[0] for c in chunks], errors
