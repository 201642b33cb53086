"""Glue shared by the stage scripts: argv, params, logging, run metadata. Paths come from
:class:`amrg.layout.Layout` (``--artifacts`` / ``--checkpoints`` redirect a whole run)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from amrg import dist
from amrg.config import Params, load_params, to_dict
from amrg.io import setup_logging, write_json
from amrg.layout import Layout


def start(stage: str, argv: list[str] | None = None, relaunch: bool = False
          ) -> tuple[Params, logging.Logger, Layout]:
    """Parse ``--params`` (default params.yaml), ``--artifacts`` and ``--checkpoints``, validate every
    key, set up logging. ``relaunch``: a training stage re-executes itself under torchrun when
    ``runtime.num_processes > 1`` (:func:`amrg.dist.relaunch`)."""
    import argparse

    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--artifacts", default=str(Layout().root), help="artifacts root (default: artifacts)")
    ap.add_argument("--checkpoints", default=str(Layout().checkpoints), help="resumable training state (default: checkpoints)")
    args = ap.parse_args(argv)
    setup_logging()
    params = load_params(args.params)
    if relaunch:
        dist.relaunch(params.runtime.num_processes, f"stages.{stage}", argv)
    log = logging.getLogger(f"stages.{stage}")
    log.info("stage %s", stage)
    return params, log, Layout(Path(args.artifacts), Path(args.checkpoints))


CONTENT_HASH_LIMIT = 256 * 2**20  # larger input files (the pixel store) are fingerprinted by size and mtime


def fingerprint(*parts) -> str:
    """Hash of params sections and input files: a training checkpoint only resumes the same run. Files are
    hashed by content in 16 MiB reads, those over :data:`CONTENT_HASH_LIMIT` by size and mtime."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Path) and p.is_file() and p.stat().st_size > CONTENT_HASH_LIMIT:
            h.update(f"{p.stat().st_size}:{p.stat().st_mtime_ns}".encode())
        elif isinstance(p, Path) and p.is_file():
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
        elif isinstance(p, Path):
            h.update(str(sorted(x.stat().st_mtime_ns for x in p.rglob("*"))).encode())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def write_resolved(out_dir: Path, **sections) -> None:
    """Write the params a stage used beside its outputs."""
    write_json(out_dir / "params.json", {k: to_dict(v) if hasattr(v, "__dataclass_fields__") else v
                                         for k, v in sections.items()})


def log_history(out_dir: Path, history: list[dict]) -> None:
    """Per-epoch training curves for ``dvc plots show/diff``, in dvclive's file layout:
    ``out_dir/dvclive/plots/metrics/<name>.tsv`` (columns ``step``, ``<name>``) and a last-step summary
    ``out_dir/dvclive/metrics.json``. Written from the loop's full history, so a resumed run still
    logs every epoch. (dvclive's ``Live`` itself is not used: it fails in a git repo without commits
    and ``dvc init``s a plain git repo when a stage runs outside DVC.)
    """
    from amrg.io import write_text

    root = out_dir / "dvclive"
    names = [k for k in history[0] if k != "epoch"] if history else []
    for name in names:
        rows = "".join(f"{step}\t{h[name]}\n" for step, h in enumerate(history) if name in h)
        write_text(root / "plots" / "metrics" / f"{name}.tsv", f"step\t{name.rsplit('/', 1)[-1]}\n{rows}")
    write_json(root / "metrics.json", {**{k: v for k, v in history[-1].items() if k != "epoch"},
                                       "step": len(history) - 1} if history else {})


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 3)


def clear_stage_dir(out: Path) -> None:
    """Remove whatever an earlier run left in a stage's output directory (a stage that writes less than its
    last run, e.g. a pre-training stage switched off, leaves no stale file behind)."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def peak_memory_mb(device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, the max resident set size on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB
