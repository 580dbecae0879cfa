"""Prediction of one view's stack of slices: 2.5D slabs, in-plane sliding window, blending, TTA.

Pure helpers (tile starts, tile sizes, Gaussian blending weights) and :func:`predict_stack`, which
adds one model's softmax probabilities for every slice into an accumulator.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from data.preprocess import PAD_WINDOWED
from data.slab import slab_indices
from engine.runtime import autocast
from inference.model import DIVISOR, TTA_FLIPS, LoadedModel

# Pure helpers: window positions and blending weights


def window_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)`` with the given stride.

    The last tile is aligned with the end, so every position is covered and no tile leaves the
    image. ``size <= tile`` gives ``[0]``.
    """
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, max(1, stride)))
    starts.append(size - tile)
    return starts


def tile_size(size: int, block: int) -> int:
    """The tile length used along an axis of length ``size``: ``block`` when the axis is longer,
    else ``size`` rounded up to a multiple of 16 (the whole axis in one, padded, tile).

    Tiles are at least 32: a 16-pixel tile leaves the network's 1/16 scale one pixel, where
    instance normalisation has nothing to normalise (PyTorch refuses it at batch 1)."""
    block = max(2 * DIVISOR, block - block % DIVISOR)
    if size > block:
        return block
    return int(math.ceil(size / DIVISOR) * DIVISOR)


def blend_weights(tile: int, n_tiles: int, sigma_scale: float = 0.125) -> np.ndarray:
    """1D blending weights for one axis: a Gaussian (sigma = tile / 8) when tiles overlap, else ones.

    The outer 1/8th of each tile -- where a convolutional network sees the least context -- counts
    little where tiles overlap. The minimum is kept well above zero so every position has weight.
    """
    if n_tiles <= 1:
        return np.ones(tile, dtype=np.float32)
    x = np.arange(tile, dtype=np.float64) - (tile - 1) / 2.0
    g = np.exp(-0.5 * (x / (sigma_scale * tile)) ** 2)
    return np.maximum(g / g.max(), 1e-3).astype(np.float32)


@dataclass(frozen=True)
class TilePlan:
    """How a (H, W) slice is cut: padded size, tile size and tile starts per axis, blending weights."""

    height: int
    width: int
    padded: tuple[int, int]
    tile: tuple[int, int]
    starts: tuple[list[int], list[int]]
    weight: np.ndarray  # (tile_h, tile_w)

    @property
    def n_tiles(self) -> int:
        return len(self.starts[0]) * len(self.starts[1])


def plan_tiles(height: int, width: int, block: int) -> TilePlan:
    """Sliding-window plan for ``height x width`` slices with tiles of ``block`` and stride block/2."""
    th, tw = tile_size(height, block), tile_size(width, block)
    ph, pw = max(height, th), max(width, tw)
    sh, sw = window_starts(ph, th, th // 2), window_starts(pw, tw, tw // 2)
    weight = np.outer(blend_weights(th, len(sh)), blend_weights(tw, len(sw)))
    return TilePlan(height, width, (ph, pw), (th, tw), (sh, sw), weight)


# ----------------------------------------------------------------------------------------------
# Prediction of one view's stack

# On the CPU the stack is shared among threads that each run whole forward passes with their share of
# torch's intra-op threads. A width-16 network's convolutions are too small for two intra-op threads
# to keep two cores busy: two single-threaded passes side by side segmented 1.17x more slices per
# second than one pass on two threads (256x256 slices, AVX2 kernels: 25.9 vs 22.3 slices/s). More
# than 4 would only multiply the activation memory.
MAX_CPU_WORKERS = 4


def cpu_workers(device: torch.device) -> int:
    """Threads :func:`predict_stack` runs forward passes on: on the CPU torch's intra-op thread
    count, at most :data:`MAX_CPU_WORKERS`; elsewhere 1."""
    return max(1, min(torch.get_num_threads(), MAX_CPU_WORKERS)) if device.type == "cpu" else 1


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    # bf16 autocast on CUDA only (engine.runtime.autocast runs full precision for None)
    return torch.bfloat16 if amp and device.type == "cuda" else None


@torch.inference_mode()
def _predict_padded(model: nn.Module, x: torch.Tensor, plan: TilePlan, weight: torch.Tensor,
                    norm: torch.Tensor, num_classes: int, amp: bool) -> torch.Tensor:
    """Blended softmax probabilities (B, C, ph, pw) of a padded batch, tile by tile."""
    b = x.shape[0]
    (th, tw), (sh, sw) = plan.tile, plan.starts
    if plan.n_tiles == 1:
        with autocast(x.device, _amp_dtype(x.device, amp)):
            logits = model(x).logits
        return torch.softmax(logits.float(), dim=1)
    acc = torch.zeros((b, num_classes, *plan.padded), dtype=torch.float32, device=x.device)
    for h0 in sh:
        for w0 in sw:
            with autocast(x.device, _amp_dtype(x.device, amp)):
                logits = model(x[..., h0:h0 + th, w0:w0 + tw]).logits
            acc[..., h0:h0 + th, w0:w0 + tw] += torch.softmax(logits.float(), dim=1) * weight
    return acc / norm


@torch.inference_mode()
def predict_stack(loaded: LoadedModel, stack: np.ndarray, out: np.ndarray, *, batch: int = 16,
                  tta: bool = False, device: torch.device | None = None, amp: bool = False,
                  progress: Any = None, tile: int | None = None, workers: int | None = None) -> None:
    """Add a model's softmax probabilities for every slice of a view stack into ``out``.

    Args:
        loaded: the model (its ``slices`` and ``block`` are used).
        stack: ``(n, H, W)`` float32 windowed slices of one view.
        out: ``(C, n, H, W)`` float32 accumulator; probabilities are *added* (so several models can
            share it), each slice's probabilities summing to 1.
        batch: slices per forward pass.
        tta: also average over the flips of the slice plane the model was trained with
            (``loaded.tta_flips``; none for a model trained without ``--flip``).
        device: compute device (default: the model's).
        amp: bf16 autocast on CUDA.
        progress: a tqdm-like object updated once per batch, or None.
        tile: sliding-window tile size; 0 = never tile (whole slices, padded to a multiple of 16);
            None = whole slices up to the area of a square of twice the training block, tiles of
            the block beyond.
        workers: threads running forward passes side by side, each on its own batches with an equal
            share of the intra-op threads (restored afterwards); None = :func:`cpu_workers`. Every
            batch is the same computation whichever thread runs it; a different intra-op thread
            count per pass may change the last bits of a convolution.
    """
    model = loaded.model
    if device is None:
        device = next(model.parameters()).device
    n, h, w = stack.shape
    c = loaded.num_classes
    if out.shape != (c, n, h, w):
        raise ValueError(f"accumulator shape {out.shape} != {(c, n, h, w)}")
    if tile is None:
        # The network is fully convolutional with adaptive pooling and validation scores whole
        # slices, so whole slices are both faster (no overlap) and what the best checkpoint was
        # chosen on; only much larger slices are tiled, to bound activation memory.
        # The bound is on the area (activation memory), not the longer side: coronal and sagittal
        # slices of a long scan are tall and narrow (S-I resampled to the in-plane spacing), and
        # tiling a 625 x 256 slice with 224 tiles at half stride computed 3x its pixels.
        tile = 0 if h * w <= (2 * loaded.block) ** 2 else loaded.block
    block = tile
    if block <= 0:  # whole slices: one tile, the slice padded to a multiple of 16
        block = tile_size(max(h, w), 10**9)
    plan = plan_tiles(h, w, block)
    ph, pw = plan.padded
    weight = torch.from_numpy(plan.weight).to(device)
    norm = torch.zeros(plan.padded, dtype=torch.float32, device=device)
    th, tw = plan.tile
    for h0 in plan.starts[0]:
        for w0 in plan.starts[1]:
            norm[h0:h0 + th, w0:w0 + tw] += weight
    flips = loaded.tta_flips if tta else ((),)

    @torch.inference_mode()  # the mode is per thread: a worker thread starts outside it
    def predict_batch(start: int) -> None:
        centres = np.arange(start, min(start + batch, n))
        idx = slab_indices(centres, n, loaded.slices)
        x = torch.from_numpy(np.ascontiguousarray(stack[idx], dtype=np.float32)).to(device)
        if (ph, pw) != (h, w):
            x = torch.nn.functional.pad(x, (0, pw - w, 0, ph - h), value=PAD_WINDOWED)
        probs = None
        for dims in flips:
            xf = x.flip(dims) if dims else x
            p = _predict_padded(model, xf, plan, weight, norm, c, amp)
            p = p.flip(dims) if dims else p
            probs = p if probs is None else probs + p
        probs = probs[..., :h, :w]
        if len(flips) > 1:
            probs = probs / len(flips)
        # batches cover disjoint slices: workers never add into the same part of ``out``
        out[:, centres[0]:centres[-1] + 1] += probs.transpose(0, 1).cpu().numpy()

    starts = range(0, n, batch)
    workers = cpu_workers(device) if workers is None else max(1, int(workers))
    workers = min(workers, len(starts))
    if workers <= 1:
        for start in starts:
            predict_batch(start)
            if progress is not None:
                progress.update(1)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))  # new threads take this count too
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="predict") as pool:
            futures = [pool.submit(predict_batch, s) for s in starts]
            try:
                for done in as_completed(futures):
                    done.result()  # a worker's exception is raised here
                    if progress is not None:
                        progress.update(1)
            except BaseException:
                for f in futures:  # a failed pass or Ctrl-C: do not run the rest of the stack first
                    f.cancel()
                raise
    finally:
        torch.set_num_threads(threads)


__all__ = ["MAX_CPU_WORKERS", "TTA_FLIPS", "TilePlan", "blend_weights", "cpu_workers", "plan_tiles",
           "predict_stack", "tile_size", "window_starts"]
