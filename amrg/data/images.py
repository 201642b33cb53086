"""Decode images once: any PIL-readable file or a DICOM file -> grayscale uint8 square at ``image_size``.

16-bit (``I;16``/``I``) images are rescaled by their own range, RGB/RGBA/palette are converted to
luminance. DICOM (recognised by its ``DICM`` preamble, whatever the file name) is read with pydicom
(:func:`dicom_to_gray`): the modality LUT (rescale slope/intercept), then the VOI LUT or window of the
file, then MONOCHROME1 inverted, scaled to 8 bits by the VOI output range (by the pixels' own range
when the file has no VOI). Paths are confined to ``images_dir``: one that escapes it (``..``, absolute,
a symlink out of the tree) is refused. Each failure raises :class:`ImageError` with a short reason code
that the caller records as a counted skip (``missing_image``, ``unreadable_image``, ``image_too_large``,
``no_pixel_data``, ``multi_frame``, ``unsupported_transfer_syntax``, ``path_outside_images_dir``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


# the largest image decoded, in pixels: PIL's decompression-bomb limit (a 20,000 x 20,000 upload is refused
# before its pixels are allocated); DICOM files are held to the same limit
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
DICOM_MAGIC = b"DICM"  # at byte 128, after the preamble (PS3.10 7.1)
DICOM_DECODERS = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle"


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


def is_dicom(path: str | Path) -> bool:
    """True for a DICOM Part 10 file (the ``DICM`` magic after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == DICOM_MAGIC
    except OSError:
        return False


def voi_output_range(ds) -> tuple[float, float] | None:
    """The value range the file's VOI transform maps into (PS3.3 C.11.2): ``[0, 2^n - 1]`` of the first
    VOI LUT's descriptor, or for a window the modality output range (the stored range, rescaled when the
    file has a rescale), as pydicom's ``apply_windowing`` uses it. None when the file has no VOI."""
    if ds.get("VOILUTSequence"):
        return 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.PixelRepresentation) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


def dicom_to_gray(path: Path, rel: str) -> np.ndarray:
    """uint8 ``(H, W)`` of a single-frame DICOM radiograph: modality LUT, VOI LUT or window, MONOCHROME1
    inverted, 8-bit scaling by the VOI output range (no VOI: the pixels' own range)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as e:
        raise ImageError("unreadable_image", f"{rel}: not a readable DICOM file: {type(e).__name__}: {e}") from e
    if "PixelData" not in ds and "SOPClassUID" not in ds:  # the magic, then no element a DICOM object has
        raise ImageError("unreadable_image", f"{rel}: not a readable DICOM file (no SOP class, no pixel data)")
    if "PixelData" not in ds:
        raise ImageError("no_pixel_data", f"{rel}: the DICOM file has no pixel data (a structured report or "
                                          "presentation state, not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError("multi_frame", f"{rel}: a multi-frame DICOM ({frames} frames); amrg reads single-frame "
                                        "radiographs: export the frame to read as its own file")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > MAX_PIXELS:
        raise ImageError("image_too_large", f"{rel}: {cols} x {rows} pixels, over the {MAX_PIXELS:,}-pixel limit")
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise ImageError("unsupported_transfer_syntax", f"{rel}: cannot decode the pixel data ({name}): {e}; "
                             f"the compressed syntaxes need pydicom's optional decoders: {DICOM_DECODERS}") from e
        raise ImageError("unreadable_image", f"{rel}: the pixel data cannot be read ({name}; truncated?): {e}") from e
    if arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 3:  # colour (secondary capture): luminance
        arr = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif arr.ndim != 2:
        raise ImageError("unreadable_image", f"{rel}: unexpected DICOM pixel shape {arr.shape}")
    else:
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    span = voi_output_range(ds) if arr.ndim == 2 and int(ds.get("SamplesPerPixel", 1)) == 1 else None
    lo, hi = span if span is not None else (float(arr.min()), float(arr.max()))
    x = np.clip((arr - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(arr)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":  # high values are dark
        x = 1.0 - x
    return (x * 255.0).round().astype(np.uint8)


def decode_image(root: str | Path, rel: str, size: int) -> np.ndarray:
    path = resolve_inside(root, rel)
    if not path.exists():
        raise ImageError("missing_image", rel)
    if is_dicom(path):
        gray = dicom_to_gray(path, rel)
    else:
        try:
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError("image_too_large", f"{rel}: {img.width} x {img.height} pixels, over the "
                                                        f"{MAX_PIXELS:,}-pixel limit")
                img.load()
                gray = to_uint8_gray(img)
        except Image.DecompressionBombError as e:
            raise ImageError("image_too_large", f"{rel}: {e}") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError("unreadable_image", f"{rel}: {type(e).__name__}: {e}") from e
    if gray.ndim != 2 or min(gray.shape) < 8:
        raise ImageError("unreadable_image", f"{rel}: unexpected shape {gray.shape}")
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR), dtype=np.uint8)
