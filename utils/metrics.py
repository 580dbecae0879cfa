"""Segmentation metrics: Dice, surface distances (HD95, ASSD) in millimetres, volumes.

Pure numpy/scipy functions in two stages: statistics (overlap counts, surface distances), then
scores computed from them.

Spacing convention
------------------
Every ``spacing`` argument here is in **numpy axis order** ``(z, y, x)`` -- the order of the
array's axes. :class:`data.volume.Geometry` stores spacing in ITK order ``(x, y, z)``, so pass
``geometry.spacing[::-1]``.

Empty-mask conventions
----------------------
* both masks empty: Dice 1, HD95 0, ASSD 0 (nothing to find, nothing found);
* exactly one empty: Dice 0, HD95 and ASSD ``inf`` (callers report them as not finite).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Spacing = Sequence[float]


@dataclass(frozen=True)
class OverlapStats:
    """Voxel counts of a binary prediction against a binary ground truth."""

    tp: int
    fp: int
    fn: int

    @property
    def pred_count(self) -> int:
        return self.tp + self.fp

    @property
    def gt_count(self) -> int:
        return self.tp + self.fn


def overlap_stats(pred_mask: np.ndarray, gt_mask: np.ndarray) -> OverlapStats:
    """True positives, false positives and false negatives of two same-shaped boolean masks.

    Raises:
        ValueError: shapes differ.
    """
    pred, gt = _check_pair(pred_mask, gt_mask)
    tp = int(np.count_nonzero(pred & gt))
    return OverlapStats(tp=tp, fp=int(np.count_nonzero(pred)) - tp, fn=int(np.count_nonzero(gt)) - tp)


def dice_from_stats(stats: OverlapStats) -> float:
    """Dice ``2 TP / (2 TP + FP + FN)``; 1.0 when both masks are empty."""
    denom = 2 * stats.tp + stats.fp + stats.fn
    return 1.0 if denom == 0 else 2.0 * stats.tp / denom


def dice(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (both empty: 1.0, one empty: 0.0)."""
    return dice_from_stats(overlap_stats(pred_mask, gt_mask))


def volume_ml(mask: np.ndarray, spacing: Spacing) -> float:
    """Volume of a boolean mask in millilitres; ``spacing`` in mm, numpy axis order."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its erosion (6-neighbourhood in 3D).

    Voxels on the array border count as surface (the outside is background).
    """
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_distances(pred_mask: np.ndarray, gt_mask: np.ndarray,
                      spacing: Spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) between the surfaces of two masks, in both directions.

    Only the bounding box of ``pred | gt`` plus one voxel is processed, which gives the same
    surfaces and distances as the full array (all surface voxels lie inside it) at a fraction
    of the memory.

    Args:
        pred_mask, gt_mask: boolean masks of the same shape (2D or 3D).
        spacing: voxel size in mm per array axis, numpy order (``(z, y, x)`` in 3D).

    Returns:
        ``(pred_to_gt, gt_to_pred)``: for every surface voxel of ``pred`` the distance to the
        nearest surface voxel of ``gt``, and vice versa (float64 1D arrays). When one mask is
        empty the other's distances are all ``inf`` and its own array is empty.

    Raises:
        ValueError: shapes differ or ``spacing`` has the wrong length / non-positive values.
    """
    pred, gt = _check_pair(pred_mask, gt_mask)
    sp = _check_spacing(spacing, pred.ndim)
    union = pred | gt
    if not union.any():
        return np.zeros(0), np.zeros(0)
    box = bounding_box(union, margin=1)
    pred, gt = pred[box], gt[box]
    s_pred, s_gt = surface(pred), surface(gt)
    if not s_gt.any():
        return np.full(int(s_pred.sum()), np.inf), np.zeros(0)
    if not s_pred.any():
        return np.zeros(0), np.full(int(s_gt.sum()), np.inf)
    # distance_transform_edt measures the distance to the nearest zero voxel: zeros = surface.
    to_gt = ndimage.distance_transform_edt(~s_gt, sampling=sp)
    pred_to_gt = to_gt[s_pred]
    del to_gt
    to_pred = ndimage.distance_transform_edt(~s_pred, sampling=sp)
    return np.asarray(pred_to_gt, dtype=np.float64), np.asarray(to_pred[s_gt], dtype=np.float64)


def _empty_distance(pred_to_gt: np.ndarray, gt_to_pred: np.ndarray) -> float | None:
    """The surface distance when a mask is empty (one convention for HD95 and ASSD): 0 when both
    are, ``inf`` when exactly one is, None when neither is."""
    if pred_to_gt.size == 0 and gt_to_pred.size == 0:
        return 0.0
    if pred_to_gt.size == 0 or gt_to_pred.size == 0:
        return float("inf")
    return None


def hd95_from_distances(pred_to_gt: np.ndarray, gt_to_pred: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance: the larger of the two directed 95th percentiles.

    Both arrays empty (both masks empty) gives 0; exactly one mask empty gives ``inf``.
    """
    empty = _empty_distance(pred_to_gt, gt_to_pred)
    if empty is not None:
        return empty
    return float(max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95)))


def assd_from_distances(pred_to_gt: np.ndarray, gt_to_pred: np.ndarray) -> float:
    """Average symmetric surface distance: mean over all surface voxels of both masks."""
    empty = _empty_distance(pred_to_gt, gt_to_pred)
    if empty is not None:
        return empty
    return float((pred_to_gt.sum() + gt_to_pred.sum()) / (pred_to_gt.size + gt_to_pred.size))


def hd95(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Spacing) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (spacing in numpy axis order)."""
    return hd95_from_distances(*surface_distances(pred_mask, gt_mask, spacing))


def assd(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Spacing) -> float:
    """Average symmetric surface distance in mm (spacing in numpy axis order)."""
    return assd_from_distances(*surface_distances(pred_mask, gt_mask, spacing))


def organ_metrics(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: Spacing) -> dict[str, float]:
    """Dice, HD95, ASSD (mm) and both volumes (ml) of one organ.

    Returns:
        ``{"dice", "hd95", "assd", "vol_pred_ml", "vol_gt_ml"}``.
    """
    pred, gt = _check_pair(pred_mask, gt_mask)
    d_pg, d_gp = surface_distances(pred, gt, spacing)
    return {
        "dice": dice(pred, gt),
        "hd95": hd95_from_distances(d_pg, d_gp),
        "assd": assd_from_distances(d_pg, d_gp),
        "vol_pred_ml": volume_ml(pred, spacing),
        "vol_gt_ml": volume_ml(gt, spacing),
    }


def evaluate_case(pred_labels: np.ndarray, gt_labels: np.ndarray, spacing_zyx: Spacing,
                  class_ids: Mapping[str, int]) -> dict[str, dict[str, float]]:
    """Per-organ metrics of a label map against a ground-truth label map on the same grid.

    Args:
        pred_labels, gt_labels: integer label maps of the same shape (class indices).
        spacing_zyx: voxel size in mm in numpy axis order (``Geometry.spacing[::-1]``).
        class_ids: organ name -> class index to evaluate (e.g. ``{"liver": 1, "kidney": 2}``).

    Returns:
        organ name -> :func:`organ_metrics` dict.

    Raises:
        ValueError: shapes differ, bad spacing.
    """
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} != ground truth shape {gt_labels.shape}")
    return {name: organ_metrics(pred_labels == cid, gt_labels == cid, spacing_zyx)
            for name, cid in class_ids.items()}


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    return a, b


def _check_spacing(spacing: Spacing, ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing {spacing} must hold {ndim} positive values (numpy axis order)")
    return sp


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel, grown by ``margin`` (clipped to the
    array); None for an empty mask. Used by the metrics and the post-processing."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        box.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)
