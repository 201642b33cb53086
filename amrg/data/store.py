"""The preprocess tables and fast readers for them.

``studies.parquet``: id, split, report, findings, impression, n_images, one float column per CheXpert
observation (``lbl_*``: 1, 0, -1, NaN). ``images.parquet``: study_id, view, split, pixels (uint8
``size x size`` as fixed-size binary, decoded once). Readers return zero-copy NumPy views.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..io import read_parquet
from ..labels.schema import LABEL_COLUMNS


def images_table(study_ids: list[str], views: list[int], splits: list[str], pixels: np.ndarray) -> pa.Table:
    n, h, w = pixels.shape
    flat = pa.py_buffer(np.ascontiguousarray(pixels).tobytes())
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(h * w), n, [None, flat])
    return pa.table({"study_id": study_ids, "view": pa.array(views, pa.int8()), "split": splits, "pixels": col})


def pixels_of(table: pa.Table, column: str = "pixels") -> np.ndarray:
    """Fixed-size binary column -> uint8 ``(N, S, S)`` view."""
    arr = table.column(column).combine_chunks()
    size = int(round(arr.type.byte_width ** 0.5))
    data = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * arr.type.byte_width,
                         offset=arr.offset * arr.type.byte_width)
    return data.reshape(len(arr), size, size)


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
        fewer images repeats its last one (IU X-ray studies have two views)."""
        by_study: dict[str, list[int]] = {}
        for i, s in enumerate(self.study_ids):
            by_study.setdefault(s, []).append(i)
        out = np.zeros((len(ids), n_views), dtype=np.int64)
        for j, s in enumerate(ids):
            rows = by_study[s][:n_views]
            out[j] = rows + [rows[-1]] * (n_views - len(rows))
        return out


def load_images(path) -> Images:
    t = read_parquet(path)
    return Images(t.column("study_id").to_pylist(), t.column("view").to_numpy(),
                  np.asarray(t.column("split").to_pylist()), pixels_of(t))
