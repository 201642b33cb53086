"""The data manifest: what preprocess reads, listed cheaply, so DVC reruns preprocess exactly when it changed.

DVC hashes a dependency's content; hashing a 570 GB image tree on every ``dvc status`` is not
acceptable. The ``index`` stage (``always_changed``, DVC's pattern for an external source) writes this
manifest instead: one line per input file, ``path  size  stamp``, where the stamp is the file's SHA-256
for files up to :data:`CONTENT_LIMIT` (annotation files, the release CSVs, a reports zip) and its
modification time (ns) for larger files and for every file of a tree (images, report text files).
preprocess depends on the manifest, so changing ``data.dataset``, the annotation file or anything in
the image tree reruns it, and touching nothing reruns nothing (the manifest comes out byte-identical).
Listing 377k images is one ``os.scandir`` walk (seconds on a local disk), not a read of their bytes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..io import atomic_path

if TYPE_CHECKING:
    from ..config import Data

CONTENT_LIMIT = 64 * 2**20  # files up to this size are stamped by content, larger ones by mtime
TREE_SUFFIXES = (".jpg", ".jpeg", ".png", ".dcm", ".txt")  # the files of image / report trees that are read


def stamp(path: Path, by_content: bool) -> str:
    st = path.stat()
    if not by_content or st.st_size > CONTENT_LIMIT:
        return f"{st.st_size}\tmtime:{st.st_mtime_ns}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return f"{st.st_size}\tsha256:{h.hexdigest()}"


def walk(root: Path) -> Iterator[Path]:
    """Every file below ``root`` whose suffix is one of :data:`TREE_SUFFIXES`, in sorted order."""
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in reversed(entries):
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
        yield from (Path(e.path) for e in entries
                    if e.is_file() and os.path.splitext(e.name)[1].lower() in TREE_SUFFIXES)


def inputs(data: "Data") -> tuple[list[Path], list[Path]]:
    """(single files, trees) that ``data``'s builder and preprocess read."""
    files = [Path(p) for p in (data.annotation, data.table) if p]
    trees: list[Path] = []
    if data.dataset in ("mimic_cxr", "chexpert_plus") and data.root:  # the release's top-level tables
        files += sorted(p for p in Path(data.root).iterdir() if p.is_file())
    if data.dataset == "mimic_cxr" and data.reports:
        (trees if Path(data.reports).is_dir() else files).append(Path(data.reports))
    if data.image_root:
        trees.append(Path(data.image_root))
    return files, trees


def manifest_lines(data: "Data") -> Iterator[str]:
    files, trees = inputs(data)
    yield f"# dataset={data.dataset} images={data.images}\n"
    for f in files:
        yield f"{f.as_posix()}\t{stamp(f, True) if f.exists() else 'missing'}\n"
    for t in trees:
        yield f"# tree {t.as_posix()}\n"
        if not t.is_dir():
            yield f"{t.as_posix()}\tmissing\n"
            continue
        for f in walk(t):
            yield f"{f.relative_to(t).as_posix()}\t{stamp(f, False)}\n"


def write_manifest(data: "Data", path: Path) -> int:
    """Write the manifest of ``data``'s inputs to ``path`` (atomically); return the number of files listed."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for line in manifest_lines(data):
            out.write(line)
            n += not line.startswith("#")
    return n
