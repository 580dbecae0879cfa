"""How a canonical slice plane becomes the network's in-plane grid, and back, without stretching.

Two modes (``Config.inplane_spacing``):

* **pad** (default, ``inplane_spacing`` None): pad the slice with air (-1024 HU; label background)
  to the grid's aspect ratio *in millimetres* (a square for the usual 256x256 grid), then resample
  it to the grid with :func:`data.resample.resample_inplane` (field of view kept). A slice whose
  field of view already has the grid's aspect ratio is not padded at all, so square inputs go
  through exactly the resampling they always did.
* **spacing** (``inplane_spacing = s`` mm): resample each in-plane axis to ``round(fov / s)``
  voxels (field of view kept, so the spacing is ``s`` up to rounding), then pad with air or crop,
  centred, to the grid. Inference pads but never crops (the network is fully convolutional, and a
  crop would drop anatomy), see ``allow_crop``.

Padding is whole voxels, so both steps stay exact grid operations: :class:`InplanePlan` records them,
:func:`apply_plan` runs them on a canonical volume and :meth:`InplanePlan.crop_pre` /
:meth:`InplanePlan.crop_post` undo the padding on arrays. The rounding to whole voxels leaves an
aspect error below one voxel of the padded axis (< 0.5 % for a 200-voxel slice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data.resample import resample_inplane
from data.volume import Geometry, Volume
from utils.errors import InputError

AIR_HU = -1024.0  # what padding adds to an image (windowed: the lower end of any HU window)
LABEL_PAD = 0  # what padding adds to a label map: background

Pads = tuple[tuple[int, int], tuple[int, int]]  # ((before, after) rows, (before, after) columns)


@dataclass(frozen=True)
class InplanePlan:
    """The in-plane steps for one canonical ``[S, P, L]`` array.

    Attributes:
        source: ``(nP, nL)`` of the canonical input.
        pre: whole-voxel padding ``((top, bottom), (left, right))`` of the input (>= 0).
        resized: ``(rows, cols)`` the padded input is resampled to (field of view kept).
        post: padding (> 0) or cropping (< 0) of the resampled grid, same layout as ``pre``.
    """

    source: tuple[int, int]
    pre: Pads
    resized: tuple[int, int]
    post: Pads

    @property
    def padded(self) -> tuple[int, int]:
        """``(rows, cols)`` after the ``pre`` padding."""
        return (self.source[0] + sum(self.pre[0]), self.source[1] + sum(self.pre[1]))

    @property
    def output(self) -> tuple[int, int]:
        """``(rows, cols)`` of the network grid."""
        return (self.resized[0] + sum(self.post[0]), self.resized[1] + sum(self.post[1]))

    def crop_post(self, array):
        """Undo ``post`` on the last two axes of ``array`` (``(..., output)`` -> ``(..., resized)``).

        Raises:
            ValueError: when ``post`` cropped (the cropped part cannot be brought back).
        """
        (t, b), (lft, r) = self.post
        if min(t, b, lft, r) < 0:
            raise ValueError("this plan crops the resampled grid; plan with allow_crop=False to invert it")
        return array[..., t:array.shape[-2] - b, lft:array.shape[-1] - r]

    def crop_pre(self, array):
        """Undo ``pre`` on the last two axes of ``array`` (``(..., padded)`` -> ``(..., source)``)."""
        (t, b), (lft, r) = self.pre
        return array[..., t:array.shape[-2] - b, lft:array.shape[-1] - r]


# The in-plane steps never need slices vastly larger than both the input's and the grid's: far more is
# a header's spacing in the wrong unit (1e6 mm pixels), whose padding or resampling would ask for
# terabytes before failing with an allocation error. Generous: 64x per axis (11 mm phantom pixels
# resampled to 1 mm are 121x in area), and no slice beyond 8192 x 8192 pixels (256 MB in float32).
MAX_SLICE_GROWTH = 64 * 64
MAX_SLICE_PIXELS = 2**26


def _check_size(plan: InplanePlan, grid_pixels: int) -> InplanePlan:
    # (a grid asked for beyond the cap keeps room for itself: --inplane goes up to 16384)
    limit = min(MAX_SLICE_GROWTH * max(plan.source[0] * plan.source[1], grid_pixels),
                max(MAX_SLICE_PIXELS, 4 * grid_pixels))
    for what, (r, c) in (("padded", plan.padded), ("resampled", plan.resized)):
        if r * c > limit:
            src_r, src_c = plan.source
            raise InputError(None, f"in-plane {what} slices would be {r} x {c} pixels from {src_r} x "
                             f"{src_c} (more than 64x per axis beyond the input and the grid, or beyond "
                             "8192 x 8192): check the voxel spacing in the header")
    return plan


def _split(total: int) -> tuple[int, int]:
    # Centred; an odd voxel goes after (the same rule for padding and cropping).
    before = int(np.trunc(total / 2))
    return before, total - before


def plan_inplane(shape: Sequence[int], spacing: Sequence[float], grid: Sequence[int],
                 spacing_mm: float | None = None, allow_crop: bool = True) -> InplanePlan:
    """Plan the in-plane steps for a canonical array.

    Args:
        shape: the canonical array's ``(nP, nL)`` (its last two axes; more leading axes are fine).
        spacing: the canonical spacing in ITK order ``(x, y[, z])``: x along L (columns), y along P
            (rows).
        grid: ``(s1, s2)`` = (columns, rows) of the network grid (``Config.inplane_size``).
        spacing_mm: None = pad mode; a positive number = spacing mode (see the module docstring).
        allow_crop: spacing mode only: False keeps the whole resampled slice (pads up to the grid
            where it is smaller, never crops).

    Returns:
        The :class:`InplanePlan`.

    Raises:
        ValueError: empty shape or grid, non-positive spacing.
        InputError: (without a file; see ``utils.errors.naming``) slices more than
            :data:`MAX_SLICE_GROWTH` times the input's and the grid's pixels, or more than
            :data:`MAX_SLICE_PIXELS`.
    """
    n_p, n_l = int(shape[-2]), int(shape[-1])
    s_x, s_y = float(spacing[0]), float(spacing[1])
    cols, rows = int(grid[0]), int(grid[1])
    if min(n_p, n_l, cols, rows) < 1 or min(s_x, s_y) <= 0:
        raise ValueError(f"bad in-plane plan input: shape {(n_p, n_l)}, spacing {(s_x, s_y)}, grid {grid}")
    none: Pads = ((0, 0), (0, 0))
    if spacing_mm is None:
        fov_r, fov_c = n_p * s_y, n_l * s_x
        # The grid's pixels are square in millimetres when its field of view is rows:cols.
        want_r = max(fov_r, fov_c * rows / cols)
        want_c = max(fov_c, fov_r * cols / rows)
        pad_r = max(0, int(round((want_r - fov_r) / s_y)))
        pad_c = max(0, int(round((want_c - fov_c) / s_x)))
        return _check_size(InplanePlan((n_p, n_l), (_split(pad_r), _split(pad_c)), (rows, cols), none),
                           rows * cols)
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
    m_r = max(1, int(round(n_p * s_y / spacing_mm)))
    m_c = max(1, int(round(n_l * s_x / spacing_mm)))
    d_r, d_c = rows - m_r, cols - m_c
    if not allow_crop:
        d_r, d_c = max(0, d_r), max(0, d_c)
    return _check_size(InplanePlan((n_p, n_l), none, (m_r, m_c), (_split(d_r), _split(d_c))), rows * cols)


def _pad_volume(volume: Volume, pads: Pads, value: float) -> Volume:
    """Pad (> 0) or crop (< 0) the last two axes of a canonical volume; geometry follows exactly."""
    (t, b), (lft, r) = pads
    if (t, b, lft, r) == (0, 0, 0, 0):
        return volume
    a = volume.array
    crop = (slice(None), slice(max(0, -t), a.shape[1] - max(0, -b)),
            slice(max(0, -lft), a.shape[2] - max(0, -r)))
    a = a[crop]
    if a.dtype.kind in "iu":  # e.g. an unsigned MR image: the lowest value it can hold stands for air
        info = np.iinfo(a.dtype)
        value = min(max(value, info.min), info.max)
    a = np.pad(a, ((0, 0), (max(0, t), max(0, b)), (max(0, lft), max(0, r))), mode="constant",
               constant_values=np.asarray(value).astype(a.dtype))
    geo = volume.geometry
    # Canonical: array rows are index j (direction column 1), columns are index i (column 0).
    d = geo.direction_matrix
    origin = (np.asarray(geo.origin, dtype=np.float64) - lft * geo.spacing[0] * d[:, 0]
              - t * geo.spacing[1] * d[:, 1])
    new_geo = Geometry(shape=tuple(int(s) for s in a.shape),  # type: ignore[arg-type]
                       spacing=geo.spacing, origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
                       direction=geo.direction)
    return Volume(np.ascontiguousarray(a), new_geo)


def apply_plan(canon: Volume, plan: InplanePlan, is_label: bool) -> Volume:
    """Run a plan on a canonical volume: pad, resample (field of view kept), pad or crop.

    Args:
        canon: canonical volume (``[S, P, L]``) whose in-plane shape is ``plan.source``.
        plan: from :func:`plan_inplane`.
        is_label: nearest neighbour, dtype kept and background padding; otherwise linear, float32
            and air padding.

    Returns:
        The canonical volume on the network grid, with its exact geometry.
    """
    if tuple(canon.array.shape[1:]) != plan.source:
        raise ValueError(f"plan is for {plan.source}, volume has {canon.array.shape[1:]}")
    value = LABEL_PAD if is_label else AIR_HU
    out = _pad_volume(canon, plan.pre, value)
    out = resample_inplane(out, (plan.resized[1], plan.resized[0]), is_label=is_label, slice_axis=2,
                           dtype=None if is_label else np.float32)
    return _pad_volume(out, plan.post, value)


__all__ = ["AIR_HU", "LABEL_PAD", "InplanePlan", "apply_plan", "plan_inplane"]
