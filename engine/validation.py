"""Validation on cached volumes: 2.5D prediction of a whole view stack and Dice per dataset and organ.

Full slices, no tiling (the network is fully convolutional); each batch is padded to a multiple of
:data:`models.mosnet.DIVISOR` and cropped back. Partially labeled datasets are scored in their merged
label space: organs a dataset does not label are merged into background before the argmax.

Dice here is :func:`utils.metrics.dice_from_stats` (the project's one Dice) with the validation
convention for an organ absent from both prediction and ground truth: NaN, left out of the means
(nothing to score), where ``utils.metrics.dice`` reports 1.0 for two empty masks.

inference/segment.py has its own 2.5D loop (sliding windows, multi-view fusion, resampling back);
:func:`predict_view_stack` is the untiled case and is reusable by it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from data.config import IGNORE_INDEX, Config
from data.sampling import PAD_IMAGE
from data.slab import slab_indices
from engine.runtime import DistInfo, autocast
from models.mosnet import DIVISOR
from utils.metrics import dice_from_stats, overlap_stats


def pad_to_divisor(x: torch.Tensor, value: float = PAD_IMAGE) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two axes (at the end) to multiples of ``DIVISOR``. Returns ``(padded, (h, w))``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % DIVISOR, (-w) % DIVISOR
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=value)
    return x, (h, w)


@torch.no_grad()
def predict_view_stack(model: nn.Module, stack: np.ndarray, slices: int, device: torch.device,
                       amp_dtype: torch.dtype | None = None, batch: int = 16,
                       labeled_mask: np.ndarray | None = None) -> np.ndarray:
    """Argmax labels for every slice of a ``(n, H, W)`` view stack (2.5D, edge-clamped).

    Args:
        model: the network (in eval mode; see :func:`validate`).
        stack: windowed image slices, the view's slice axis first.
        slices: 2.5D input slices.
        device, amp_dtype: where and in which precision to run.
        batch: slices per forward pass.
        labeled_mask: ``(num_classes,)`` bool; with it the argmax is taken in that dataset's merged
            label space (organs it does not label are merged into background).

    Returns:
        ``(n, H, W)`` uint8 class indices.
    """
    from losses.partial import merge_log_probs

    n = stack.shape[0]
    out = np.zeros(stack.shape, dtype=np.uint8)
    mask_t = None if labeled_mask is None else torch.as_tensor(labeled_mask, device=device)[None]
    for start in range(0, n, batch):
        centres = np.arange(start, min(start + batch, n))
        idx = slab_indices(centres, n, slices)
        x = torch.from_numpy(np.ascontiguousarray(stack[idx], dtype=np.float32)).to(device)
        x, (h, w) = pad_to_divisor(x)
        with autocast(device, amp_dtype):
            logits = model(x).logits
        logits = logits[..., :h, :w].float()
        if mask_t is not None:
            logits = merge_log_probs(logits, mask_t.expand(logits.shape[0], -1))
        # max(1).indices, not argmax(1): the same first-maximum indices, but PyTorch's CPU argmax over
        # the channel axis of a (B, C, H, W) tensor is ~30x slower (a quarter of a validation's time)
        out[centres] = logits.max(1).indices.to(torch.uint8).cpu().numpy()
    return out


def _inference_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """The network to validate with: on the CPU a channels_last copy (oneDNN's convolutions and the
    GroupNorm instance norm run ~1.3x faster in that layout at inference, while a training step is
    faster contiguous, so the trained weights keep their layout); elsewhere ``model`` itself."""
    if device.type != "cpu" or next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        return model
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


def dice_per_class(pred: np.ndarray, label: np.ndarray, classes: list[int]) -> dict[int, float]:
    """Volume Dice per class, ignoring ``IGNORE_INDEX`` voxels of ``label``.

    Returns:
        ``{class: Dice}``; NaN where the class is absent from both (nothing to score).
    """
    valid = label != IGNORE_INDEX
    result = {}
    for c in classes:
        stats = overlap_stats((pred == c) & valid, label == c)
        empty = stats.pred_count + stats.gt_count == 0
        result[c] = float("nan") if empty else dice_from_stats(stats)
    return result


@torch.no_grad()
def validate(model: nn.Module, volumes: list, config: Config, view: str, slices: int,
             device: torch.device, amp_dtype: torch.dtype | None = None, batch: int = 16,
             dist: DistInfo | None = None) -> dict[str, float]:
    """Dice per dataset and organ on validation volumes, in each dataset's merged label space.

    Volumes are split across ranks and the per-volume scores gathered, so every rank returns the
    same numbers.

    Returns:
        ``{"<dataset>/<organ>": mean Dice, ..., "score": mean of those}`` (sorted keys, then score).
    """
    dist = dist or DistInfo()
    was_training = model.training
    model.eval()
    net = _inference_copy(model, device)
    rows: list[tuple[str, str, float]] = []
    for i, vol in enumerate(volumes):
        if i % dist.world != dist.rank:
            continue
        ds = config.dataset(vol.dataset)
        mask = config.labeled_mask(ds)
        pred = predict_view_stack(net, vol.image(view), slices, device, amp_dtype, batch,
                                  labeled_mask=None if mask.all() else mask)
        classes = [c for c in config.labeled_classes(ds) if c > 0]
        for c, d in dice_per_class(pred, np.asarray(vol.label(view)), classes).items():
            rows.append((ds.name, config.organs[c - 1], d))
    if dist.enabled:
        import torch.distributed as tdist

        gathered: list[Any] = [None] * dist.world
        tdist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    model.train(was_training)
    table: dict[str, list[float]] = {}
    for dname, organ, d in rows:
        if not math.isnan(d):
            table.setdefault(f"{dname}/{organ}", []).append(d)
    result = {k: float(np.mean(v)) for k, v in sorted(table.items())}
    result["score"] = float(np.mean(list(result.values()))) if result else float("nan")
    return result
