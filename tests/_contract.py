"""What each stage really reads, computed from the source: its import closure inside the repository."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("amrg", "stages")


def _module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs every parent package's __init__."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imports(path: Path, module: str) -> set[str]:
    """Repository modules ``path`` (module ``module``) imports anywhere, lazy imports included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]  # `from pkg import submodule`
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.update(m for m in _with_parents(name) if _module_file(m))
    return found


def import_closure(module: str) -> set[str]:
    """Files (repository-relative, posix) that ``python -m <module>`` can import from the repository."""
    todo, seen = set(_with_parents(module)), set()
    while todo:
        m = todo.pop()
        if m in seen or (f := _module_file(m)) is None:
            continue
        seen.add(m)
        todo |= _imports(f, m) - seen
    return {_module_file(m).relative_to(ROOT).as_posix() for m in seen}


def code_deps(deps: list[str]) -> set[str]:
    """dvc.yaml deps that are code, directories expanded to their .py files."""
    out: set[str] = set()
    for d in deps:
        p = ROOT / d
        if d.endswith(".py"):
            out.add(d)
        elif p.is_dir() and d.split("/")[0] in PACKAGES:
            out |= {f.relative_to(ROOT).as_posix() for f in p.rglob("*.py")}
    return out
