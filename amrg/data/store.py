"""The preprocess tables, the pixel store, and the readers for them.

``studies.parquet``: id, split, patient_id, report, findings, impression, n_images, one float column per
CheXpert observation as the labeler reads the report (``lbl_*``: 1, 0, -1, NaN; what CE compares) and
the classifier's targets (``tgt_*``: the same labels, or the dataset's own with ``labels.source:
dataset``). ``images.parquet``: study_id, view, view_position, split, one row per image, in the row
order of ``pixels.npy``: uint8 ``(N, size, size)``, decoded once.

Pixels (and the generator's stage-1 features) are read through :class:`RowFile`: rows of an ``.npy``
file fetched by index through a memory map that lives for one read, so a process holds the batch it
asked for, never the file (the mapped pages of a long-lived map would count in its resident set and
grow with the dataset). :class:`RowWriter` writes such a file row batch by row batch, atomically.

CAM keep masks (``regions.parquet``) are written by :func:`with_patch_mask` and read by
:func:`read_patch_mask` only: column ``patch_mask``, fixed-size binary, one row-major ``np.packbits`` of
the ``side x side`` bool mask per row; the schema metadata keys ``patch_mask.patch`` (pixels per patch
side) and ``patch_mask.side`` (patches per image side) travel with the table through the parquet file.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from ..io import atomic_path, read_parquet
from ..labels.schema import LABEL_COLUMNS, TARGET_COLUMNS, binarize

PATCH_MASK = "patch_mask"
_PATCH_KEY, _SIDE_KEY = b"patch_mask.patch", b"patch_mask.side"


def images_table(study_ids: list[str], views: list[int], splits: list[str], pixels: np.ndarray) -> pa.Table:
    n, h, w = pixels.shape
    flat = pa.py_buffer(np.ascontiguousarray(pixels).tobytes())
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(h * w), n, [None, flat])
    return pa.table({"study_id": study_ids, "view": pa.array(views, pa.int8()), "split": splits, "pixels": col})


def _fixed_size_bytes(table: pa.Table, column: str) -> np.ndarray:
    """Fixed-size binary column -> uint8 ``(N, byte_width)`` view."""
    arr = table.column(column).combine_chunks()
    width = arr.type.byte_width
    if len(arr) == 0:
        return np.zeros((0, width), dtype=np.uint8)
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * width, offset=arr.offset * width)
    return data.reshape(len(arr), width)


def _fixed_size_column(rows: np.ndarray) -> pa.FixedSizeBinaryArray:
    """uint8 ``(N, W)`` -> fixed-size binary array of N values of W bytes."""
    n, width = rows.shape
    flat = pa.py_buffer(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, flat])


def pixels_of(table: pa.Table, column: str = "pixels") -> np.ndarray:
    """Fixed-size binary column -> uint8 ``(N, S, S)`` view."""
    data = _fixed_size_bytes(table, column)
    size = int(round(data.shape[1] ** 0.5))
    return data.reshape(len(data), size, size)


# ----------------------------------------------------------------------------- row files (.npy)
class RowFile:
    """The rows of an ``.npy`` array ``(N, *row_shape)``: ``rf[rows]`` reads only those rows (a NumPy array
    you own) through a memory map opened for that read. Pickles as its path (DataLoader workers)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        m = np.load(self.path, mmap_mode="r")
        if not isinstance(m, np.memmap) or m.ndim < 1:
            raise ValueError(f"{self.path} is not an .npy array of rows")
        self.shape, self.dtype, self.offset = tuple(m.shape), m.dtype, m.offset
        del m

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows) -> np.ndarray:
        if isinstance(rows, torch.Tensor):
            rows = rows.numpy()
        if len(self) == 0:
            return np.zeros(self.shape, self.dtype)[rows]
        m = np.memmap(self.path, self.dtype, "r", self.offset, self.shape)
        try:
            return np.array(m[rows])
        finally:
            del m

    def __getitem__(self, rows) -> np.ndarray:
        return self.read(rows)


class TensorRows(RowFile):
    """A :class:`RowFile` whose reads are torch tensors (``pixels[rows]``, ``features[b]`` in the tasks)."""

    def __getitem__(self, rows) -> torch.Tensor:
        return torch.from_numpy(self.read(rows))


class RowWriter:
    """Write an ``.npy`` file of ``n_rows`` rows of ``row_shape`` batch by batch: the header first, then each
    :meth:`write` appended; the file appears at ``path`` only when all ``n_rows`` were written."""

    def __init__(self, path: str | Path, n_rows: int, row_shape: tuple[int, ...], dtype):
        self.path, self.n, self.shape, self.dtype = Path(path), int(n_rows), tuple(row_shape), np.dtype(dtype)
        self.written = 0

    def __enter__(self) -> "RowWriter":
        self._ctx = atomic_path(self.path)
        self._f = open(self._ctx.__enter__(), "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.n, *self.shape)}
        np.lib.format.write_array_header_1_0(self._f, header)
        return self

    def write(self, rows) -> None:
        rows = np.ascontiguousarray(rows.numpy() if isinstance(rows, torch.Tensor) else rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape:
            raise ValueError(f"{self.path}: rows of shape {rows.shape[1:]}, expected {self.shape}")
        if self.written + len(rows) > self.n:
            raise ValueError(f"{self.path}: more than the {self.n} rows announced")
        self._f.write(rows.tobytes())
        self.written += len(rows)

    def copy_rows(self, other: Path) -> None:
        """Append every row of the ``.npy`` file ``other`` (same row shape and dtype) without decoding it."""
        src = RowFile(other)
        if src.shape[1:] != self.shape or src.dtype != self.dtype:
            raise ValueError(f"{other}: rows {src.shape[1:]} {src.dtype}, expected {self.shape} {self.dtype}")
        with open(other, "rb") as f:
            f.seek(src.offset)
            shutil.copyfileobj(f, self._f, 1 << 24)
        self.written += len(src)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._f.close()
        if exc_type is None and self.written != self.n:
            err = ValueError(f"{self.path}: {self.written} rows written, {self.n} announced")
            self._ctx.__exit__(ValueError, err, None)  # the temporary file is removed, nothing appears
            raise err
        return bool(self._ctx.__exit__(exc_type, exc, tb))


def write_rows(paths: Sequence[Path], n_rows: int, batches) -> list[TensorRows]:
    """Stream ``batches`` (each a tuple of arrays/tensors, one per path, of equal length) into one ``.npy``
    row file per path; each file's row shape and dtype are those of its first batch. Memory: one batch."""
    writers = None
    with contextlib.ExitStack() as stack:
        for batch in batches:
            arrays = [b.numpy() if isinstance(b, torch.Tensor) else np.asarray(b) for b in batch]
            if writers is None:
                writers = [stack.enter_context(RowWriter(p, n_rows, a.shape[1:], a.dtype)) for p, a in zip(paths, arrays)]
            for w, a in zip(writers, arrays):
                w.write(a)
    if writers is None:
        raise ValueError(f"no rows to write to {', '.join(str(p) for p in paths)}")
    return [TensorRows(p) for p in paths]


# ----------------------------------------------------------------------------- CAM keep masks
def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool ``(N, side, side)`` -> uint8 ``(N, ceil(side^2 / 8))``: each mask row-major, ``np.packbits``."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or masks.shape[1] < 1:
        raise ValueError(f"masks must be (N, side, side) with side >= 1; got shape {masks.shape}")
    return np.packbits(masks.astype(bool).reshape(len(masks), masks.shape[1] * masks.shape[2]), axis=1)


def unpack_masks(packed: np.ndarray, side: int) -> np.ndarray:
    """Inverse of :func:`pack_masks`: uint8 ``(N, ceil(side^2 / 8))`` -> bool ``(N, side, side)``."""
    packed = np.asarray(packed, dtype=np.uint8)
    width = -(-side * side // 8)
    if packed.ndim != 2 or packed.shape[1] != width:
        raise ValueError(f"packed masks of side {side} must be (N, {width}) bytes; got shape {packed.shape}")
    return np.unpackbits(packed, axis=1, count=side * side).reshape(len(packed), side, side).astype(bool)


def with_patch_mask(table: pa.Table, masks: np.ndarray, patch: int) -> pa.Table:
    """``table`` with the CAM keep masks appended as column ``patch_mask`` (one packed mask per row) and
    ``patch`` (pixels per patch side) and ``side`` (patches per image side) in its schema metadata.

    ``masks``: bool ``(table.num_rows, side, side)``, the eq. 1 selection of :func:`amrg.cam.patch_mask`.
    """
    if table.num_rows != len(masks):
        raise ValueError(f"{len(masks)} masks for a table of {table.num_rows} rows")
    if PATCH_MASK in table.column_names:
        raise ValueError(f"table already has a {PATCH_MASK!r} column")
    if int(patch) != patch or patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch!r}")
    packed = pack_masks(masks)
    side = np.asarray(masks).shape[1]
    out = table.append_column(PATCH_MASK, _fixed_size_column(packed))
    meta = dict(out.schema.metadata or {})
    meta.update({_PATCH_KEY: str(int(patch)).encode(), _SIDE_KEY: str(side).encode()})
    return out.replace_schema_metadata(meta)


def read_patch_mask(table: pa.Table) -> tuple[np.ndarray, int]:
    """The masks written by :func:`with_patch_mask`: bool ``(N, side, side)`` and the patch size in pixels."""
    meta = table.schema.metadata or {}
    if PATCH_MASK not in table.column_names or _PATCH_KEY not in meta or _SIDE_KEY not in meta:
        raise ValueError(f"table has no {PATCH_MASK!r} column with its patch size in the metadata (not written "
                         "by amrg.data.store.with_patch_mask, or by an older amrg): rerun `dvc repro mine_cam`")
    patch, side = int(meta[_PATCH_KEY]), int(meta[_SIDE_KEY])
    return unpack_masks(_fixed_size_bytes(table, PATCH_MASK), side), patch


@dataclass
class Studies:
    ids: list[str]
    split: np.ndarray  # str
    reports: list[str]
    labels: np.ndarray  # (N, 14) float32 with NaN: the labeler's reading of each report (CE's reference)
    targets: np.ndarray  # (N, 14) float32 with NaN: what the classifier learns (labels.source)

    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.ids)}

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def load_studies(path) -> Studies:
    t = read_parquet(path, columns=["id", "split", "report", *LABEL_COLUMNS, *TARGET_COLUMNS])  # not the raw texts

    def block(columns: list[str]) -> np.ndarray:
        return np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in columns], 1).astype(np.float32)

    return Studies(t.column("id").to_pylist(), np.asarray(t.column("split").to_pylist()),
                   t.column("report").to_pylist(), block(LABEL_COLUMNS), block(TARGET_COLUMNS))


@dataclass
class Images:
    study_ids: list[str]
    views: np.ndarray
    split: np.ndarray
    pixels: TensorRows  # (N, S, S) uint8, read by rows

    def study_views(self, ids: list[str], n_views: int = 2) -> np.ndarray:
        """Row indices ``(len(ids), n_views)``: the first ``n_views`` images of each study; a study with
        fewer images repeats its last one (IU X-ray studies have two views). A study without any image
        is a ``KeyError`` that names it."""
        by_study: dict[str, list[int]] = {}
        for i, s in enumerate(self.study_ids):
            by_study.setdefault(s, []).append(i)
        missing = [s for s in ids if s not in by_study]
        if missing:
            shown = ", ".join(repr(s) for s in missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
            raise KeyError(f"no image of study {shown} in images.parquet ({len(self.study_ids)} images of "
                           f"{len(by_study)} studies): were the images skipped in preprocess (stats.json 'skips')?")
        out = np.zeros((len(ids), n_views), dtype=np.int64)
        for j, s in enumerate(ids):
            rows = by_study[s][:n_views]
            out[j] = rows + [rows[-1]] * (n_views - len(rows))
        return out


def load_images(index: str | Path, pixels: str | Path) -> Images:
    """``images.parquet`` and its pixel rows (:attr:`amrg.layout.Layout.images` / ``.pixels``)."""
    t = read_parquet(index, columns=["study_id", "view", "split"])
    rows = TensorRows(pixels)
    if len(rows) != t.num_rows:
        raise ValueError(f"{index} lists {t.num_rows} images but {rows.path} holds {len(rows)}: rerun preprocess")
    return Images(t.column("study_id").to_pylist(), t.column("view").to_numpy(),
                  np.asarray(t.column("split").to_pylist()), rows)


def image_targets(studies: Studies, images: Images, rows: Sequence[int] | np.ndarray | None,
                  uncertain_as: str) -> np.ndarray:
    """float32 ``(len(rows), 14)`` 0/1 classifier targets of the image rows ``rows`` (``None``: every image):
    the targets of each image's study, binarised by :func:`amrg.labels.schema.binarize` (NaN -> 0,
    -1 -> ``uncertain_as``)."""
    idx = studies.index()
    rows = range(len(images.study_ids)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    missing = sorted({images.study_ids[r] for r in rows} - idx.keys())
    if missing:
        raise KeyError(f"images of study {', '.join(repr(s) for s in missing[:5])} have no row in studies.parquet")
    labels = studies.targets[np.asarray([idx[images.study_ids[r]] for r in rows], dtype=np.int64)]
    return binarize(labels, uncertain_as).astype(np.float32).reshape(-1, labels.shape[1])
