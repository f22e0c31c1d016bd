"""Synthetic LiTS-like abdominal CT phantoms: test and demo data, not a clinical claim.

:func:`generate_phantom` draws one contrast-enhanced (portal-venous-like) abdominal CT
volume with its liver / tumour reference segmentation; :func:`write_phantom_dataset` writes
a LiTS-format data set of them (``volume-K.nii.gz`` / ``segmentation-K.nii.gz``).

Conventions are those of :mod:`training.volume`: arrays are ``(X, Y, Z)`` in canonical RAS+
(``i`` towards the patient's right, ``j`` anterior, ``k`` superior), HU float32, labels
uint8 0 background / 1 liver / 2 tumour, and an affine from voxel indices to RAS mm.

Every structure is defined in millimetres as an implicit 3-D shape (an approximate signed
distance, negative inside) and sampled at the voxel centres, so the anatomy is consistent
from slice to slice and, for one generator state, across image sizes: all anatomical random
draws happen before the size-dependent image noise. In-plane sizes are physical; the
cranio-caudal layout is scaled to the scanned slab (up to a real liver's height, 150-190
mm) so that the liver fills most, but not all, of the slices of an upper-abdominal slab;
longer slabs add lung bases above the liver and bowel below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.ndimage as ndi
from tqdm.auto import tqdm

from training.volume import LABEL_BACKGROUND, LABEL_LIVER, LABEL_TUMOR, CTVolume, write_lits_case

__all__ = ["generate_phantom", "write_phantom_dataset"]

HU_AIR = -1000.0
HU_PADDING = -1024.0
"""Value outside the scanner's reconstruction circle, as many scanners write it."""
HU_MAX = 3071.0
"""Top of the 12-bit CT range."""

TUMOUR_COUNT_PROBABILITIES = (0.1, 0.35, 0.25, 0.17, 0.13)
"""P(0..4 tumours) per volume."""
TUMOUR_DIAMETER_MM = (5.0, 50.0)
PLACEMENT_STEP_MM = 4.0
"""In-plane step of the coarse grid on which tumour centres are chosen."""
REFERENCE_LIVER_HEIGHT_MM = 170.0
"""Cranio-caudal anatomical lengths are given for a liver this tall and scaled with it."""

Point = tuple[float, float, float]


# --------------------------------------------------------------------------- grids, fields


@dataclass(frozen=True)
class _Grid:
    """Axis-aligned sample points: voxel-centre coordinates ``x``, ``y``, ``z`` (1-D, mm)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.size, self.y.size, self.z.size)

    @property
    def X(self) -> np.ndarray:  # noqa: N802 - broadcastable (n, 1, 1) coordinates
        return self.x[:, None, None]

    @property
    def Y(self) -> np.ndarray:  # noqa: N802
        return self.y[None, :, None]

    @property
    def Z(self) -> np.ndarray:  # noqa: N802
        return self.z[None, None, :]

    def window(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        """Index slices of the samples inside the box ``[lo, hi]`` (mm), or ``None`` if empty."""
        window = []
        for axis, low, high in zip((self.x, self.y, self.z), lo, hi):
            start, stop = int(np.searchsorted(axis, low, "left")), int(np.searchsorted(axis, high, "right"))
            if stop <= start:
                return None
            window.append(slice(start, stop))
        return tuple(window)  # type: ignore[return-value]

    def sub(self, window: tuple[slice, slice, slice]) -> _Grid:
        return _Grid(self.x[window[0]], self.y[window[1]], self.z[window[2]])


class _SmoothField:
    """A smooth zero-mean, unit-variance random field on a box (any length unit).

    A sum of Gaussian bumps with independent normal weights on a lattice of step
    ``length / 2``: its correlation length (1/e) is about ``length``. The weights are drawn
    once, so the field does not depend on where or how finely it is sampled; sampling a grid
    is three small matrix products (the bumps are separable).
    """

    def __init__(self, rng: np.random.Generator, lo: Sequence[float], hi: Sequence[float], length: float) -> None:
        self.sigma = length / 2.0
        self.nodes = [
            np.arange(low - 3 * self.sigma, high + 3.5 * self.sigma, self.sigma, dtype=np.float32) for low, high in zip(lo, hi)
        ]
        self.weights = rng.standard_normal(tuple(n.size for n in self.nodes), dtype=np.float32)

    def _basis(self, coords: np.ndarray, nodes: np.ndarray) -> np.ndarray:
        # Outside the lattice the field is continued as a constant instead of fading to 0/0.
        coords = np.clip(np.asarray(coords, np.float32).ravel(), nodes[0], nodes[-1])
        basis = np.exp(-0.5 * ((coords[:, None] - nodes[None, :]) / self.sigma) ** 2)
        # Unit-norm rows make the variance exactly 1 at every sample point.
        return basis / np.linalg.norm(basis, axis=1, keepdims=True)

    def sample(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The field at the grid ``x`` (n,), ``y`` (m,), ``z`` (k,): an ``(n, m, k)`` float32 array."""
        bx, by, bz = (self._basis(c, n) for c, n in zip((x, y, z), self.nodes))
        field = np.tensordot(self.weights, bz, axes=([2], [1]))  # (a, b, k)
        field = np.tensordot(bx, field, axes=([1], [0]))  # (n, b, k)
        field = np.tensordot(field, by, axes=([1], [1]))  # (n, k, m)
        return field.transpose(0, 2, 1)

    def on(self, grid: _Grid) -> np.ndarray:
        return self.sample(grid.x, grid.y, grid.z)


# --------------------------------------------------------------------------- shapes


@dataclass
class _Ellipsoid:
    """An ellipsoid rotated by ``angle`` (rad) about the z axis; its in-plane centre may
    drift linearly with z by ``drift`` (mm per z semi-axis), which tilts it."""

    centre: Point
    axes: Point
    angle: float = 0.0
    drift: tuple[float, float] = (0.0, 0.0)

    def distance(self, g: _Grid) -> np.ndarray:
        """Approximate signed distance in mm: exact on the surface, first order near it."""
        cx, cy, cz = self.centre
        ax, ay, az = self.axes
        w = (g.Z - cz) / az
        dx = g.X - (cx + self.drift[0] * w)
        dy = g.Y - (cy + self.drift[1] * w)
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (dx * c + dy * s) / ax
        v = (dy * c - dx * s) / ay
        q = np.sqrt(u * u + v * v + w * w)
        gradient = np.sqrt((u / ax) ** 2 + (v / ay) ** 2 + (w / az) ** 2)
        return ((q - 1.0) * q / np.maximum(gradient, 1e-6)).astype(np.float32)

    def bounds(self, margin: float = 0.0) -> tuple[Point, Point]:
        r = max(self.axes[0], self.axes[1]) + max(abs(self.drift[0]), abs(self.drift[1])) + margin
        cx, cy, cz = self.centre
        return (cx - r, cy - r, cz - self.axes[2] - margin), (cx + r, cy + r, cz + self.axes[2] + margin)


def _segment_distance(g: _Grid, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float) -> np.ndarray:
    """Signed distance (mm) to a tapered cylinder (a cone frustum with round caps)."""
    d = p1 - p0
    t = ((g.X - p0[0]) * d[0] + (g.Y - p0[1]) * d[1] + (g.Z - p0[2]) * d[2]) / max(float(d @ d), 1e-9)
    t = np.clip(t, 0.0, 1.0)
    ex, ey, ez = g.X - (p0[0] + t * d[0]), g.Y - (p0[1] + t * d[1]), g.Z - (p0[2] + t * d[2])
    return (np.sqrt(ex * ex + ey * ey + ez * ez) - (r0 + t * (r1 - r0))).astype(np.float32)


@dataclass
class _Tubes:
    """A union of tapered segments (a polyline or a vessel tree)."""

    starts: np.ndarray  # (n, 3) mm
    ends: np.ndarray  # (n, 3) mm
    r_start: np.ndarray  # (n,) mm
    r_end: np.ndarray  # (n,) mm

    @classmethod
    def polyline(cls, points: Sequence[Point], radii: Sequence[float], samples: int = 6) -> _Tubes:
        """A smooth tube through ``points``: a Catmull-Rom curve cut into short segments."""
        p = np.asarray(points, np.float64)
        r = np.asarray(radii, np.float64)
        p = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
        curve, radius = [], []
        for i in range(1, len(p) - 2):
            for t in np.arange(samples) / samples:
                t2, t3 = t * t, t * t * t
                curve.append(
                    0.5
                    * (
                        2 * p[i]
                        + (p[i + 1] - p[i - 1]) * t
                        + (2 * p[i - 1] - 5 * p[i] + 4 * p[i + 1] - p[i + 2]) * t2
                        + (3 * p[i] - p[i - 1] - 3 * p[i + 1] + p[i + 2]) * t3
                    )
                )
                radius.append(r[i - 1] + (r[i] - r[i - 1]) * t)
        curve.append(p[-2])
        radius.append(r[-1])
        curve, radius = np.asarray(curve), np.asarray(radius)
        return cls(curve[:-1], curve[1:], radius[:-1], radius[1:])

    def bounds(self, margin: float = 0.0) -> tuple[Point, Point]:
        r = float(max(self.r_start.max(), self.r_end.max())) + margin
        points = np.vstack([self.starts, self.ends])
        return tuple(points.min(0) - r), tuple(points.max(0) + r)  # type: ignore[return-value]

    def distance(self, g: _Grid) -> np.ndarray:
        d = np.full(g.shape, np.inf, np.float32)
        for p0, p1, r0, r1 in zip(self.starts, self.ends, self.r_start, self.r_end):
            r = max(r0, r1)
            window = g.window(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
            if window is not None:
                np.minimum(d[window], _segment_distance(g.sub(window), p0, p1, r0, r1), out=d[window])
        return d


def _smooth_union(distances: Sequence[np.ndarray], k: float) -> np.ndarray:
    """Union of shapes with rounded creases of about ``k`` mm (a soft minimum)."""
    stacked = np.stack(distances)
    low = stacked.min(0)
    return (low - k * np.log(np.exp(-(stacked - low) / k).sum(0))).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


# --------------------------------------------------------------------------- canvas


@dataclass
class _Canvas:
    """What the structures paint into, with the body masks they share.

    ``texture`` is a unit-variance smooth field (correlation ~6 mm) for parenchymal
    mottling, or ``None`` when only the labels matter (tumour placement).
    """

    grid: _Grid
    hu: np.ndarray
    label: np.ndarray
    texture: np.ndarray | None
    skin: np.ndarray | None = None  # radial distance to the skin, mm (negative inside)
    fat: np.ndarray | None = None  # (X, Y, 1) subcutaneous fat thickness, mm
    muscle: np.ndarray | None = None  # (X, Y, 1) abdominal wall muscle thickness, mm
    abdomen: np.ndarray | None = None  # bool: inside the wall muscles, below the diaphragm
    thorax: np.ndarray | None = None  # bool: inside the wall muscles, above the diaphragm

    def tex(self, window: tuple[slice, slice, slice]) -> np.ndarray | float:
        return 0.0 if self.texture is None else self.texture[window]


Value = float | Callable[[_Grid, np.ndarray, "np.ndarray | float"], np.ndarray]
"""A constant HU, or ``f(grid, distance, texture) -> HU`` on a window."""


def _paint(
    canvas: _Canvas,
    bounds: tuple[Point, Point],
    distance: Callable[[_Grid], np.ndarray],
    value: Value,
    *,
    label: int = LABEL_BACKGROUND,
    pad: float = 0.0,
    pad_value: float = -95.0,
    within: np.ndarray | None = None,
) -> None:
    """Paint the voxels where ``distance < 0`` with ``value`` and ``label``.

    A ``pad`` mm shell around the shape is painted with fat first: the fat planes that
    separate organs on CT. ``within`` (a full-volume bool mask) limits both.
    """
    lo, hi = bounds
    window = canvas.grid.window(np.subtract(lo, pad), np.add(hi, pad))
    if window is None:
        return
    g = canvas.grid.sub(window)
    d = np.broadcast_to(distance(g), g.shape)
    allowed = True if within is None else within[window]
    hu, lab = canvas.hu[window], canvas.label[window]
    if pad > 0:
        shell = (d >= 0) & (d < pad) & allowed
        hu[shell] = pad_value
        lab[shell] = LABEL_BACKGROUND
    inside = (d < 0) & allowed
    if callable(value):
        hu[inside] = np.broadcast_to(value(g, d, canvas.tex(window)), g.shape)[inside]
    else:
        hu[inside] = value
    lab[inside] = label


class _Structure(Protocol):
    """Anything that paints itself: its random parameters are drawn at construction, so
    painting is deterministic and can be repeated on any grid."""

    def paint(self, canvas: _Canvas) -> None: ...


# --------------------------------------------------------------------------- layout


class _Layout:
    """Patient-level geometry that every structure is placed against (mm, RAS, centred).

    ``z0`` is the bottom of the liver and ``h`` its height; ``sz = h / 170 mm`` scales the
    cranio-caudal anatomy. ``(x0, y0)`` is the body centre, ``a``/``b``/``b_post`` its
    lateral / anterior / posterior half-axes; ``a_in``, ``b_in`` and ``y_in`` describe the
    abdominal cavity inside the wall muscles.
    """

    def __init__(self, rng: np.random.Generator, slices: int) -> None:
        self.fov = rng.uniform(340.0, 420.0)
        self.dz = rng.uniform(2.5, 5.0)
        self.slices = slices
        length = slices * self.dz
        self.z_range = (-length / 2.0, length / 2.0)
        self.h = min(rng.uniform(0.80, 0.92) * length, rng.uniform(150.0, 190.0))
        self.z0 = -length / 2.0 + (length - self.h) * rng.uniform(0.3, 0.7)
        self.sz = self.h / REFERENCE_LIVER_HEIGHT_MM

        self.a = self.fov / 2.0 * rng.uniform(0.74, 0.88)
        self.b = self.a * rng.uniform(0.64, 0.76)
        self.b_post = self.b * rng.uniform(0.86, 0.96)
        self.p_ant, self.p_post = rng.uniform(2.0, 2.3), rng.uniform(2.4, 3.0)
        self.x0, self.y0 = rng.uniform(-6.0, 6.0), rng.uniform(-8.0, 8.0)
        # Outline harmonics k = 2, 3, 4: (cos, sin) amplitudes and their change along z.
        self.harmonics = rng.normal(0.0, 1.0, (3, 4)) * np.array([[0.014], [0.009], [0.006]])
        self.fat0 = rng.uniform(0.04, 0.19) * self.a  # habitus: wider patients carry more fat
        self.fat_lateral, self.fat_anterior = rng.uniform(0.1, 0.4), rng.uniform(-0.2, 0.3)
        self.muscle0 = rng.uniform(8.0, 12.0)

        fat_post = self.fat_thickness(-math.pi / 2)
        b_ant_in = self.b - self.fat_thickness(math.pi / 2) - self.muscle0 - 5.0
        b_post_in = self.b_post - fat_post - self.muscle0 - 6.0
        self.a_in = self.a - self.fat_thickness(0.0) - self.muscle0
        self.b_in = (b_ant_in + b_post_in) / 2.0
        self.y_in = self.y0 + (b_ant_in - b_post_in) / 2.0

        # Spine and great vessels: the retroperitoneal frame.
        self.xs = self.x0 + rng.uniform(-3.0, 3.0)
        self.y_vb = self.y0 - self.b_post + fat_post + rng.uniform(64.0, 74.0)
        self.vb_axes = (rng.uniform(19.0, 25.0), rng.uniform(14.0, 17.0))
        self.aorta_r = rng.uniform(9.0, 13.0)
        self.aorta = (self.xs - rng.uniform(8.0, 16.0), self.y_vb + self.vb_axes[1] + self.aorta_r + rng.uniform(1.0, 4.0))
        self.ivc_axes = (rng.uniform(10.0, 14.0), rng.uniform(7.0, 10.0))
        self.ivc = (self.xs + rng.uniform(20.0, 28.0), self.y_vb + self.vb_axes[1] + rng.uniform(8.0, 14.0))

        # Diaphragm: two paraboloid domes; the right apex is the top of the liver.
        top = self.z0 + self.h
        self.domes = (
            (self.x0 + 0.35 * self.a_in, self.y_in + 0.1 * self.b_in, top),
            (self.x0 - 0.4 * self.a_in, self.y_in + 0.05 * self.b_in, top - rng.uniform(0.03, 0.12) * self.h),
        )
        self.dome_depth = rng.uniform(0.3, 0.45) * self.h

    def fat_thickness(self, theta: np.ndarray | float) -> np.ndarray | float:
        """Subcutaneous fat thickness (mm) at polar angle ``theta`` (0 right, pi/2 anterior)."""
        t = self.fat0 * (1.0 + self.fat_lateral * np.cos(2 * theta) + self.fat_anterior * np.sin(theta))
        return np.maximum(t, 3.0)

    def muscle_thickness(self, theta: np.ndarray | float) -> np.ndarray | float:
        """Wall muscle thickness (mm): rectus anteriorly, quadratus / latissimus posteriorly."""
        rectus = 5.0 * np.exp(-(((theta - math.pi / 2) / 0.5) ** 2))
        back = 6.0 * np.exp(-(((theta + math.pi / 2) / 0.7) ** 2))
        return self.muscle0 + rectus + back

    def polar(self, g: _Grid) -> tuple[np.ndarray, np.ndarray]:
        """Radius (mm) and angle about the body centre: ``(n, m, 1)`` arrays."""
        dx, dy = g.X - self.x0, g.Y - self.y0
        return np.hypot(dx, dy), np.arctan2(dy, dx)

    def skin_radius(self, theta: np.ndarray, zeta: np.ndarray | float) -> np.ndarray:
        """Body outline radius (mm) at polar angle ``theta`` and relative height ``zeta``
        (-1 at the bottom of the slab, 1 at its top): a superellipse with a flatter back."""
        c, s = np.abs(np.cos(theta)), np.abs(np.sin(theta))
        p = np.where(theta < 0, self.p_post, self.p_ant)
        b = np.where(theta < 0, self.b_post, self.b)
        radius = ((c / self.a) ** p + (s / b) ** p + 1e-12) ** (-1.0 / p)
        wobble = 1.0
        for k, (ca, sa, cz, sz) in enumerate(self.harmonics, start=2):
            wobble = wobble + (ca + cz * zeta) * np.cos(k * theta) + (sa + sz * zeta) * np.sin(k * theta)
        return radius * wobble

    def skin_distance(self, g: _Grid, rho: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Radial distance (mm) to the skin, negative inside: ``(n, m, k)``."""
        zeta = (g.Z - (self.z_range[0] + self.z_range[1]) / 2.0) / max(self.z_range[1], 1.0)
        return (rho - self.skin_radius(theta, zeta)).astype(np.float32)

    def back(self) -> float:
        """The lowest (most posterior) y of the skin over the slab, mm."""
        theta = np.linspace(-math.pi, 0.0, 181)
        return self.y0 + min(float((self.skin_radius(theta, zeta) * np.sin(theta)).min()) for zeta in (-1.0, 1.0))

    def diaphragm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height (mm) of the diaphragm above ``(x, y)``: the upper envelope of the domes."""
        # Shallow in front, deep behind: the posterior costophrenic recesses reach lowest.
        heights = [
            apex
            - self.dome_depth
            * (((x - cx) / (0.65 * self.a_in)) ** 2 + ((y - cy) / np.where(y > cy, 1.7, 1.15) / self.b_in) ** 2)
            for cx, cy, apex in self.domes
        ]
        return np.maximum(*heights)

    def at(self, fx: float, fy: float, fz: float) -> Point:
        """A point given as fractions of the cavity half-axes and of the liver height."""
        return (self.x0 + fx * self.a_in, self.y_in + fy * self.b_in, self.z0 + fz * self.h)


# --------------------------------------------------------------------------- structures


class _Body:
    """Air, table, skin, subcutaneous fat, the muscle wall and the body cavity masks."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        self.lay = lay
        self.fat_hu = rng.uniform(-112.0, -92.0)
        self.muscle_hu = rng.uniform(40.0, 55.0)
        self.table_gap = rng.uniform(0.5, 4.0)

    def paint(self, canvas: _Canvas) -> None:
        lay, g = self.lay, canvas.grid
        rho, theta = lay.polar(g)
        canvas.hu[...] = HU_AIR
        # Patient table: a thin dense shell around a foam core, curving up at the sides.
        top = lay.back() - self.table_gap + (g.X - lay.x0) ** 2 / 2500.0
        depth = top - g.Y
        canvas.hu[...] = np.where((depth >= 0) & (depth < 40.0), -850.0, canvas.hu)
        canvas.hu[...] = np.where(((depth >= 0) & (depth < 2.5)) | ((depth >= 37.5) & (depth < 40.0)), 200.0, canvas.hu)

        skin = lay.skin_distance(g, rho, theta)
        fat = lay.fat_thickness(theta).astype(np.float32)
        muscle = lay.muscle_thickness(theta).astype(np.float32)
        canvas.skin, canvas.fat, canvas.muscle = skin, fat, muscle
        tex = canvas.tex((slice(None),) * 3)
        inside = skin < 0
        canvas.hu[inside] = np.broadcast_to(self.fat_hu + 8.0 * tex, skin.shape)[inside]
        canvas.hu[inside & (skin > -2.0)] = 30.0

        depth = -(skin + fat) / muscle  # 0 at the fat/muscle border, 1 at the cavity
        wall = (depth >= 0) & (depth < 1)
        canvas.hu[wall] = np.broadcast_to(self.muscle_hu + 6.0 * tex, skin.shape)[wall]
        # Fat planes between the lateral muscle layers and along the linea alba.
        lateral = np.abs(np.cos(theta)) > 0.55
        planes = lateral & (np.abs(depth - 0.45) < 0.6 / muscle)
        alba = (np.abs(g.X - lay.x0) < 2.5) & (g.Y > lay.y0)
        canvas.hu[wall & (planes | alba)] = self.fat_hu

        cavity = depth >= 1
        # Visceral fat, with the dots of small mesenteric vessels where the texture peaks.
        visceral = self.fat_hu + 10.0 + 8.0 * tex + np.where(np.asarray(tex) > 2.3, 150.0, 0.0)
        canvas.hu[cavity] = np.broadcast_to(visceral, skin.shape)[cavity]
        below = g.Z < lay.diaphragm(g.X, g.Y)
        canvas.abdomen = cavity & below
        canvas.thorax = cavity & (g.Z >= lay.diaphragm(g.X, g.Y) + 4.0)
        canvas.hu[cavity & ~below & ~canvas.thorax] = self.muscle_hu


class _Thorax:
    """Lung bases above the diaphragm, with vessels, and the heart on its central tendon."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        self.lung_hu = rng.uniform(-880.0, -830.0)
        self.blood_hu = rng.uniform(130.0, 180.0)
        self.heart = _Ellipsoid(
            lay.at(-0.12, rng.uniform(0.25, 0.4), 1.0 + rng.uniform(0.15, 0.25)),
            (0.36 * lay.a_in, 0.42 * lay.b_in, 60.0 * lay.sz),
            rng.uniform(-0.5, -0.2),
        )

    def paint(self, canvas: _Canvas) -> None:
        thorax, tex = canvas.thorax, canvas.tex((slice(None),) * 3)
        lung = np.broadcast_to(self.lung_hu + 20.0 * tex + np.where(np.asarray(tex) > 1.9, 850.0, 0.0), thorax.shape)
        canvas.hu[thorax] = lung[thorax]

        def heart(g: _Grid, d: np.ndarray, t: np.ndarray | float) -> np.ndarray:
            return np.where(d < -9.0, self.blood_hu, 60.0) + 5.0 * t

        _paint(canvas, self.heart.bounds(), self.heart.distance, heart, pad=4.0, within=thorax)


class _Bowel:
    """Small-bowel loops: a thresholded random field, with walls, fluid and gas pockets."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        self.region = _Ellipsoid(lay.at(-0.05, 0.2, rng.uniform(-0.2, 0.05)), (0.85 * lay.a_in, 0.8 * lay.b_in, 0.5 * lay.h))
        lo, hi = self.region.bounds()
        self.loops = _SmoothField(rng, lo, hi, 22.0)
        self.gas = _SmoothField(rng, lo, hi, 14.0)
        self.threshold = rng.uniform(-0.5, 0.1)
        self.gas_threshold = rng.uniform(0.6, 1.4)
        self.content_hu = rng.choice([rng.uniform(5.0, 30.0), rng.uniform(150.0, 300.0)], p=[0.8, 0.2])
        self.wall_hu = rng.uniform(40.0, 70.0)

    def distance(self, g: _Grid) -> np.ndarray:
        loops = (self.threshold - self.loops.on(g)) * 8.0  # field units to ~mm
        return np.maximum(self.region.distance(g), loops)

    def value(self, g: _Grid, d: np.ndarray, t: np.ndarray | float) -> np.ndarray:
        hu = np.where(d > -2.5, self.wall_hu, self.content_hu) + 6.0 * t
        return np.where((d < -3.5) & (self.gas.on(g) > self.gas_threshold), HU_AIR, hu)

    def paint(self, canvas: _Canvas) -> None:
        _paint(canvas, self.region.bounds(), self.distance, self.value, within=canvas.abdomen)


class _Colon:
    """Ascending, transverse and descending colon: a tube of mottled stool and gas."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        path = [(0.68, -0.05, -0.8), (0.68, 0.05, 0.1), (0.45, 0.45, 0.22), (0.0, 0.62, 0.15),
                (-0.4, 0.45, 0.38), (-0.7, 0.0, 0.55), (-0.72, -0.25, -0.8)]  # fmt: skip
        points = [tuple(np.add(lay.at(fx, fy, fz), rng.normal(0.0, [8.0, 8.0, 10.0 * lay.sz]))) for fx, fy, fz in path]
        self.tube = _Tubes.polyline(points, rng.uniform(16.0, 25.0, len(points)))
        lo, hi = self.tube.bounds()
        self.shape = _SmoothField(rng, lo, hi, 30.0)
        self.stool = _SmoothField(rng, lo, hi, 8.0)
        self.gas_threshold = rng.uniform(0.0, 1.2)

    def distance(self, g: _Grid) -> np.ndarray:
        return self.tube.distance(g) + 3.0 * self.shape.on(g)

    def value(self, g: _Grid, d: np.ndarray, t: np.ndarray | float) -> np.ndarray:
        stool = self.stool.on(g)
        content = np.where(stool > self.gas_threshold, HU_AIR, -40.0 + 40.0 * stool)
        return np.where(d > -3.0, 45.0 + 5.0 * t, content)

    def paint(self, canvas: _Canvas) -> None:
        _paint(canvas, self.tube.bounds(4.0), self.distance, self.value, pad=2.5, within=canvas.abdomen)


class _Stomach:
    """Stomach under the left dome: enhancing wall, fluid and an air-fluid level."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        self.body = _Ellipsoid(
            lay.at(-0.38, 0.3, rng.uniform(0.65, 0.8)),
            (rng.uniform(35.0, 50.0), rng.uniform(28.0, 40.0), rng.uniform(40.0, 60.0) * lay.sz),
            rng.uniform(-0.5, 0.2),
        )
        lo, hi = self.body.bounds(10.0)
        self.shape = _SmoothField(rng, lo, hi, 30.0)
        # Supine patient: gas rises to the anterior (high y) side; a level above the
        # lumen (factor > 1) means no gas.
        self.gas_level = self.body.centre[1] + rng.uniform(-0.2, 1.1) * self.body.axes[1]
        self.fluid_hu = rng.uniform(5.0, 25.0)

    def distance(self, g: _Grid) -> np.ndarray:
        return self.body.distance(g) + 6.0 * self.shape.on(g)

    def value(self, g: _Grid, d: np.ndarray, t: np.ndarray | float) -> np.ndarray:
        content = np.where(g.Y > self.gas_level, HU_AIR, self.fluid_hu)
        return np.where(d > -4.0, 60.0 + 6.0 * t, content)

    def paint(self, canvas: _Canvas) -> None:
        _paint(canvas, self.body.bounds(15.0), self.distance, self.value, pad=2.0, within=canvas.abdomen)


def _vessel_tree(
    rng: np.random.Generator, root: np.ndarray, targets: Sequence[np.ndarray], radius: float, depth: int, sz: float
) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Segments of a random binary tree growing from ``root`` towards each of ``targets``."""
    segments = []
    stack = [(root, target - root, 0.55 * float(np.linalg.norm(target - root)), radius, depth) for target in targets]
    while stack:
        start, direction, length, r, level = stack.pop()
        # The liver is flattened in z as much as the slab is: keep branches nearly axial.
        direction = _unit(_unit(direction) + rng.normal(0.0, 0.2, 3)) * np.array([1.0, 1.0, sz])
        end = start + _unit(direction) * length
        segments.append((start, end, r, 0.85 * r))
        if level > 0:
            for side in (-1.0, 1.0):
                normal = rng.normal(0.0, 1.0, 3)
                normal = _unit(normal - (normal @ _unit(direction)) * _unit(direction))
                angle = side * rng.uniform(0.35, 0.8)
                child = math.cos(angle) * _unit(direction) + math.sin(angle) * normal
                stack.append((end, child, length * rng.uniform(0.6, 0.8), 0.75 * r, level - 1))
    return segments


class _Liver:
    """The liver (label 1): right, left and caudate lobes, smoothly merged and perturbed,
    with portal and hepatic vein trees (still labelled liver, as in LiTS)."""

    def __init__(self, rng: np.random.Generator, lay: _Layout, avoid: Sequence[_Ellipsoid]) -> None:
        self.lay = lay
        self.avoid = avoid
        self.lobes = [
            _Ellipsoid(
                lay.at(0.42, -0.05, 0.52),
                (rng.uniform(0.52, 0.62) * lay.a_in, rng.uniform(0.75, 0.9) * lay.b_in, 0.55 * lay.h),
                rng.uniform(-0.15, 0.15),
                (-0.12 * lay.a_in, 0.18 * lay.b_in),
            ),
            _Ellipsoid(
                lay.at(-0.05, 0.42, rng.uniform(0.65, 0.78)),
                (rng.uniform(0.4, 0.58) * lay.a_in, rng.uniform(0.28, 0.38) * lay.b_in, 0.3 * lay.h),
                rng.uniform(0.1, 0.35),
            ),
            _Ellipsoid((lay.xs + 15.0, lay.y_vb + 45.0, lay.z0 + 0.62 * lay.h), (20.0, 18.0, 0.22 * lay.h)),
        ]
        lo = np.min([lobe.bounds()[0] for lobe in self.lobes], axis=0) - 10.0
        hi = np.max([lobe.bounds()[1] for lobe in self.lobes], axis=0) + 10.0
        self.box = (tuple(lo), tuple(hi))
        self.shape = _SmoothField(rng, lo, hi, 45.0)
        self.bumpiness = rng.uniform(6.0, 10.0)
        self.hu = rng.uniform(80.0, 112.0)
        self.vessel_hu = self.hu + rng.uniform(60.0, 100.0)

        portal = np.array(lay.at(0.15, 0.05, 0.4))
        portal_targets = [lay.at(0.75, -0.1, 0.45), lay.at(-0.3, 0.45, 0.7), lay.at(0.4, 0.5, 0.55), lay.at(0.6, -0.5, 0.7)]
        hepatic = np.array((*lay.ivc, lay.z0 + 0.85 * lay.h))
        hepatic_targets = [lay.at(0.8, -0.2, 0.5), lay.at(0.25, 0.6, 0.45), lay.at(-0.35, 0.5, 0.7)]
        segments = _vessel_tree(rng, portal, [np.array(t) for t in portal_targets], rng.uniform(7.0, 9.0), 3, lay.sz)
        segments += _vessel_tree(rng, hepatic, [np.array(t) for t in hepatic_targets], rng.uniform(6.0, 8.0), 3, lay.sz)
        starts, ends, r0, r1 = zip(*segments)
        self.vessels = _Tubes(np.array(starts), np.array(ends), np.array(r0), np.array(r1))

    def distance(self, g: _Grid) -> np.ndarray:
        d = _smooth_union([lobe.distance(g) for lobe in self.lobes], 6.0) + self.bumpiness * self.shape.on(g)
        for shape in self.avoid:
            d = np.maximum(d, -shape.distance(g))
        # A tapered tip rather than a cut at the bottom of the liver frame.
        return np.maximum(d, (self.lay.z0 - g.Z) * 2.0)

    def value(self, g: _Grid, d: np.ndarray, t: np.ndarray | float) -> np.ndarray:
        return np.where(self.vessels.distance(g) < 0, self.vessel_hu, self.hu) + 7.0 * t

    def paint(self, canvas: _Canvas) -> None:
        _paint(canvas, self.box, self.distance, self.value, label=LABEL_LIVER, pad=2.0, within=canvas.abdomen)


class _Spleen:
    """Spleen (patient's left, posterolateral): a crescent hugging the wall."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        centre = (lay.x0 - lay.a_in + rng.uniform(24.0, 34.0), lay.y_in - 0.35 * lay.b_in + rng.uniform(-10.0, 10.0),
                  lay.z0 + rng.uniform(0.6, 0.75) * lay.h)  # fmt: skip
        theta = math.atan2(centre[1] - lay.y0, centre[0] - lay.x0)
        axes = (rng.uniform(18.0, 25.0), rng.uniform(42.0, 58.0), rng.uniform(45.0, 60.0) * lay.sz)
        self.body = _Ellipsoid(centre, axes, theta)  # thin axis radial, long axis along the wall
        inward = -1.2 * axes[0] * np.array([math.cos(theta), math.sin(theta)])
        self.hilum = _Ellipsoid((centre[0] + inward[0], centre[1] + inward[1], centre[2]),
                                (0.9 * axes[0], 0.55 * axes[1], 0.7 * axes[2]), theta)  # fmt: skip
        lo, hi = self.body.bounds(10.0)
        self.shape = _SmoothField(rng, lo, hi, 25.0)
        self.hu = rng.uniform(95.0, 125.0)

    def distance(self, g: _Grid) -> np.ndarray:
        return np.maximum(self.body.distance(g), -self.hilum.distance(g)) + 4.0 * self.shape.on(g)

    def paint(self, canvas: _Canvas) -> None:
        _paint(canvas, self.body.bounds(12.0), self.distance, lambda g, d, t: self.hu + 5.0 * t, pad=2.5,
               within=canvas.abdomen)  # fmt: skip


class _Pancreas:
    """Pancreas from the head (right) to the tail at the splenic hilum, lobulated."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        yv = lay.y_vb
        points = [
            (lay.xs + rng.uniform(30.0, 45.0), yv + rng.uniform(40.0, 50.0), lay.z0 + 0.28 * lay.h),
            (lay.xs + 5.0, yv + rng.uniform(50.0, 60.0), lay.z0 + 0.36 * lay.h),
            (lay.xs - 35.0, yv + rng.uniform(45.0, 55.0), lay.z0 + 0.44 * lay.h),
            (lay.x0 - lay.a_in + rng.uniform(45.0, 60.0), yv + rng.uniform(15.0, 30.0), lay.z0 + 0.55 * lay.h),
        ]
        self.tube = _Tubes.polyline(points, [14.0, 8.0, 10.0, 9.0])
        lo, hi = self.tube.bounds(5.0)
        self.shape = _SmoothField(rng, lo, hi, 8.0)
        self.hu = rng.uniform(85.0, 120.0)

    def distance(self, g: _Grid) -> np.ndarray:
        return self.tube.distance(g) + 2.5 * self.shape.on(g)

    def paint(self, canvas: _Canvas) -> None:
        _paint(canvas, self.tube.bounds(8.0), self.distance, lambda g, d, t: self.hu + 12.0 * t, pad=2.0,
               within=canvas.abdomen)  # fmt: skip


class _Kidney:
    """A kidney: bean-shaped enhancing parenchyma with a fatty renal sinus at the hilum."""

    def __init__(self, rng: np.random.Generator, lay: _Layout, side: float, z_centre: float) -> None:
        centre = (lay.xs + side * (lay.vb_axes[0] + rng.uniform(35.0, 45.0)), lay.y_vb - rng.uniform(0.0, 15.0), z_centre)
        axes = (rng.uniform(28.0, 34.0), rng.uniform(20.0, 25.0), rng.uniform(50.0, 60.0) * lay.sz)
        # Long in-plane axis anterolateral to posteromedial; the hilum faces anteromedially.
        tilt = rng.uniform(0.6, 1.05)
        angle = tilt if side > 0 else math.pi - tilt
        hilum = side * np.array([-math.sin(angle), math.cos(angle)])
        self.body = _Ellipsoid(centre, axes, angle)
        notch = np.add(centre[:2], hilum * 0.85 * axes[1])
        self.notch = _Ellipsoid((*notch, centre[2]), (0.4 * axes[0], 0.5 * axes[1], 0.55 * axes[2]), angle)
        sinus = np.add(centre[:2], hilum * 0.35 * axes[1])
        self.sinus = _Ellipsoid((*sinus, centre[2]), (0.4 * axes[0], 0.4 * axes[1], 0.6 * axes[2]), angle)
        # The kidney and the retroperitoneum behind it, which intraperitoneal organs avoid.
        self.shadow = _Ellipsoid((centre[0], centre[1] - 15.0, centre[2]), (axes[0] + 8.0, axes[1] + 20.0, axes[2] + 6.0), angle)
        self.cortex_hu = rng.uniform(150.0, 200.0)
        self.medulla_hu = self.cortex_hu - rng.uniform(0.0, 25.0)

    def distance(self, g: _Grid) -> np.ndarray:
        return np.maximum(self.body.distance(g), -self.notch.distance(g))

    def value(self, g: _Grid, d: np.ndarray, t: np.ndarray | float) -> np.ndarray:
        sinus = self.sinus.distance(g)
        hu = np.where((d > -6.0) | (sinus < 3.0), self.cortex_hu, self.medulla_hu)
        hu = np.where(sinus < 0, np.where(sinus < -5.0, 10.0, -60.0), hu)
        return hu + 5.0 * t

    def paint(self, canvas: _Canvas) -> None:
        _paint(canvas, self.body.bounds(), self.distance, self.value, pad=3.0, within=canvas.abdomen)


class _GreatVessels:
    """Aorta (with occasional wall calcification), IVC, SMA and SMV, and the psoas muscles."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        self.lay = lay
        self.aorta_hu = rng.uniform(150.0, 260.0)
        self.ivc_hu = rng.uniform(110.0, 150.0)
        self.muscle_hu = rng.uniform(40.0, 55.0)
        z_lo, z_hi = lay.z_range[0] - 10.0, lay.z_range[1] + 10.0
        self.z = (z_lo, z_hi)
        ax, ay = lay.aorta
        spots = rng.integers(1, 5) if rng.uniform() < 0.4 else 0
        self.plaques = [
            (ax + (lay.aorta_r - 1.0) * math.cos(phi), ay + (lay.aorta_r - 1.0) * math.sin(phi), rng.uniform(z_lo, z_hi),
             rng.uniform(1.2, 2.5), rng.uniform(2.0, 6.0))  # fmt: skip
            for phi in rng.uniform(0.0, 2 * math.pi, spots)
        ]
        y_sma = ay + lay.aorta_r + rng.uniform(10.0, 15.0)
        self.sma = (lay.xs - 2.0, y_sma)
        self.smv = (lay.xs + rng.uniform(10.0, 14.0), y_sma + 3.0)
        self.psoas_x = lay.vb_axes[0] + rng.uniform(8.0, 14.0)

    def paint(self, canvas: _Canvas) -> None:
        lay = self.lay
        limit = lay.z0 + 0.35 * lay.h

        # Psoas: absent above the kidneys' hila, thickening towards the pelvis.
        def psoas(side: float) -> Callable[[_Grid], np.ndarray]:
            def distance(g: _Grid) -> np.ndarray:
                grow = np.clip((limit - g.Z) / (0.8 * lay.h), 0.0, 1.0)
                ax, ay = 4.0 + 16.0 * grow, 4.0 + 14.0 * grow
                cx = lay.xs + side * (self.psoas_x + ax)
                r = np.sqrt(((g.X - cx) / ax) ** 2 + ((g.Y - lay.y_vb - 2.0) / ay) ** 2)
                return ((r - 1.0) * np.minimum(ax, ay) + np.where(grow > 0, 0.0, 1e3)).astype(np.float32)

            return distance

        for side in (-1.0, 1.0):
            box = ((lay.xs + side * self.psoas_x - 45.0, lay.y_vb - 25.0, self.z[0]),
                   (lay.xs + side * self.psoas_x + 45.0, lay.y_vb + 25.0, limit))  # fmt: skip
            _paint(canvas, box, psoas(side), lambda g, d, t: self.muscle_hu + 5.0 * t, pad=2.0)

        # Vertical vessels: elliptic cylinders (a huge z semi-axis), cut to z_top by the box.
        tubes = [
            (lay.ivc, lay.ivc_axes, self.z[1], self.ivc_hu, 0.0),
            (lay.aorta, (lay.aorta_r, lay.aorta_r), self.z[1], self.aorta_hu, 1.5),
            (self.sma, (3.5, 3.5), limit, self.aorta_hu, 1.5),
            (self.smv, (5.5, 5.0), limit, self.ivc_hu + 20.0, 1.0),
        ]
        for (cx, cy), (ax, ay), z_top, hu, pad in tubes:
            shape = _Ellipsoid((cx, cy, 0.0), (ax, ay, 1e4))
            box = ((cx - ax, cy - ay, self.z[0]), (cx + ax, cy + ay, z_top))
            _paint(canvas, box, shape.distance, lambda g, d, t, hu=hu: hu + 5.0 * t, pad=pad)
        for x, y, z, r, half in self.plaques:
            plaque = _Ellipsoid((x, y, z), (r, r, half))
            _paint(canvas, plaque.bounds(), plaque.distance, 800.0)


class _Spine:
    """Vertebrae (cortex, marrow, discs, canal, posterior elements) and the paraspinal muscles."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        self.lay = lay
        self.period = rng.uniform(30.0, 36.0) * lay.sz
        self.phase0 = rng.uniform(0.0, 1.0)
        self.canal_r = rng.uniform(8.0, 10.0)
        self.spinous_length = rng.uniform(22.0, 32.0)
        self.transverse_length = rng.uniform(12.0, 22.0)
        self.transverse_rise = rng.uniform(0.0, 8.0)
        self.paraspinal_half_width = rng.uniform(22.0, 29.0)
        self.marrow_hu = rng.uniform(180.0, 290.0)
        self.cortex_hu = rng.uniform(700.0, 1000.0)
        self.muscle_hu = rng.uniform(40.0, 55.0)

    def paint(self, canvas: _Canvas) -> None:
        lay = self.lay
        xs, y_vb, (vb_a, vb_b), rc = lay.xs, lay.y_vb, lay.vb_axes, self.canal_r
        y_canal = y_vb - vb_b - rc + 2.0
        y_lamina = y_canal - rc - 5.0
        y_back = lay.y0 - lay.b_post + lay.fat_thickness(-math.pi / 2)  # the back muscles' surface
        spinous_length = min(self.spinous_length, y_lamina - y_back - 8.0)
        window = canvas.grid.window((xs - 110.0, y_back - 10.0, -np.inf),
                                    (xs + 110.0, y_vb + vb_b + 5.0, np.inf))  # fmt: skip
        if window is None:
            return
        g = canvas.grid.sub(window)
        hu, lab, tex = canvas.hu[window], canvas.label[window], canvas.tex(window)
        flat = _Grid(g.x, g.y, np.zeros(1, np.float32))

        # Erector spinae either side of the spinous process, inside the subcutaneous fat.
        under_fat = (canvas.skin[window] + canvas.fat[window[0], window[1]]) < 0
        w = self.paraspinal_half_width
        half_height = (y_canal + 5.0 - y_back) / 2.0
        for side in (-1.0, 1.0):
            # A squarish (superelliptic) section that meets its twin at the midline.
            u = np.abs(flat.X - (xs + side * (w + 3.0))) / w
            v = np.abs(flat.Y - (y_back + half_height)) / half_height
            region = (u**2.5 + v**2.5 < 1.0) & under_fat
            hu[region] = np.broadcast_to(self.muscle_hu + 6.0 * tex, g.shape)[region]
            lab[region] = LABEL_BACKGROUND

        phase = ((g.Z - lay.z0) / self.period + self.phase0) % 1.0  # (1, 1, k): 0 = disc centre
        disc = (phase < 0.12) | (phase > 0.88)
        canal = _Ellipsoid((xs, y_canal, 0.0), (rc, rc, 1e4)).distance(flat)
        body = np.maximum(_Ellipsoid((xs, y_vb, 0.0), (vb_a, vb_b, 1e4)).distance(flat), -(canal - 1.0))
        parts = []
        for side in (-1.0, 1.0):
            xp = xs + side * (rc + 2.5)
            parts += [
                ((xp, y_vb - vb_b + 4.0), (xp, y_canal - 2.0), 3.5, (0.3, 0.65)),  # pedicle
                ((xp, y_canal - 2.0), (xs, y_lamina), 3.0, (0.45, 0.98)),  # lamina
                ((xp, y_canal), (xp + side * self.transverse_length, y_canal + self.transverse_rise), 3.0, (0.35, 0.6)),
            ]
        parts.append(((xs, y_lamina), (xs, y_lamina - spinous_length), 3.5, (0.45, 0.98)))  # spinous process

        bone = np.full(g.shape, np.inf, np.float32)
        bone = np.where(disc, bone, body)
        for p0, p1, r, (start, stop) in parts:
            d = _segment_distance(flat, np.array([*p0, 0.0]), np.array([*p1, 0.0]), r, r)
            bone = np.where((phase > start) & (phase < stop), np.minimum(bone, d), bone)
        disc_mask = np.broadcast_to((body < 0) & disc, g.shape)
        hu[disc_mask] = np.broadcast_to(90.0 + 8.0 * tex, g.shape)[disc_mask]
        inside = bone < 0
        value = np.where(bone > -1.8, self.cortex_hu, self.marrow_hu + 40.0 * tex)
        hu[inside] = np.broadcast_to(value, g.shape)[inside]
        canal_mask = np.broadcast_to(canal < 0, g.shape)
        hu[canal_mask] = np.broadcast_to(15.0 + 5.0 * tex, g.shape)[canal_mask]
        lab[inside | disc_mask | canal_mask] = LABEL_BACKGROUND


class _Ribs:
    """Ribs and costal cartilages cut obliquely: each rib descends as it runs forward.

    A rib is a band in (angle from the back ``phi``, height ``z``) on the mid-line of the
    wall muscles: ``z = z_n - slope * phi``. Lower ribs stop earlier (the costal margin)."""

    def __init__(self, rng: np.random.Generator, lay: _Layout) -> None:
        self.lay = lay
        self.pitch = rng.uniform(22.0, 26.0) * lay.sz
        self.slope = rng.uniform(35.0, 45.0) * lay.sz
        self.half_height = rng.uniform(5.0, 6.5) * lay.sz
        self.half_thickness = rng.uniform(3.2, 4.2)
        top = lay.z_range[1] + 3.0 * self.slope
        count = int((top - (lay.z0 + 0.3 * lay.h)) / self.pitch) + 1
        self.anchors = [top - self.pitch * (np.arange(count) + offset) + rng.normal(0.0, 0.05 * self.pitch, count)
                        for offset in rng.uniform(-0.3, 0.3, 2)]  # fmt: skip
        self.cortex_hu = rng.uniform(650.0, 900.0)
        self.marrow_hu = rng.uniform(180.0, 280.0)
        self.cartilage_hu = rng.uniform(120.0, 200.0)

    def paint(self, canvas: _Canvas) -> None:
        lay, g = self.lay, canvas.grid
        offset = canvas.skin + canvas.fat + canvas.muscle / 2.0  # radial, from mid-muscle
        i, j, k = np.nonzero(np.abs(offset) < self.half_thickness)
        if i.size == 0:
            return
        dx, dy = g.x[i] - lay.x0, g.y[j] - lay.y0
        phi = np.arccos(np.clip(-dy / np.maximum(np.hypot(dx, dy), 1e-6), -1.0, 1.0))  # 0 at the back
        radial = offset[i, j, k] / self.half_thickness
        z = g.z[k]
        hu = np.full(i.size, np.nan, np.float32)
        for side, anchors in zip((1.0, -1.0), self.anchors):
            on_side = (dx * side) > 0
            for anchor in anchors:
                frac = float(np.clip(((anchor - lay.z0) / lay.h - 0.35) / 0.95, 0.0, 1.0))
                phi_max = 1.6 + 1.35 * frac
                q = ((z - (anchor - self.slope * phi)) / self.half_height) ** 2 + radial**2
                rib = on_side & (q < 1.0) & (phi > 0.7) & (phi < phi_max)
                bone = np.where(q > 0.55, self.cortex_hu, self.marrow_hu)
                hu = np.where(rib, np.where(phi > min(phi_max, 2.25), self.cartilage_hu, bone), hu)
        hit = ~np.isnan(hu)
        canvas.hu[i[hit], j[hit], k[hit]] = hu[hit]
        canvas.label[i[hit], j[hit], k[hit]] = LABEL_BACKGROUND


class _Tumour:
    """A hypodense lesion (label 2): a lumpy sphere, heterogeneous, sometimes with an
    enhancing rim or a necrotic core; clipped to the interior of the liver."""

    def __init__(self, rng: np.random.Generator, centre: np.ndarray, radius: float, liver_hu: float) -> None:
        self.centre, self.radius = centre, radius
        self.lumps = _SmoothField(rng, (-1.6,) * 3, (1.6,) * 3, 0.9)
        self.lumpiness = rng.uniform(0.08, 0.22)
        self.hu = liver_hu - rng.uniform(25.0, 55.0)
        self.rim = rng.uniform(10.0, 20.0) if rng.uniform() < 0.3 and radius > 8.0 else 0.0
        self.necrosis = rng.uniform(10.0, 25.0) if radius > 15.0 else 0.0

    def distance(self, g: _Grid) -> np.ndarray:
        cx, cy, cz = self.centre
        lumps = self.lumps.sample((g.x - cx) / self.radius, (g.y - cy) / self.radius, (g.z - cz) / self.radius)
        r = np.sqrt((g.X - cx) ** 2 + (g.Y - cy) ** 2 + (g.Z - cz) ** 2)
        return (r - self.radius * (1.0 + self.lumpiness * np.clip(lumps, -2.0, 2.0))).astype(np.float32)

    def value(self, d: np.ndarray, t: np.ndarray | float) -> np.ndarray:
        hu = self.hu + 6.0 * t + np.where(d > -2.0, self.rim, 0.0)
        return hu - np.where(d < -0.5 * self.radius, self.necrosis, 0.0)

    def paint(self, canvas: _Canvas) -> None:
        reach = self.radius * (1.0 + 2.0 * self.lumpiness)
        window = canvas.grid.window(self.centre - reach, self.centre + reach)
        if window is None:
            return
        # One voxel more on each side, so that the erosion below sees the window's border.
        window = tuple(slice(max(w.start - 1, 0), w.stop + 1) for w in window)
        g = canvas.grid.sub(window)
        lab = canvas.label[window]
        interior = ndi.binary_erosion(lab != LABEL_BACKGROUND, np.ones((3, 3, 3), bool), border_value=0)
        d = self.distance(g)
        inside = (d < 0) & interior
        canvas.hu[window][inside] = np.broadcast_to(self.value(d, canvas.tex(window)), g.shape)[inside]
        lab[inside] = LABEL_TUMOR


# --------------------------------------------------------------------------- assembly


def _draw_anatomy(rng: np.random.Generator, lay: _Layout) -> tuple[list[_Structure], _Liver]:
    """All structures in painting order (later ones win), and the liver among them."""
    bowel, colon, stomach = _Bowel(rng, lay), _Colon(rng, lay), _Stomach(rng, lay)
    z_right = lay.z0 + rng.uniform(0.0, 0.2) * lay.h
    kidneys = [_Kidney(rng, lay, 1.0, z_right), _Kidney(rng, lay, -1.0, z_right + rng.uniform(5.0, 20.0) * lay.sz)]
    liver = _Liver(rng, lay, [kidney.shadow for kidney in kidneys])
    spleen, pancreas = _Spleen(rng, lay), _Pancreas(rng, lay)
    structures = [_Body(rng, lay), _Thorax(rng, lay), bowel, colon, stomach, liver, spleen, pancreas, *kidneys,
                  _GreatVessels(rng, lay), _Spine(rng, lay), _Ribs(rng, lay)]  # fmt: skip
    return structures, liver


def _render(structures: Sequence[_Structure], grid: _Grid, texture: np.ndarray | None) -> _Canvas:
    """Paint ``structures`` in order on ``grid``; ``texture`` as in :class:`_Canvas`."""
    canvas = _Canvas(grid, np.empty(grid.shape, np.float32), np.zeros(grid.shape, np.uint8), texture)
    for structure in structures:
        structure.paint(canvas)
    return canvas


def _place_tumours(rng: np.random.Generator, lay: _Layout, structures: Sequence[_Structure], liver: _Liver) -> list[_Tumour]:
    """Draw 0-4 tumours with centres deep enough inside the liver for their size.

    The liver is rendered on a coarse grid fixed in mm (not in pixels), so the choice does
    not depend on the image size.
    """
    half = lay.fov / 2.0
    axis = np.arange(-half, half + 1e-6, PLACEMENT_STEP_MM, dtype=np.float32)
    z = ((np.arange(lay.slices) - (lay.slices - 1) / 2.0) * lay.dz).astype(np.float32)
    grid = _Grid(axis, axis, z)
    inside = _render(structures, grid, None).label == LABEL_LIVER
    depth = ndi.distance_transform_edt(inside, sampling=(PLACEMENT_STEP_MM, PLACEMENT_STEP_MM, lay.dz)) if inside.any() else None

    count = rng.choice(len(TUMOUR_COUNT_PROBABILITIES), p=TUMOUR_COUNT_PROBABILITIES)
    radii = np.sort(np.exp(rng.uniform(*np.log(TUMOUR_DIAMETER_MM), count)))[::-1] / 2.0
    tumours: list[_Tumour] = []
    if depth is None:
        return tumours
    for radius in radii:
        room = depth.copy()
        for t in tumours:  # keep lesions apart so that each stays countable
            gap = np.sqrt((grid.X - t.centre[0]) ** 2 + (grid.Y - t.centre[1]) ** 2 + (grid.Z - t.centre[2]) ** 2)
            np.minimum(room, gap - 1.3 * t.radius, out=room)
        # Room for the radius, most of its lumps and the coarse grid's error; painting
        # clips whatever still sticks out.
        radius = min(radius, (float(room.max()) - PLACEMENT_STEP_MM) / 1.3)
        if radius < TUMOUR_DIAMETER_MM[0] / 2.0:
            continue
        candidates = np.flatnonzero(room >= 1.3 * radius + PLACEMENT_STEP_MM)
        if candidates.size == 0:
            continue
        i, j, k = np.unravel_index(rng.choice(candidates), room.shape)
        jitter = rng.uniform(-0.5, 0.5, 2) * PLACEMENT_STEP_MM
        centre = np.array([axis[i] + jitter[0], axis[j] + jitter[1], z[k]], np.float64)
        tumours.append(_Tumour(rng, centre, float(radius), liver.hu))
    return tumours


def _check_arguments(**values: int) -> None:
    minimum = {"volumes": 1, "size": 32, "slices": 1}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum[name]:
            raise ValueError(f"{name} must be an integer >= {minimum[name]}, got {value!r}")


def generate_phantom(rng: np.random.Generator, size: int = 512, slices: int = 32, case_id: str = "0") -> CTVolume:
    """Draw one synthetic contrast-enhanced abdominal CT volume with liver/tumour labels.

    Args:
        rng: the source of randomness; the same generator state gives the same volume.
        size: in-plane matrix (``size x size`` pixels), at least 32. The field of view
            (340-420 mm) is drawn per volume and does not depend on ``size``, so the pixel
            spacing is ``fov / size``.
        slices: number of axial slices (slice thickness 2.5-5 mm, drawn per volume).
        case_id: the returned volume's identifier.

    Returns:
        a :class:`~training.volume.CTVolume`: ``hu`` ``(size, size, slices)`` float32 in
        [-1024, 3071] HU, ``segmentation`` uint8 (0 background, 1 liver, 2 tumour), and a
        diagonal RAS+ affine (mm) centred on the volume.
    """
    _check_arguments(size=size, slices=slices)
    lay = _Layout(rng, slices)
    structures, liver = _draw_anatomy(rng, lay)
    half = lay.fov / 2.0
    mottle = _SmoothField(rng, (-half, -half, lay.z_range[0]), (half, half, lay.z_range[1]), 6.0)
    tumours = _place_tumours(rng, lay, structures, liver)

    # Everything above is independent of `size`; only the sampling and the noise below use it.
    spacing = lay.fov / size
    axis = ((np.arange(size) - (size - 1) / 2.0) * spacing).astype(np.float32)
    z = ((np.arange(slices) - (slices - 1) / 2.0) * lay.dz).astype(np.float32)
    grid = _Grid(axis, axis, z)
    canvas = _render(structures, grid, mottle.on(grid))
    for tumour in tumours:
        tumour.paint(canvas)

    hu = canvas.hu
    # Scanner point-spread (~0.5 mm) and quantum noise correlated over about a pixel.
    hu = ndi.gaussian_filter(hu, (0.5 / spacing, 0.5 / spacing, 0.0), mode="nearest", truncate=3.0)
    noise = ndi.gaussian_filter(rng.standard_normal(hu.shape, dtype=np.float32), (0.8, 0.8, 0.0), mode="wrap")
    hu += noise * (rng.uniform(10.0, 18.0) / max(float(noise.std()), 1e-6))
    outside = (axis[:, None] ** 2 + axis[None, :] ** 2) > half**2  # the reconstruction circle
    hu[outside] = HU_PADDING
    np.clip(hu, HU_PADDING, HU_MAX, out=hu)

    affine = np.diag([spacing, spacing, lay.dz, 1.0])
    affine[:3, 3] = (-(size - 1) / 2.0 * spacing, -(size - 1) / 2.0 * spacing, -(slices - 1) / 2.0 * lay.dz)
    return CTVolume(case_id=case_id, hu=hu, segmentation=canvas.label, affine=affine,
                    sources=["synthetic phantom"])  # fmt: skip


def write_phantom_dataset(
    out: str | Path, volumes: int, size: int = 512, slices: int = 32, seed: int = 0, progress: bool = True
) -> list[tuple[Path, Path]]:
    """Write ``volumes`` phantoms as LiTS ``volume-K.nii.gz`` / ``segmentation-K.nii.gz`` pairs.

    Volume ``K`` is drawn from its own generator, seeded by ``(seed, K)``, so it is the same
    whatever ``volumes`` is. Files are written atomically.

    Args:
        out: output folder (created if missing).
        volumes: number of cases, K = 0 .. volumes - 1.
        size: in-plane matrix, pixels (>= 32).
        slices: slices per volume (>= 1).
        seed: data-set seed.
        progress: show a progress bar.

    Returns:
        the ``(volume, segmentation)`` paths, in order of K.
    """
    _check_arguments(volumes=volumes, size=size, slices=slices)
    out = Path(out)
    paths = []
    for index in tqdm(range(volumes), desc="phantoms", unit="volume", disable=not progress):
        rng = np.random.default_rng(np.random.SeedSequence((seed, index)))
        paths.append(write_lits_case(out, index, generate_phantom(rng, size, slices, case_id=str(index))))
    return paths
