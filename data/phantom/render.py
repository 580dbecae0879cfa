"""Rendering an anatomy on a canonical grid: tissue map, intensities, noise, partial volume, field of
view (square scanner field or body-tight crop)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from data.phantom.anatomy import draw_anatomy
from data.phantom.shapes import Anatomy
from data.phantom.tissues import BASE_SIZE, PADDING_HU, TISSUE_ID, TISSUES
from data.resample import resample_axis
from data.volume import Geometry, Volume

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
        image = resample_axis(image, axis, image.shape[axis] * f, is_label=False)
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
