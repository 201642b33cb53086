"""Provenance of model-based metrics: which package and version computed a score, from which weights.

Every model-based score (RadGraph F1, BERTScore, ...) is written next to a small JSON-able dict saying
what produced it, so that two numbers are only compared when they come from the same package, model
and weights. The helpers here are shared by :mod:`amrg.metrics.radgraph` and
:mod:`amrg.metrics.bertscore`.

Checksums are SHA-256 over the raw bytes of each weight file. They are cached per process by
``(path, size, mtime)``, so scoring several systems with one model hashes its weights once.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path
from typing import Any

# the files of a model directory that hold weights (a checkpoint's config and tokenizer are not hashed)
WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "*.bin", "*.th", "*.pt", "*.pth", "*.ckpt")
_CHUNK = 1 << 20
_cache: dict[tuple[str, int, int], str] = {}


def package_version(dist: str) -> str | None:
    """Installed version of the distribution ``dist`` (e.g. ``"bert-score"``), or None when absent.

    Read from the installed metadata, not from the module's ``__version__`` (bert-score 0.3.13 still
    says ``__version__ = "0.3.12"``)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of one file's bytes."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK), b""):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


def weights_sha256(model_dir: str | Path, patterns: tuple[str, ...] = WEIGHT_PATTERNS) -> dict[str, str]:
    """``{relative file name: sha256}`` of the weight files directly inside ``model_dir`` (sorted names).

    Only the top level is scanned (a model directory keeps its weights there; sub-folders such as a
    sentence-transformers ``1_Pooling/`` hold no encoder weights). An empty dict means no weight file
    was found."""
    root = Path(model_dir)
    files = sorted({f for pat in patterns for f in root.glob(pat) if f.is_file()})
    return {f.name: file_sha256(f) for f in files}


def model_ref_fields(ref: str) -> dict[str, Any]:
    """How a model reference is recorded: as given (never the resolved absolute path, which differs per
    machine), plus the version of the package that ships it for a ``pkg:<module>/<subdir>`` reference."""
    out: dict[str, Any] = {"model_path": ref}
    if ref.startswith("pkg:"):
        module = ref[4:].partition("/")[0]
        out["model_package"] = {"name": module, "version": package_version(module)}
    return out


def describe(metric: str, paper_name: str, package: str, **fields: Any) -> dict[str, Any]:
    """The common head of every provenance dict: metric key, paper name, package and version, direction."""
    return {"metric": metric, "paper_name": paper_name, "package": package,
            "package_version": package_version(package), "direction": "higher is better", **fields}
