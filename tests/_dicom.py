"""DICOM files written by the tests themselves (pydicom), in the shapes radiographs arrive in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def dataset(pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
            study_uid: str | None = None, **tags) -> FileDataset:
    """A single-image DICOM dataset (explicit VR little endian) holding ``pixels`` (uint8 or uint16,
    ``(H, W)``; ``(F, H, W)`` for a multi-frame file; None: no pixel data); ``tags`` set as attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SECONDARY_CAPTURE, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "DX", "TEST"
    if pixels is not None:
        bits = bits_stored or pixels.dtype.itemsize * 8
        ds.set_pixel_data(pixels, photometric, bits)
    for k, v in tags.items():
        setattr(ds, k, v)
    return ds


def write(path: Path, pixels: np.ndarray | None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset(pixels, **kw).save_as(path, enforce_file_format=True)
    return path
