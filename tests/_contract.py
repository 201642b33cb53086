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


def compact(files: set[str]) -> list[str]:
    """Closure files as dvc.yaml lists them: the stage script first, then files, then whole directories
    where every .py file of the directory is in the closure."""
    dirs = sorted({Path(f).parent.as_posix() for f in files} - {"amrg", "stages", "."}, key=len)
    covered: list[str] = []
    for d in dirs:
        if not any(d.startswith(c + "/") for c in covered) and \
                {p.relative_to(ROOT).as_posix() for p in (ROOT / d).rglob("*.py")} <= files:
            covered.append(d)
    rest = [f for f in sorted(files) if not any(f.startswith(c + "/") for c in covered)]
    stages = sorted((f for f in rest if f.startswith("stages/")),
                    key=lambda f: (f.endswith("__init__.py"), f.endswith("common.py")))
    return stages + [f for f in rest if not f.startswith("stages/")] + sorted(covered)


def write_code_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each stage's code deps in dvc.yaml to its import closure, keeping its data deps:
    ``python -m tests._contract`` after changing imports (tests/test_dvc_contract.py checks it)."""
    import re

    import yaml

    text = dvc_yaml.read_text()
    for stage, body in yaml.safe_load(text)["stages"].items():
        data = [d for d in body["deps"] if d.split("/")[0] not in PACKAGES]
        deps = compact(import_closure(f"stages.{stage}")) + data
        block = "    deps:\n" + "".join(f"      - {d}\n" for d in deps)
        pattern = re.compile(rf"(\n  {stage}:.*?\n)    deps:\n(?:      - [^\n]*\n)+", re.S)
        text, n = pattern.subn(lambda m: m.group(1) + block, text, count=1)
        assert n == 1, stage
    dvc_yaml.write_text(text)


if __name__ == "__main__":
    write_code_deps()
