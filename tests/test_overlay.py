"""amrg.cam overlays: the one heat-map renderer, also for the cam/overlays strips of mine_cam."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from amrg.cam import heat_overlay, overlay_strip, overlay_strip_png


def test_overlay_strip_is_image_heat_and_masked_side_by_side():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    cam = np.zeros((8, 8), np.float32)
    cam[2:4, 5:7] = 1.0
    masked = np.where(cam > 0, image, 0).astype(np.uint8)
    strip = overlay_strip(image, cam, masked)
    assert strip.shape == (8, 24, 3) and strip.dtype == np.uint8
    np.testing.assert_array_equal(strip[:, :8], np.repeat(image[..., None], 3, 2))
    np.testing.assert_array_equal(strip[:, 8:16], heat_overlay(image, cam))
    np.testing.assert_array_equal(strip[:, 16:], np.repeat(masked[..., None], 3, 2))
    # jet heat: full activation is red-dominant, no activation leaves the radiograph grey
    assert strip[2, 13, 0] > strip[2, 13, 2] and (strip[0, 8] == image[0, 0]).all()
    png = overlay_strip_png(image, cam, masked)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), strip)
    with pytest.raises(ValueError, match="one \\(H, W\\) shape"):
        overlay_strip(image, cam[:4], masked)
