"""Phantom chest radiographs: deterministic synthetic X-rays drawn from a study's CheXpert-14 labels.

No real images are available, so the embedded default draws each study's images from its labels: a
picture that reads as a chest radiograph, from which a small classifier can learn every label, with
each finding where a radiologist would look (so GradCAM can be checked against :func:`phantom_regions`).

Vectorised numpy on canonical coordinates ``u`` (left->right), ``v`` (top->bottom) in [0, 1]; the image
is ``soft tissue + bone + devices + grain`` clipped to uint8. The ``seed`` jitters thorax scale and
position, heart width, dome heights, rib phase, grain and texture, and places the findings (side, zone,
count); the same ``(labels, view, size, seed)`` always gives the same bytes. Label 1 draws a finding at
full strength, -1 (uncertain) at half (half the contrast, or half the enlargement for Cardiomegaly /
Enlarged Cardiomediastinum), 0 / NaN not at all; "No Finding" is derived, never drawn.

Normal anatomy. Frontal (PA, ``view=0``, patient's right on image left): neck and shoulders, two dark
lung fields with vascular markings fanning out from the hila, bright mediastinum with dark trachea and
aortic knob, heart left of midline on the diaphragm (cardiothoracic ratio ~0.43), domes (right higher)
with sharp costophrenic angles, bright abdomen with gastric bubble, spine, posterior and faint anterior
rib arcs, clavicles. Lateral (``view=1``, anterior on image left): body silhouette, one lung field,
heart antero-inferior behind the sternum, retrosternal / retrocardiac clear spaces, trachea, aortic
arch, vertebral bodies posteriorly with sloping rib shadows, domes deeper posteriorly.

Findings (frontal; lateral where it differs):

* Enlarged Cardiomediastinum: upper mediastinum bulges out between the apices and the heart;
  lateral: retrosternal space filled in.
* Cardiomegaly: heart silhouette widened, mostly to the image right, CTR > 0.5; lateral: heart
  enlarged posteriorly into the retrocardiac space.
* Lung Lesion: one to three round, sharp-edged nodules in the lung fields.
* Lung Opacity: patchy cluster of soft blobs in an upper, mid or lower zone of one lung.
* Edema: bilateral perihilar ("bat-wing") haze plus horizontal Kerley-B lines at the lateral bases.
* Consolidation: dense homogeneous lobar opacity (lower lobe below an oblique fissure, or upper lobe
  above a horizontal one) with dark branching air bronchograms.
* Pneumonia: fluffy confluent opacity with mottled texture in a mid / lower zone of one lung.
* Atelectasis: thin plate-like band in a lower zone plus elevation of that hemidiaphragm.
* Pneumothorax: apical / lateral rim of one lung made lucent without markings, edged by a thin bright
  visceral pleural line.
* Pleural Effusion: basal fluid rising to a meniscus at the lateral wall (lateral: posterior), blunting
  the costophrenic angle; unilateral or bilateral by seed.
* Pleural Other: lumpy pleural thickening along the lateral (lateral: posterior) chest wall.
* Fracture: one posterior rib interrupted by a gap, the lateral fragment stepped off and sclerotic.
* Support Devices: very bright endotracheal tube, central venous line and / or pacemaker box with its
  lead running into the heart.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

from amrg.labels.schema import CHEXPERT_14

PHANTOM_NOTE = ("Images are synthetic phantom radiographs drawn deterministically from each study's "
                "CheXpert-14 labels, not real patient X-rays.")

_IDX = {n: i for i, n in enumerate(CHEXPERT_14)}
LUNG, MEDIA, HEART, ABDOMEN = 58.0, 192.0, 200.0, 176.0  # soft-tissue grey levels


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) % (1 << 63), *tags])


def _ramp(d, w):
    """Soft step, 0 below -w/2, 1 above +w/2 (anti-aliased edge of a signed distance ``d``)."""
    r = d * (1.0 / w)
    r += 0.5
    np.maximum(r, 0.0, out=r)
    return np.minimum(r, 1.0, out=r)


def _seg_d2(u, v, pts):
    """Squared distance from every pixel to a polyline ``pts`` [(u, v), ...]."""
    best = None
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((u - x0) * dx + (v - y0) * dy) * (1.0 / (dx * dx + dy * dy + 1e-12)), 0.0, 1.0)
        d2 = (u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2
        best = d2 if best is None else np.minimum(best, d2)
    return best


@functools.lru_cache(maxsize=8)
def _fields(size: int):
    """Seed-independent (2S, 2S) fields, cut per image at a seeded offset: film grain, smooth unit noise,
    and the hilar markings pattern centred on the canvas (near density, far falloff, vessel phase)."""
    r = np.random.default_rng(20240611)
    g = r.standard_normal((2 * size, 2 * size), dtype=np.float32) * 2.6
    small = Image.fromarray(r.standard_normal((56, 56)).astype(np.float32), mode="F")
    tex = np.asarray(small.resize((2 * size, 2 * size), Image.BICUBIC), dtype=np.float32)
    c = (np.arange(2 * size, dtype=np.float32) - size + 0.5) / size
    du, dv = c[None, :], c[:, None]
    dist = np.sqrt(du * du + dv * dv)
    return g, tex / tex.std(), 30 * np.exp(dist * -20.0), np.exp(dist * -5.0), 15 * np.arctan2(dv, du) + 6 * dist


def _gauss(ctx, u0, v0, r):
    return np.exp(-((ctx.u - u0) ** 2) / (2 * r * r)) * np.exp(-((ctx.v - v0) ** 2) / (2 * r * r))


class _Ctx:
    """Coordinate grids, jittered geometry and the three layers of one image."""

    def __init__(self, view: int, size: int, seed: int):
        self.view, self.size = int(view), int(size)
        j = [float(x) for x in _rng(seed, self.view, 0).normal(0.0, 1.0, 10).clip(-2.5, 2.5)]
        self.sx, self.sy, self.ox, self.oy = 1 + 0.03 * j[0], 1 + 0.03 * j[1], 0.012 * j[2], 0.012 * j[3]
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.u = ((c - 0.5 - self.ox) / self.sx + 0.5)[None, :].astype(np.float32)
        self.v = ((c - 0.5 - self.oy) / self.sy + 0.5)[:, None].astype(np.float32)
        self.ew = 1.3 / size / min(self.sx, self.sy)  # anti-aliasing edge width in canonical units
        oy, ox, ty, tx = (int(x) for x in _rng(seed, self.view, 1, size).integers(0, size, 4))
        self.grain = _fields(size)[0][oy:oy + size, ox:ox + size]
        self.tex2 = _fields(size)[1][ty:ty + size, tx:tx + size]
        self.rib_phase = 0.02 * j[7]
        if self.view == 0:  # lungs: centre, half-width at the base, half-height apex..CP angle
            self.lungs = [dict(cx=0.305, cy=0.45, ax=0.17, ay=0.35, lat=-1, hil=(0.41, 0.46),
                               dome=(0.29, 0.715 + 0.012 * j[5], 0.80 + 0.01 * j[5], 0.16, 0.0)),
                          dict(cx=0.695, cy=0.46, ax=0.165, ay=0.36, lat=1, hil=(0.60, 0.44),
                               dome=(0.705, 0.74 + 0.012 * j[6], 0.82 + 0.01 * j[6], 0.16, 0.0))]
            self.heart = (0.545, 0.635, 0.158 * (1 + 0.035 * j[4]), 0.11, 0.35)
            self.fissure = (0.1, 0.25)
        else:
            self.lungs = [dict(cx=0.50, cy=0.47, ax=0.35, ay=0.36, lat=1, hil=(0.53, 0.46),
                               dome=(0.40, 0.70 + 0.012 * j[5], 0.74 + 0.01 * j[5], 0.36, 0.12))]
            self.heart = (0.35, 0.61, 0.18 * (1 + 0.035 * j[4]), 0.125, -0.6)
            self.fissure = (-0.1, 0.6)

    def to_px(self, pu, pv):
        return (int(round(((pu - 0.5) * self.sx + 0.5 + self.ox) * self.size - 0.5)),
                int(round(((pv - 0.5) * self.sy + 0.5 + self.oy) * self.size - 0.5)))

    def dome(self, L, u=None):
        pu, pv, base, w, slope = L["dome"]
        u = self.u if u is None else u
        return base - (base - pv) * (1 - ((u - pu) / w) ** 2) + slope * (u - pu)

    def diaphragm(self):
        if self.view == 1:
            return self.dome(self.lungs[0])
        return np.where(self.u < 0.5, self.dome(self.lungs[0]), self.dome(self.lungs[1]))

    @staticmethod
    def _wf(b):  # lung width factor: narrow apex, widest at the base
        return 0.70 + 0.30 * np.clip((b + 1) / 1.5, 0, 1)

    def local(self, L, grow=1.0):
        """Lung-local coords: ``a`` across (+-1 at the walls), ``b`` apex (-1) to costophrenic angle (+1)."""
        b = (self.v - L["cy"]) / (L["ay"] * grow)
        a = (self.u - L["cx"]) / (L["ax"] * grow) / self._wf(b)
        return a, b

    def shape(self, L, grow=1.0):
        a, b = self.local(L, grow)
        top = np.minimum((b + 0.4) / 0.6, 0)  # rounded apex, straight-ish walls below
        return a * a + top * top

    def egg(self, L, grow=1.0):
        return _ramp((1 - self.shape(L, grow)) * (0.5 * L["ax"]), self.ew)

    def pt(self, L, a, b):
        return float(L["cx"] + a * L["ax"] * self._wf(b)), float(L["cy"] + b * L["ay"])

    def heart_mask(self, grow=0.0, shift=0.0, vgrow=0.0):
        """Tilted ellipse, lower half deeper so the heart sits on the diaphragm; cut by the domes."""
        cx, cy, A, B, th = self.heart
        A, B, cx, cy = A * (1 + grow), B * (1 + vgrow), cx + shift, cy + 0.4 * shift
        du, dv = self.u - cx, self.v - cy
        p, q = du * math.cos(th) + dv * math.sin(th), dv * math.cos(th) - du * math.sin(th)
        q = q - np.maximum(q, 0) * 0.4
        e = (p / A) ** 2 + (q / B) ** 2
        return _ramp((1 - e) * (0.5 * B), self.ew) * _ramp(self.diaphragm() - self.v + 0.01, self.ew)

    def ribs(self, dd, shift=0.0, gap=None):
        """Posterior rib arcs as a function of distance-from-spine ``dd`` (1, S); ``shift`` in rib units."""
        if self.view == 0:
            x = dd - 0.04
            ph = (self.v + 0.25 * x - 1.6 * x * x - 0.085 - self.rib_phase) / (0.064 + 0.022 * self.v)
        else:
            ph = (self.v - 0.45 * dd - 0.03 - self.rib_phase) / 0.07
        ph = ph + shift
        q = ph - np.floor(ph)
        r = np.clip(1.6 - np.abs(q - 0.5) * 7.0, 0.0, 1.0) * _ramp(ph, 0.3) * _ramp(10.5 - ph, 0.3)
        return r if gap is None else r * (1 - gap)


# --- normal anatomy ---------------------------------------------------------------------------------
def _med_w(v):
    """Half-width of the frontal mediastinum at height ``v`` (S, 1)."""
    return 0.048 + 0.012 * v + 0.045 * np.clip((v - 0.28) / 0.3, 0, 1) ** 1.5


def _anatomy(c: _Ctx) -> None:
    u, v, ew, S = c.u, c.v, c.ew, c.size
    if c.view == 0:
        hb = 0.16 + 0.31 * np.clip(v / 0.24, 0, 1) ** 0.55
        body = _ramp(hb - np.abs(u - 0.5), 4 * ew)
        soft = 12 + body * (108 + 26 * (1 - ((u - 0.5) / 0.47) ** 2))
    else:
        body = _ramp((1 - ((u - 0.49) / 0.53) ** 2 - ((v - 0.66) / 0.72) ** 2) * 0.2, 4 * ew)
        soft = 12 + body * (116 + 18 * (1 - ((u - 0.5) / 0.5) ** 2) + 60 * np.clip(0.38 - v, 0, 1))
    c.lm, mk = [], np.zeros((S, S), np.float32)
    for L in c.lungs:
        a, b = c.local(L)
        m = c.egg(L) * _ramp(c.dome(L) - v, ew)
        # lung darkness, less at the bases (soft tissue), apices (shoulders) and walls
        soft -= m * (soft - LUNG - 14 * c.view - 26 * np.clip(b - 0.35, 0, 1) - 30 * np.clip(-0.55 - b, 0, 1)
                     - 14 * np.clip(np.abs(a) - 0.7, 0, 1))
        x, y = c.to_px(*L["hil"])  # vascular markings: cut the hilar pattern out centred on this hilum
        win = (slice(S - y, 2 * S - y), slice(S - x, 2 * S - x))
        near, far, ang = (f[win] for f in _fields(S)[2:])
        streak = np.clip(np.cos(ang + 1.5 * c.tex2) * 2.5 - 1.5, 0, 1)
        mk += m * (near + (12 + 5 * c.tex2) * streak * far)
        c.lm.append(m)
    if c.view == 0:  # mediastinum with aortic knob, trachea
        med = _ramp(_med_w(v) - np.abs(u - 0.505), ew) * _ramp(v - 0.10, 0.08) * _ramp(0.72 - v, ew)
        med = np.maximum(med, _ramp(0.033 - np.sqrt((u - 0.556) ** 2 + (v - 0.31) ** 2), ew))
        soft += med * (MEDIA - soft)
        tr = _ramp(0.013 - np.abs(u - 0.503 + 0.03 * np.clip(v - 0.22, 0, 1)), ew) * _ramp(0.33 - v, 0.03)
    else:  # aortic arch and descending aorta, trachea
        arc = _ramp(0.02 - np.abs(np.sqrt((u - 0.53) ** 2 + (v - 0.36) ** 2) - 0.07), 2 * ew) * _ramp(0.37 - v, 0.02)
        desc = _ramp(0.02 - np.abs(u - 0.60 - 0.05 * (v - 0.36)), 2 * ew) * _ramp(v - 0.36, 0.02) * _ramp(0.72 - v, 0.1)
        med = np.maximum(arc, desc) * 0.6
        soft += med * 40
        tr = _ramp(0.014 - np.abs(u - 0.44 - 0.17 * v), ew) * _ramp(0.40 - v, 0.06) * 0.5
    heart = c.heart_mask()
    soft += heart * ((HEART if c.view == 0 else 158.0) - soft)
    below = _ramp(v - c.diaphragm(), ew) * body
    soft += below * (ABDOMEN - soft)
    if c.view == 0:  # gastric bubble under the left dome
        gv = c.dome(c.lungs[1], 0.68) + 0.04
        soft -= 50 * _ramp(1 - ((u - 0.68) / 0.045) ** 2 - ((v - gv) / 0.028) ** 2, 0.3)
    soft -= tr * 36
    c.vis = [m * (1 - heart) * (1 - med) for m in c.lm]
    c.mk = mk * (1 - heart) * (1 - med)
    c.soft = soft + c.mk
    # bones: spine, ribs, clavicles (frontal) / vertebral bodies, ribs, sternum (lateral)
    if c.view == 0:
        dd = np.abs(u - 0.505)
        spine = _ramp(0.032 - dd, ew) * (14 + 5 * np.cos(2 * np.pi * v / 0.05)) * (1 - 0.6 * heart)
        thorax = sum(c.egg(L, 1.06) for L in c.lungs) * (1 - 0.75 * below) * (1 - 0.75 * heart)
        ribs = c.ribs(dd) * thorax * _ramp(dd - 0.045, 0.02) * 30
        pa = (v + 0.42 * (dd - 0.40) - 0.16) / 0.085
        ant = np.clip(1 - np.abs(pa - np.floor(pa) - 0.5) * 5, 0, 1) * _ramp(dd - 0.16, 0.06) * _ramp(5.5 - pa, 0.3)
        cl = 0.172 - 0.17 * (dd - 0.04) + 0.22 * (dd - 0.04) ** 2
        clav = _ramp(0.013 - np.abs(v - cl), ew) * _ramp(dd - 0.03, ew) * _ramp(0.31 - dd, 0.02) * 46
        c.bone = spine + ribs + ant * thorax * 10 + clav
    else:
        dd = 0.80 - u
        vq = v / 0.056 - np.floor(v / 0.056)
        verts = _ramp(0.048 - np.abs(u - 0.775 + 0.07 * (v - 0.5)), 4 * ew) * _ramp(0.4 - np.abs(vq - 0.5), 0.15)
        spine = verts * _ramp(v - 0.1, 0.1) * 22
        ribs = c.ribs(dd) * c.egg(c.lungs[0], 1.04) * _ramp(dd, 0.03) * _ramp(0.3 - dd, 0.12) * 12 * (1 - 0.8 * below)
        sternum = _ramp(0.013 - np.abs(u - 0.16 - 0.06 * (v - 0.2)), ew) * _ramp(v - 0.17, ew) * _ramp(0.62 - v, ew)
        c.bone = spine + ribs + 34 * sternum
    c.dd = dd
    c.dev = np.zeros((S, S), np.float32)


# --- findings: each edits c.soft / c.bone / c.dev with strength s (1 or 0.5) and its own rng r ------
def _lung_pick(c, r):
    k = int(r.integers(2)) % len(c.lungs)
    return c.lungs[k], k


def _ecm(c, s, r):
    u, v = c.u, c.v
    if c.view == 0:
        bulge = 0.055 * s * np.clip(np.sin(np.pi * np.clip((v - 0.12) / 0.42, 0, 1)), 0, 1) ** 0.7
        m = _ramp(_med_w(v) + bulge - np.abs(u - 0.505), c.ew) * _ramp(v - 0.12, 0.06) * _ramp(0.6 - v, c.ew)
        c.soft += m * np.maximum(MEDIA - c.soft, 0)
    else:
        m = _ramp(1 - ((u - 0.29) / (0.03 + 0.09 * s)) ** 2 - ((v - 0.34) / (0.1 + 0.06 * s)) ** 2, 0.3)
        c.soft += m * np.maximum(150 - c.soft, 0)


def _cardiomegaly(c, s, r):
    m = c.heart_mask(grow=0.45 * s, shift=0.03 * s, vgrow=0.25 * s)
    c.soft += m * np.maximum((HEART if c.view == 0 else 158.0) - c.soft, 0)


def _lesion(c, s, r):
    for _ in range(1 + int(r.integers(3))):
        L = _lung_pick(c, r)[0]
        u0, v0 = c.pt(L, L["lat"] * r.uniform(0.05, 0.6), r.uniform(-0.6, 0.5))
        rr = ((c.u - u0) ** 2 + (c.v - v0) ** 2) * (1 / r.uniform(0.022, 0.04) ** 2)
        c.soft += 72 * s * np.sqrt(np.sqrt(np.clip(1 - rr, 0, 1)))


def _cluster(c, r, L, a0, b0, n, sa, r0, r1):
    """Sum of ``n`` Gaussian blobs scattered around lung-local point (a0, b0)."""
    return sum(_gauss(c, *c.pt(L, a0 + r.normal(0, sa), b0 + r.normal(0, 0.12)), r.uniform(r0, r1))
               for _ in range(n))


def _opacity(c, s, r):
    L, k = _lung_pick(c, r)
    a0, b0 = L["lat"] * r.uniform(0.05, 0.5), [-0.5, 0.05, 0.5][int(r.integers(3))]
    acc = _cluster(c, r, L, a0, b0, 5, 0.22, 0.03, 0.05)
    c.soft += 62 * s * np.clip(acc, 0, 1.2) * (0.65 + 0.35 * np.clip(c.tex2, -1, 1)) * c.vis[k]


def _edema(c, s, r):
    for L, m in zip(c.lungs, c.vis):
        hu, hv = L["hil"]
        haze = _gauss(c, hu + L["lat"] * 0.035, hv + 0.03, 0.085)
        a, b = c.local(L)
        band = _ramp(c.shape(L) - 0.55, 0.2) * _ramp(a * L["lat"] - 0.4, 0.1) * _ramp(b - 0.3, 0.1)
        band *= _ramp(0.95 - b, 0.1)  # lateral lower periphery: Kerley-B lines
        ph = (c.v - r.uniform(0, 0.03)) / 0.026
        lines = np.clip(1 - np.abs(ph - np.floor(ph) - 0.5) * 6.0, 0, 1)
        c.soft += s * m * (55 * haze + 40 * band * lines)


def _consolidation(c, s, r):
    L, k = _lung_pick(c, r)
    a, b = c.local(L)
    f0, fk = c.fissure
    lower = r.random() < 0.65
    edge = (b - f0 + fk * a * L["lat"]) if lower else (-0.25 - b)
    lobe = _ramp(edge * L["ay"], 2 * c.ew) * c.vis[k] * _ramp(a * L["lat"] + 0.7, 0.3)
    b0 = 0.6 if lower else -0.55
    d2 = np.minimum.reduce([_seg_d2(c.u, c.v, [c.pt(L, L["lat"] * 0.05, b0), c.pt(
        L, L["lat"] * (0.5 + 0.1 * i), b0 + 0.18 * (i - 1) + r.normal(0, 0.04))]) for i in range(3)])
    bronch = _ramp(0.006 - np.sqrt(d2), c.ew) * lobe  # air bronchograms
    c.soft += s * (lobe * (95 + 6 * c.tex2 - 0.6 * c.mk) - 34 * bronch)


def _pneumonia(c, s, r):
    L, k = _lung_pick(c, r)
    acc = _cluster(c, r, L, L["lat"] * r.uniform(0.1, 0.45), r.uniform(0.05, 0.6), 7, 0.2, 0.04, 0.065)
    dens = np.clip(acc * 1.4, 0, 1) ** 1.5 * (0.62 + 0.38 * np.clip(c.tex2 * 0.6 + 0.5 * np.sin(c.grain), -1, 1))
    c.soft += 82 * s * dens * c.vis[k]


def _atelectasis(c, s, r):
    L, k = _lung_pick(c, r)
    b0, tilt = r.uniform(0.35, 0.6), r.uniform(-0.12, 0.12)
    p0, p1 = c.pt(L, -0.3 * L["lat"], b0 + tilt), c.pt(L, 0.85 * L["lat"], b0 - tilt)
    plate = _ramp(0.012 - np.sqrt(_seg_d2(c.u, c.v, [p0, p1])), 2 * c.ew) * c.vis[k]
    c.soft += 80 * s * plate
    d = c.dome(L)
    up = _ramp(c.v - (d - 0.045 * s), c.ew) * _ramp(d - c.v, c.ew) * c.egg(L, 1.03)
    c.soft += up * np.maximum(ABDOMEN - c.soft, 0)


def _pneumothorax(c, s, r):
    L, k = _lung_pick(c, r)
    a, b = c.local(L)
    q = np.sqrt(c.shape(L))
    w = 0.24 if c.view == 0 else 0.14
    where = _ramp(0.3 - b, 0.3) * _ramp(a * L["lat"] + 0.3, 0.3) * c.vis[k]
    rim = _ramp(q - (1 - w), 0.02) * where
    line = _ramp(0.014 - np.abs(q - (1 - w)), 0.01) * where
    c.soft += s * (-rim * (c.mk + 26) + 45 * line)


def _effusion(c, s, r):
    both, k0 = r.random() < 0.35, int(r.integers(2)) % len(c.lungs)
    for k, L in enumerate(c.lungs):
        if not (both or k == k0):
            continue
        a0 = (c.u - L["cx"]) / L["ax"] * L["lat"]
        base = c.dome(L, L["cx"] + L["lat"] * L["ax"])
        vf = base - (0.085 + 0.05 * s) - 0.09 * np.clip(a0, 0, 1.2) ** 2 + 0.03 * np.clip(-a0, 0, 1)
        fluid = np.clip((c.v - vf) / 0.05, 0, 1) * c.egg(L, 1.03) * (0.9 * s)
        c.soft += fluid * np.maximum(ABDOMEN - 8 - c.soft, 0)


def _pleural_other(c, s, r):
    L, k = _lung_pick(c, r)
    a, b = c.local(L)
    q = np.sqrt(c.shape(L))
    w = 0.11 + 0.05 * np.cos(c.v * 40 + r.uniform(0, 6.3))
    band = _ramp(q - (1 - w), 0.04) * _ramp(a * L["lat"] - 0.2, 0.1) * _ramp(b + 0.6, 0.1) * _ramp(0.6 - b, 0.1)
    c.soft += 70 * s * band * c.lm[k]


def _fracture(c, s, r):
    sgn, n = [-1, 1][int(r.integers(2))], int(r.integers(3, 7))
    if c.view == 0:  # point on rib n at distance df from the spine (inverse of _Ctx.ribs)
        df = r.uniform(0.2, 0.3)
        x = df - 0.04
        v0 = (-0.25 * x + 1.6 * x * x + 0.085 + c.rib_phase + (n + 0.5) * 0.064) / (1 - 0.022 * (n + 0.5))
        u0, side = 0.505 + sgn * df, _ramp(sgn * (c.u - 0.505), c.ew)
    else:
        df = r.uniform(0.06, 0.2)
        v0, u0, side = 0.45 * df + 0.03 + c.rib_phase + (n + 0.5) * 0.07, 0.80 - df, 1.0
    win = np.clip(2.0 - 1.6 * np.sqrt((c.u - u0) ** 2 + (c.v - v0) ** 2) / 0.05, 0, 1)
    step, gap = _ramp(c.dd - df, 0.008) * 0.35, _ramp(0.008 - np.abs(c.dd - df), 0.006)
    amp = 30 if c.view == 0 else 12  # as in _anatomy; the displaced fragment is drawn sclerotic
    c.bone += s * win * side * (c.ribs(c.dd, shift=step, gap=gap) * (amp + 26) - c.ribs(c.dd) * amp)


def _devices(c, s, r):
    pick, d2, lat, box = r.random(3) < [0.6, 0.6, 0.5], [], c.view == 1, 0
    pick[int(r.integers(3))] |= not pick.any()
    if pick[0]:  # endotracheal / nasogastric tube down the trachea
        d2.append(_seg_d2(c.u, c.v, [(0.43, 0.0), (0.48, 0.28)] if lat else [(0.50, 0.0), (0.503, 0.27)]))
    if pick[1]:  # central venous line into the SVC
        d2.append(_seg_d2(c.u, c.v, [(0.30, 0.10), (0.45, 0.25), (0.46, 0.42)] if lat else
                          [(0.14, 0.15), (0.30, 0.19), (0.44, 0.25), (0.465, 0.38)]))
    if pick[2]:  # pacemaker generator and lead to the right ventricle
        bu, bv = (0.14, 0.22) if lat else (0.78, 0.20)
        bw, bh = (0.03, 0.04) if lat else (0.045, 0.03)
        box = _ramp(np.minimum(bw - np.abs(c.u - bu), bh - np.abs(c.v - bv)), c.ew)
        d2.append(_seg_d2(c.u, c.v, [(bu, bv), (0.35, 0.30), (0.42, 0.42), (0.30, 0.68)] if lat else
                          [(bu, bv), (0.62, 0.24), (0.50, 0.36), (0.49, 0.55), (0.60, 0.70)]))
    lines = _ramp(max(0.006, 0.8 / c.size) - np.sqrt(np.minimum.reduce(d2)), c.ew)
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
        fn(c, 1.0 if x == 1 else 0.5, _rng(seed, 100 + _IDX[name]))  # placement: same in both views
        if want_regions:
            regions[name] = np.abs(c.soft + c.bone + c.dev - before) >= 3.0
    img = np.clip(c.soft + c.bone + c.dev + c.grain, 0, 255).round().astype(np.uint8)
    return img, regions


def phantom_seed(study_id: str, seed: int) -> int:
    """The drawing seed of a study's phantom images: both views show the same findings in the same place."""
    import zlib

    return zlib.crc32(study_id.encode()) ^ seed


def draw_phantom(labels, view: int, size: int, seed: int) -> np.ndarray:
    """Synthetic radiograph (uint8, ``size`` x ``size``) of ``labels`` (CheXpert-14 order) in ``view``."""
    return _render(labels, view, size, seed, False)[0]


def phantom_regions(labels, view: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """For each finding drawn in :func:`draw_phantom` (same args), a boolean mask of where it was drawn."""
    return _render(labels, view, size, seed, True)[1]
