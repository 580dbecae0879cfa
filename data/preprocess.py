"""The one preprocessing shared by the training cache and inference.

Image pipeline (labels: same steps without windowing, nearest neighbour)::

    canon, orientation = prepare_canonical(volume, config.inplane_size, is_label=False,
                                           spacing_mm=config.inplane_spacing)  # pad / spacing mode
    windowed = window_hu(canon.array, config.hu_window)            # [S, P, L] float32 in [-1, 1]
    stack = view_stack(windowed, canon.geometry.spacing, view, is_label=False)   # (n, H, W)

:func:`preprocess_image` runs the first two steps. The cache stores ``windowed`` (the axial stack)
and derives the other views from it with :func:`view_stack`, so a cached sample is bit-identical to
what inference computes from the file.

View layouts on a canonical ``[S, P, L]`` array (see :mod:`data.volume`):

* ``axial``: the array itself, ``(nS, nP, nL)``.
* ``coronal``: ``(nP, nS', nL)``, slices along P.
* ``sagittal``: ``(nL, nS', nP)``, slices along L.

``nS'`` is the S-I axis resampled (field of view kept, see :mod:`data.resample`) to the in-plane
spacing ``min(spacing_x, spacing_y)``, so coronal and sagittal images have (nearly) square pixels.
Row 0 of a coronal/sagittal image is the most inferior position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data.inplane import InplanePlan, apply_plan, plan_inplane
from data.resample import resample_axis
from data.volume import VIEWS, Orientation, Volume, to_canonical

# What padding adds to a windowed image (training crops, inference tiles): air, the lower end of the
# window ([-1, 1]); data.inplane.AIR_HU is the same air before windowing.
PAD_WINDOWED = -1.0


def window_hu(array: np.ndarray, hu_window: Sequence[float]) -> np.ndarray:
    """Clip intensities to ``hu_window`` and scale linearly to ``[-1, 1]``.

    Args:
        array: CT intensities (HU), any shape and numeric dtype.
        hu_window: ``(low, high)`` with ``low < high``.

    Returns:
        float32 array of the same shape.
    """
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if not lo < hi:
        raise ValueError(f"hu_window must be (low, high) with low < high, got {tuple(hu_window)}")
    x = np.asarray(array, dtype=np.float32)
    out = np.clip(x, lo, hi)
    out -= np.float32(lo)
    out *= np.float32(2.0 / (hi - lo))
    out -= np.float32(1.0)
    return out


def prepare_with_plan(volume: Volume, inplane_size: Sequence[int], is_label: bool,
                      spacing_mm: float | None = None,
                      allow_crop: bool = True) -> tuple[Volume, Orientation, InplanePlan]:
    """Reorient to canonical LPS, then bring the slice plane to the grid without stretching it.

    Args:
        volume: a volume as read by :func:`data.volume.read_volume`.
        inplane_size: ``(s1, s2)`` = (columns, rows) of the grid: sizes of canonical index axes ``i``
            (L, array columns) and ``j`` (P, array rows); the canonical array becomes ``(nS, s2, s1)``
            (spacing mode without cropping: at least that).
        is_label: nearest neighbour, dtype kept, background padding (labels); otherwise linear
            interpolation, air padding and float32 (no rounding before windowing).
        spacing_mm: None = pad mode, else spacing mode (see :mod:`data.inplane`).
        allow_crop: spacing mode: crop slices larger than the grid (training) or not (inference).

    Returns:
        The canonical volume (exact geometry), the :class:`~data.volume.Orientation` whose
        ``invert`` maps canonical arrays back to the input's array order, and the
        :class:`~data.inplane.InplanePlan` of the in-plane steps (undo them first, see
        :func:`restore_inplane`).
    """
    canon, orientation = to_canonical(volume)
    plan = plan_inplane(canon.array.shape[1:], canon.geometry.spacing, inplane_size, spacing_mm,
                        allow_crop=allow_crop)
    return apply_plan(canon, plan, is_label=is_label), orientation, plan


def prepare_canonical(volume: Volume, inplane_size: Sequence[int], is_label: bool,
                      spacing_mm: float | None = None) -> tuple[Volume, Orientation]:
    """:func:`prepare_with_plan` without the plan (the training cache's form)."""
    out, orientation, _ = prepare_with_plan(volume, inplane_size, is_label, spacing_mm)
    return out, orientation


def preprocess_image(volume: Volume, hu_window: Sequence[float], inplane_size: Sequence[int],
                     spacing_mm: float | None = None,
                     allow_crop: bool = True) -> tuple[Volume, Orientation, InplanePlan]:
    """:func:`prepare_with_plan` then :func:`window_hu`: the canonical network-input volume.

    Returns:
        Canonical float32 volume in ``[-1, 1]`` (its array is the axial stack), the orientation and
        the in-plane plan.
    """
    canon, orientation, plan = prepare_with_plan(volume, inplane_size, False, spacing_mm, allow_crop)
    return canon.with_array(window_hu(canon.array, hu_window)), orientation, plan


def restore_inplane(array, inplane_shape: Sequence[int], is_label: bool = False):
    """Resample the last two axes of a canonical array back to ``inplane_shape`` ``(nP, nL)``.

    The inverse grid mapping of the in-plane resampling step (same field of view; separable linear =
    ITK's linear on this axis-aligned grid), for probability stacks ``(..., nS, H, W)``: with an
    :class:`~data.inplane.InplanePlan`, ``plan.crop_pre(restore_inplane(plan.crop_post(x),
    plan.padded))`` is the source grid.

    Args:
        array: numpy array or torch tensor ``(..., H, W)``.
        inplane_shape: ``(nP, nL)`` to resample to.
        is_label: nearest neighbour instead of linear.

    Returns:
        ``(..., nP, nL)``, same type as ``array``.
    """
    out = resample_axis(array, array.ndim - 1, int(inplane_shape[1]), is_label)
    return resample_axis(out, array.ndim - 2, int(inplane_shape[0]), is_label)


def _check_view(view: str) -> None:
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")


def si_length(n_si: int, spacing_canonical: Sequence[float]) -> int:
    """Length of the S-I axis after resampling it to the in-plane spacing (coronal/sagittal views).

    Args:
        n_si: canonical slice count (array axis 0).
        spacing_canonical: canonical spacing ``(x, y, z)`` (ITK order).
    """
    target = min(float(spacing_canonical[0]), float(spacing_canonical[1]))
    return max(1, int(round(n_si * float(spacing_canonical[2]) / target)))


def view_stack(array_canonical: np.ndarray, spacing_canonical: Sequence[float], view: str,
               is_label: bool) -> np.ndarray:
    """The ``(n, H, W)`` stack of a view's slices from a canonical ``[S, P, L]`` array.

    Args:
        array_canonical: canonical 3D array (windowed image or class map).
        spacing_canonical: its spacing ``(x, y, z)`` in ITK order.
        view: ``axial`` | ``coronal`` | ``sagittal``.
        is_label: nearest neighbour for the S-I resampling instead of linear.

    Returns:
        Axial: the array itself (no copy). Coronal ``(nP, nS', nL)`` and sagittal ``(nL, nS', nP)``:
        new contiguous arrays, ``nS' =`` :func:`si_length`. Images stay float32; labels keep dtype.
    """
    _check_view(view)
    if array_canonical.ndim != 3:
        raise ValueError(f"expected a 3D canonical array, got shape {array_canonical.shape}")
    if view == "axial":
        return array_canonical
    n_si = si_length(array_canonical.shape[0], spacing_canonical)
    res = resample_axis(array_canonical, 0, n_si, is_label=is_label)
    if not is_label and res.dtype != np.float32:
        res = res.astype(np.float32)
    order = (1, 0, 2) if view == "coronal" else (2, 0, 1)
    return np.ascontiguousarray(np.transpose(res, order))


def view_to_canonical(stack, canonical_shape: Sequence[int], view: str):
    """Bring a view's stack (e.g. class probabilities) back onto the canonical grid.

    Args:
        stack: numpy array or torch tensor ``(..., n, H, W)`` in the layout :func:`view_stack`
            produced for ``view`` (leading axes, e.g. classes, are kept).
        canonical_shape: the canonical array shape ``(nS, nP, nL)``.
        view: the view ``stack`` is laid out in.

    Returns:
        ``(..., nS, nP, nL)``, same type as ``stack``. The S-I axis is resampled back linearly
        (probabilities stay probabilities: a convex combination), so the views can be averaged.

    Raises:
        ValueError: when the stack does not fit ``canonical_shape`` for this view.
    """
    _check_view(view)
    n_s, n_p, n_l = (int(s) for s in canonical_shape)
    lead = stack.ndim - 3
    if lead < 0:
        raise ValueError(f"stack needs at least 3 dims, got shape {tuple(stack.shape)}")
    got = tuple(int(s) for s in stack.shape[lead:])
    if view == "axial":
        if got != (n_s, n_p, n_l):
            raise ValueError(f"axial stack {got} does not match canonical shape {(n_s, n_p, n_l)}")
        return stack
    if view == "coronal":
        ok = got[0] == n_p and got[2] == n_l
        order = (1, 0, 2)  # (P, S', L) -> (S', P, L)
    else:
        ok = got[0] == n_l and got[2] == n_p
        order = (1, 2, 0)  # (L, S', P) -> (S', P, L)
    if not ok:
        raise ValueError(f"{view} stack {got} does not match canonical shape {(n_s, n_p, n_l)}")
    axes = list(range(lead)) + [lead + a for a in order]
    x = stack.permute(*axes) if not isinstance(stack, np.ndarray) else np.transpose(stack, axes)
    out = resample_axis(x, lead, n_s, is_label=False)
    if isinstance(out, np.ndarray):
        return np.ascontiguousarray(out)
    return out.contiguous()


__all__ = ["PAD_WINDOWED", "preprocess_image", "prepare_canonical", "prepare_with_plan", "restore_inplane",
           "si_length", "view_stack", "view_to_canonical", "window_hu"]
