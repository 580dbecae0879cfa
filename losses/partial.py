"""Losses for partially labeled data: the target adaptive loss (TAL), its naive baseline, deep supervision.

A sample whose dataset labels the class set S (``labeled_mask[b]``, background always included) cannot
tell "background" from "an organ it does not label": in its label maps both are 0. TAL therefore
merges, per sample, the background with every unlabeled organ::

    log p'_0 = logsumexp_{j in {0} u (C \\ S)} log_softmax(z)_j      (merged background)
    log p'_k = log_softmax(z)_k                                        k in S, k > 0
    log p'_j = -inf                                                    j not in S (absorbed into 0)

and takes the (class-weighted) NLL, optionally plus soft Dice, in that merged space. Fully labeled
samples (S = all classes) get ordinary cross-entropy. Everything is computed in float32 log space
(log_softmax + logsumexp): no probabilities-then-log, no clamps, finite under bf16/fp16 autocast.

``mode="naive"`` is the ablation baseline: plain weighted cross-entropy over all classes, so organs a
dataset does not label are learned as background.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.config import DEFAULT_CLASS_WEIGHTS, IGNORE_INDEX

MODES = ("tal", "naive")
NORMALISERS = ("weights", "pixels")
# Soft Dice smoothing, in pixels: keeps the gradient of a class predicted where the target has none
# (without it the loss of such a pair is the constant 1 and false positives are never pushed down).
DICE_SMOOTH = 1.0


def merge_log_probs(logits: Tensor, labeled_mask: Tensor) -> Tensor:
    """Per-sample merged log-probabilities of the classes each sample's dataset labels.

    Args:
        logits: (B, C, H, W) logits (any float dtype; computed in float32).
        labeled_mask: (B, C) bool, True for classes the sample's dataset labels. Column 0 (background)
            is treated as True whatever it holds.

    Returns:
        (B, C, H, W) float32: channel 0 is the log-probability of background merged with every
        unlabeled organ, labeled organ channels keep their log-probability, and unlabeled organ
        channels are ``-inf`` (probability 0, absorbed into channel 0), so ``exp`` of the result sums
        to 1 over channels and ``argmax`` never picks an unlabeled organ.

    Raises:
        ValueError: shape mismatch.
    """
    _check_mask(logits, labeled_mask)
    return _merge(F.log_softmax(logits.float(), dim=1), labeled_mask.to(torch.bool))


def _merge(log_probs: Tensor, labeled: Tensor) -> Tensor:
    """``log_probs`` (..., B, C, H, W) and ``labeled`` (B, C) -> merged log-probs, same shape."""
    lab = labeled[..., None, None]  # (B, C, 1, 1) broadcasts over any leading axes
    neg_inf = torch.tensor(float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
    organs = torch.where(lab[:, 1:], log_probs[..., 1:, :, :], neg_inf)
    return torch.cat([_merged_background(log_probs, labeled), organs], dim=-3)


def background_set(labeled: Tensor) -> Tensor:
    """(B, C) bool: the classes merged into background for each sample (background and every organ
    its dataset does not label), from ``labeled`` (B, C)."""
    in_bg = ~labeled
    in_bg[:, 0] = True
    return in_bg


def _merged_background(log_probs: Tensor, labeled: Tensor) -> Tensor:
    """Channel 0 of :func:`_merge`: log of background + every unlabeled organ, (..., B, 1, H, W)."""
    in_bg = background_set(labeled)[..., None, None]
    neg_inf = torch.tensor(float("-inf"), dtype=log_probs.dtype, device=log_probs.device)
    # masked entries are -inf: logsumexp gives them weight exp(-inf) = 0, so their gradient is 0, not NaN
    return torch.logsumexp(torch.where(in_bg, log_probs, neg_inf), dim=-3, keepdim=True)


def _merged_nll(log_probs: Tensor, tgt: _Target) -> Tensor:
    """``-merged[target]`` per pixel, (K, B, H, W), without building the merged tensor.

    A target is background (merged channel 0) or an organ its sample labels, whose merged log-prob is
    its own log-prob: so only the background merge is computed, and the gather reads the log-probs.
    Same values and gradients, bit for bit, as gathering from :func:`_merge` (each log-prob gets its
    gradient from one of the two branches only; tested), minus a (K, B, C, H, W) ``where`` and ``cat``
    and their backward.
    """
    k = log_probs.shape[0]
    index = tgt.index.expand(k, -1, -1, -1, -1)
    own = log_probs.gather(2, index)
    return -torch.where(index == 0, _merged_background(log_probs, tgt.labeled), own).squeeze(2)


def _check_mask(logits: Tensor, labeled_mask: Tensor) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, C, H, W), got {tuple(logits.shape)}")
    b, c = logits.shape[:2]
    if tuple(labeled_mask.shape) != (b, c):
        raise ValueError(f"labeled_mask must be (B, C) = ({b}, {c}), got {tuple(labeled_mask.shape)}")


def class_weight_vector(class_weights: Sequence[float] | Tensor, num_classes: int,
                        device: torch.device | str | None = None) -> Tensor:
    """(C,) float32 class weights from ``(background, organ)`` or from one weight per class.

    Raises:
        ValueError: wrong length or a negative weight.
    """
    # checked on the host: no device synchronisation per loss call
    if isinstance(class_weights, torch.Tensor):
        class_weights = class_weights.detach().cpu()
    w = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
    if w.numel() == 2 and num_classes != 2:
        w = torch.cat([w[:1], w[1:].expand(num_classes - 1)])
    if w.numel() != num_classes:
        raise ValueError(f"class_weights must have 2 (background, organ) or {num_classes} values, "
                         f"got {w.numel()}")
    if bool((w < 0).any()):
        raise ValueError(f"class_weights must be >= 0, got {w.tolist()}")
    return w.to(device) if device is not None else w


@dataclass
class _Target:
    """A target prepared once and shared by every output scored against it."""

    index: Tensor     # (B, 1, H, W) int64 class index, ignored pixels set to 0
    mask: Tensor      # (B, H, W) float32 pixel_weight (or 1) on kept pixels, 0 where ignored
    pixel: Tensor     # (B, H, W) float32 class weight * mask
    denom: Tensor     # () float32 sum of class weights (or count) over non-ignored pixels
    labeled: Tensor   # (B, C) bool, all True in naive mode


def _prepare(logits_shape: torch.Size, target: Tensor, labeled_mask: Tensor, class_weights,
             mode: str, ignore_index: int, pixel_weight: Tensor | None, device: torch.device,
             normalise: str = "weights") -> _Target:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if normalise not in NORMALISERS:
        raise ValueError(f"normalise must be one of {NORMALISERS}, got {normalise!r}")
    b, c, h, w = logits_shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"target must be (B, H, W) = ({b}, {h}, {w}), got {tuple(target.shape)}")
    if tuple(labeled_mask.shape) != (b, c):
        raise ValueError(f"labeled_mask must be (B, C) = ({b}, {c}), got {tuple(labeled_mask.shape)}")
    if pixel_weight is not None and tuple(pixel_weight.shape) != (b, h, w):
        raise ValueError(f"pixel_weight must be (B, H, W) = ({b}, {h}, {w}), "
                         f"got {tuple(pixel_weight.shape)}")
    target = target.to(device=device, dtype=torch.long)
    labeled = labeled_mask.to(device=device, dtype=torch.bool)
    if mode == "naive":
        labeled = torch.ones_like(labeled)
    else:  # background is always a target (the merged one), as documented; set without a host sync
        labeled = labeled.clone()
        labeled[:, 0] = True
    valid = target != ignore_index
    index = torch.where(valid, target, 0)
    in_range = (index >= 0) & (index < c)
    # a class outside S would have merged log-prob -inf: that is a data bug, not something to train on
    ok = in_range & labeled.gather(1, index.clamp(0, c - 1).flatten(1)).view_as(index)
    if not bool(ok.all()):
        bad = torch.unique(target[~ok]).tolist()
        raise ValueError(f"target holds classes {bad} that are out of range or not labeled by the "
                         f"sample's dataset (labeled_mask); ignore_index is {ignore_index}")
    cw = class_weight_vector(class_weights, c, device)[index]
    mask = valid.to(torch.float32)
    denom = (cw * mask).sum() if normalise == "weights" else mask.sum()
    if pixel_weight is not None:
        mask = mask * pixel_weight.to(device=device, dtype=torch.float32)
    return _Target(index=index[:, None], mask=mask, pixel=cw * mask, denom=denom, labeled=labeled)


def _losses(logits: Tensor, tgt: _Target, dice_weight: float) -> Tensor:
    """Loss of each of K outputs: ``logits`` (K, B, C, H, W) -> (K,) float32."""
    log_probs = F.log_softmax(logits.float(), dim=2)
    nll = _merged_nll(log_probs, tgt)  # (K, B, H, W)
    # weighted-CE normalisation (PyTorch's): sum w_t * pixel_weight * nll / sum w_t over kept pixels.
    # All pixels ignored: numerator and denominator are both 0 and the loss is 0.
    ce = (tgt.pixel * nll).sum(dim=(1, 2, 3)) / tgt.denom.clamp_min(1e-12)
    if dice_weight == 0:
        return ce
    return ce + dice_weight * _soft_dice(_merge(log_probs, tgt.labeled), tgt)


def _soft_dice(merged: Tensor, tgt: _Target) -> Tensor:
    """Soft Dice loss over the labeled organs (classes of S except background): (K,).

    Per sample and class: ``1 - (2|P.T| + s) / (|P| + |T| + s)`` over non-ignored pixels (weighted by
    pixel_weight), ``s`` = :data:`DICE_SMOOTH` pixels. A (sample, class) pair is skipped when the class
    is neither in the target nor in the argmax prediction: its Dice is undefined, and counting it as 0
    or 1 would bias the mean. A false positive (predicted, not in the target) counts: its loss
    ``|P| / (|P| + s)`` falls as the predicted mass does, so it is pushed down. Mean over kept pairs;
    0 when none is kept.
    """
    k, b, c = merged.shape[:3]
    probs = merged.exp()  # exact 0 on unlabeled organ channels
    m = tgt.mask
    onehot = F.one_hot(tgt.index[:, 0], c).permute(0, 3, 1, 2).to(probs.dtype) * m[:, None]
    pm = probs * m[None, :, None]
    inter = (pm * onehot).sum(dim=(-2, -1))[..., 1:]            # (K, B, C-1)
    psum = pm.sum(dim=(-2, -1))[..., 1:]
    tsum = onehot.sum(dim=(-2, -1))[None, :, 1:].expand_as(psum)
    classes = torch.arange(c, device=merged.device)[:, None, None]
    predicted = ((merged.argmax(dim=2, keepdim=True) == classes) & (m > 0)[:, None]).any(dim=(-2, -1))
    present = (tsum > 0) | predicted[..., 1:]
    keep = present & tgt.labeled[None, :, 1:]
    dice = 1 - (2 * inter + DICE_SMOOTH) / (psum + tsum + DICE_SMOOTH)
    keep_f = keep.to(dice.dtype)
    return (dice * keep_f).sum(dim=(1, 2)) / keep_f.sum(dim=(1, 2)).clamp_min(1)


def target_adaptive_loss(logits: Tensor, target: Tensor, labeled_mask: Tensor,
                         class_weights: Sequence[float] | Tensor = DEFAULT_CLASS_WEIGHTS, mode: str = "tal",
                         dice_weight: float = 0.0, ignore_index: int = IGNORE_INDEX,
                         pixel_weight: Tensor | None = None, normalise: str = "weights") -> Tensor:
    """Target adaptive loss of one output against a partially labeled target.

    Args:
        logits: (B, C, H, W) logits, any float dtype (the loss is computed in float32).
        target: (B, H, W) class indices; ``ignore_index`` pixels are left out. Non-ignored values
            must be classes the sample's dataset labels (pseudo-labels: :func:`engine.semi.pseudo_label`).
        labeled_mask: (B, C) bool classes labeled per sample (column 0 treated as True); a batch may
            mix samples with different label sets.
        class_weights: ``(background, organ)`` or one weight per class. In TAL mode the merged
            background gets the background weight.
        mode: ``"tal"`` (merged space) or ``"naive"`` (plain weighted CE over all C classes).
        dice_weight: weight of the soft Dice term over the labeled organs (0 = off, the original's
            recipe; UniMatch's (CE + Dice) / 2 corresponds to 1 with the result halved).
        ignore_index: target value that is left out.
        pixel_weight: optional (B, H, W) per-pixel weight (e.g. a confidence mask). Normalisation:
            ``sum(w_t * pixel_weight * nll) / sum(w_t)`` over non-ignored pixels, i.e. masked-out
            pixels still count in the denominator, as in UniMatch's ``(loss * conf).sum() /
            valid.sum()``; a batch with few confident pixels thus contributes a smaller loss.
        normalise: ``"weights"``: divide by the sum of the class weights over non-ignored pixels
            (PyTorch's weighted cross-entropy); ``"pixels"``: by their number (UniMatch's unlabeled
            losses: the class weights scale the terms and are not renormalised).

    Returns:
        Scalar float32 loss (0 with a graph when every pixel is ignored).

    Raises:
        ValueError: shape mismatch, unknown mode, bad class weights, or a target class outside the
            sample's labeled set / out of range.
    """
    tgt = _prepare(logits.shape, target, labeled_mask, class_weights, mode, ignore_index, pixel_weight,
                   logits.device, normalise)
    return _losses(logits[None], tgt, dice_weight)[0]


class DeepSupervisedLoss(nn.Module):
    """TAL on a :class:`models.MOSOutput`: fused logits plus weighted deep supervision of every scale.

    ``loss = fused_weight * L(fused) + sum_i scale_weights[i] * L(scales[i])``. The default (1.0 on the
    fused output, 0.5 shared evenly by the scales) keeps the fused prediction, the one used at
    inference, dominant, while every head gets a direct gradient: the adaptive fusion alone can starve
    heads it gives little weight to, which deep supervision prevents. All outputs are scored in one
    batched pass against a target prepared (and checked) once.

    Args:
        class_weights, mode, dice_weight, ignore_index: as in :func:`target_adaptive_loss`.
        fused_weight: weight of the fused output.
        scale_weights: one float (total, shared evenly by the scales) or one weight per scale.

    Raises:
        ValueError: negative weights, unknown mode.
    """

    def __init__(self, class_weights: Sequence[float] | Tensor = DEFAULT_CLASS_WEIGHTS, mode: str = "tal",
                 dice_weight: float = 0.0, ignore_index: int = IGNORE_INDEX, fused_weight: float = 1.0,
                 scale_weights: float | Sequence[float] = 0.5) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if fused_weight < 0 or dice_weight < 0:
            raise ValueError("fused_weight and dice_weight must be >= 0")
        self.class_weights = class_weights
        self.mode = mode
        self.dice_weight = float(dice_weight)
        self.ignore_index = ignore_index
        self.fused_weight = float(fused_weight)
        self.scale_weights = scale_weights if isinstance(scale_weights, (int, float)) \
            else tuple(float(s) for s in scale_weights)
        if (isinstance(self.scale_weights, tuple) and any(s < 0 for s in self.scale_weights)) or \
                (not isinstance(self.scale_weights, tuple) and self.scale_weights < 0):
            raise ValueError(f"scale_weights must be >= 0, got {scale_weights!r}")

    def _scale_weights(self, n: int) -> list[float]:
        if isinstance(self.scale_weights, tuple):
            if len(self.scale_weights) != n:
                raise ValueError(f"{len(self.scale_weights)} scale_weights for {n} scale outputs")
            return list(self.scale_weights)
        return [float(self.scale_weights) / n] * n if n else []

    def forward(self, output, target: Tensor, labeled_mask: Tensor,
                pixel_weight: Tensor | None = None) -> dict[str, Tensor]:
        """Score a MOSOutput.

        Args:
            output: MOSOutput (``logits`` fused, ``scales`` list of (B, C, H, W)).
            target, labeled_mask, pixel_weight: as in :func:`target_adaptive_loss`.

        Returns:
            ``{"loss": weighted total, "fused": fused-output loss, "scales": (num_scales,) losses}``
            (float32, attached to the graph).
        """
        logits = torch.stack([output.logits, *output.scales])
        tgt = _prepare(output.logits.shape, target, labeled_mask, self.class_weights, self.mode,
                       self.ignore_index, pixel_weight, output.logits.device)
        each = _losses(logits, tgt, self.dice_weight)
        w = torch.tensor([self.fused_weight, *self._scale_weights(len(output.scales))],
                         dtype=each.dtype, device=each.device)
        return {"loss": (w * each).sum(), "fused": each[0], "scales": each[1:]}
