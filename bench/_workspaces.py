"""Helpers shared by the cluster benches: a git "origin" made from this working tree, clones of it
that sit beside one shared local DVC remote (the committed .dvc/config points at ../amrg-dvc-remote),
and a subprocess runner that times each command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests._workspace import make_workspace  # noqa: E402  (the one workspace helper, shared with the tests)
DVC = [sys.executable, "-m", "dvc"]

def env(tmp: Path, **extra) -> dict:
    e = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
             DVC_NO_ANALYTICS="1", DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
             GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
             GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    e.pop("PYTHONPATH", None)
    e.update(extra)
    return e


def run(args, cwd, e, log=None, check=True, timeout=3600) -> tuple[float, str]:
    """Run a command, return (seconds, merged output); append the output to ``log`` if given."""
    t0 = time.perf_counter()
    p = subprocess.run([str(a) for a in args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    out = p.stdout + p.stderr
    if log is not None:
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(map(str, args))}  (cwd={cwd}, {seconds:.1f}s, rc={p.returncode})\n{out}")
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({p.returncode}):\n{out[-4000:]}")
    return seconds, out


def make_origin(tmp: Path, tiny: bool, e: dict) -> Path:
    """A git repo of this working tree (no outputs, no dvc.lock), on the smoke overlay
    ``configs/tiny.yaml`` when ``tiny``."""
    origin = make_workspace(tmp / "origin", tiny=tiny)
    for args in (["git", "add", "-A"], ["git", "commit", "-qm", "bench origin"]):
        run(args, origin, e)
    return origin


def clone(tmp: Path, name: str, e: dict) -> Path:
    run(["git", "clone", "-q", tmp / "origin", tmp / name], tmp, e)
    return tmp / name


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def restored(output: str) -> list[str]:
    return re.findall(r"Stage '([^']+)' is cached - skipping run", output)


def tree_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)
