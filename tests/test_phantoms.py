"""Phantom radiographs: determinism, visibility and placement of each finding, CTR, strength."""

import numpy as np
import pytest

from amrg.data.phantoms import draw_phantom, phantom_regions
from amrg.labels.schema import CHEXPERT_14

DRAWN = CHEXPERT_14[1:]  # "No Finding" is derived, never drawn


def lab(*names, val=1.0, rest=np.nan):
    x = np.full(len(CHEXPERT_14), rest, dtype=float)
    for n in names:
        x[CHEXPERT_14.index(n)] = val
    return x


def ctr(img: np.ndarray) -> float:
    """Cardiothoracic ratio read off the pixels: at each row of the heart level, the bright run through
    the heart (>= 150) over the span of the dark lung pixels inside the body (< 110); the max over rows."""
    S = img.shape[0]
    sm = (img[:, :-2].astype(float) + img[:, 1:-1] + img[:, 2:]) / 3
    c, best = S // 2 + S // 20 - 1, 0.0
    for r in range(int(0.5 * S), int(0.68 * S)):
        body = np.flatnonzero(sm[r] >= 110)
        dark = np.flatnonzero(sm[r, body[0]:body[-1]] < 110) + body[0]
        bright = sm[r] >= 150
        if len(dark) < 2 or not bright[c]:
            continue
        left, right = c - np.argmin(bright[c::-1]) + 1, c + np.argmin(bright[c:]) - 1
        best = max(best, (right - left + 1) / (dark[-1] - dark[0] + 1))
    return best


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("view", [0, 1])
def test_shape_dtype_and_determinism(size, view):
    x = lab("Cardiomegaly", "Pleural Effusion", "Support Devices")
    a = draw_phantom(x, view, size, 7)
    assert a.dtype == np.uint8 and a.shape == (size, size)
    assert a.tobytes() == draw_phantom(x.copy(), view, size, 7).tobytes()
    assert not np.array_equal(a, draw_phantom(x, view, size, 8))
    assert 30 < a.mean() < 200 and a.std() > 25  # neither blank nor saturated
    regions = phantom_regions(x, view, size, 7)
    assert set(regions) == {"Cardiomegaly", "Pleural Effusion", "Support Devices"}
    for m in regions.values():
        assert m.dtype == bool and m.shape == (size, size) and m.any()


def test_views_differ_and_labels_accept_lists_with_none():
    x = [None] * len(CHEXPERT_14)
    assert not np.array_equal(draw_phantom(x, 0, 64, 1), draw_phantom(x, 1, 64, 1))
    with pytest.raises(ValueError):
        draw_phantom(np.zeros(5), 0, 64, 1)
    with pytest.raises(ValueError):
        draw_phantom(lab(), 2, 64, 1)


@pytest.mark.parametrize("view", [0, 1])
def test_normal_study_has_no_regions_and_typical_statistics(view):
    base = draw_phantom(lab(), view, 224, 99)
    # 0, NaN and a positive "No Finding" all give the same normal image
    for x in (lab(rest=0.0), lab("No Finding"), lab("No Finding", rest=0.0)):
        assert np.array_equal(draw_phantom(x, view, 224, 99), base)
        assert phantom_regions(x, view, 224, 99) == {}
    stats = np.array([[im.mean(), im.std(), np.percentile(im, 10), np.percentile(im, 90)]
                      for im in (draw_phantom(lab(), view, 224, s) for s in range(20))])
    lo, hi = stats.min(0), stats.max(0)
    pad = 0.1 * (hi - lo) + 0.5
    mine = np.array([base.mean(), base.std(), np.percentile(base, 10), np.percentile(base, 90)])
    assert np.all(mine >= lo - pad) and np.all(mine <= hi + pad)
    # two normal studies are not identical, but only slightly different
    a, b = (draw_phantom(lab(), view, 224, s).astype(float) for s in (1, 2))
    assert 0 < np.abs(a - b).mean() < 40


# loose anatomical placement on the frontal view: (row range, col range) of the region's centroid,
# as fractions of the image; None = anywhere
PLACE = {
    "Enlarged Cardiomediastinum": ((0.1, 0.55), (0.35, 0.65)),
    "Cardiomegaly": ((0.45, 0.8), (0.4, 0.8)),
    "Pleural Effusion": ((0.6, 0.9), None),
    "Pneumothorax": ((0.05, 0.5), None),
    "Atelectasis": ((0.5, 0.85), None),
    "Pneumonia": ((0.35, 0.85), None),
    "Edema": ((0.3, 0.8), (0.35, 0.65)),  # bilateral: centroid near the midline
    "Fracture": ((0.1, 0.8), None),
}


@pytest.mark.parametrize("view", [0, 1])
@pytest.mark.parametrize("name", DRAWN)
def test_each_finding_is_visible_and_local(name, view):
    for seed, size in ((0, 224), (1, 224), (2, 224), (3, 64)):
        normal = draw_phantom(lab(), view, size, seed).astype(float)
        img = draw_phantom(lab(name), view, size, seed).astype(float)
        regions = phantom_regions(lab(name), view, size, seed)
        assert set(regions) == {name}
        m = regions[name]
        assert m.sum() >= (4 if size == 64 else 12), (name, seed)
        diff = img - normal
        assert np.abs(diff[m]).mean() > 12, (name, seed, np.abs(diff[m]).mean())
        if name == "Pneumothorax":
            assert diff[m].mean() < -5  # lucent rim
        elif name != "Fracture":
            assert diff[m].mean() > 8, (name, seed)
        out = np.abs(diff[~m])
        assert out.mean() < 0.5 and np.percentile(out, 99.9) <= 4, (name, seed)
        if view == 0 and size == 224 and name in PLACE:
            rows, cols = np.nonzero(m)
            (r0, r1), cr = PLACE[name]
            assert r0 < rows.mean() / size < r1, (name, seed, rows.mean() / size)
            if cr:
                assert cr[0] < cols.mean() / size < cr[1], (name, seed, cols.mean() / size)


def test_all_findings_together():
    x = lab(*DRAWN)
    regions = phantom_regions(x, 0, 224, 5)
    assert set(regions) == set(DRAWN) and "No Finding" not in regions
    img = draw_phantom(x, 0, 224, 5)
    assert np.abs(img.astype(float) - draw_phantom(lab(), 0, 224, 5)).mean() > 10


def test_cardiomegaly_widens_the_heart():
    for size in (224, 64):
        for seed in range(6):
            normal = ctr(draw_phantom(lab(), 0, size, seed))
            unsure = ctr(draw_phantom(lab("Cardiomegaly", val=-1), 0, size, seed))
            big = ctr(draw_phantom(lab("Cardiomegaly"), 0, size, seed))
            assert 0.36 < normal < 0.48, (size, seed, normal)
            assert big > 0.52 and big > normal + 0.08, (size, seed, normal, big)
            assert normal < unsure < big, (size, seed, normal, unsure, big)


@pytest.mark.parametrize("view", [0, 1])
def test_uncertain_draws_weaker_than_positive(view):
    for name in DRAWN:
        for seed in (0, 1):
            normal = draw_phantom(lab(), view, 224, seed).astype(float)
            pos = np.abs(draw_phantom(lab(name), view, 224, seed) - normal).sum()
            unc = np.abs(draw_phantom(lab(name, val=-1), view, 224, seed) - normal).sum()
            assert 0.15 * pos < unc < 0.8 * pos, (name, seed, unc / pos)


def test_random_label_vectors_draw_exactly_their_findings():
    """Mixed label vectors as preprocess meets them (NaN, 0, 1, -1): every positive or uncertain finding is
    drawn and has a region, nothing else is; a vector with none draws the normal image. (Drawing speed
    is measured in bench/, not asserted here.)"""
    rng = np.random.default_rng(0)
    labels = rng.choice([np.nan, 0.0, 1.0, -1.0], p=[0.75, 0.1, 0.1, 0.05], size=(60, len(CHEXPERT_14)))
    labels[:4, 1:] = np.nan  # a few with no finding at all
    for i, x in enumerate(labels):
        view = i % 2
        img = draw_phantom(x, view, 128, i)
        assert img.dtype == np.uint8 and img.shape == (128, 128) and 30 < img.mean() < 200
        drawn = {n for n, v in zip(CHEXPERT_14, x) if n in DRAWN and v in (1.0, -1.0)}
        regions = phantom_regions(x, view, 128, i)
        assert set(regions) == drawn, i
        assert all(m.any() for m in regions.values()), i
        assert np.array_equal(img, draw_phantom(lab(), view, 128, i)) == (not drawn), i
