"""Synthetic abdominal CT phantoms: UniMOS's embedded default data (no download needed).

A phantom is described in millimetres in an *anatomy frame* whose axes are the LPS axes (x towards
the patient's left, y posterior, z superior) and whose origin lies on the body axis at the height of
the liver dome. It is painted on the canonical LPS grid of :mod:`data.volume` (array ``[S, P, L]``),
then stored the way the real dataset stores its files (axis flips / permutation with the matching
direction matrix and origin), so ``to_canonical(read_volume(file))`` gives back the same anatomy.

Anatomy: body ellipse with subcutaneous fat and a muscle wall; in the abdominal cavity bowel with
mesenteric fat and gas, lung bases, liver (two lobes), gallbladder, stomach with a gas cap, pancreas,
spleen, two kidneys with sinus fat, aorta, IVC, psoas and paraspinal muscles, vertebrae with discs.
Organs are deformed ellipsoids (low-order harmonic radius modulation plus a smooth random bump
field); positions, sizes and HU values are drawn per case; liver and spleen have similar HU, so a
model has to learn shape and position. HU values follow the portal venous phase that LiTS, KiTS and
MSD Spleen were mostly acquired in (enhancing parenchyma ~100-130 HU, kidneys brighter, hypodense
tumours); a non-contrast liver/spleen would sit within noise of the abdominal wall muscle, which no
real training set of these organs looks like.

Speed: structures are painted at most ``BASE_SIZE`` voxels across in-plane and only inside their
bounding boxes; intensities (with noise, so the noise comes out correlated) are upsampled linearly
and the tissue map by repetition, so label maps stay nearest neighbour.

Determinism: every case draws from ``np.random.default_rng([seed, dataset code, case number])``;
no global random state.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.volume import Geometry, Volume, to_storage, write_volume
from utils.errors import InputError

BASE_SIZE = 256  # largest in-plane grid painted before upsampling
MAX_DEFORM = 0.2  # organ surface deformation, as a fraction of the radius (bounds the z extent)
PADDING_HU = -1024.0  # outside the circular reconstruction field of view
MARKER = ".phantom.json"  # lists the files synth.py wrote in a dataset folder (rerun clean-up)


# ----------------------------------------------------------------------------------------------
# Tissues


@dataclass(frozen=True)
class Tissue:
    """One tissue class of the phantom.

    Attributes:
        name: identifier (also used by the dataset label tables).
        hu: range the case's mean HU is drawn from (uniformly).
        texture: amplitude (HU, one standard deviation) of smooth intensity variation inside.
    """

    name: str
    hu: tuple[float, float]
    texture: float


TISSUES: tuple[Tissue, ...] = (
    Tissue("air", (-1000.0, -1000.0), 0.0),
    Tissue("fat", (-120.0, -85.0), 8.0),
    Tissue("muscle", (42.0, 58.0), 4.0),
    Tissue("bowel", (15.0, 40.0), 10.0),
    Tissue("lung", (-880.0, -820.0), 20.0),
    Tissue("bone", (450.0, 650.0), 50.0),
    Tissue("disc", (70.0, 100.0), 5.0),
    Tissue("canal", (15.0, 35.0), 3.0),
    Tissue("aorta", (185.0, 245.0), 4.0),
    Tissue("ivc", (110.0, 160.0), 4.0),
    Tissue("liver", (100.0, 122.0), 4.0),
    Tissue("liver_tumour", (35.0, 60.0), 4.0),
    Tissue("gallbladder", (2.0, 18.0), 2.0),
    Tissue("stomach", (25.0, 45.0), 6.0),
    Tissue("stomach_gas", (-950.0, -850.0), 10.0),
    Tissue("pancreas", (80.0, 105.0), 5.0),
    Tissue("spleen", (106.0, 128.0), 4.0),
    Tissue("kidney_r", (155.0, 195.0), 6.0),
    Tissue("kidney_l", (155.0, 195.0), 6.0),
    Tissue("kidney_tumour_r", (60.0, 100.0), 5.0),
    Tissue("kidney_tumour_l", (60.0, 100.0), 5.0),
)
TISSUE_ID: dict[str, int] = {t.name: i for i, t in enumerate(TISSUES)}

# Organ -> its tissues (what a label of that organ covers); used by tests and summaries.
ORGAN_TISSUES: dict[str, tuple[str, ...]] = {
    "liver": ("liver", "liver_tumour"),
    "kidney": ("kidney_r", "kidney_l", "kidney_tumour_r", "kidney_tumour_l"),
    "spleen": ("spleen",),
}


# ----------------------------------------------------------------------------------------------
# Dataset styles: how each real dataset looks on disk


@dataclass(frozen=True)
class DatasetStyle:
    """File layout, grid, storage orientation and intensities of one imitated dataset.

    Attributes:
        name: dataset folder name (as in ``configs/default.yaml``).
        code: part of every case's random seed, so a case does not depend on ``--datasets``.
        image_name / label_name: file name patterns, formatted with the case number ``n``.
        first_number: number of the first case.
        inplane_size: in-plane voxels at ``scale`` 1 (square).
        inplane_spacing: in-plane spacing range (mm) at ``scale`` 1, drawn per case.
        slice_spacing: slice spacings (mm) drawn from per case.
        direction: storage direction matrix (row-major; columns = LPS directions of index axes).
        dtype: image dtype on disk.
        hu_offset: calibration shift added to every voxel (HU).
        noise_sigma: range of the image noise standard deviation (HU), drawn per case.
        labels: tissue name -> value in this dataset's label files (other tissues are 0).
        liver_tumours / kidney_tumours: tumour counts drawn from per case.
        unlabeled: whether the dataset has an unlabeled/ split.
        tight_prob: probability that a case is a body-tight, non-square crop instead of the
            scanner's square field of view (``inplane_size`` x ``inplane_spacing``: 358-500 mm).
    """

    name: str
    code: int
    image_name: str
    label_name: str
    first_number: int
    inplane_size: int
    inplane_spacing: tuple[float, float]
    slice_spacing: tuple[float, ...]
    direction: tuple[float, ...]
    dtype: str
    hu_offset: float
    noise_sigma: tuple[float, float]
    labels: dict[str, int]
    liver_tumours: tuple[int, ...] = (0,)
    kidney_tumours: tuple[int, ...] = (0,)
    unlabeled: bool = True
    tight_prob: float = 0.3


_RAS_LIKE = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # i -> right, j -> anterior (dcm2niix)
# KiTS19: i runs superior -> inferior, j posterior, k left; numpy's last axis is the slice axis.
_SLICES_FIRST = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
_ANTERIOR_INFERIOR = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)  # slices stored top-down
_LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

DATASET_STYLES: dict[str, DatasetStyle] = {
    "LiTS": DatasetStyle(
        name="LiTS", code=1, image_name="volume-{n}.nii", label_name="segmentation-{n}.nii",
        first_number=0, inplane_size=512, inplane_spacing=(0.70, 0.96),
        slice_spacing=(2.5, 3.0, 4.0, 5.0), direction=_RAS_LIKE, dtype="int16", hu_offset=0.0,
        noise_sigma=(10.0, 16.0), labels={"liver": 1, "liver_tumour": 2},
        liver_tumours=(0, 1, 1, 2, 2, 3)),
    "KiTS": DatasetStyle(
        name="KiTS", code=2, image_name="scan_{n:05d}.nii.gz", label_name="label_{n:05d}.nii.gz",
        first_number=0, inplane_size=512, inplane_spacing=(0.72, 0.97),
        slice_spacing=(3.0, 4.0, 5.0), direction=_SLICES_FIRST, dtype="int16", hu_offset=0.0,
        noise_sigma=(12.0, 18.0),
        labels={"kidney_r": 1, "kidney_l": 1, "kidney_tumour_r": 2, "kidney_tumour_l": 2},
        kidney_tumours=(1,)),
    "MSDSpleen": DatasetStyle(
        name="MSDSpleen", code=3, image_name="spleen_{n}.nii.gz", label_name="spleen_{n}.nii.gz",
        first_number=1, inplane_size=256, inplane_spacing=(1.40, 1.92), slice_spacing=(5.0,),
        direction=_ANTERIOR_INFERIOR, dtype="float32", hu_offset=30.0, noise_sigma=(14.0, 20.0),
        labels={"spleen": 1}),
    "BTCV": DatasetStyle(
        name="BTCV", code=4, image_name="img{n:04d}.nii.gz", label_name="label{n:04d}.nii.gz",
        first_number=1, inplane_size=512, inplane_spacing=(0.70, 0.94), slice_spacing=(2.5, 3.0, 4.0),
        direction=_LPS, dtype="int16", hu_offset=-10.0, noise_sigma=(10.0, 16.0),
        labels={"spleen": 1, "kidney_r": 2, "kidney_l": 3, "gallbladder": 4, "liver": 6,
                "stomach": 7, "stomach_gas": 7, "aorta": 8, "ivc": 9, "pancreas": 11},
        unlabeled=False),
}


def label_lut(style: DatasetStyle) -> np.ndarray:
    """Lookup table tissue id -> label value of ``style``'s label files (uint8)."""
    lut = np.zeros(len(TISSUES), dtype=np.uint8)
    for name, value in style.labels.items():
        lut[TISSUE_ID[name]] = value
    return lut


def dataset_labels(tissue_map: np.ndarray, name: str) -> np.ndarray:
    """The label file values of dataset ``name`` for a tissue map (same shape, uint8)."""
    return label_lut(DATASET_STYLES[name])[tissue_map]


# ----------------------------------------------------------------------------------------------
# Shapes (anatomy frame, mm). Each has bounds() and mask(z, y, x) on 1D voxel-centre coordinates.


@dataclass(frozen=True)
class SmoothField:
    """Random smooth scalar field: Gaussian bumps on a regular lattice, evaluated separably.

    Attributes:
        lo: lattice corner ``(x, y, z)`` in mm.
        step: lattice spacing (mm), also the Gaussian width.
        values: lattice weights, shape ``(nz, ny, nx)``; scaled so the field has about unit
            standard deviation times the amplitude it was drawn with.
    """

    lo: tuple[float, float, float]
    step: float
    values: np.ndarray

    @staticmethod
    def draw(rng: np.random.Generator, lo: Sequence[float], hi: Sequence[float], step: float,
             amplitude: float) -> SmoothField:
        """A field covering the box ``[lo, hi]`` (x, y, z) with standard deviation ~``amplitude``."""
        lo_a = np.asarray(lo, dtype=np.float64) - step
        n = [int(math.ceil((h - lo_) / step)) + 2 for lo_, h in zip(lo_a, hi)]
        # Sum of squared Gaussian weights per axis is ~sqrt(pi) for width == spacing.
        values = rng.standard_normal((n[2], n[1], n[0])) * (amplitude / math.pi ** 0.75)
        return SmoothField(tuple(float(v) for v in lo_a), float(step), values.astype(np.float32))

    def _weights(self, coords: np.ndarray, axis: int, count: int) -> np.ndarray:
        centres = self.lo[axis] + self.step * np.arange(count, dtype=np.float32)
        d = (coords.astype(np.float32)[:, None] - centres[None, :]) / np.float32(self.step)
        return np.exp(np.float32(-0.5) * d * d)

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        nz, ny, nx = self.values.shape
        wx, wy, wz = self._weights(x, 0, nx), self._weights(y, 1, ny), self._weights(z, 2, nz)
        # Contract the lattice axes smallest-first; the last product is one GEMM writing (z, y, x).
        t = np.tensordot(self.values, wx, axes=([2], [1]))  # (cz, cy, x)
        t = np.tensordot(wy, t, axes=([1], [1]))  # (y, cz, x)
        return np.tensordot(wz, t, axes=([1], [1]))  # (z, y, x), contiguous


def _harmonics(u0: np.ndarray, u1: np.ndarray, u2: np.ndarray) -> list[np.ndarray]:
    """Low-order real polynomials on the unit sphere (spherical-harmonic-like, degrees 1-3)."""
    return [u0, u1, u2, u0 * u1, u1 * u2, u0 * u2, u0 * u0 - u1 * u1, 0.5 * (3 * u2 * u2 - 1),
            3 * u0 * u1 * u2]


@dataclass(frozen=True)
class Blob:
    """A smoothly deformed, rotated ellipsoid.

    Attributes:
        centre: ``(x, y, z)`` mm.
        radii: semi-axes along the blob's own axes (mm).
        rotation: 3x3, columns = the blob axes in the anatomy frame.
        harmonics: coefficients of :func:`_harmonics` (radius modulation, fraction of radius).
        bumps: smooth random field added to the radius modulation, or None.
    """

    centre: np.ndarray
    radii: np.ndarray
    rotation: np.ndarray
    harmonics: np.ndarray
    bumps: SmoothField | None = None

    def half_extent(self) -> np.ndarray:
        """Largest possible distance from the centre along x, y, z (deformation included)."""
        return np.sqrt(((self.rotation * self.radii[None, :]) ** 2).sum(axis=1)) * (1 + MAX_DEFORM)

    def bounds(self, z_lo: float = -math.inf, z_hi: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
        h = self.half_extent()
        return self.centre - h, self.centre + h

    def mask(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        f32 = np.float32
        d = [(x - f32(self.centre[0]))[None, None, :], (y - f32(self.centre[1]))[None, :, None],
             (z - f32(self.centre[2]))[:, None, None]]
        q = [sum(d[b] * f32(self.rotation[b, a] / self.radii[a]) for b in range(3)) for a in range(3)]
        rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        inside = rho < 1 - MAX_DEFORM
        # The deformation only matters in the shell where it can move the surface.
        shell = np.nonzero((rho >= 1 - MAX_DEFORM) & (rho < 1 + MAX_DEFORM))
        rs = rho[shell]
        inv = 1.0 / rs
        basis = _harmonics(q[0][shell] * inv, q[1][shell] * inv, q[2][shell] * inv)
        delta = sum(f32(c) * b for c, b in zip(self.harmonics, basis))
        if self.bumps is not None:
            delta = delta + self.bumps(z, y, x)[shell]
        inside[shell] = rs < 1 + np.clip(delta, -MAX_DEFORM, MAX_DEFORM)
        return inside


@dataclass(frozen=True)
class Column:
    """An elliptic cylinder along z whose centre and radii change linearly with z.

    Attributes:
        centre: ``(x, y)`` at height ``zc`` (mm); ``slope`` its change per mm of z.
        radii: ``(rx, ry)`` at ``zc``; ``radius_slope`` their change per mm of z (>= 0 kept).
        z_range: the column exists for ``z_range[0] <= z <= z_range[1]``.
        period / duty / phase: when ``period`` > 0, only where ``(z - phase) mod period < duty``
            (vertebral discs).
    """

    centre: tuple[float, float]
    radii: tuple[float, float]
    zc: float = 0.0
    slope: tuple[float, float] = (0.0, 0.0)
    radius_slope: float = 0.0
    z_range: tuple[float, float] = (-math.inf, math.inf)
    period: float = 0.0
    duty: float = 0.0
    phase: float = 0.0

    def bounds(self, z_lo: float = -math.inf, z_hi: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
        lo_z, hi_z = max(z_lo, self.z_range[0]), min(z_hi, self.z_range[1])
        ends = [z for z in (lo_z, hi_z) if math.isfinite(z)] or [self.zc]
        lo = np.array([math.inf, math.inf, lo_z])
        hi = np.array([-math.inf, -math.inf, hi_z])
        for z in ends:
            grow = max(0.0, self.radius_slope * (z - self.zc))
            r = (max(self.radii[0] + grow, 0.0), max(self.radii[1] + grow, 0.0))
            for a in range(2):
                c = self.centre[a] + self.slope[a] * (z - self.zc)
                lo[a], hi[a] = min(lo[a], c - r[a]), max(hi[a], c + r[a])
        return lo, hi

    def mask(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        f32 = np.float32
        dz = (z - f32(self.zc))[:, None, None]
        grow = f32(self.radius_slope) * dz
        rx = np.maximum(f32(self.radii[0]) + grow, f32(1e-3))
        ry = np.maximum(f32(self.radii[1]) + grow, f32(1e-3))
        cx = f32(self.centre[0]) + f32(self.slope[0]) * dz
        cy = f32(self.centre[1]) + f32(self.slope[1]) * dz
        ex = (x[None, None, :] - cx) / rx
        ey = (y[None, :, None] - cy) / ry
        inside = ex * ex + ey * ey < 1
        zz = z[:, None, None]
        keep = (zz >= self.z_range[0]) & (zz <= self.z_range[1])
        if self.period > 0:
            keep &= np.mod(zz - f32(self.phase), f32(self.period)) < f32(self.duty)
        return inside & keep


@dataclass(frozen=True)
class FieldRegion:
    """Where a smooth random field exceeds a threshold (mesenteric fat between bowel loops)."""

    field: SmoothField
    threshold: float

    def bounds(self, z_lo: float = -math.inf, z_hi: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
        return np.full(3, -math.inf), np.full(3, math.inf)

    def mask(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return self.field(z, y, x) > self.threshold


Shape = Blob | Column | FieldRegion


@dataclass(frozen=True)
class Paint:
    """One painting step: ``shape`` becomes ``tissue`` where allowed.

    Attributes:
        tissue: tissue name.
        shape: where.
        within: only over these tissues (None: over anything).
        clip: only inside this region too (abdominal cavity, muscle wall), or None.
    """

    tissue: str
    shape: Shape
    within: tuple[str, ...] | None = None
    clip: Column | None = None


@dataclass(frozen=True)
class Anatomy:
    """One case's anatomy: painting steps in order, an intensity texture, the z range to image (mm)."""

    steps: tuple[Paint, ...]
    texture: SmoothField
    z_range: tuple[float, float]


# ----------------------------------------------------------------------------------------------
# Drawing an anatomy


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix Rz(az) @ Ry(ay) @ Rx(ax), angles in degrees."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _blob(rng: np.random.Generator, centre: Sequence[float], radii: Sequence[float],
          angles: Sequence[float] = (0.0, 0.0, 0.0), jitter: float = 6.0, size: float = 0.08,
          deform: float = 0.07, bumps: float = 0.05) -> Blob:
    """A blob near ``centre`` with radii near ``radii`` (mm) and rotation near ``angles`` (deg)."""
    c = np.asarray(centre, dtype=np.float64) + rng.normal(0.0, jitter, 3)
    r = np.asarray(radii, dtype=np.float64) * rng.uniform(1 - size, 1 + size) \
        * rng.uniform(1 - size / 2, 1 + size / 2, 3)
    rot = _rotation(*(np.asarray(angles, dtype=np.float64) + rng.normal(0.0, 6.0, 3)))
    # Degree-1 terms only shift the shape: keep them small; degree 2-3 give the lobulation.
    harm = rng.normal(0.0, deform, 9) * np.array([0.4, 0.4, 0.4, 1, 1, 1, 1, 1, 0.7])
    field = None
    if bumps > 0:
        h = np.sqrt(((rot * r[None, :]) ** 2).sum(axis=1)) * (1 + MAX_DEFORM)
        field = SmoothField.draw(rng, c - h, c + h, step=max(12.0, float(r.max()) * 0.45),
                                 amplitude=bumps)
    return Blob(c, r, rot, harm, field)


def _tumour(rng: np.random.Generator, host: Blob, spread: tuple[float, float],
            radius: tuple[float, float]) -> Blob:
    """A small round blob centred inside ``host`` (at ``spread`` fractions of its radii)."""
    v = rng.normal(size=3)
    v /= np.linalg.norm(v) + 1e-12
    centre = host.centre + host.rotation @ (host.radii * v * rng.uniform(*spread))
    r = math.exp(rng.uniform(math.log(radius[0]), math.log(radius[1])))
    return _blob(rng, centre, (r, r, r), rng.uniform(0, 360, 3), jitter=0.0, size=0.15,
                 deform=0.06, bumps=0.04)


def draw_anatomy(rng: np.random.Generator, liver_tumours: int = 0, kidney_tumours: int = 0) -> Anatomy:
    """Draw one case's anatomy (mm, anatomy frame; see the module docstring).

    Args:
        rng: the case's random generator.
        liver_tumours: number of hypodense tumours inside the liver.
        kidney_tumours: number of tumours inside a kidney (side drawn per tumour).

    Returns:
        The :class:`Anatomy`; its ``z_range`` covers every labeled organ with a margin.
    """
    u = rng.uniform
    # Body cross-section ~320 x 240 mm, fat and muscle layers, cavity inside.
    a, b = u(146.0, 162.0), u(106.0, 124.0)
    t_fat, t_mus = u(10.0, 26.0), u(7.0, 12.0)
    grow = u(-0.06, 0.06)  # body a little wider at the bottom or at the top
    ai, bi = a - t_fat - t_mus, b - t_fat - t_mus

    def layer(da: float, db: float) -> Column:
        return Column((0.0, 0.0), (da, db), zc=-80.0, radius_slope=grow)

    cavity, wall = layer(ai, bi), layer(a - t_fat, b - t_fat)
    steps: list[Paint] = [Paint("fat", layer(a, b)), Paint("muscle", wall), Paint("bowel", cavity)]

    # Mesenteric fat between bowel loops, lung bases at the top, bowel gas.
    fov = (np.array([-a, -b, -260.0]), np.array([a, b, 80.0]))
    steps.append(Paint("fat", FieldRegion(SmoothField.draw(rng, *fov, step=16.0, amplitude=1.0),
                                          u(0.5, 0.9)), within=("bowel",)))
    for side in (-1, 1):
        steps.append(Paint("lung", _blob(rng, (side * 0.55 * ai, 0.3 * bi, 45.0),
                                         (0.45 * ai, 0.6 * bi, 62.0), bumps=0.0),
                           within=("bowel", "fat"), clip=cavity))
    for _ in range(int(rng.integers(4, 10))):
        c = (u(-0.7, 0.7) * ai, u(-0.85, 0.1) * bi, u(-175.0, -70.0))
        r = u(4.0, 13.0)
        steps.append(Paint("air", _blob(rng, c, (r, r * u(0.6, 1.4), r * u(0.6, 1.4)), jitter=0.0,
                                        bumps=0.0), within=("bowel",)))

    # Spine: paraspinal muscles, posterior arch, vertebral bodies with discs, canal; psoas. The
    # posterior structures stay inside the muscle wall (subcutaneous fat remains behind them).
    yv = 0.44 * b + u(-4.0, 4.0)
    for side in (-1, 1):
        steps.append(Paint("muscle", Column((side * u(26.0, 32.0), yv + 40.0), (u(22.0, 27.0), 19.0)),
                           clip=wall))
        steps.append(Paint("muscle", Column((side * u(30.0, 36.0), yv - 2.0), (0.5, 0.4), zc=-75.0,
                                            radius_slope=-u(0.16, 0.22), z_range=(-math.inf, -75.0))))
    rv = (u(19.0, 23.0), u(16.0, 19.0))
    period, disc = u(32.0, 37.0), u(6.0, 9.0)
    phase = u(0.0, period)
    steps += [
        Paint("bone", Column((0.0, yv + 27.0), (15.0, 13.0)), clip=wall),
        Paint("bone", Column((0.0, yv + 45.0), (5.0, 14.0)), clip=wall),
        Paint("bone", Column((0.0, yv), rv)),
        Paint("disc", Column((0.0, yv), rv, period=period, duty=disc, phase=phase)),
        Paint("canal", Column((0.0, yv + 26.0), (8.0, 7.0))),
    ]

    # Abdominal organs, all clipped to the cavity. Positions scale with the cavity size.
    stomach = _blob(rng, (0.38 * ai, -0.35 * bi, -52.0), (0.33 * ai, 0.33 * bi, 48.0), (0, 0, -20))
    gas = Blob(stomach.centre + np.array([0.0, -0.55 * stomach.radii[1], 0.35 * stomach.radii[2]]),
               stomach.radii * np.array([0.6, 0.45, 0.45]), stomach.rotation, np.zeros(9))
    steps += [Paint("stomach", stomach, clip=cavity),
              Paint("stomach_gas", gas, within=("stomach",))]
    pancreas = _blob(rng, (0.15 * ai, yv - 55.0, -88.0), (58.0, 11.0, 14.0), (0, -15, 8),
                     deform=0.08, bumps=0.08)
    steps.append(Paint("pancreas", pancreas, clip=cavity))

    liver = _blob(rng, (-0.47 * ai, -0.08 * bi, -72.0), (0.58 * ai, 0.9 * bi, 68.0), (0, 8, 0),
                  jitter=5.0, bumps=0.06)
    left_lobe = _blob(rng, (-0.04 * ai, -0.52 * bi, -45.0), (0.38 * ai, 0.38 * bi, 36.0), (0, 0, -10),
                      jitter=5.0)
    steps += [Paint("liver", liver, clip=cavity), Paint("liver", left_lobe, clip=cavity)]
    gb_z = liver.centre[2] - 0.45 * liver.radii[2]
    steps.append(Paint("gallbladder", _blob(rng, (-0.32 * ai, -0.55 * bi, gb_z), (14.0, 16.0, 28.0),
                                            (25, 0, 0), jitter=4.0), clip=cavity))
    spleen = _blob(rng, (0.74 * ai, 0.42 * bi, -55.0), (22.0, 50.0, 48.0), (0, 0, 32), jitter=5.0,
                   deform=0.09)
    steps.append(Paint("spleen", spleen, clip=cavity))

    kidneys = {}
    tumour_sides = [int(rng.integers(0, 2)) for _ in range(kidney_tumours)]
    for k, (side, name, z) in enumerate(((-1, "kidney_r", -102.0), (1, "kidney_l", -90.0))):
        kid = _blob(rng, (side * 0.53 * ai, 0.5 * bi, z + u(-6.0, 6.0)), (27.0, 19.0, 52.0),
                    (0, -side * 12.0, side * 30.0), jitter=4.0, size=0.1)
        steps.append(Paint(name, kid, clip=cavity))
        for _ in range(tumour_sides.count(k)):
            steps.append(Paint(name.replace("kidney", "kidney_tumour"),
                               _tumour(rng, kid, (0.1, 0.45), (12.0, 26.0)), within=(name,)))
        # Sinus fat towards the hilum (anteromedial): local +x for the right kidney, -x for the left.
        sinus = Blob(kid.centre + kid.rotation @ np.array([-side * 0.6 * kid.radii[0], 0.0, 0.0]),
                     kid.radii * np.array([0.5, 0.5, 0.45]), kid.rotation, np.zeros(9))
        steps.append(Paint("fat", sinus, within=(name,)))
        kidneys[name] = kid

    # Vessels last among normal structures: they pass through liver and pancreas.
    steps += [
        Paint("aorta", Column((u(12.0, 18.0), yv - 32.0), (u(10.0, 13.0),) * 2, zc=-80.0,
                              slope=(u(-0.04, 0.04), 0.0))),
        Paint("ivc", Column((u(-26.0, -19.0), yv - 30.0), (u(12.0, 15.0), u(8.0, 10.0)), zc=-80.0,
                            slope=(u(-0.04, 0.04), 0.0))),
    ]

    for _ in range(liver_tumours):
        steps.append(Paint("liver_tumour", _tumour(rng, liver, (0.0, 0.6), (6.0, 24.0)),
                           within=("liver",)))

    # Image everything from above the liver/spleen tops to below the lowest kidney pole.
    organs = (liver, left_lobe, spleen, *kidneys.values())
    top = max(o.centre[2] + o.half_extent()[2] for o in organs)
    bottom = min(o.centre[2] - o.half_extent()[2] for o in organs)
    z_range = (bottom - u(4.0, 14.0), top + u(4.0, 14.0))
    texture = SmoothField.draw(rng, *fov, step=14.0, amplitude=1.0)
    return Anatomy(tuple(steps), texture, z_range)


# ----------------------------------------------------------------------------------------------
# Rasterising


@dataclass(frozen=True)
class Grid:
    """Voxel-centre coordinates (anatomy frame, mm, ascending) of a canonical grid's axes."""

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.z.size, self.y.size, self.x.size)

    def window(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices ``(k, j, i)`` of the voxels inside the box ``[lo, hi]`` (x, y, z); None if empty."""
        out = []
        for coords, a in ((self.z, 2), (self.y, 1), (self.x, 0)):
            s = int(np.searchsorted(coords, lo[a], side="left"))
            e = int(np.searchsorted(coords, hi[a], side="right"))
            if e <= s:
                return None
            out.append(slice(s, e))
        return (out[0], out[1], out[2])


def rasterize(anatomy: Anatomy, grid: Grid) -> np.ndarray:
    """Paint an anatomy on a grid.

    Returns:
        uint8 tissue ids (index into :data:`TISSUES`), shape ``grid.shape``.
    """
    tissue = np.zeros(grid.shape, dtype=np.uint8)
    allowed = np.zeros(256, dtype=bool)
    for step in anatomy.steps:
        win = grid.window(*step.shape.bounds(float(grid.z[0]), float(grid.z[-1])))
        if win is None:
            continue
        m = step.shape.mask(grid.z[win[0]], grid.y[win[1]], grid.x[win[2]])
        sub = tissue[win]
        if step.clip is not None:
            m &= step.clip.mask(grid.z[win[0]], grid.y[win[1]], grid.x[win[2]])
        if step.within is not None:
            allowed[:] = False
            allowed[[TISSUE_ID[t] for t in step.within]] = True
            m &= allowed[sub]
        sub[m] = TISSUE_ID[step.tissue]
    return tissue


def _upsample_linear(a: np.ndarray, f: int, axis: int) -> np.ndarray:
    """Linear upsampling by an integer factor with cell-centred alignment (edges replicated)."""
    if f == 1:
        return a
    n = a.shape[axis]
    lead = (slice(None),) * axis
    prev = np.concatenate([a[lead + (slice(0, 1),)], a[lead + (slice(0, n - 1),)]], axis=axis)
    nxt = np.concatenate([a[lead + (slice(1, n),)], a[lead + (slice(n - 1, n),)]], axis=axis)
    prev -= a
    nxt -= a
    # Output sample r of input cell b sits at b + t with t = (r + 0.5) / f - 0.5 in (-0.5, 0.5).
    out = np.empty(a.shape[:axis + 1] + (f,) + a.shape[axis + 1:], dtype=a.dtype)
    for r in range(f):
        t = (r + 0.5) / f - 0.5
        diff, w = (prev, -t) if t < 0 else (nxt, t)
        dst = out[lead + (slice(None), r)]
        np.multiply(diff, a.dtype.type(w), out=dst)
        dst += a
    return out.reshape(a.shape[:axis] + (n * f,) + a.shape[axis + 1:])


def _gaussian_weights(sigma: float) -> np.ndarray:
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _noise_gain(sigma: float, factor: int) -> float:
    """Factor that keeps white noise at unit std after in-plane smoothing and upsampling."""
    w = _gaussian_weights(sigma)
    var_s = float((w * w).sum())
    rho1 = float((w[1:] * w[:-1]).sum()) / var_s  # neighbour correlation after smoothing
    ts = [abs((r + 0.5) / factor - 0.5) for r in range(factor)]
    var_u = float(np.mean([(1 - t) ** 2 + t * t + 2 * t * (1 - t) * rho1 for t in ts]))
    return 1.0 / (var_s * var_u)  # per axis std factor sqrt(var_s*var_u), two axes


# ----------------------------------------------------------------------------------------------
# Phantoms


@dataclass(frozen=True)
class PhantomSpec:
    """Grid and intensity settings of one phantom.

    Attributes:
        inplane_size: in-plane voxels (square).
        inplane_spacing: in-plane spacing (mm).
        slice_spacing: slice spacing (mm).
        hu_offset: calibration shift added to every voxel.
        noise_sigma: noise standard deviation (HU).
        liver_tumours / kidney_tumours: tumour counts.
        dtype: output dtype (values are rounded to integers in any case).
        base_size: in-plane size above which the phantom is painted coarser and upsampled.
        smooth: in-plane Gaussian smoothing (voxels of the painted grid): partial volume.
        crop_margin: None = the scanner's square field of view ``inplane_size`` voxels wide;
            ``(mx, my)`` mm = a body-tight crop: the body's extent plus this margin on each side
            (left-right, anterior-posterior), so the grid is not square.
        z_margin: extra coverage (mm) below and above the organs: more or fewer slices.
    """

    inplane_size: int = 128
    inplane_spacing: float = 2.8
    slice_spacing: float = 5.0
    hu_offset: float = 0.0
    noise_sigma: float = 14.0
    liver_tumours: int = 0
    kidney_tumours: int = 0
    dtype: str = "int16"
    base_size: int = BASE_SIZE
    smooth: float = 0.6
    crop_margin: tuple[float, float] | None = None
    z_margin: tuple[float, float] = (0.0, 0.0)


def _base_factor(n: int, base: int) -> int:
    f = max(1, n // max(base, 1))
    while n % f:
        f -= 1
    return f


def _grid_size(anatomy: Anatomy, spec: PhantomSpec, z_lo: float, z_hi: float) -> tuple[int, int, int]:
    """In-plane voxels ``(nx, ny)`` and the painting factor ``f`` (dividing both) of a phantom."""
    n = spec.inplane_size
    if spec.crop_margin is None:
        return n, n, _base_factor(n, spec.base_size)
    # Body-tight: the body's (fat layer's) extent over the imaged slices, plus the margins; the body
    # offset drawn by make_phantom (<= 8 mm) is covered by a margin of at least 8 mm.
    lo, hi = anatomy.steps[0].shape.bounds(z_lo, z_hi)
    size = [(hi[a] - lo[a] + 2.0 * spec.crop_margin[a]) / spec.inplane_spacing for a in (0, 1)]
    f = max(1, int(max(size)) // max(spec.base_size, 1))
    nx, ny = (max(16, int(math.ceil(v / f)) * f) for v in size)
    return nx, ny, f


def make_phantom(rng: np.random.Generator, spec: PhantomSpec) -> tuple[Volume, np.ndarray]:
    """Draw and render one phantom on the canonical LPS grid.

    Args:
        rng: the case's generator (anatomy, intensities, noise and grid placement are drawn from it).
        spec: grid and intensity settings.

    Returns:
        ``(image, tissue)``: the image Volume (canonical ``[S, P, L]``, identity direction, dtype
        ``spec.dtype``, integer HU values) and the uint8 tissue map on the same grid (ids into
        :data:`TISSUES`).
    """
    anatomy = draw_anatomy(rng, spec.liver_tumours, spec.kidney_tumours)
    s, sz = spec.inplane_spacing, spec.slice_spacing
    z_lo, z_hi = anatomy.z_range[0] - spec.z_margin[0], anatomy.z_range[1] + spec.z_margin[1]
    nz = int(math.ceil((z_hi - z_lo) / sz)) + 1
    # The body sits near the centre of the field of view (and inside its circle: half-width at most
    # 162 + 7 + 8 mm < 179 mm, the smallest radius of the styles); the table height is arbitrary.
    body = rng.uniform(-8.0, 8.0, 2)
    table_z = float(rng.uniform(-400.0, -150.0))
    nx, ny, f = _grid_size(anatomy, spec, z_lo, z_hi)
    origin = (-(nx - 1) * s / 2.0, -(ny - 1) * s / 2.0, table_z + z_lo)
    # Painted voxel b covers full voxels f*b .. f*b+f-1: its centre is at full index f*b + (f-1)/2.
    grid = Grid(z=(z_lo + np.arange(nz) * sz).astype(np.float32),
                y=(origin[1] + (np.arange(ny // f) * f + (f - 1) / 2.0) * s - body[1]).astype(np.float32),
                x=(origin[0] + (np.arange(nx // f) * f + (f - 1) / 2.0) * s - body[0]).astype(np.float32))
    tissue = rasterize(anatomy, grid)

    hu = np.array([rng.uniform(*t.hu) for t in TISSUES], dtype=np.float32)
    tex = np.array([t.texture for t in TISSUES], dtype=np.float32)
    image = hu[tissue] + tex[tissue] * anatomy.texture(grid.z, grid.y, grid.x)
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    image += np.float32(spec.noise_sigma * _noise_gain(spec.smooth, f)) * noise
    del noise
    from scipy.ndimage import gaussian_filter1d

    for axis in (1, 2):
        image = gaussian_filter1d(image, spec.smooth, axis=axis, mode="nearest", truncate=4.0)
        image = _upsample_linear(image, f, axis)
    if f > 1:
        tissue = np.repeat(np.repeat(tissue, f, axis=1), f, axis=2)
    image += np.float32(spec.hu_offset)
    np.rint(image, out=image)
    # Outside the scanner's circular reconstruction field the value is padding, as in real CT (a
    # body-tight crop lies inside that circle: it was cut from a square field of view).
    if spec.crop_margin is None:
        r = (np.arange(nx) - (nx - 1) / 2.0) / (nx / 2.0)
        image[:, r[:, None] ** 2 + r[None, :] ** 2 > 1.0] = PADDING_HU
    if spec.dtype == "int16":
        image = np.clip(image, -1024, 3071).astype(np.int16)
    else:
        image = image.astype(spec.dtype)
    geo = Geometry(shape=(nz, ny, nx), spacing=(float(s), float(s), float(sz)),
                   origin=tuple(float(o) for o in origin))  # type: ignore[arg-type]
    return Volume(image, geo), tissue


# ----------------------------------------------------------------------------------------------
# Datasets on disk


def case_rng(seed: int, name: str, number: int) -> np.random.Generator:
    """The generator of case ``number`` of dataset ``name`` (independent of other cases)."""
    return np.random.default_rng([int(seed), DATASET_STYLES[name].code, int(number)])


def draw_spec(rng: np.random.Generator, style: DatasetStyle, scale: float = 1.0) -> PhantomSpec:
    """Per-case grid and intensity settings of a dataset; ``scale`` shrinks the in-plane size.

    Field-of-view variety: a case is a body-tight crop (8-30 mm left and right of the body, 15-40 mm
    in front and behind: about 310-400 x 250-330 mm, non-square) with probability
    ``style.tight_prob``, else the scanner's square field of view (358-500 mm over the styles);
    0-40 mm of extra coverage below and 0-15 mm above the organs vary the slice count.
    """
    n = max(16, int(round(style.inplane_size * scale)))
    spacing = float(rng.uniform(*style.inplane_spacing)) * style.inplane_size / n
    slice_spacing = float(rng.choice(style.slice_spacing))
    noise = float(rng.uniform(*style.noise_sigma))
    liver_t, kidney_t = int(rng.choice(style.liver_tumours)), int(rng.choice(style.kidney_tumours))
    tight = bool(rng.uniform() < style.tight_prob)
    margin = (float(rng.uniform(8.0, 30.0)), float(rng.uniform(15.0, 40.0)))
    z_margin = (float(rng.uniform(0.0, 40.0)), float(rng.uniform(0.0, 15.0)))
    return PhantomSpec(
        inplane_size=n,
        inplane_spacing=round(spacing, 6),
        slice_spacing=slice_spacing,
        hu_offset=style.hu_offset,
        noise_sigma=noise,
        liver_tumours=liver_t,
        kidney_tumours=kidney_t,
        dtype=style.dtype,
        crop_margin=margin if tight else None,
        z_margin=z_margin,
    )


def make_case(seed: int, name: str, number: int, scale: float = 1.0) -> tuple[Volume, np.ndarray]:
    """Canonical image and tissue map of case ``number`` of dataset ``name`` (what synth writes)."""
    rng = case_rng(seed, name, number)
    return make_phantom(rng, draw_spec(rng, DATASET_STYLES[name], scale))


def case_numbers(name: str, cases: int, unlabeled: int, val: int) -> dict[str, list[int]]:
    """Case numbers per split; labeled, then validation, then unlabeled, so names never clash."""
    style = DATASET_STYLES[name]
    n0 = style.first_number
    unl = unlabeled if style.unlabeled else 0
    return {"labeled": list(range(n0, n0 + cases)),
            "validation": list(range(n0 + cases, n0 + cases + val)),
            "unlabeled": list(range(n0 + cases + val, n0 + cases + val + unl))}


def _claim_folder(folder: Path) -> set[str]:
    """Files a previous synth run left in ``folder``; refuse folders synth.py did not write."""
    marker = folder / MARKER
    if not folder.exists():
        return set()
    if not folder.is_dir():
        raise InputError(folder, "exists and is not a folder")
    if marker.is_file():
        try:
            return set(json.loads(marker.read_text())["files"])
        except (ValueError, KeyError, TypeError, OSError):
            raise InputError(marker, "is not a valid phantom marker; remove the folder or choose "
                             "another --out") from None
    if any(folder.iterdir()):
        raise InputError(folder, f"exists, is not empty and was not written by synth.py (no {MARKER});"
                         " refusing to overwrite it: choose another --out")
    return set()


def _write_marker(folder: Path, files: set[str], info: dict[str, Any]) -> None:
    from utils.fileio import write_json_atomic

    write_json_atomic(folder / MARKER, {**info, "files": sorted(files)})


def write_dataset(out: str | Path, name: str, cases: int, unlabeled: int, val: int, seed: int = 0,
                  scale: float = 1.0) -> dict[str, Any]:
    """Write one dataset's phantoms in the seed layout under ``out/name``.

    Layout: ``labeled/``, ``validation/``, ``unlabeled/`` images and ``label/`` holding the labels of
    the labeled and validation cases (file names of :data:`DATASET_STYLES`). Files of a previous run
    that this run does not rewrite are removed (listed in a hidden ``.phantom.json``).

    Returns:
        Summary: folder, counts per split, in-plane size, spacing and slice ranges, dtype, seconds.

    Raises:
        InputError: the folder cannot be written, or exists with files synth.py did not write.
    """
    t0 = time.time()
    style = DATASET_STYLES[name]
    folder = Path(out) / name
    old = _claim_folder(folder)
    numbers = case_numbers(name, cases, unlabeled, val)
    plan: list[tuple[str, int, str, str | None]] = []
    for split, nums in numbers.items():
        for n in nums:
            label = f"label/{style.label_name.format(n=n)}" if split != "unlabeled" else None
            plan.append((split, n, f"{split}/{style.image_name.format(n=n)}", label))
    new = {p[2] for p in plan} | {p[3] for p in plan if p[3]}
    info = {"dataset": name, "seed": seed, "scale": scale,
            "counts": {k: len(v) for k, v in numbers.items()}}
    # Claim every file this run may touch before writing any, so an interrupted run is cleaned up.
    _write_marker(folder, old | new, info)
    lut = label_lut(style)
    spacings, slices, sizes, fovs = [], [], set(), []
    for _split, n, image_rel, label_rel in plan:
        image, tissue = make_case(seed, name, n, scale)
        stored = to_storage(image, style.direction)
        write_volume(stored, folder / image_rel, compress=image_rel.endswith(".gz"))
        if label_rel:
            labels = to_storage(image.with_array(lut[tissue]), style.direction)
            write_volume(labels, folder / label_rel, compress=label_rel.endswith(".gz"))
        g = image.geometry
        spacings.append(g.spacing)
        slices.append(g.shape[0])
        sizes.add(g.shape[1:])
        fovs.append((g.shape[2] * g.spacing[0], g.shape[1] * g.spacing[1]))
    for rel in sorted(old - new):
        parts = Path(rel).parts
        # Only files synth.py itself names: a split folder and a file name (no '..', no absolute).
        if len(parts) == 2 and parts[0] in (*numbers, "label") and parts[1] not in ("..", "."):
            (folder / rel).unlink(missing_ok=True)
    _write_marker(folder, new, info)
    # Empty splits still get their folder: the seed layout expects all of them.
    for split in ("labeled", "validation", "label", *(("unlabeled",) if style.unlabeled else ())):
        (folder / split).mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "folder": str(folder), **{k: len(v) for k, v in numbers.items()},
        "inplane_shape": [list(v) for v in sorted(sizes)], "dtype": style.dtype,
        "image_name": style.image_name, "label_name": style.label_name,
        "seconds": round(time.time() - t0, 2),
    }
    if spacings:
        sp = np.asarray(spacings)
        summary.update(inplane_spacing=[float(sp[:, 0].min()), float(sp[:, 0].max())],
                       slice_spacing=[float(sp[:, 2].min()), float(sp[:, 2].max())],
                       slices=[int(min(slices)), int(max(slices))],
                       fov_mm=[round(float(min(min(f) for f in fovs)), 1),
                               round(float(max(max(f) for f in fovs)), 1)],
                       square=sum(1 for w, h in fovs if w == h), tight=sum(1 for w, h in fovs if w != h))
    return summary


def describe(name: str, summary: dict[str, Any]) -> str:
    """One line for a dataset summary."""
    line = (f"{name}: {summary['labeled']} labeled, {summary['validation']} validation, "
            f"{summary['unlabeled']} unlabeled")
    if "slices" in summary:
        sp, ss, sl = summary["inplane_spacing"], summary["slice_spacing"], summary["slices"]
        fov = summary["fov_mm"]
        line += (f"; fields of view {fov[0]:.0f}-{fov[1]:.0f} mm, {len(summary['inplane_shape'])} grid "
                 f"shapes at {sp[0]:.2f}-{sp[1]:.2f} mm, {sl[0]}-{sl[1]} slices of "
                 f"{ss[0]:g}-{ss[1]:g} mm, {summary['dtype']}")
    return f"{line} -> {summary['folder']} ({summary['seconds']:.1f} s)"


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(out, f"cannot create output folder ({err.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".synth-probe.", dir=out)
    except OSError as err:
        raise InputError(out, f"output folder is not writable ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def synthesize(out: str | Path, cases: int = 4, unlabeled: int = 4, val: int = 2, seed: int = 0,
               datasets: Sequence[str] | None = None, scale: float = 1.0,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the phantom datasets under ``out`` (the default data of UniMOS).

    Args:
        out: output root; each dataset goes to ``out/<name>/``.
        cases / unlabeled / val: labeled, unlabeled and validation cases per dataset (BTCV has no
            unlabeled split).
        seed: non-negative seed; the same seed gives byte-identical volumes.
        datasets: names from :data:`DATASET_STYLES` (default: all).
        scale: in-plane size factor (0.5: 256 instead of 512), for tests.
        log: called with one summary line per dataset.

    Returns:
        ``{"out", "seed", "scale", "seconds", "datasets": {name: summary}}``.

    Raises:
        InputError: bad counts/seed/scale/dataset names, or ``out`` not writable; nothing is
            written then.
    """
    names = list(DATASET_STYLES) if datasets is None else list(datasets)
    unknown = [n for n in names if n not in DATASET_STYLES]
    if unknown or not names:
        raise InputError(None, f"unknown dataset(s) {unknown} (choose from {', '.join(DATASET_STYLES)})")
    for flag, value in (("--cases", cases), ("--unlabeled", unlabeled), ("--val", val),
                        ("--seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise InputError(None, f"{flag} must be a non-negative integer, got {value}")
    if not (math.isfinite(scale) and 0.0 < scale <= 2.0) or round(512 * scale) < 16:
        raise InputError(None, f"--scale must be in (1/32, 2], got {scale}")
    out = Path(out)
    _check_writable(out)
    for name in names:  # refuse foreign folders before writing anything
        _claim_folder(out / name)
    t0 = time.time()
    result: dict[str, Any] = {"out": str(out), "seed": seed, "scale": scale, "datasets": {}}
    for name in names:
        summary = write_dataset(out, name, cases, unlabeled, val, seed, scale)
        result["datasets"][name] = summary
        if log is not None:
            log(describe(name, summary))
    result["seconds"] = round(time.time() - t0, 2)
    return result
