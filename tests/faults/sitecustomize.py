"""Fault-injection shim for the kill -9 tests: put this directory on PYTHONPATH and set AMRG_FAULT.

    AMRG_FAULT="<stage>|write|<n>"         pause before the n-th atomic rename into artifacts/
                                           (the temp file is complete, the output path not yet written)
    AMRG_FAULT="<stage>|checkpoint|<n>"    pause after the n-th checkpoint written under checkpoints/
    AMRG_FAULT="<stage>|call|<mod>:<qualname>|<n>"  pause before the n-th call of that function

Only the process whose ``__main__`` is ``stages.<stage>`` is affected (DVC itself imports this file
too). On reaching the point, the process writes ``$AMRG_FAULT_MARKER`` (what it paused at) and sleeps
until the test kills it (``kill -9``) or until ``$AMRG_FAULT_RELEASE`` exists (then it carries on).
Nothing here changes what the stage computes.
"""

import functools
import importlib.abc
import importlib.util
import os
import sys
import time

_SPEC = os.environ.get("AMRG_FAULT", "")


def _in_stage(stage):
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == f"stages.{stage}"


def _pause(what):
    marker = os.environ.get("AMRG_FAULT_MARKER")
    release = os.environ.get("AMRG_FAULT_RELEASE")
    if marker:
        with open(marker + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {what}\n")
        os.replace(marker + ".tmp", marker)
    deadline = time.time() + 600
    while time.time() < deadline:
        if release and os.path.exists(release):
            return
        time.sleep(0.02)


def _install(spec):
    parts = spec.split("|")
    stage, kind, n = parts[0], parts[1], int(parts[-1])
    count = [0]

    if kind in ("write", "checkpoint"):
        real_replace = os.replace
        folder = os.sep + ("artifacts" if kind == "write" else "checkpoints") + os.sep

        def replace(src, dst, *args, **kwargs):
            hit = _in_stage(stage) and folder in os.path.abspath(os.fspath(dst))
            if hit:
                count[0] += 1
            if hit and kind == "write" and count[0] == n:
                _pause(f"before rename -> {os.fspath(dst)}")
            out = real_replace(src, dst, *args, **kwargs)
            if hit and kind == "checkpoint" and count[0] == n:
                _pause(f"after checkpoint -> {os.fspath(dst)}")
            return out

        os.replace = replace
        return

    if kind == "call":
        module_name, qualname = parts[2].split(":")

        def wrap(fn):
            @functools.wraps(fn)
            def inner(*args, **kwargs):
                if _in_stage(stage):
                    count[0] += 1
                    if count[0] == n:
                        _pause(f"before call {count[0]} of {module_name}:{qualname}")
                return fn(*args, **kwargs)
            return inner

        def patch(module):
            owner, attr = module, qualname.split(".")
            for a in attr[:-1]:
                owner = getattr(owner, a)
            setattr(owner, attr[-1], wrap(getattr(owner, attr[-1])))

        class Finder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != module_name:
                    return None
                sys.meta_path.remove(self)
                try:
                    found = importlib.util.find_spec(name)
                finally:
                    sys.meta_path.insert(0, self)
                if found is None or found.loader is None:
                    return found
                exec_module = found.loader.exec_module

                def exec_and_patch(module):
                    exec_module(module)
                    patch(module)

                found.loader.exec_module = exec_and_patch
                return found

        sys.meta_path.insert(0, Finder())
        return

    raise ValueError(f"AMRG_FAULT: unknown kind {kind!r} in {spec!r}")


if _SPEC:
    _install(_SPEC)
