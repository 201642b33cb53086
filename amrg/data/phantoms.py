"""Phantom chest radiographs: deterministic synthetic X-rays drawn from a study's CheXpert-14 labels.

No real images are available, so the embedded default draws each study's images from its labels. The
goal is not realism for its own sake but a picture that (a) reads as a chest radiograph, (b) lets a
small classifier learn every label from pixels, (c) puts each finding where a radiologist would look,
so GradCAM localisation can be checked against :func:`phantom_regions`.

Rendering is vectorised numpy on canonical coordinates ``u`` (left->right) and ``v`` (top->bottom) in
[0, 1]; the image is ``soft tissue + bone + devices + grain`` clipped to uint8. The ``seed`` jitters
thorax scale/position, heart width, dome heights, rib phase and the noise texture, and places the
findings (side, zone, number); the same ``(labels, view, size, seed)`` always gives identical bytes.
Label 1 draws a finding at full strength, -1 (uncertain) at about half (half the contrast, or half
the enlargement for Cardiomegaly / Enlarged Cardiomediastinum), 0/NaN not at all. "No Finding" is
derived, never drawn.

Normal anatomy. Frontal (PA, ``view=0``, patient's right on image left): neck and shoulders, two dark
egg-shaped lung fields with vascular markings fanning out from bright hila, a bright mediastinum with
dark trachea and aortic knob, a heart sitting left of midline on the diaphragm (cardiothoracic ratio
about 0.42), diaphragm domes (right higher) with sharp costophrenic angles, bright abdomen below,
spine shadow, posterior rib arcs and clavicles. Lateral (``view=1``, anterior on image left): body
silhouette, one lung field, heart antero-inferior behind the sternum, retrosternal and retrocardiac
clear spaces, trachea, vertebral bodies posteriorly with sloping rib shadows, domes deeper posteriorly.

Findings (frontal / lateral):

* Enlarged Cardiomediastinum: upper mediastinum widened between the lung apices and the heart /
  retrosternal space filled in.
* Cardiomegaly: heart silhouette widened, mostly to the image right, CTR > 0.5 / heart enlarged
  posteriorly, filling the retrocardiac space.
* Lung Lesion: one to three round, sharp-edged nodules in a lung field.
* Lung Opacity: patchy cluster of soft blobs in an upper, mid or lower zone of one lung.
* Edema: bilateral perihilar ("bat-wing") haze plus horizontal Kerley-B lines at the lateral bases.
* Consolidation: dense homogeneous lobar opacity (lower lobe below an oblique fissure, or upper lobe)
  with dark branching air bronchograms.
* Pneumonia: fluffy confluent opacity with mottled texture in a mid/lower zone of one lung.
* Atelectasis: thin plate-like band in a lower zone plus elevation of that hemidiaphragm.
* Pneumothorax: apical/lateral rim of one lung made lucent with no markings, edged by a thin bright
  visceral pleural line.
* Pleural Effusion: basal fluid rising to a meniscus at the lateral (lateral view: posterior) wall,
  blunting the costophrenic angle; unilateral or bilateral by seed.
* Pleural Other: lumpy pleural thickening along the lateral (lateral view: posterior) chest wall.
* Fracture: one posterior rib interrupted by a gap with a step-off of the lateral fragment.
* Support Devices: very bright endotracheal tube, central venous line and/or pacemaker box with its
  lead running into the heart.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from amrg.labels.schema import CHEXPERT_14

PHANTOM_NOTE = ("Images are synthetic phantom radiographs drawn deterministically from each study's "
                "CheXpert-14 labels, not real patient X-rays.")

_IDX = {n: i for i, n in enumerate(CHEXPERT_14)}
LUNG, MEDIA, HEART, ABDOMEN = 58.0, 195.0, 208.0, 178.0  # soft-tissue levels (grey values)


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % (1 << 63), *tags])


def _ramp(d, w):
    """Soft step, 0 below -w/2, 1 above +w/2 (anti-aliased edge of a signed distance ``d``)."""
    return np.clip(d * (1.0 / w) + 0.5, 0.0, 1.0)


def _seg_d2(u, v, pts):
    """Squared distance from every pixel to a polyline ``pts`` [(u, v), ...]."""
    best = None
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((u - x0) * dx + (v - y0) * dy) * (1.0 / (dx * dx + dy * dy + 1e-12)), 0.0, 1.0)
        d2 = (u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2
        best = d2 if best is None else np.minimum(best, d2)
    return best


def _gauss(ctx, u0, v0, r):
    return np.exp(-((ctx.u - u0) ** 2) / (2 * r * r)) * np.exp(-((ctx.v - v0) ** 2) / (2 * r * r))


class _Ctx:
    """Coordinate grids, jittered geometry and the three layers of one image."""

    def __init__(self, view: int, size: int, seed: int):
        self.view, self.size = int(view), int(size)
        j = _rng(seed, self.view, 0).normal(0.0, 1.0, 10).clip(-2.5, 2.5)
        sx, sy = 1 + 0.03 * j[0], 1 + 0.03 * j[1]
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.u = ((c - 0.5 - 0.012 * j[2]) / sx + 0.5)[None, :].astype(np.float32)
        self.v = ((c - 0.5 - 0.012 * j[3]) / sy + 0.5)[:, None].astype(np.float32)
        self.ew = 1.3 / size / min(sx, sy)
        self.j = j
        nr = _rng(seed, self.view, 1, size)
        self.tex = self._lowfreq(nr, 10, 1.0)
        self.tex2 = self._lowfreq(nr, 28, 1.0)
        self.grain = nr.standard_normal((size, size), dtype=np.float32) * 2.6
        self.rib_phase = 0.02 * j[7]
        if self.view == 0:
            self.lungs = [dict(cx=0.30, cy=0.52, ax=0.165, ay=0.44, lat=-1, hil=(0.405, 0.47),
                               dome=(0.29, 0.715 + 0.012 * j[5], 0.80 + 0.01 * j[5], 0.21, 0.0)),
                          dict(cx=0.70, cy=0.53, ax=0.16, ay=0.44, lat=1, hil=(0.605, 0.45),
                               dome=(0.71, 0.74 + 0.012 * j[6], 0.82 + 0.01 * j[6], 0.21, 0.0))]
            self.heart = (0.535, 0.635, 0.153 * (1 + 0.035 * j[4]), 0.125, 0.22)
            self.fissure = (0.05, 0.2)
        else:
            self.lungs = [dict(cx=0.50, cy=0.50, ax=0.34, ay=0.42, lat=1, hil=(0.53, 0.45),
                               dome=(0.40, 0.705 + 0.012 * j[5], 0.745 + 0.01 * j[5], 0.36, 0.12))]
            self.heart = (0.355, 0.60, 0.165 * (1 + 0.035 * j[4]), 0.14, 0.2)
            self.fissure = (-0.15, 0.6)

    def _lowfreq(self, rng, n, amp):
        small = rng.standard_normal((n, n)).astype(np.float32)
        big = Image.fromarray(small, mode="F").resize((self.size, self.size), Image.BICUBIC)
        return np.asarray(big, dtype=np.float32) * amp

    # --- geometry helpers -------------------------------------------------------------------------
    def dome(self, L, u=None):
        pu, pv, base, w, slope = L["dome"]
        u = self.u if u is None else u
        return base - (base - pv) * (1 - ((u - pu) / w) ** 2) + slope * (u - pu)

    def diaphragm(self):
        if self.view == 1:
            return self.dome(self.lungs[0])
        return np.where(self.u < 0.5, self.dome(self.lungs[0]), self.dome(self.lungs[1]))

    def local(self, L, grow=1.0):
        b = (self.v - L["cy"]) / (L["ay"] * grow)
        a = (self.u - L["cx"]) / (L["ax"] * grow) / (1 + 0.22 * b)
        return a, b

    def egg(self, L, grow=1.0):
        a, b = self.local(L, grow)
        return _ramp((1 - (a * a + b * b)) * (0.5 * min(L["ax"], L["ay"])), self.ew)

    def pt(self, L, a, b):
        return L["cx"] + a * L["ax"] * (1 + 0.22 * b), L["cy"] + b * L["ay"]

    def heart_mask(self, grow=0.0, shift=0.0, vgrow=0.0):
        cx, cy, ax, ay, ayb = self.heart
        cx, ax = cx + shift, ax * (1 + grow)
        dv = self.v - cy
        ayv = np.where(dv < 0, ay * (1 + vgrow), ayb * (1 + vgrow))
        e = ((self.u - cx) / ax) ** 2 + (dv / ayv) ** 2
        return _ramp((1 - e) * (0.5 * min(ax, ay)), self.ew) * _ramp(self.diaphragm() - self.v + 0.01, self.ew)

    def ribs(self, dd, shift=0.0, gap=None):
        """Rib-arc density as a function of distance-from-spine ``dd`` (1, S)."""
        if self.view == 0:
            x = dd - 0.04
            ph = (self.v - (-0.30 * x + 1.05 * x * x) - 0.085 - self.rib_phase) / (0.071 + 0.012 * self.v)
        else:
            ph = (self.v - 0.42 * dd - 0.02 - self.rib_phase) / 0.072
        ph = ph + shift
        q = ph - np.floor(ph)
        r = np.clip(1 - np.abs(q - 0.5) * 5.5, 0.0, 1.0) * _ramp(ph, 0.2) * _ramp(10.5 - ph, 0.2)
        return r ** 0.6 if gap is None else r ** 0.6 * (1 - gap)


# --- normal anatomy ---------------------------------------------------------------------------------
def _anatomy(c: _Ctx) -> None:
    u, v, ew = c.u, c.v, c.ew
    S = c.size
    if c.view == 0:
        hb = 0.47 - 0.30 * np.clip((0.16 - v) / 0.16, 0, 1) ** 2
        body = _ramp(hb - np.abs(u - 0.5), 3 * ew)
        soft = 12 + body * (112 + 18 * (1 - ((u - 0.5) / 0.5) ** 2))
    else:
        body = _ramp((1 - ((u - 0.50) / 0.44) ** 2 - ((v - 0.58) / 0.62) ** 2) * 0.2, 3 * ew)
        soft = 12 + body * (120 + 12 * (1 - ((u - 0.5) / 0.5) ** 2))
    soft = soft + 0 * u  # (S, S)
    c.lm, mk = [], np.zeros((S, S), np.float32)
    for L in c.lungs:
        a, b = c.local(L)
        m = c.egg(L) * _ramp(c.dome(L) - v, ew)
        depth = (soft - LUNG) - 22 * np.clip(b - 0.25, 0, 1) - 10 * np.clip(-0.6 - b, 0, 1) * 2
        soft -= m * depth * (0.8 if c.view else 1.0)
        hu, hv = L["hil"]
        dist = np.sqrt((u - hu) ** 2 + (v - hv) ** 2)
        theta = np.arctan2(v - hv, u - hu)
        streak = np.clip(np.cos(13 * theta + 2.2 * c.tex2 + 40 * dist) * 1.6 - 0.6, 0, 1)
        mk += m * (24 * np.exp(-dist / 0.07) + (9 + 5 * c.tex2) * streak * np.exp(-dist / 0.22))
        c.lm.append(m)
    if c.view == 0:  # mediastinum, aortic knob, heart, trachea
        mw = 0.047 + 0.03 * v
        med = _ramp(mw - np.abs(u - 0.505), ew) * _ramp(v - 0.10, 0.06) * _ramp(0.70 - v, ew)
        med = np.maximum(med, _ramp(0.034 - np.sqrt((u - 0.557) ** 2 + (v - 0.315) ** 2), ew))
        soft += med * (MEDIA - soft)
        tr = _ramp(0.013 - np.abs(u - 0.503 + 0.02 * np.clip(v - 0.25, 0, 1)), ew) * _ramp(0.33 - v, 0.03)
    else:
        med = _ramp(0.07 - np.abs(u - 0.47 + 0.12 * (v - 0.4)), 2 * ew) * _ramp(v - 0.12, 0.05) * _ramp(0.52 - v, 0.05)
        soft += med * 38
        tr = _ramp(0.014 - np.abs(u - 0.43 - 0.22 * v), ew) * _ramp(0.42 - v, 0.04)
    heart = c.heart_mask()
    soft += heart * ((HEART if c.view == 0 else 172.0) - soft)
    below = _ramp(v - c.diaphragm(), ew) * body
    soft += below * (ABDOMEN - soft)
    if c.view == 0:  # gastric bubble under the left dome
        soft -= 55 * _ramp(1 - ((u - 0.67) / 0.045) ** 2 - ((v - c.dome(c.lungs[1], 0.67) - 0.045) / 0.03) ** 2, 0.3)
    soft -= tr * 38
    c.vis = [m * (1 - heart) * (1 - med) for m in c.lm]
    c.mk = mk * (1 - heart) * (1 - med)
    c.soft = soft + c.mk
    # bones: spine, ribs, clavicles / sternum
    if c.view == 0:
        dd = np.abs(u - 0.505)
        spine = _ramp(0.033 - dd, ew) * (24 + 8 * np.cos(2 * np.pi * v / 0.052))
        thorax = sum(c.egg(L, 1.08) for L in c.lungs)
        ribs = c.ribs(dd) * thorax * _ramp(dd - 0.045, 0.02) * 34
        cl = 0.168 - 0.22 * (dd - 0.04) + 0.55 * (dd - 0.04) ** 2
        clav = _ramp(0.011 - np.abs(v - cl), ew) * _ramp(dd - 0.035, ew) * _ramp(0.31 - dd, 0.02) * 50
        c.bone = spine + ribs + clav
    else:
        dd = 0.88 - u
        verts = _ramp(0.06 - np.abs(u - 0.85 + 0.05 * v), ew) * _ramp(0.8 - (v / 0.056 - np.floor(v / 0.056)), 0.1)
        spine = verts * _ramp(v - 0.05, 0.05) * _ramp(c.diaphragm() + 0.08 - v, 0.04) * 46
        ribs = c.ribs(dd) * c.egg(c.lungs[0], 1.05) * _ramp(dd - 0.05, 0.03) * _ramp(0.45 - dd, 0.1) * 22
        sternum = _ramp(0.012 - np.abs(u - 0.150 - 0.08 * (v - 0.2)), ew) * _ramp(v - 0.17, ew) * _ramp(0.64 - v, ew) * 40
        c.bone = spine + ribs + sternum
    c.dd = dd
    c.dev = np.zeros((S, S), np.float32)


# --- findings: each edits c.soft / c.bone / c.dev with strength s (1 or 0.5) and its own rng r ------
def _lung_pick(c, r):
    k = int(r.integers(2))
    return c.lungs[k % len(c.lungs)], k % len(c.lungs)


def _ecm(c, s, r):
    u, v = c.u, c.v
    if c.view == 0:
        w = 0.047 + 0.03 * v + 0.055 * s * _ramp(v - 0.14, 0.06) * _ramp(0.50 - v, 0.1)
        m = _ramp(w - np.abs(u - 0.505), c.ew) * _ramp(v - 0.12, 0.06) * _ramp(0.6 - v, c.ew)
        c.soft += m * np.maximum(MEDIA - c.soft, 0)
    else:
        m = _ramp(1 - ((u - 0.30) / (0.07 + 0.05 * s)) ** 2 - ((v - 0.36) / 0.17) ** 2, 0.3)
        c.soft += m * np.maximum(150 - c.soft, 0)


def _cardiomegaly(c, s, r):
    m = c.heart_mask(grow=0.40 * s, shift=0.03 * s, vgrow=0.10 * s)
    c.soft += m * np.maximum((HEART if c.view == 0 else 172.0) - c.soft, 0)


def _lesion(c, s, r):
    for _ in range(1 + int(r.integers(3))):
        L, _k = _lung_pick(c, r)
        u0, v0 = c.pt(L, L["lat"] * r.uniform(0.05, 0.6), r.uniform(-0.6, 0.35))
        R = r.uniform(0.022, 0.04)
        rr = (c.u - u0) ** 2 + (c.v - v0) ** 2
        c.soft += 72 * s * np.sqrt(np.clip(1 - rr / (R * R), 0, 1)) ** 0.5


def _opacity(c, s, r):
    L, k = _lung_pick(c, r)
    a0, b0 = L["lat"] * r.uniform(0.05, 0.5), [-0.45, -0.05, 0.32][int(r.integers(3))]
    acc = 0
    for _ in range(5):
        acc = acc + _gauss(c, *c.pt(L, a0 + r.normal(0, 0.22), b0 + r.normal(0, 0.1)), r.uniform(0.03, 0.05))
    c.soft += 58 * s * np.clip(acc, 0, 1.2) * (0.65 + 0.35 * np.clip(c.tex2, -1, 1)) * c.lm[k]


def _edema(c, s, r):
    for L, m in zip(c.lungs, c.lm):
        hu, hv = L["hil"]
        haze = _gauss(c, hu + L["lat"] * 0.035, hv + 0.03, 0.085)
        a, b = c.local(L)
        e = a * a + b * b
        band = _ramp(e - 0.55, 0.2) * _ramp(a * L["lat"] - 0.35, 0.1) * _ramp(b - 0.1, 0.1) * _ramp(0.62 - b, 0.1)
        ph = (c.v - r.uniform(0, 0.03)) / 0.026
        lines = np.clip(1 - np.abs(ph - np.floor(ph) - 0.5) * 6.0, 0, 1)
        c.soft += s * m * (52 * haze + 38 * band * lines)


def _consolidation(c, s, r):
    L, k = _lung_pick(c, r)
    a, b = c.local(L)
    f0, fk = c.fissure
    lower = r.random() < 0.65
    edge = (b - f0 + fk * a * L["lat"]) if lower else (-0.2 - b)
    lobe = _ramp(edge * L["ay"], 2 * c.ew) * c.lm[k] * _ramp(0.6 - (a * L["lat"]) * -1, 0.2) * (1 if lower else 1)
    dens = 92 * lobe * (0.92 + 0.08 * c.tex2)
    b0 = 0.35 if lower else -0.5
    segs = [[c.pt(L, L["lat"] * 0.1, b0), c.pt(L, L["lat"] * (0.45 + 0.1 * i), b0 + 0.15 * (i - 1) + r.normal(0, 0.04))]
            for i in range(3)]
    d2 = np.minimum(np.minimum(_seg_d2(c.u, c.v, segs[0]), _seg_d2(c.u, c.v, segs[1])), _seg_d2(c.u, c.v, segs[2]))
    bronch = _ramp(0.006 - np.sqrt(d2), c.ew) * lobe
    c.soft += s * (dens - 30 * bronch - c.mk * lobe * 0.6)


def _pneumonia(c, s, r):
    L, k = _lung_pick(c, r)
    a0, b0 = L["lat"] * r.uniform(0.1, 0.45), r.uniform(0.0, 0.42)
    acc = 0
    for _ in range(7):
        acc = acc + _gauss(c, *c.pt(L, a0 + r.normal(0, 0.2), b0 + r.normal(0, 0.1)), r.uniform(0.04, 0.065))
    dens = np.clip(acc * 1.4, 0, 1) ** 1.5 * (0.62 + 0.38 * np.clip(c.tex2 * 0.6 + 0.5 * np.sin(c.grain), -1, 1))
    c.soft += 80 * s * dens * c.lm[k]


def _atelectasis(c, s, r):
    L, k = _lung_pick(c, r)
    b0, tilt = r.uniform(0.2, 0.42), r.uniform(-0.15, 0.15)
    p0, p1 = c.pt(L, -0.55 * L["lat"], b0 + tilt), c.pt(L, 0.75 * L["lat"], b0 - tilt)
    plate = _ramp(0.011 - np.sqrt(_seg_d2(c.u, c.v, [p0, p1])), 1.5 * c.ew) * c.lm[k]
    c.soft += 78 * s * plate
    d = c.dome(L)
    up = _ramp(c.v - (d - 0.04 * s), c.ew) * _ramp(d - c.v, c.ew) * c.egg(L, 1.02)
    c.soft += up * np.maximum(ABDOMEN - c.soft, 0)


def _pneumothorax(c, s, r):
    L, k = _lung_pick(c, r)
    a, b = c.local(L)
    q = np.sqrt(a * a + b * b)
    w = 0.17 if c.view == 0 else 0.12
    where = _ramp(0.25 - b, 0.25) * _ramp(a * L["lat"] + 0.35, 0.3) * c.lm[k]
    rim = _ramp(q - (1 - w), 0.02) * where
    line = _ramp(0.012 - np.abs(q - (1 - w)), 0.01) * where
    c.soft += s * (-rim * (c.mk + 24) + 42 * line)


def _effusion(c, s, r):
    both = r.random() < 0.35
    k0 = int(r.integers(2)) % len(c.lungs)
    for k, L in enumerate(c.lungs):
        if len(c.lungs) > 1 and not both and k != k0:
            continue
        a0 = (c.u - L["cx"]) / L["ax"] * L["lat"]
        base = c.dome(L, L["cx"] + L["lat"] * L["ax"] * 0.8)
        vf = base - (0.085 + 0.05 * s) - 0.09 * np.clip(a0, 0, 1.2) ** 2 + 0.03 * np.clip(-a0, 0, 1)
        fluid = np.clip((c.v - vf) / 0.05, 0, 1) * c.egg(L, 1.03) * (0.9 * s)
        c.soft += fluid * np.maximum(ABDOMEN - 8 - c.soft, 0)


def _pleural_other(c, s, r):
    L, k = _lung_pick(c, r)
    a, b = c.local(L)
    q = np.sqrt(a * a + b * b)
    w = 0.07 + 0.03 * np.cos(c.v * 45 + r.uniform(0, 6.3))
    band = _ramp(q - (1 - w), 0.03) * _ramp(a * L["lat"] - 0.25, 0.1) * _ramp(b + 0.55, 0.1) * _ramp(0.4 - b, 0.1)
    c.soft += 60 * s * band * c.lm[k]


def _fracture(c, s, r):
    sgn = [-1, 1][int(r.integers(2))]
    n = int(r.integers(3, 7))
    df = r.uniform(0.2, 0.29) if c.view == 0 else r.uniform(0.15, 0.3)
    if c.view == 0:  # locate rib n along the arc at distance df
        x = df - 0.04
        v0 = (-0.30 * x + 1.05 * x * x) + 0.085 + c.rib_phase + (n + 0.5) * (0.071 + 0.012 * 0.5)
        u0 = 0.505 + sgn * df
        side = _ramp(sgn * (c.u - 0.505), c.ew)
    else:
        v0, u0, side = 0.42 * df + 0.02 + c.rib_phase + (n + 0.5) * 0.072, 0.88 - df, 1.0
    win = _gauss(c, u0, v0, 0.03) > 0.2
    step = _ramp(c.dd - df, 0.01) * 0.28
    gap = _ramp(0.007 - np.abs(c.dd - df), 0.006)
    amp = 34 if c.view == 0 else 22
    new = c.ribs(c.dd, shift=step, gap=gap) * amp
    c.bone += s * win * side * (new - c.ribs(c.dd) * amp)


def _devices(c, s, r):
    pick = r.random(3) < [0.6, 0.6, 0.5]
    if not pick.any():
        pick[int(r.integers(3))] = True
    d2, w = [], max(0.006, 0.8 / c.size)
    lat = c.view == 1
    if pick[0]:  # endotracheal / nasogastric tube down the trachea
        d2.append(_seg_d2(c.u, c.v, [(0.43, 0.0), (0.48, 0.28)] if lat else [(0.50, 0.0), (0.503, 0.27)]))
    if pick[1]:  # central venous line into the SVC
        d2.append(_seg_d2(c.u, c.v, [(0.30, 0.10), (0.45, 0.25), (0.46, 0.42)] if lat else
                          [(0.14, 0.15), (0.30, 0.19), (0.44, 0.25), (0.465, 0.38)]))
    box = 0
    if pick[2]:  # pacemaker generator and lead to the right ventricle
        bu, bv = (0.14, 0.22) if lat else (0.78, 0.20)
        bw, bh = (0.03, 0.04) if lat else (0.045, 0.03)
        box = _ramp(np.minimum(bw - np.abs(c.u - bu), bh - np.abs(c.v - bv)), c.ew)
        d2.append(_seg_d2(c.u, c.v, [(bu, bv), (0.35, 0.30), (0.42, 0.42), (0.30, 0.68)] if lat else
                          [(bu, bv), (0.62, 0.24), (0.50, 0.36), (0.49, 0.55), (0.60, 0.70)]))
    lines = _ramp(w - np.sqrt(np.minimum.reduce(d2)), c.ew)
    c.dev += 115 * s * np.maximum(lines, box)


_FINDINGS = (("Enlarged Cardiomediastinum", _ecm), ("Cardiomegaly", _cardiomegaly), ("Atelectasis", _atelectasis),
             ("Edema", _edema), ("Lung Opacity", _opacity), ("Consolidation", _consolidation),
             ("Pneumonia", _pneumonia), ("Lung Lesion", _lesion), ("Pleural Effusion", _effusion),
             ("Pleural Other", _pleural_other), ("Pneumothorax", _pneumothorax), ("Fracture", _fracture),
             ("Support Devices", _devices))


def _render(labels, view: int, size: int, seed: int, want_regions: bool):
    lab = np.asarray(labels, dtype=np.float64).reshape(-1)
    if lab.shape[0] != len(CHEXPERT_14):
        raise ValueError(f"labels must have {len(CHEXPERT_14)} entries, got {lab.shape[0]}")
    if view not in (0, 1):
        raise ValueError(f"view must be 0 (frontal) or 1 (lateral), got {view}")
    c = _Ctx(view, size, seed)
    _anatomy(c)
    regions = {}
    for name, fn in _FINDINGS:
        x = lab[_IDX[name]]
        if x != 1 and x != -1:
            continue
        before = c.soft + c.bone + c.dev if want_regions else None
        fn(c, 1.0 if x == 1 else 0.5, _rng(seed, 100 + _IDX[name]))
        if want_regions:
            delta = np.abs(c.soft + c.bone + c.dev - before)
            regions[name] = delta >= max(3.0, 0.1 * float(delta.max()))
    img = np.clip(c.soft + c.bone + c.dev + c.grain, 0, 255).round().astype(np.uint8)
    return img, regions


def draw_phantom(labels, view: int, size: int, seed: int) -> np.ndarray:
    """Synthetic radiograph (uint8, ``size`` x ``size``) of ``labels`` (CheXpert-14 order) in ``view``."""
    return _render(labels, view, size, seed, False)[0]


def phantom_regions(labels, view: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """For each finding drawn in :func:`draw_phantom` (same args), a boolean mask of where it was drawn."""
    return _render(labels, view, size, seed, True)[1]
