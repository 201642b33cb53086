"""Decode images once: any PIL-readable file -> grayscale uint8 square at ``image_size``.

16-bit (``I;16``/``I``) images are rescaled by their own range, RGB/RGBA/palette are converted to
luminance. Paths are confined to ``images_dir``: one that escapes it (``..``, absolute, a symlink out of
the tree) is refused. Each failure raises :class:`ImageError` with a short reason code that the caller
records as a counted skip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def resolve_inside(root: str | Path, rel: str) -> Path:
    root = Path(root).resolve()
    if Path(rel).is_absolute():
        raise ImageError("path_outside_images_dir", rel)
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ImageError("path_outside_images_dir", rel)
    return path


def to_uint8_gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return arr.round().astype(np.uint8)
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA").convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def decode_image(root: str | Path, rel: str, size: int) -> np.ndarray:
    path = resolve_inside(root, rel)
    if not path.exists():
        raise ImageError("missing_image", rel)
    try:
        with Image.open(path) as img:
            img.load()
            gray = to_uint8_gray(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError("unreadable_image", f"{rel}: {type(e).__name__}: {e}") from e
    if gray.ndim != 2 or min(gray.shape) < 8:
        raise ImageError("unreadable_image", f"{rel}: unexpected shape {gray.shape}")
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR), dtype=np.uint8)
