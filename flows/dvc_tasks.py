"""DVC side of the Prefect flows, kept free of Prefect imports so it can be tested on its own.

* ``stage_graph`` / ``stage_order`` / ``read_metrics``: DVC's own view of the pipeline
  (``dvc.repo.Repo(...).index``): its stage graph, in topological order, and the metrics DVC lists.
* ``run_dvc`` is the one helper through which every DVC CLI call goes (one writer per workspace).
* ``classify_failure`` / ``is_transient_failure`` decide which failures are worth a retry.
* ``workspace_lock`` lets one pipeline run at a time own a workspace (a second one waits or fails).
* ``overlay_leaves`` / ``validate_overlay``: a params overlay as ``-S key=value`` leaves, checked with
  :func:`amrg.config.parse_params` against params.yaml before anything runs. Nothing here writes
  params.yaml: an overlay runs as a temporary DVC experiment (``dvc exp run --temp -S ...``).
* ``default_remote`` tells whether ``dvc pull``/``dvc push`` have somewhere to go.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import functools
import json
import os
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

EX_TEMPFAIL = 75  # sysexits.h: "temporary failure, try again" -- a stage may exit with it to ask for a retry
TRANSIENT_EXIT_CODES = frozenset({EX_TEMPFAIL})
# DVC's own error lines that mean "someone else holds the repo" or "the remote hiccupped"
TRANSIENT_PATTERNS = re.compile(
    r"unable to acquire lock|is busy|failed to (?:pull|push|fetch|download|upload)"
    r"|connection (?:reset|refused|aborted)|timed out|temporary failure|remote .*unavailable",
    re.IGNORECASE,
)
_EXITED_WITH = re.compile(r"exited with (-?\d+)")
_FAILED_STAGE = re.compile(r"failed to reproduce '([^']+)'")
# what DVC prints per stage (dvc repro and dvc exp run alike)
_OUTCOMES = ((re.compile(r"^Running stage '([^']+)'"), "ran"),
             (re.compile(r"^Stage '([^']+)' is cached - skipping run"), "restored"),
             (re.compile(r"^Stage '([^']+)' didn't change, skipping"), "unchanged"))


class DvcPipelineError(ValueError):
    """DVC cannot load the pipeline: a dependency cycle, a bad template, an unknown stage, ..."""


@contextlib.contextmanager
def dvc_repo(repo: str | os.PathLike) -> Iterator[Any]:
    """DVC's own view of ``repo`` (``dvc.repo.Repo``); DVC's load errors become DvcPipelineError."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(repo)) as r:
            yield r
    except DvcException as e:
        detail = f" ({e.exc})" if getattr(e, "exc", None) else ""  # dvc.yaml schema errors say where
        raise DvcPipelineError(f"{Path(repo) / 'dvc.yaml'}: {e}{detail}") from e


def stage_address(r: Any, stage: Any) -> str:
    """What ``dvc repro`` takes from the repository root: ``name`` (root dvc.yaml) or ``sub/dvc.yaml:name``."""
    rel = Path(os.path.relpath(stage.dvcfile.path, r.root_dir)).as_posix()
    return stage.name if rel == "dvc.yaml" else f"{rel}:{stage.name}"


def pipeline_stages(r: Any) -> tuple[list[Any], dict[str, list[str]]]:
    """(stages with a command, in DVC's topological order, ties in dvc.yaml order; stage -> upstream)."""
    import networkx as nx

    stages = [s for s in r.index.stages if getattr(s, "cmd", None)]  # .dvc data files have no command
    pos = {s: i for i, s in enumerate(stages)}
    full = r.index.graph  # edges point downstream -> upstream; raises CyclicGraphError on a cycle
    graph = full.subgraph(stages).reverse(copy=True)  # upstream -> downstream
    order = list(nx.lexicographical_topological_sort(graph, key=pos.__getitem__))
    ups = {stage_address(r, s): [stage_address(r, u) for u in sorted(full.successors(s), key=lambda u: pos.get(u, -1))
                            if u in pos] for s in stages}
    return order, ups


def stage_graph(repo: str | os.PathLike) -> dict[str, list[str]]:
    """stage -> its upstream stages, as DVC builds them (``dvc.repo.Repo(repo).index.graph``): dvc.yaml
    order, templated (``${...}``) and foreach/matrix stages resolved by DVC. Stage names are DVC's
    addresses (``name``, ``name@item``, ``sub/dvc.yaml:name``), as ``dvc repro`` takes them."""
    with dvc_repo(repo) as r:
        return pipeline_stages(r)[1]


def stage_order(repo: str | os.PathLike) -> list[str]:
    """DVC's stages in topological order, ties in dvc.yaml order. A cycle raises DvcPipelineError."""
    with dvc_repo(repo) as r:
        return [stage_address(r, s) for s in pipeline_stages(r)[0]]


def read_metrics(repo: str | os.PathLike, stage: str, rev: str | None = None) -> dict[str, Any]:
    """``{path: data}`` of the metrics files of ``stage`` as DVC reads them (``Repo.metrics.show``) in
    the workspace or, with ``rev``, in a commit or experiment: the stage's own ``metrics:``, else the
    top-level ``metrics:`` lying under its outs, else (when ``stage`` is the pipeline's last stage)
    every metrics file. Files that do not exist (yet) are left out."""
    with dvc_repo(repo) as r:
        order, _ = pipeline_stages(r)
        stage_obj = next((s for s in order if stage_address(r, s) == stage), None)
        if stage_obj is None:
            raise DvcPipelineError(f"unknown stage {stage!r}; stages: {', '.join(stage_address(r, s) for s in order)}")
        outs = [Path(os.path.relpath(o.fs_path, r.root_dir)).as_posix() for o in stage_obj.outs]
        shown = r.metrics.show(revs=[rev] if rev else None, hide_workspace=False)
        found = (shown.get(rev) if rev else next(iter(shown.values()), None)) or {}
        files = {Path(p).as_posix(): f.get("data") for p, f in (found.get("data") or {}).items()}
        own = {p: d for p, d in files.items() if any(p == o or p.startswith(o + "/") for o in outs)}
        if not own and order and order[-1] is stage_obj:
            own = files
        return {p: d for p, d in own.items() if d is not None}


class DvcStageError(RuntimeError):
    """`dvc repro` of one stage failed deterministically (e.g. the stage raised)."""

    def __init__(self, stage: str, returncode: int, tail: str):
        super().__init__(f"stage {stage!r}: dvc exited with {returncode}\n{tail}")
        self.stage, self.returncode, self.tail = stage, returncode, tail

    def __reduce__(self):  # picklable despite the custom __init__ (Prefect may serialise it)
        return (type(self), (self.stage, self.returncode, self.tail))


class TransientDvcError(DvcStageError):
    """Failure worth a retry: DVC lock held, remote I/O error, or exit code EX_TEMPFAIL."""


@dataclass
class DvcResult:
    args: list[str]
    returncode: int
    lines: list[str]  # last lines of output
    errors: list[str]  # every "ERROR..." line DVC printed
    skipped: bool  # DVC said the stage didn't change
    restored: bool = False  # DVC restored the stage's outputs from the run-cache instead of running it
    outcomes: dict[str, str] = field(default_factory=dict)  # stage -> ran | restored | unchanged


_GUARD = threading.Lock()
_WORKSPACE_LOCKS: dict[str, threading.Lock] = {}


def run_dvc(args: list[str], cwd: str | os.PathLike, log: Callable[[str], Any] = print,
            tail_lines: int = 200) -> DvcResult:
    """Run ``python -m dvc <args>`` in ``cwd``, streaming merged stdout/stderr line by line to ``log``.
    The single entry point for DVC calls; calls on one workspace are serialised."""
    key = str(Path(cwd).resolve())
    with _GUARD:
        lock = _WORKSPACE_LOCKS.setdefault(key, threading.Lock())
    cmd = [sys.executable, "-m", "dvc", *args]
    # stage commands say `python`: make it this interpreter (the project's venv), in the workspace and
    # in DVC's temporary experiment copies alike
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": path if bindir in path.split(os.pathsep) else os.pathsep.join(filter(None, [bindir, path]))}
    tail: deque[str] = deque(maxlen=tail_lines)
    errors: list[str] = []
    outcomes: dict[str, str] = {}
    with lock:
        log(f"$ dvc {' '.join(args)}  (cwd={key})")
        with subprocess.Popen(cmd, cwd=key, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1, errors="replace") as proc:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                if not line:
                    continue
                log(line)
                tail.append(line)
                if line.lstrip().startswith("ERROR"):
                    errors.append(line)
                for pattern, outcome in _OUTCOMES:
                    if m := pattern.match(line.strip()):
                        outcomes[m.group(1)] = outcome
            returncode = proc.wait()
    values = set(outcomes.values())
    return DvcResult(cmd[3:], returncode, list(tail), errors, "unchanged" in values, "restored" in values,
                     outcomes)


def failed_stage(result: DvcResult) -> str | None:
    """The stage DVC names in ``ERROR: failed to reproduce '<stage>'``, if any."""
    return next((m.group(1) for e in result.errors if (m := _FAILED_STAGE.search(e))), None)


def classify_failure(stage: str, result: DvcResult) -> DvcStageError:
    """Exception for a failed run: TransientDvcError for lock/remote/EX_TEMPFAIL, else DvcStageError."""
    codes = {result.returncode} | {int(c) for e in result.errors for c in _EXITED_WITH.findall(e)}
    transient = bool(codes & TRANSIENT_EXIT_CODES) or any(TRANSIENT_PATTERNS.search(e) for e in result.errors)
    cls = TransientDvcError if transient else DvcStageError
    return cls(stage, result.returncode, "\n".join(result.lines[-40:]))


def is_transient_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only TransientDvcError (the failed state's data)."""
    exc = getattr(state, "data", None)
    if isinstance(exc, BaseException):
        return isinstance(exc, TransientDvcError)
    return "TransientDvcError" in (getattr(state, "message", "") or "")


# -- one pipeline run per workspace ----------------------------------------------------------------

class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds this workspace."""


WORKSPACE_LOCK = ".dvc/tmp/amrg-pipeline.lock"


@contextlib.contextmanager
def workspace_lock(repo: str | os.PathLike, wait: bool = False, owner: str = "",
                   log: Callable[[str], Any] = print) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``<repo>/.dvc/tmp/amrg-pipeline.lock`` for a whole pipeline run.

    DVC's own locks cover one ``dvc`` command; a flow runs one command per stage, so two flows in one
    workspace could otherwise interleave stage by stage.
    ``wait=False``: a second run fails at once with :class:`WorkspaceBusy` naming the holder;
    ``wait=True``: it blocks until the first one ends. The kernel drops the lock when its holder dies
    (``kill -9`` included), so a crashed run never leaves the workspace locked."""
    path = Path(repo) / WORKSPACE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            if not wait:
                raise WorkspaceBusy(
                    f"workspace {Path(repo).resolve()} is in use by another pipeline run ({holder}); "
                    "wait for it to finish (or pass wait_for_workspace=True / --wait), or run parallel "
                    "experiments in isolated workspaces: `dvc exp run --queue ...` + `dvc queue start -j N`"
                ) from None
            log(f"waiting for the workspace lock held by {holder}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        info = json.dumps({"pid": os.getpid(), "owner": owner})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# -- params overlay: validated here, applied by DVC (`dvc exp run --temp -S ...`) ----------------------

def load_overlay(overlay: dict[str, Any] | str | os.PathLike | None, repo: Path) -> dict[str, Any]:
    """An overlay is a mapping (``{"hopfield.beta": 8}`` or nested) or a YAML file (relative to the repo)."""
    if overlay is None:
        return {}
    if isinstance(overlay, dict):
        return overlay
    path = Path(overlay)
    path = path if path.is_absolute() else Path(repo) / path
    if not path.is_file():
        raise FileNotFoundError(f"params overlay {overlay!r} not found (looked at {path})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"params overlay {overlay!r} must be a mapping, got {type(data).__name__}")
    return data


def overlay_leaves(overlay: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested and dotted keys alike -> ``{"a.b": value}`` leaves, the form ``dvc exp run -S`` takes."""
    out: dict[str, Any] = {}
    for key, value in overlay.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.update(overlay_leaves(value, path) if isinstance(value, dict) and value else {path: value})
    return out


def _has_key(params: dict[str, Any], key: str) -> bool:
    parent, _, last = key.rpartition(".")
    from amrg.config import get_dotted

    node = get_dotted(params, parent) if parent else params
    return isinstance(node, dict) and last in node


def validate_overlay(params: dict[str, Any], leaves: dict[str, Any], source: str = "params.yaml") -> dict[str, Any]:
    """Check ``params`` (params.yaml as loaded) with ``leaves`` (``{"a.b": v}``) set, as the stages will
    read it, with :func:`amrg.config.parse_params`; every key must already be in ``params`` (``-S`` only
    overrides). Raises :class:`amrg.config.ParamsError` naming every bad key; returns the leaves that
    change a value (``{}``: the overlay changes nothing)."""
    from amrg.config import ParamsError, get_dotted, merge_overlay, parse_params

    merged = copy.deepcopy(params)
    for key, value in leaves.items():
        merge_overlay(merged, functools.reduce(lambda v, k: {k: v}, reversed(key.split(".")), value))
    parse_params(merged)  # wrong type, range or unknown key: ParamsError naming every bad key
    if missing := [k for k in leaves if not _has_key(params, k)]:
        raise ParamsError(f"params overlay: {', '.join(missing)} not in {source} (an overlay only overrides keys)")
    return {k: v for k, v in leaves.items() if get_dotted(params, k) != v or type(get_dotted(params, k)) is not type(v)}


def params_overlay(repo: str | os.PathLike, overlay: dict[str, Any] | str | os.PathLike | None,
                   params_file: str = "params.yaml") -> dict[str, Any]:
    """The changed ``{"a.b": value}`` leaves of ``overlay`` (a mapping or a YAML file in ``repo``),
    validated against ``<repo>/<params_file>`` (:func:`validate_overlay`). Writes nothing."""
    leaves = overlay_leaves(load_overlay(overlay, Path(repo)))
    if not leaves:
        return {}
    path = Path(repo) / params_file
    params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return validate_overlay(params, leaves, params_file)


def set_args(leaves: dict[str, Any]) -> list[str]:
    """``{"hopfield.beta": 2.0, "hopfield.visual": False}`` -> ``-S hopfield.beta=2.0 -S hopfield.visual=false``."""
    out = []
    for k, v in leaves.items():
        out += ["-S", f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"]
    return out


# -- experiments -------------------------------------------------------------------------------------

def experiment_names(cwd: str | os.PathLike) -> set[str]:
    """Names of the experiments of the current baseline commit (``dvc exp list --names-only``)."""
    result = run_dvc(["exp", "list", "--names-only"], cwd=cwd, log=lambda _: None)
    return set(result.lines) if result.returncode == 0 else set()


def remove_experiments(cwd: str | os.PathLike, names: list[str], log: Callable[[str], Any] = print) -> list[str]:
    """``dvc exp remove`` those of ``names`` that exist, so that a rerun can take the same names without
    ``--force`` (which would also force every stage to rerun instead of coming from the run-cache)."""
    existing = [n for n in names if n in experiment_names(cwd)]
    if existing:
        result = run_dvc(["exp", "remove", *existing], cwd=cwd, log=log)
        if result.returncode != 0:
            raise classify_failure(f"exp remove {' '.join(existing)}", result)
    return existing


# -- remote ----------------------------------------------------------------------------------------

def default_remote(cwd: str | os.PathLike) -> str | None:
    """Name of the DVC default remote of the workspace (``core.remote``), or None when none is set."""
    result = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=cwd,
                            capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    name = result.stdout.strip()
    return name if result.returncode == 0 and name else None
