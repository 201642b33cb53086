"""A temporary copy of this working tree as a fresh repository: the one helper the end-to-end tests,
the cluster tests, the DVC-contract tests and the cluster benches build their workspaces with."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from amrg.config import merge_overlay

ROOT = Path(__file__).resolve().parents[1]
NEVER = ("artifacts/", "checkpoints/")


def tiny_params(params_file: str | Path, *extra: dict) -> dict:
    """``params_file`` merged with the smoke overlay ``configs/tiny.yaml`` beside it, then ``extra``."""
    params_file = Path(params_file)
    raw = yaml.safe_load(params_file.read_text())
    for overlay in (yaml.safe_load((params_file.parent / "configs" / "tiny.yaml").read_text()), *extra):
        merge_overlay(raw, overlay)
    return raw


def make_workspace(dst: Path, *overlays: dict, tiny: bool = True, keep_lock: bool = False,
                   exclude: tuple[str, ...] = ()) -> Path:
    """Copy the tracked and untracked-but-not-ignored files of this working tree to ``dst`` (never
    artifacts/ or checkpoints/, nor the ``exclude`` prefixes), drop dvc.lock unless ``keep_lock``,
    write params.yaml on the smoke overlay (``tiny``) plus ``overlays``, and ``git init`` it."""
    dst.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file() and not f.startswith(NEVER + tuple(exclude)):
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    if not keep_lock:
        (dst / "dvc.lock").unlink(missing_ok=True)
    if tiny or overlays:
        raw = tiny_params(dst / "params.yaml", *overlays) if tiny else yaml.safe_load((dst / "params.yaml").read_text())
        if not tiny:
            for o in overlays:
                merge_overlay(raw, o)
        (dst / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    return dst


def run(args: list[str], cwd: Path, env: dict) -> str:
    """Run a command to success (its output tails in the failure message); return stdout + stderr."""
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{' '.join(args)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def stages_ran(output: str) -> list[str]:
    """The stages a `dvc repro` output says it ran, in order."""
    return re.findall(r"Running stage '([^']+)'", output)
