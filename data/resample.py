"""Resampling that keeps the physical field of view: in-plane (SimpleITK) and along one array axis.

Grid convention (used by every function here)
---------------------------------------------
A grid of ``n`` voxels of size ``s`` covers the field of view ``[-s/2, (n - 1/2) s]`` around its
origin voxel. Resampling to ``m`` voxels keeps that field of view: the new spacing is
``s * n / m`` and the origin moves by ``(s_new - s) / 2`` along the axis direction, so both outer
edges stay where they were. (The original kept the origin instead, which shifts the content by half
a voxel of the size change.) New voxel ``t`` then samples the old continuous index
``(t + 1/2) * n / m - 1/2``, which always lies inside ``[-1/2, n - 1/2]``: the border voxels are
extended, never blended with a zero background.

Images are interpolated linearly (SimpleITK), labels with nearest neighbour (never linearly: that
invents label values and moves borders) in index space, where a tie (an exact 2x downsampling puts
every new centre half-way between two old ones) always goes to the upper voxel.

The folder walk behind ``resample.py`` is :mod:`data.resample_tree`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.volume import Geometry, Volume, slice_axis_index, to_sitk

# ----------------------------------------------------------------------------------------------
# Array / volume resampling


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast interpolated floats to ``dtype``, rounding and saturating for integer types."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    if dtype.kind == "b":
        return values >= 0.5
    return values.astype(dtype, copy=False)


def source_positions(n_old: int, n_new: int) -> np.ndarray:
    """Old continuous indices sampled by each of ``n_new`` voxels (see the module docstring)."""
    return (np.arange(n_new, dtype=np.float64) + 0.5) * (n_old / n_new) - 0.5


def _take(array, axis: int, idx: np.ndarray):
    """``array`` gathered at ``idx`` along ``axis``: numpy or torch (on the tensor's device)."""
    if isinstance(array, np.ndarray):
        return np.take(array, idx, axis=axis)
    import torch

    return torch.index_select(array, axis, torch.from_numpy(idx).to(array.device))


def resample_axis(array, axis: int, n_new: int, is_label: bool):
    """Resample one axis of a numpy array or torch tensor to ``n_new`` voxels, field of view kept.

    The one linear (and nearest-neighbour) resampler of UniMOS: preprocessing, the way back to the
    input grid, and the phantoms' integer upsampling all use it.

    Args:
        array: numpy array or torch tensor of any dimensionality.
        axis: the axis to resample (negative values count from the end).
        n_new: new length of that axis.
        is_label: nearest neighbour (values unchanged) instead of linear interpolation.

    Returns:
        Same type as ``array``. Labels keep their dtype; linear interpolation returns float32 for
        integer input and the input's float dtype otherwise. Returns ``array`` itself when the
        length is already ``n_new``.
    """
    n_old = array.shape[axis]
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    if n_old == n_new:
        return array
    pos = source_positions(n_old, n_new)
    if is_label:
        return _take(array, axis, np.clip(np.floor(pos + 0.5), 0, n_old - 1).astype(np.int64))
    pos = np.clip(pos, 0.0, n_old - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_old - 1)
    shape = [1] * array.ndim
    shape[axis] = n_new
    w = (pos - lo).astype(np.float32).reshape(shape)
    if isinstance(array, np.ndarray):
        x = array if array.dtype.kind == "f" else array.astype(np.float32)
        w = w.astype(x.dtype)
    else:
        import torch

        x = array if array.is_floating_point() else array.float()
        w = torch.from_numpy(w).to(x.device, x.dtype)
    a = _take(x, axis, lo)
    return a + (_take(x, axis, hi) - a) * w


def inplane_axes(slice_axis: int) -> tuple[int, int]:
    """The two ITK index axes other than ``slice_axis``, in increasing order."""
    return tuple(a for a in range(3) if a != slice_axis)  # type: ignore[return-value]


def resampled_geometry(geometry: Geometry, size: Sequence[int]) -> Geometry:
    """Geometry of the same field of view sampled with ``size`` voxels (ITK order ``(ni, nj, nk)``).

    Spacing becomes ``old * old_n / new_n``; the origin moves by half the change of voxel size along
    each index axis so the outer edges stay put; the direction is kept.
    """
    old_size = geometry.size
    d = geometry.direction_matrix
    spacing = [geometry.spacing[a] * old_size[a] / size[a] for a in range(3)]
    origin = np.asarray(geometry.origin, dtype=np.float64).copy()
    for a in range(3):
        origin += 0.5 * (spacing[a] - geometry.spacing[a]) * d[:, a]
    return Geometry(
        shape=(int(size[2]), int(size[1]), int(size[0])),
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=geometry.direction,
    )


def resample_inplane(volume: Volume, size: Sequence[int], is_label: bool, slice_axis: int | None = None,
                     dtype: np.dtype | type | None = None) -> Volume:
    """Resample the two in-plane axes to ``size``; slice count, field of view and direction kept.

    Args:
        volume: input volume.
        size: ``(s1, s2)``, the new sizes of the in-plane ITK index axes in increasing order
            (for the usual axial storage: ``s1`` along ``i``/x (array columns), ``s2`` along ``j``/y
            (array rows), so the array becomes ``(nk, s2, s1)``).
        is_label: nearest neighbour instead of linear interpolation.
        slice_axis: ITK index axis kept as is; default: the one closest to superior-inferior
            (:func:`data.volume.slice_axis_index`), not blindly ``k``.
        dtype: output dtype; default the input's (integer images are rounded and saturated).

    Returns:
        The resampled volume; ``volume`` itself when the in-plane size already matches and no
        dtype change is asked for.
    """
    import SimpleITK as sitk  # noqa: N813

    geo = volume.geometry
    if slice_axis is None:
        slice_axis = slice_axis_index(geo)
    new_size = list(geo.size)
    for a, s in zip(inplane_axes(slice_axis), size):
        if int(s) < 1:
            raise ValueError(f"in-plane size must be >= 1, got {tuple(size)}")
        new_size[a] = int(s)
    out_dtype = np.dtype(dtype) if dtype is not None else volume.array.dtype
    if tuple(new_size) == tuple(geo.size):
        if out_dtype == volume.array.dtype:
            return volume
        return volume.with_array(_cast_like(volume.array, out_dtype))
    new_geo = resampled_geometry(geo, new_size)
    if is_label:
        # Index-space nearest neighbour (numpy): ties such as an exact 2x downsampling always round
        # up, whereas ITK's physical-point round trip breaks them by floating-point noise.
        array = volume.array
        for a in inplane_axes(slice_axis):
            array = resample_axis(array, 2 - a, new_size[a], is_label=True)
        array = np.ascontiguousarray(array)
        if array.dtype != out_dtype:
            array = array.astype(out_dtype)
        return Volume(array, new_geo)
    # Interpolate in float64/float32 and round ourselves: ITK would truncate for integer outputs.
    src = volume.array.astype(np.float64 if volume.array.dtype == np.float64 else np.float32)
    img = to_sitk(volume.with_array(src))
    out = sitk.Resample(img, new_size, sitk.Transform(), sitk.sitkLinear, new_geo.origin, new_geo.spacing,
                        new_geo.direction, 0, img.GetPixelID())
    array = _cast_like(sitk.GetArrayFromImage(out), out_dtype)
    # Keep the computed geometry rather than ITK's float round trip, so it is exact.
    return Volume(array, new_geo)


__all__ = ["inplane_axes", "resample_axis", "resample_inplane", "resampled_geometry", "source_positions"]
