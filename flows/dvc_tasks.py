"""DVC side of the Prefect flow, kept free of Prefect imports so it can be tested on its own.

* ``stage_graph`` / ``stage_order`` read ``dvc.yaml`` (the only DAG) and order its stages.
* ``run_dvc`` is the one helper through which every DVC CLI call goes (one writer per workspace).
* ``classify_failure`` / ``is_transient_failure`` decide which failures are worth a retry.
* ``workspace_lock`` lets one pipeline run at a time own a workspace (a second one waits or fails).
* ``apply_params_overlay`` merges a params overlay into params.yaml (validated before any compute).
* ``default_remote`` tells whether ``dvc pull``/``dvc push`` have somewhere to go.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import json
import os
import posixpath
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class StageSpec:
    name: str
    deps: tuple[str, ...]  # paths normalised relative to dvc.yaml's directory
    outs: tuple[str, ...]  # outs + stage-level metrics + plots
    metrics: tuple[str, ...]


def _entry_paths(entries: Any, stage: str, field: str) -> list[str]:
    """`deps:`/`outs:` entries are strings or one-key dicts ``{path: {cache: false, ...}}``."""
    paths = [str(k) for e in entries or [] for k in (e if isinstance(e, dict) else [e])]
    if templated := [p for p in paths if "${" in p]:
        raise NotImplementedError(f"stage {stage!r}: templated {field} paths {templated} are not supported")
    return paths


def _norm(wdir: str, path: str) -> str:
    return posixpath.normpath(posixpath.join(wdir, path.replace(os.sep, "/")))


def load_dvc_yaml(dvc_yaml_path: str | os.PathLike) -> dict[str, Any]:
    return yaml.safe_load(Path(dvc_yaml_path).read_text(encoding="utf-8")) or {}


def load_stages(dvc_yaml_path: str | os.PathLike) -> dict[str, StageSpec]:
    """Stages of a dvc.yaml in file order. foreach/matrix stages raise NotImplementedError."""
    stages: dict[str, StageSpec] = {}
    for name, body in (load_dvc_yaml(dvc_yaml_path).get("stages") or {}).items():
        body = body or {}
        if "foreach" in body or "matrix" in body:
            raise NotImplementedError(
                f"stage {name!r} uses foreach/matrix; the Prefect flow only handles plain stages"
            )
        wdir = str(body.get("wdir", "."))
        field = {f: [_norm(wdir, p) for p in _entry_paths(body.get(f), name, f)]
                 for f in ("deps", "outs", "metrics", "plots")}
        stages[name] = StageSpec(name, tuple(field["deps"]),
                                 tuple(field["outs"] + field["metrics"] + field["plots"]),
                                 tuple(field["metrics"]))
    return stages


def _overlaps(a: str, b: str) -> bool:
    """True when paths a and b are equal or one lies under the other (DVC's out/dep overlap rule)."""
    return a == b or a == "." or b == "." or a.startswith(b + "/") or b.startswith(a + "/")


def stage_graph(dvc_yaml_path: str | os.PathLike) -> dict[str, list[str]]:
    """stage -> upstream stages (dvc.yaml order): B needs A when a dep of B is, lies under,
    or contains an out of A. A stage whose deps overlap its own outs is a cycle (ValueError)."""
    stages = load_stages(dvc_yaml_path)
    graph: dict[str, list[str]] = {}
    for b in stages.values():
        ups = [a.name for a in stages.values()
               if any(_overlaps(d, o) for d in b.deps for o in a.outs)]
        if b.name in ups:
            raise ValueError(f"dependency cycle in dvc.yaml: {b.name} -> {b.name}")
        graph[b.name] = ups
    return graph


def stage_order(dvc_yaml_path: str | os.PathLike) -> list[str]:
    """Topological order of dvc.yaml's stages; ties keep dvc.yaml order. Cycles raise ValueError."""
    graph = stage_graph(dvc_yaml_path)
    index = {name: i for i, name in enumerate(graph)}
    downstream: dict[str, list[str]] = {name: [] for name in graph}
    indegree = {name: len(ups) for name, ups in graph.items()}
    for name, ups in graph.items():
        for up in ups:
            downstream[up].append(name)
    ready = [index[n] for n, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    order: list[str] = []
    names = list(graph)
    while ready:
        name = names[heapq.heappop(ready)]
        order.append(name)
        for down in downstream[name]:
            indegree[down] -= 1
            if indegree[down] == 0:
                heapq.heappush(ready, index[down])
    if len(order) < len(graph):
        stuck = [n for n in graph if n not in order]
        raise ValueError(f"dependency cycle in dvc.yaml among stages: {', '.join(stuck)}"
                         f" ({_find_cycle(graph, stuck)})")
    return order


def _find_cycle(graph: dict[str, list[str]], stuck: list[str]) -> str:
    """Walk upstream edges inside the stuck set until a stage repeats: 'a -> b -> a'."""
    path, node = [], stuck[0]
    while node not in path:
        path.append(node)
        node = next(u for u in graph[node] if u in stuck)
    cycle = path[path.index(node):][::-1]  # reverse: print in data-flow direction
    return " -> ".join(cycle + [cycle[0]])


class DvcStageError(RuntimeError):
    """`dvc repro` of one stage failed deterministically (e.g. the stage raised)."""

    def __init__(self, stage: str, returncode: int, tail: str):
        super().__init__(f"stage {stage!r}: dvc repro exited with {returncode}\n{tail}")
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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=tail_lines)
    errors: list[str] = []
    skipped = restored = False
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
                skipped = skipped or "didn't change, skipping" in line
                restored = restored or "is cached - skipping run" in line
            returncode = proc.wait()
    return DvcResult(cmd[3:], returncode, list(tail), errors, skipped, restored)


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

    DVC's own locks cover one ``dvc`` command; a flow runs one command per stage (and may rewrite
    params.yaml first), so two flows in one workspace could otherwise interleave stage by stage.
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


# -- params overlay --------------------------------------------------------------------------------

def _overlay_items(overlay: dict[str, Any], prefix: str = "") -> Iterator[tuple[list[str], Any]]:
    """Nested and dotted keys alike -> (path, value) leaves; dict values under dotted keys recurse."""
    for key, value in overlay.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            yield from _overlay_items(value, path)
        else:
            yield path.split("."), value


def load_overlay(overlay: dict[str, Any] | str | os.PathLike | None, repo: Path) -> dict[str, Any]:
    """An overlay is a mapping (``{"hopfield.beta": 8}`` or nested) or a YAML file (relative to the repo)."""
    if overlay is None:
        return {}
    if isinstance(overlay, dict):
        return overlay
    path = Path(overlay)
    path = path if path.is_absolute() else repo / path
    if not path.is_file():
        raise FileNotFoundError(f"params overlay {overlay!r} not found (looked at {path})")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"params overlay {overlay!r} must be a mapping, got {type(data).__name__}")
    return data


def apply_params_overlay(repo: str | os.PathLike, overlay: dict[str, Any] | str | os.PathLike | None,
                         params_file: str = "params.yaml") -> dict[str, Any]:
    """Merge ``overlay`` into ``<repo>/<params_file>`` like ``dvc exp run -S key=value`` would.

    The merged file is validated with :func:`amrg.config.parse_params` *before* it is written, so a
    wrong key, type or range fails here, naming every bad key, and leaves params.yaml untouched.
    Comments and key order survive (ruamel round trip); the write is atomic. Returns the changed
    leaves ``{"a.b": new}`` (empty when nothing changed: the file is then not rewritten)."""
    from ruamel.yaml import YAML

    from amrg.config import ParamsError, parse_params
    from amrg.io import write_text

    repo = Path(repo)
    items = list(_overlay_items(load_overlay(overlay, repo)))
    if not items:
        return {}
    path = repo / params_file
    rt = YAML()  # round trip: keeps comments, key order and quoting
    rt.default_flow_style, rt.preserve_quotes, rt.width = None, True, 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text(encoding="utf-8")) or {}
    changed: dict[str, Any] = {}
    for keys, value in items:
        node = doc
        for i, k in enumerate(keys[:-1]):
            if k not in node or node[k] is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ParamsError(f"params overlay: {'.'.join(keys[:i + 1])} is not a section (cannot set "
                                  f"{'.'.join(keys)})")
        if node.get(keys[-1], object()) != value:
            node[keys[-1]] = value
            changed[".".join(keys)] = value
    import io

    buf = io.StringIO()
    rt.dump(doc, buf)
    text = buf.getvalue()
    # validate the merged text as the stages will read it (PyYAML) through the checks every stage runs
    parse_params(yaml.safe_load(text) or {})
    if changed:
        write_text(path, text)  # atomic: temp file, fsync, rename
    return changed


# -- remote ----------------------------------------------------------------------------------------

def default_remote(cwd: str | os.PathLike) -> str | None:
    """Name of the DVC default remote of the workspace (``core.remote``), or None when none is set."""
    result = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=cwd,
                            capture_output=True, text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    name = result.stdout.strip()
    return name if result.returncode == 0 and name else None
