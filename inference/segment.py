"""Whole-volume inference: 2.5D slices, in-plane sliding window, multi-view fusion, exact geometry back.

Pipeline of :func:`segment_volume` (the preprocessing is the training cache's, :mod:`data.preprocess`)::

    canonical, orientation = prepare_canonical(volume)          # LPS, in-plane resampled to 256x256
    windowed = window_hu(canonical)                             # [-1, 1]
    for every model (one per view, possibly several per view):
        stack = view_stack(windowed, view)                      # (n, H, W)
        probs_view = softmax over 2.5D slices (edge clamped),  # sliding window when H or W > block,
                     averaged over TTA flips                    # padded to a multiple of 16 otherwise
        probs += view_to_canonical(probs_view)                  # (C, nS, 256, 256)
    probs /= number of models
    labels = argmax(resample probs in-plane to the original canonical grid), slab by slab
    labels = largest connected components per organ (optional)
    return orientation.invert(labels) on the input's exact grid

Memory: probabilities are only held on the resampled (256x256) canonical grid in float32; the way
back to the original in-plane size is done a few slices at a time straight into a uint8 argmax, so a
512x512x600 CT needs roughly 2-3 GB on the CPU (most of it transient preprocessing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from data.config import Config
from data.preprocess import preprocess_image, view_stack, view_to_canonical
from data.volume import VIEWS, Volume
from engine.runtime import resolve_device
from inference.model import DIVISOR, LoadedModel, load_model
from inference.outputs import plan_outputs
from inference.postprocess import keep_largest_components
from inference.window import (
    TTA_FLIPS,
    TilePlan,
    blend_weights,
    plan_tiles,
    predict_stack,
    tile_size,
    window_starts,
)
from utils.errors import InputError


def _common_config(models: Sequence[LoadedModel]) -> Config:
    first = models[0]
    for m in models[1:]:
        for what, a, b in (("organs", m.organs, first.organs),
                           ("HU window", m.config.hu_window, first.config.hu_window),
                           ("in-plane size", m.config.inplane_size, first.config.inplane_size),
                           ("in-plane spacing", (m.config.inplane_spacing,),
                            (first.config.inplane_spacing,))):
            if tuple(a) != tuple(b):
                raise InputError(m.path, f"checkpoint {what} {tuple(a)} differs from {first.path}'s "
                                 f"{tuple(b)}; models fused together must share it")
    return first.config


def probabilities_to_labels(probs: np.ndarray, out_shape: Sequence[int], device: torch.device,
                            slab_bytes: int = 64 << 20) -> np.ndarray:
    """Resample ``(C, nS, h, w)`` probabilities in-plane to ``out_shape`` (nS, H, W), then argmax.

    Linear interpolation of probabilities (field of view kept, the convention of
    :mod:`data.resample`), done a slab of slices at a time so that only the uint8 result exists at
    full resolution.

    Returns:
        uint8 class map of shape ``out_shape``.
    """
    c, n_s, h, w = probs.shape
    n_s2, big_h, big_w = (int(s) for s in out_shape)
    if n_s2 != n_s:
        raise ValueError(f"slice count changed: {n_s} -> {n_s2}")
    labels = np.empty((n_s, big_h, big_w), dtype=np.uint8)
    slab = max(1, slab_bytes // max(1, c * big_h * big_w * 4))
    for z0 in range(0, n_s, slab):
        z1 = min(z0 + slab, n_s)
        p = torch.from_numpy(probs[:, z0:z1]).to(device)
        if (big_h, big_w) != (h, w):
            # Bilinear without corner alignment samples source index (t + 1/2) * h / H - 1/2, clamped
            # to the grid: exactly data.resample's field-of-view-keeping convention (tested), and
            # much faster than two gathers.
            p = torch.nn.functional.interpolate(p, size=(big_h, big_w), mode="bilinear",
                                                align_corners=False)
        labels[z0:z1] = _argmax0(p).cpu().numpy()
    return labels


def _argmax0(p: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over dim 0 (few classes): a running maximum, much faster than Tensor.argmax on
    the CPU for a reduction over the outermost axis. Ties go to the lower class, as argmax."""
    best = p[0].clone()
    idx = torch.zeros(p.shape[1:], dtype=torch.uint8, device=p.device)
    for k in range(1, p.shape[0]):
        better = p[k] > best
        idx[better] = k
        torch.maximum(best, p[k], out=best)
    return idx


def _fused_probabilities(models: Sequence[LoadedModel], image: np.ndarray, spacing: Sequence[float],
                         progress: bool, **predict: Any) -> np.ndarray:
    """Sum of every model's softmax probabilities ``(C, nS, H, W)`` on the canonical grid.

    Each view's stack is predicted once per model of that view and brought back to the canonical
    grid (:func:`view_to_canonical`); ``predict`` goes to :func:`predict_stack`.
    """
    c = models[0].num_classes
    probs = np.zeros((c, *image.shape), dtype=np.float32)
    bar = None
    if progress:
        from tqdm import tqdm

        n_slices = dict(zip(VIEWS, image.shape))  # slices per view: along S, P, L
        total = sum(math.ceil(n_slices[m.view] / predict["batch"]) for m in models)
        bar = tqdm(total=total, desc="segment", unit="batch", leave=False)
    try:
        for view in [v for v in VIEWS if any(m.view == v for m in models)]:
            stack = view_stack(image, spacing, view, is_label=False)
            members = [m for m in models if m.view == view]
            if view == "axial":
                for m in members:  # axial stack layout == canonical: accumulate in place
                    predict_stack(m, stack, probs, progress=bar, **predict)
                continue
            acc = np.zeros((c, *stack.shape), dtype=np.float32)
            for m in members:
                predict_stack(m, stack, acc, progress=bar, **predict)
            del stack
            for k in range(c):  # one class at a time: the S-I resampling makes temporaries
                probs[k] += view_to_canonical(acc[k], image.shape, view)
            del acc
    finally:
        if bar is not None:
            bar.close()
    return probs


def default_batch(device: torch.device) -> int:
    """Slices per forward pass: 16 on a GPU; 1 on a CPU, where :func:`predict_stack` runs one pass
    per core side by side (256x256 slices, width 16, 2 cores, AVX2 kernels: 25.9 slices/s with one
    slice per pass, 23.4 with two; one pass of two slices on two intra-op threads: 22.3)."""
    return 16 if device.type == "cuda" else 1


def segment_volume(models: LoadedModel | Sequence[LoadedModel], volume: Volume, *, batch: int | None = None,
                   tta: bool = False, postprocess: bool = True, device: str | torch.device | None = None,
                   amp: bool | None = None, progress: bool = False, tile: int | None = None,
                   workers: int | None = None) -> Volume:
    """Segment a CT volume; the result lies on the input's exact grid.

    Args:
        models: one model or several (e.g. axial, coronal, sagittal); their softmax probabilities
            are averaged on the canonical grid (multi-view fusion). They must share organs, HU window
            and in-plane size.
        volume: CT in HU, any orientation (oblique grids are handled by their closest axes).
        batch: slices per forward pass; None: :func:`default_batch` of the device.
        tta: average over the four flips of the slice plane too (4x slower).
        postprocess: keep the largest connected component(s) of each organ
            (``config.components``; 1 by default).
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        amp: bf16 autocast; default on for CUDA (ignored on the CPU).
        progress: show a progress bar on stderr.
        tile: in-plane sliding-window tile size (see :func:`predict_stack`); 0 = whole
            slices (padded to a multiple of 16), ~3x faster for 256 slices and 224 blocks.
        workers: threads running forward passes side by side (see :func:`predict_stack`); None:
            one per intra-op thread on a CPU (at most 4), 1 on a GPU.

    Returns:
        uint8 label map (0 background, ``i + 1`` = ``organs[i]``) with the input's geometry.

    Raises:
        InputError: models that cannot be fused, CUDA asked for but missing.
    """
    models = [models] if isinstance(models, LoadedModel) else list(models)
    if not models:
        raise ValueError("segment_volume needs at least one model")
    config = _common_config(models)
    dev = resolve_device(device)
    batch = default_batch(dev) if batch is None else batch
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    amp = (dev.type == "cuda") if amp is None else bool(amp)
    for m in models:
        m.model.eval().to(dev)

    # The checkpoint's in-plane mode (old checkpoints: pad mode); never crop at inference.
    canon, orientation, plan = preprocess_image(volume, config.hu_window, config.inplane_size,
                                                config.inplane_spacing, allow_crop=False)
    image, spacing = canon.array, canon.geometry.spacing
    del canon
    probs = _fused_probabilities(models, image, spacing, progress, batch=batch, tta=tta, device=dev,
                                 amp=amp, tile=tile, workers=workers)
    del image
    probs /= np.float32(len(models))

    # The canonical shape of the original grid: transposing a zero-stride view costs nothing.
    # Undo the in-plane plan: drop the grid padding, resample to the padded source grid, drop the
    # air padding (after the argmax: cropping commutes with it).
    canonical_shape = orientation.apply(np.broadcast_to(np.uint8(0), volume.array.shape)).shape
    probs = plan.crop_post(probs)
    labels = probabilities_to_labels(probs, (canonical_shape[0], *plan.padded), dev)
    del probs
    labels = np.ascontiguousarray(plan.crop_pre(labels))
    if postprocess:
        keep_largest_components(labels, config, inplace=True)
    out = np.ascontiguousarray(orientation.invert(labels))
    return Volume(out, volume.geometry)


# The modules this one was split into (issue 16) re-exported: `from inference.segment import ...` keeps
# working for segment.py, bench/ and the tests.
__all__ = ["DIVISOR", "TTA_FLIPS", "LoadedModel", "TilePlan", "blend_weights", "default_batch", "load_model",
           "plan_outputs",
           "plan_tiles", "predict_stack", "probabilities_to_labels", "segment_volume", "tile_size",
           "window_starts"]
