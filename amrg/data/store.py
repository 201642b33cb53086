"""The preprocess tables and fast readers for them.

``studies.parquet``: id, split, report, findings, impression, n_images, one float column per CheXpert
observation (``lbl_*``: 1, 0, -1, NaN). ``images.parquet``: study_id, view, split, pixels (uint8
``size x size`` as fixed-size binary, decoded once). Readers return zero-copy NumPy views.

CAM keep masks (``regions.parquet``) are written by :func:`with_patch_mask` and read by
:func:`read_patch_mask` only: column ``patch_mask``, fixed-size binary, one row-major ``np.packbits`` of
the ``side x side`` bool mask per row; the schema metadata keys ``patch_mask.patch`` (pixels per patch
side) and ``patch_mask.side`` (patches per image side) travel with the table through the parquet file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from ..io import read_parquet
from ..labels.schema import LABEL_COLUMNS, binarize

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
    labels: np.ndarray  # (N, 14) float32 with NaN

    def index(self) -> dict[str, int]:
        return {s: i for i, s in enumerate(self.ids)}

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)


def load_studies(path) -> Studies:
    t = read_parquet(path)
    labels = np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in LABEL_COLUMNS], 1).astype(np.float32)
    return Studies(t.column("id").to_pylist(), np.asarray(t.column("split").to_pylist()),
                   t.column("report").to_pylist(), labels)


@dataclass
class Images:
    study_ids: list[str]
    views: np.ndarray
    split: np.ndarray
    pixels: np.ndarray  # (N, S, S) uint8

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


def load_images(path) -> Images:
    t = read_parquet(path)
    return Images(t.column("study_id").to_pylist(), t.column("view").to_numpy(),
                  np.asarray(t.column("split").to_pylist()), pixels_of(t))


def image_targets(studies: Studies, images: Images, rows: Sequence[int] | np.ndarray | None,
                  uncertain_as: str) -> np.ndarray:
    """float32 ``(len(rows), 14)`` 0/1 classifier targets of the image rows ``rows`` (``None``: every image):
    the labels of each image's study, binarised by :func:`amrg.labels.schema.binarize` (NaN -> 0,
    -1 -> ``uncertain_as``)."""
    idx = studies.index()
    rows = range(len(images.study_ids)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    missing = sorted({images.study_ids[r] for r in rows} - idx.keys())
    if missing:
        raise KeyError(f"images of study {', '.join(repr(s) for s in missing[:5])} have no row in studies.parquet")
    labels = studies.labels[np.asarray([idx[images.study_ids[r]] for r in rows], dtype=np.int64)]
    return binarize(labels, uncertain_as).astype(np.float32).reshape(-1, labels.shape[1])
