"""Semi-supervised training: the UniMatch step (Yang et al., CVPR 2023), a mean teacher, thresholds.

One call of :func:`semi_step` does, for a labeled batch and two unlabeled batches ``a`` and ``b``:

1. pseudo-labels and confidences of the weak views of ``a`` and ``b`` from the teacher (no gradient);
2. the student on ``[labeled; weak a]`` in one pass with feature perturbation of the ``a`` samples:
   supervised logits, and the feature-perturbed prediction of weak ``a`` (``SemiConfig.fp``: dropout on
   every encoder level decoded by the whole decoder, as UniMatch, or only before the heads);
3. two strong views of ``a``, each CutMixed (independent boxes) with a strong view of ``b``; the pasted
   region takes ``b``'s pseudo-label and confidence;
4. the student on ``[s1; s2]`` in one pass;
5. ``loss = (w_x L_x + r (w_fp L_fp + w_s1 L_s1 + w_s2 L_s2)) / 2``, the unsupervised terms being the
   target adaptive loss against the pseudo-labels, counting pixels with ``conf >= threshold`` (organ
   pseudo-labels already from ``SemiConfig.organ_threshold``: :func:`confidence_mask`) and divided by
   the number of image pixels (padding excluded) as UniMatch, ``r`` the ramp-up weight.

Padding: an unlabeled sample smaller than the crop is padded; ``UnlabeledBatch.valid`` marks its real
pixels. Padding gets the ignore label in the pseudo-labels, so it is in no loss, no denominator and
not in the mask ratio, and CutMix carries it along with the pasted pixels.

Teacher: ``"self"`` (UniMatch) uses the student itself. The weak prediction of ``a`` is then the
detached clean output of the student's pass 2 (UniMatch does the same: it saves a forward), and ``b``
is predicted in a separate no-grad pass in eval mode (UniMatch's ``model.eval()`` for the mix batch).
``"ema"`` uses :class:`EMATeacher` for both weak predictions, in one no-grad batched pass.

Pseudo-label space (``SemiConfig.pseudo``): ``"merged"``, as the original, takes the prediction in the
merged label space of the unlabeled sample's own dataset (organs it does not label become background)
and trains with the target adaptive loss in that space; ``"full"`` uses every organ. The confidence is
the largest probability over ALL classes in both modes: in the merged space, background sums the
probabilities of background and every unlabeled organ, so an untrained, near-uniform network would
call every pixel background with confidence (C - 1) / C (0.75 for four classes) and teach "no organ"
everywhere from the first step. With the full-space maximum it is confident nowhere (1 / C), and for
thresholds >= 0.5 the merged argmax and the merged class of the full argmax agree. In merged mode a
CutMix partner from ``b`` must label the same classes as its ``a`` sample (otherwise the pasted
pseudo-labels live in another label space); samples without such a partner get no box.

Cost: labeled + weak pass (forward + backward; the perturbed copies of the weak views add a decoder
pass), a no-grad teacher pass and the strong pass (forward + backward): ``bench/semi_step.py``
measures the ratio to a supervised step of the same labeled batch.

Use in a training loop: ``losses = semi_step(...)``; ``losses["loss"].backward()``; optimizer step;
then ``teacher.update(model)`` for the EMA teacher. Nothing else keeps state between steps except the
threshold schedule and the teacher (engine/checkpoint.py stores both for ``--resume``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from data.config import DEFAULT_CLASS_WEIGHTS
from engine.augment import StrongAugConfig, apply_cutmix, cutmix_box, strong_augment
from engine.runtime import autocast
from engine.schedule import rampup  # noqa: F401 -- re-exported (trainer, tests)
from engine.teacher import EMATeacher, ThresholdSchedule  # noqa: F401 -- re-exported
from losses.partial import IGNORE_INDEX, background_set
from models.mosnet import FP_MODES

if TYPE_CHECKING:
    from data.sampling import LabeledBatch, UnlabeledBatch

PSEUDO_MODES = ("merged", "full")
TEACHERS = ("self", "ema")




# ----------------------------------------------------------------------------------------------
# Pseudo-labels


def pseudo_label(logits: Tensor, labeled_mask: Tensor, mode: str = "merged") -> tuple[Tensor, Tensor]:
    """Pseudo-labels and confidences from logits (softmax exactly once: REFERENCE defect 4).

    Args:
        logits: ``(B, C, H, W)`` logits (any float dtype; computed in float32).
        labeled_mask: ``(B, C)`` bool classes labeled by each sample's source dataset (used by "merged").
        mode: ``"merged"``: probabilities in the sample's merged label space (background absorbs every
            organ its dataset does not label); ``"full"``: softmax over all C classes.

    Returns:
        ``(pseudo (B, H, W) int64, conf (B, H, W) float32)``: the argmax class (in "merged" mode the
        argmax in the sample's merged label space: background, 0, unless a labeled organ is more
        probable than background and every unlabeled organ together) and the largest probability
        over all classes (see the module docstring: why not the merged space's).

    Raises:
        ValueError: unknown mode or shape mismatch.
    """
    if mode not in PSEUDO_MODES:
        raise ValueError(f"pseudo-label mode must be one of {PSEUDO_MODES}, got {mode!r}")
    if logits.ndim != 4 or tuple(labeled_mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"logits (B, C, H, W) and labeled_mask (B, C) do not fit: {tuple(logits.shape)} "
                         f"/ {tuple(labeled_mask.shape)}")
    probs = torch.softmax(logits.float(), dim=1)
    conf, pseudo = probs.max(dim=1)
    if mode == "merged":
        # The argmax in the merged space: the full argmax is kept only where it beats the merged
        # background (background + every unlabeled organ), which an unlabeled organ or background
        # never does (it is part of that sum). A labeled organ loses only where its probability is
        # < 0.5, so with thresholds >= 0.5 this changes no pixel that a loss uses.
        in_bg = background_set(labeled_mask.to(device=pseudo.device, dtype=torch.bool))
        merged_bg = (probs * in_bg[:, :, None, None]).sum(dim=1)
        pseudo = torch.where(conf > merged_bg, pseudo, 0)
    return pseudo, conf


def mix_partners(mask_a: Tensor, mask_b: Tensor, generator: torch.Generator,
                 same_labels: bool) -> tuple[Tensor, Tensor]:
    """Pick, for every sample of batch ``a``, a random CutMix source in batch ``b``.

    Args:
        mask_a, mask_b: ``(Ba, C)`` / ``(Bb, C)`` bool labeled classes of each sample's dataset.
        generator: source of randomness.
        same_labels: only pair samples with identical label sets (needed for merged pseudo-labels).

    Returns:
        ``(index (Ba,) int64 into b, ok (Ba,) bool)``; ``ok`` is False where no partner qualifies.
    """
    na, nb = mask_a.shape[0], mask_b.shape[0]
    scores = torch.rand((na, nb), generator=generator, device=generator.device).to(mask_a.device)
    if same_labels:
        same = (mask_a[:, None, :] == mask_b[None, :, :]).all(dim=-1)
    else:
        same = torch.ones((na, nb), dtype=torch.bool, device=mask_a.device)
    index = torch.where(same, scores, -1.0).argmax(dim=1)
    return index, same.any(dim=1)


# ----------------------------------------------------------------------------------------------
# The step


@dataclass
class SemiConfig:
    """Settings of the semi-supervised step.

    Attributes:
        w_x, w_fp, w_s1, w_s2: weights of the supervised, feature-perturbation and two strong-view losses
            (the supervised one 2, UniMatch 1: see Final.py --semi-weights).
        divisor: the weighted sum is divided by this (the original's ``/ 2``).
        pseudo: ``"merged"`` or ``"full"`` (see :func:`pseudo_label`).
        teacher: ``"self"`` (UniMatch) or ``"ema"`` (mean teacher).
        ema_momentum: momentum of the EMA teacher (used by whoever builds it).
        cutmix_p: probability of a CutMix box per strong view.
        cutmix_area, cutmix_ratio: box area fraction and aspect-ratio ranges.
        dice_weight: weight of the soft Dice term in the unsupervised losses (0 = off).
        class_weights: class weights of the unsupervised losses; None = the supervised loss's.
        fp: feature perturbation, ``"encoder"`` (UniMatch) or ``"head"`` (see models/mosnet.py).
        organ_threshold: organ pseudo-labels count from this confidence (:func:`confidence_mask`;
            None or 1: the one threshold of the original).
        aug: strong augmentation settings.
    """

    w_x: float = 2.0
    w_fp: float = 0.5
    w_s1: float = 0.25
    w_s2: float = 0.25
    divisor: float = 2.0
    pseudo: str = "merged"
    teacher: str = "ema"
    ema_momentum: float = 0.99
    cutmix_p: float = 0.5
    cutmix_area: tuple[float, float] = (0.02, 0.4)
    cutmix_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    dice_weight: float = 0.0
    class_weights: tuple[float, ...] | None = None
    fp: str = "encoder"
    organ_threshold: float | None = 0.5
    aug: StrongAugConfig = field(default_factory=StrongAugConfig)

    def __post_init__(self) -> None:
        if self.pseudo not in PSEUDO_MODES:
            raise ValueError(f"SemiConfig.pseudo must be one of {PSEUDO_MODES}, got {self.pseudo!r}")
        if self.teacher not in TEACHERS:
            raise ValueError(f"SemiConfig.teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.fp not in FP_MODES:
            raise ValueError(f"SemiConfig.fp must be one of {FP_MODES}, got {self.fp!r}")
        weights = (self.w_x, self.w_fp, self.w_s1, self.w_s2, self.dice_weight)
        if any(w < 0 or not math.isfinite(w) for w in weights) or not self.divisor > 0:
            raise ValueError("SemiConfig loss weights must be finite and >= 0 and the divisor > 0")
        if not 0.0 <= self.cutmix_p <= 1.0:
            raise ValueError(f"SemiConfig.cutmix_p must be in [0, 1], got {self.cutmix_p}")
        if self.organ_threshold is not None and not 0.0 <= self.organ_threshold <= 1.0:
            raise ValueError(f"SemiConfig.organ_threshold must be in [0, 1], got {self.organ_threshold}")


def confidence_mask(conf: Tensor, threshold: float, pseudo: Tensor | None = None,
                    organ_threshold: float | None = None) -> Tensor:
    """Float pixel weights: 1 where ``conf >= threshold``, else 0.

    With ``organ_threshold`` (and ``pseudo``), pixels whose pseudo-label is an organ (not background 0,
    not the ignore label) already count from ``min(organ_threshold, threshold)``: background fills most
    of a CT slice and is the confident class, so one high threshold keeps mostly background
    pseudo-labels and an organ the teacher is unsure of is taught away, round after round (on phantoms
    the spleen, learned from one volume, collapsed; README).
    """
    keep = conf >= threshold
    if organ_threshold is not None:
        if pseudo is None:
            raise ValueError("an organ threshold needs the pseudo-labels")
        organ = (pseudo > 0) & (pseudo != IGNORE_INDEX)
        keep = keep | (organ & (conf >= min(organ_threshold, threshold)))
    return keep.to(torch.float32)


def organ_threshold(cfg: SemiConfig, num_classes: int) -> float | None:
    """The organ threshold in effect: ``cfg.organ_threshold``, except None with a single organ (two
    classes) and a threshold <= 0.5, where the winning class always has confidence >= 0.5: such a
    threshold would keep every organ pseudo-label, right or wrong, from the first step."""
    t = cfg.organ_threshold
    return None if t is None or (num_classes <= 2 and t <= 0.5) else t


def unsup_loss(logits: Tensor, pseudo: Tensor, conf: Tensor, labeled_mask: Tensor, threshold: float,
               class_weights: Sequence[float] | Tensor = DEFAULT_CLASS_WEIGHTS,
               dice_weight: float = 0.0, organ_threshold: float | None = None) -> Tensor:
    """Target adaptive loss against pseudo-labels, counting only pixels with ``conf >= threshold``.

    Normalised per pixel as UniMatch (``sum(w_t * loss * mask) / #pixels``, ignored padding left out of
    both): masked-out pixels count in the denominator, so few confident pixels give a small loss, and
    the class weights scale the terms without being renormalised (the original's 0.2 / 1.2 recipe).

    Args:
        logits: ``(B, C, H, W)`` student logits.
        pseudo: ``(B, H, W)`` int64 pseudo-labels (classes of ``labeled_mask``; 255 = padding, ignored).
        conf: ``(B, H, W)`` confidences.
        labeled_mask: ``(B, C)`` bool label space of each sample (all True for full pseudo-labels).
        threshold: confidence threshold.
        class_weights, dice_weight: as in ``losses.partial.target_adaptive_loss``.
        organ_threshold: a lower threshold for organ pseudo-labels (see :func:`confidence_mask`).

    Returns:
        scalar float32 loss.
    """
    from losses.partial import target_adaptive_loss

    return target_adaptive_loss(logits.float(), pseudo, labeled_mask, class_weights=class_weights,
                                mode="tal", dice_weight=dice_weight,
                                pixel_weight=confidence_mask(conf, threshold, pseudo, organ_threshold),
                                normalise="pixels")


def _masked_pseudo_label(logits: Tensor, batch: UnlabeledBatch, mode: str) -> tuple[Tensor, Tensor]:
    """:func:`pseudo_label` with the batch's padding (``valid`` False) set to the ignore label, conf 0."""
    pseudo, conf = pseudo_label(logits, batch.labeled_mask, mode)
    valid = batch.valid.to(device=pseudo.device, dtype=torch.bool)
    return torch.where(valid, pseudo, IGNORE_INDEX), torch.where(valid, conf, 0.0)


def _labeled_part(out: Any, n: int) -> Any:
    """The first ``n`` samples of a MOSOutput (fp_logits dropped: the supervised loss does not use them)."""
    return type(out)(logits=out.logits[:n], scales=[s[:n] for s in out.scales], fp_logits=None)


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm that normalises with batch statistics but leaves running stats alone.

    Strong views are deliberately off the data distribution; letting them update the running mean
    and variance shifts the statistics used at inference (measured on phantoms: validation Dice
    0.68 -> 0.75 after re-estimating them on clean slices). Momentum 0 keeps the running buffers.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


def semi_step(model: nn.Module, teacher: EMATeacher | None, labeled: LabeledBatch, unl_a: UnlabeledBatch,
              unl_b: UnlabeledBatch, sup_loss: nn.Module, threshold: float, cfg: SemiConfig | None,
              generator: torch.Generator, amp_dtype: torch.dtype | None = None,
              unsup_scale: float = 1.0) -> dict[str, Tensor]:
    """One UniMatch step: losses only (the caller does backward, the optimizer step and ``teacher.update``).

    Args:
        model: the student (may be DDP-wrapped or compiled); in train mode. It is put in eval mode for
            the no-grad prediction of ``unl_b`` with the self-teacher and restored afterwards.
        teacher: :class:`EMATeacher` (used whenever given), or None for the self-teacher.
        labeled: LabeledBatch ``(image (B, k, H, W), label, labeled_mask, dataset)``.
        unl_a: UnlabeledBatch (weak views) whose strong views are trained on.
        unl_b: UnlabeledBatch supplying the CutMix regions.
        sup_loss: DeepSupervisedLoss for the labeled part.
        threshold: confidence threshold; pixels with ``conf >= threshold`` train.
        cfg: step settings (defaults when None).
        generator: randomness of the strong augmentation and CutMix (ideally on the training device).
        amp_dtype: autocast dtype of the forward passes, or None for fp32 (losses are float32).
        unsup_scale: multiplies the three unsupervised weights (the ramp-up of :func:`rampup`).

    Returns:
        ``{"loss"}`` (attached to the graph) and detached ``"loss_x", "loss_fp", "loss_s1", "loss_s2",
        "mask_ratio"`` (fraction of the weak-view pixels of ``a`` at or above the threshold) and
        ``"conf_mean"`` (mean pseudo-label confidence over all weak-view pixels of ``a``).

    Raises:
        ValueError: teacher "ema" without a teacher, or batches whose shapes do not fit together.
    """
    cfg = cfg or SemiConfig()
    if cfg.teacher == "ema" and teacher is None:
        raise ValueError("SemiConfig.teacher is 'ema' but no EMATeacher was given")
    xl, xa, xb = labeled.image, unl_a.image, unl_b.image
    if xl.shape[1:] != xa.shape[1:] or xa.shape[1:] != xb.shape[1:]:
        raise ValueError(f"labeled {tuple(xl.shape)} and unlabeled {tuple(xa.shape)} / {tuple(xb.shape)} "
                         "batches must have the same (slices, H, W)")
    nl, na = xl.shape[0], xa.shape[0]
    device = xa.device

    # 1. weak predictions without gradient (of a only with the EMA teacher)
    logits_wa, logits_wb = _weak_logits(model, teacher, xa, xb, amp_dtype)

    # 2. student on labeled + weak a; only the weak views of a get a feature-perturbed copy
    with autocast(device, amp_dtype):
        out = model(torch.cat([xl, xa]), perturb=cfg.fp, perturb_from=nl)
    if logits_wa is None:
        logits_wa = out.logits[nl:].detach().float()
    pseudo_a, conf_a = _masked_pseudo_label(logits_wa, unl_a, cfg.pseudo)
    pseudo_b, conf_b = _masked_pseudo_label(logits_wb, unl_b, cfg.pseudo)

    # 3. strong views and CutMix
    views = _strong_views(unl_a, unl_b, (pseudo_a, conf_a), (pseudo_b, conf_b), generator, cfg)
    (img_s1, pseudo_s1, conf_s1), (img_s2, pseudo_s2, conf_s2) = views

    # 4. student on both strong views; their (intensity-perturbed, CutMixed) batch statistics
    # normalise this pass but must not become the running statistics used at inference
    with autocast(device, amp_dtype), frozen_bn_statistics(model):
        logits_s1, logits_s2 = model(torch.cat([img_s1, img_s2])).logits.split([na, na])

    # 5. losses
    loss_x = sup_loss(_labeled_part(out, nl), labeled.label, labeled.labeled_mask)["loss"]
    if out.fp_logits is None or out.fp_logits.shape[0] != na:
        raise ValueError("the model returned no fp_logits for the weak views (is it a MOSNet?)")
    loss_fp, loss_s1, loss_s2 = _unsup_losses(
        [(out.fp_logits, pseudo_a, conf_a), (logits_s1, pseudo_s1, conf_s1), (logits_s2, pseudo_s2, conf_s2)],
        unl_a, logits_wa.shape[1], sup_loss, threshold, cfg)
    unsup = cfg.w_fp * loss_fp + cfg.w_s1 * loss_s1 + cfg.w_s2 * loss_s2
    loss = (cfg.w_x * loss_x + float(unsup_scale) * unsup) / cfg.divisor
    real = (pseudo_a != IGNORE_INDEX).to(torch.float32)
    n_real = real.sum().clamp_min(1.0)
    kept = confidence_mask(conf_a, threshold, pseudo_a, organ_threshold(cfg, logits_wa.shape[1]))
    return {
        "loss": loss,
        "loss_x": loss_x.detach(),
        "loss_fp": loss_fp.detach(),
        "loss_s1": loss_s1.detach(),
        "loss_s2": loss_s2.detach(),
        "mask_ratio": (kept * real).sum() / n_real,
        "conf_mean": (conf_a * real).sum() / n_real,
    }


@torch.no_grad()
def _weak_logits(model: nn.Module, teacher: EMATeacher | None, xa: Tensor, xb: Tensor,
                 amp_dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor]:
    """Float32 logits of the weak views of ``a`` and ``b``, without gradient.

    With a teacher, both in one batched pass. Without (self-teacher), ``b`` only, by the student in
    eval mode (its training mode restored afterwards); ``a``'s are then None: the caller takes them
    from the student's labeled + weak pass.
    """
    device = xa.device
    if teacher is not None:
        with autocast(device, amp_dtype):
            logits_w = teacher(torch.cat([xa, xb]), perturb=False).logits.float()
        logits_wa, logits_wb = logits_w.split([xa.shape[0], xb.shape[0]])
        return logits_wa, logits_wb
    was_training = model.training
    model.eval()
    try:
        with autocast(device, amp_dtype):
            return None, model(xb, perturb=False).logits.float()
    finally:
        model.train(was_training)


def _strong_views(unl_a: UnlabeledBatch, unl_b: UnlabeledBatch, target_a: tuple[Tensor, Tensor],
                  target_b: tuple[Tensor, Tensor], generator: torch.Generator,
                  cfg: SemiConfig) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Two strong views of ``a``, each CutMixed (its own box and partners) with a strong view of ``b``.

    Args:
        unl_a, unl_b: the unlabeled batches (weak views).
        target_a, target_b: ``(pseudo, conf)`` of the weak views of ``a`` and ``b``.
        generator: draws the strong augmentation, then per view the box and the partners.
        cfg: step settings (augmentation, CutMix, pseudo-label space).

    Returns:
        ``[(image, pseudo, conf)]`` of the two views. apply_cutmix allocates: ``target_a`` stays the
        L_fp target (defect 3).
    """
    xa, xb = unl_a.image, unl_b.image
    na, nb = xa.shape[0], xb.shape[0]
    h, w = xa.shape[-2:]
    (pseudo_a, conf_a), (pseudo_b, conf_b) = target_a, target_b
    strong = strong_augment(torch.cat([xa, xa, xb, xb]), generator, cfg.aug)
    s1, s2, s1_src, s2_src = strong.split([na, na, nb, nb])
    views = []
    for dst, src in ((s1, s1_src), (s2, s2_src)):
        box = cutmix_box(na, h, w, generator, p=cfg.cutmix_p, area=cfg.cutmix_area, ratio=cfg.cutmix_ratio,
                         device=xa.device)
        idx, ok = mix_partners(unl_a.labeled_mask, unl_b.labeled_mask, generator,
                               same_labels=cfg.pseudo == "merged")
        box = box & ok[:, None, None]
        views.append(apply_cutmix(dst, src[idx], pseudo_a, pseudo_b[idx], conf_a, conf_b[idx], box))
    return views


def _unsup_losses(terms: list[tuple[Tensor, Tensor, Tensor]], unl_a: UnlabeledBatch, num_classes: int,
                  sup_loss: nn.Module, threshold: float, cfg: SemiConfig) -> list[Tensor]:
    """:func:`unsup_loss` of each ``(logits, pseudo, conf)`` term, in the pseudo-label space of ``cfg``
    (merged: the classes ``a``'s datasets label; full: all ``num_classes``) with the class weights of
    ``cfg`` (None: the supervised loss's)."""
    na = unl_a.image.shape[0]
    device = unl_a.image.device
    mask_u = unl_a.labeled_mask.to(torch.bool) if cfg.pseudo == "merged" else \
        torch.ones((na, num_classes), dtype=torch.bool, device=device)
    class_weights = cfg.class_weights if cfg.class_weights is not None else \
        getattr(sup_loss, "class_weights", DEFAULT_CLASS_WEIGHTS)
    organ = organ_threshold(cfg, num_classes)
    return [unsup_loss(logits, pseudo, conf, mask_u, threshold, class_weights, cfg.dice_weight, organ)
            for logits, pseudo, conf in terms]
