"""DICOM input (amrg.data.images): the files are written here with pydicom; every decoded value is checked
against a hand computation of the DICOM pixel pipeline (modality LUT, VOI window, MONOCHROME1, 8-bit scaling)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from amrg.data.images import MAX_PIXELS, ImageError, decode_image, is_dicom
from tests import _dicom

H, W = 48, 64


def ramp(dtype=np.uint16, top: int = 4095) -> np.ndarray:
    return np.linspace(0, top, H * W).reshape(H, W).round().astype(dtype)


def resized(gray: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR))


def test_8bit_monochrome2_equals_the_same_pixels_as_png(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (H, W), dtype=np.uint8)
    a[0, 0], a[0, 1] = 0, 255  # the full range: no-VOI scaling by the pixels' own range is the identity
    _dicom.write(tmp_path / "a.dcm", a)
    Image.fromarray(a).save(tmp_path / "a.png")
    assert is_dicom(tmp_path / "a.dcm") and not is_dicom(tmp_path / "a.png")
    np.testing.assert_array_equal(decode_image(tmp_path, "a.dcm", 32), decode_image(tmp_path, "a.png", 32))


def test_a_dicom_is_recognised_by_content_not_by_name(tmp_path):
    a = ramp(np.uint8, 255)
    _dicom.write(tmp_path / "IM0001", a)  # no suffix, as PACS exports name them
    np.testing.assert_array_equal(decode_image(tmp_path, "IM0001", 32), resized(a, 32))


def test_12_bit_without_voi_is_scaled_by_its_own_range_and_monochrome1_inverted(tmp_path):
    a = (ramp(np.uint16, 3000) + 100).astype(np.uint16)  # 100..3100 of the 12-bit range
    _dicom.write(tmp_path / "m2.dcm", a, bits_stored=12)
    _dicom.write(tmp_path / "m1.dcm", a, bits_stored=12, photometric="MONOCHROME1")
    x = (a - a.min()) / (a.max() - a.min())
    np.testing.assert_array_equal(decode_image(tmp_path, "m2.dcm", 32), resized((x * 255).round().astype(np.uint8), 32))
    np.testing.assert_array_equal(decode_image(tmp_path, "m1.dcm", 32), resized(((1 - x) * 255).round().astype(np.uint8), 32))


def linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR, output in [0, 1]: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped."""
    return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def test_16_bit_window_is_applied(tmp_path):
    a = ramp(np.uint16, 65535)
    _dicom.write(tmp_path / "w.dcm", a, bits_stored=16, WindowCenter=30000, WindowWidth=20000)
    want = (linear_window(a.astype(float), 30000, 20000) * 255).round().astype(np.uint8)
    got = decode_image(tmp_path, "w.dcm", W)  # resize to width only changes the height
    ref = resized(want, W)
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert (want == 0).mean() > 0.2 and (want == 255).mean() > 0.2  # the window clips both ends


def test_rescale_then_window_and_monochrome1(tmp_path):
    a = ramp(np.uint16, 4095)  # stored; the modality LUT makes them -1024..3071
    _dicom.write(tmp_path / "r.dcm", a, bits_stored=12, photometric="MONOCHROME1", RescaleSlope=1, RescaleIntercept=-1024,
                 WindowCenter=500, WindowWidth=1000)
    want = ((1 - linear_window(a.astype(float) - 1024, 500, 1000)) * 255).round().astype(np.uint8)
    assert np.abs(decode_image(tmp_path, "r.dcm", W).astype(int) - resized(want, W)).max() <= 1


def test_rle_lossless_decodes_to_the_uncompressed_pixels(tmp_path):
    a = ramp()
    plain = _dicom.write(tmp_path / "plain.dcm", a, bits_stored=12)
    ds = _dicom.dataset(a, bits_stored=12)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert plain.read_bytes() != (tmp_path / "rle.dcm").read_bytes()
    np.testing.assert_array_equal(decode_image(tmp_path, "rle.dcm", 32), decode_image(tmp_path, "plain.dcm", 32))


def test_jpeg_baseline_decodes_through_the_pillow_plugin(tmp_path):
    a = ramp(np.uint8, 255)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    ds = _dicom.dataset(a)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    assert np.abs(decode_image(tmp_path, "jpeg.dcm", 32).astype(int) - resized(a, 32)).max() <= 4  # lossy


def test_a_syntax_without_its_decoder_names_the_decoders(tmp_path):
    ds = _dicom.dataset(ramp(np.uint8, 255))
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8not a jpeg-ls stream\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jls.dcm", enforce_file_format=True)
    with pytest.raises(ImageError) as e:
        decode_image(tmp_path, "jls.dcm", 32)
    assert e.value.reason in ("unsupported_transfer_syntax", "unreadable_image")
    assert "JPEG-LS" in e.value.detail


@pytest.mark.parametrize("case, reason", [("multi_frame", "multi_frame"), ("no_pixels", "no_pixel_data"),
                                          ("huge", "image_too_large"), ("truncated", "unreadable_image"),
                                          ("not_dicom", "unreadable_image")])
def test_bad_dicom_files_are_refused_with_their_reason(tmp_path, case, reason):
    a = ramp(np.uint8, 255)
    path = tmp_path / f"{case}.dcm"
    if case == "multi_frame":
        _dicom.write(path, np.stack([a, a, a]))
    elif case == "no_pixels":
        _dicom.write(path, None)
    elif case == "huge":  # the header claims 20,000 x 20,000: refused before any pixel is allocated
        ds = _dicom.dataset(a)
        ds.Rows = ds.Columns = 20_000
        ds.save_as(path, enforce_file_format=True)
        assert 20_000 * 20_000 > MAX_PIXELS
    elif case == "truncated":
        full = _dicom.write(tmp_path / "full.dcm", a).read_bytes()
        path.write_bytes(full[: len(full) - H * W // 2])
    else:
        path.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(ImageError) as e:
        decode_image(tmp_path, path.name, 32)
    assert e.value.reason == reason, e.value


def test_a_huge_png_is_refused_as_too_large(tmp_path):
    # a 20,000 x 20,000 PNG of one colour is a few hundred KB on disk
    Image.new("L", (20_000, 20_000)).save(tmp_path / "big.png", optimize=False, compress_level=1)
    with pytest.raises(ImageError) as e:
        decode_image(tmp_path, "big.png", 32)
    assert e.value.reason == "image_too_large"
