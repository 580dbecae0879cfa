"""Shapes in the anatomy frame (mm): smooth random fields, deformed ellipsoids, elliptic columns,
field regions, painting steps and the :class:`Anatomy` they make up."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data.phantom.tissues import MAX_DEFORM

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
