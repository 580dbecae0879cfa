"""MOSNet: the multi-organ segmentation basenet, in the style of PIPO-FAN (Fang & Yan, IEEE TMI 2020).

Layout (level ``l`` works at 1/2**l of the input size, channels ``c = [w, 2w, 4w, 8w, 8w]``)::

    pyramid input   x avg-pooled x2, x4, x8, x16; every level goes through the shared stem and as many
                    residual blocks as the encoder has before that scale ("equal convolutional depth")
    encoder         e0 = stem(x); e_l = blocks(cat[maxpool(e_{l-1}), pyramid_l])         l = 1..4
    decoder         d4 = e4;      d_l = blocks(cat[e_l, upsample(d_{l+1})])               l = 3..0
    scale branches  d_l goes through the residual blocks it is missing compared with d_0, so every
                    output has the same convolutional depth; then a head (norm-ReLU-1x1 conv) gives
                    class logits, bilinearly upsampled to full size: 5 scale outputs
    fusion          a small conv scores each scale output, global average + max pooling gives one
                    score per output and image, softmax across outputs, weighted sum = fused logits

Feature perturbation (``perturb``), for the semi-supervised module:

* ``"encoder"`` (default, as UniMatch): Dropout2d on the encoder features of every level (the skips
  and the bottleneck), decoded through the whole decoder, the scale branches, the heads and the
  fusion. The encoder pass is shared; clean and perturbed copies go through the decoder as one batch.
* ``"head"`` (the original UniMOS code's depth): Dropout2d on the scale features right before each
  head's 1x1 conv; only the 1x1 convs and the fusion see the perturbation.

Only samples ``perturb_from:`` get a perturbed copy (the semi-supervised step perturbs the unlabeled
weak views, not the labeled samples that share the forward). With instance norm (Final.py's default)
every sample is normalised on its own, so the clean outputs equal those of an unperturbed pass. With
batch norm (``norm="batch"``) the perturbed copies share the decoder's batch statistics with the clean
ones: the clean outputs move (by up to ~0.06 in the logits) and the running statistics see dropped
features too, as in UniMatch; ``"head"`` perturbation does not have this.

Normalisation (``norm``): PIPO-FAN uses BatchNorm (``batch``); ``instance`` (Final.py's default)
normalises every feature map of every image on its own, in training and at inference alike. Trained
on several datasets at once, BatchNorm's single set of running statistics fitted none of them well
(measured in the README: 0.34 vs 0.59 kidney Dice on KiTS validation volumes, eval-mode statistics vs
per-volume batch statistics), and the semi-supervised module's teacher inherited the mismatch.

All outputs are logits (never softmax). Works for any H, W divisible by 16 (global pooling in the
fusion is adaptive), in channels_last, under autocast and torch.compile. ``MOSNet`` and
``build_model`` default to batch norm (checkpoints without a ``norm`` entry are batch norm); Final.py
trains instance norm (``models.DEFAULT_NORM``). channels_last on CPU: a batch-norm training step is
faster, an instance-norm one slower (7-10 % at the demo preset, measured with the GroupNorm kernel
instance norm now uses), hence channels_last for training on CUDA only; CPU inference uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.blocks import NORMS, FusionScorer, Head, Stem, res_chain

NUM_LEVELS = 5  # full size + four 2x downsamplings: inputs must be divisible by 16
DIVISOR = 2 ** (NUM_LEVELS - 1)
FP_MODES = ("encoder", "head")


@dataclass
class MOSOutput:
    """What MOSNet returns.

    Attributes:
        logits: (B, C, H, W) fused logits.
        scales: deep-supervision logits, one per decoder scale, finest (full-size decoder level) first,
            each upsampled to (B, C, H, W).
        fp_logits: (B - perturb_from, C, H, W) fused logits of the feature-perturbed copies of samples
            ``perturb_from:``, or None without ``perturb``. In eval mode Dropout2d is the identity, so
            they equal ``logits[perturb_from:]``.
        weights: (B, num_scales) adaptive fusion weights of the clean pass (softmax: rows sum to 1).
    """

    logits: Tensor
    scales: list[Tensor]
    fp_logits: Tensor | None = None
    weights: Tensor | None = None


def _normalise_blocks(blocks: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(blocks, int):
        blocks = (blocks,) * (NUM_LEVELS - 1)
    blocks = tuple(int(b) for b in blocks)
    if len(blocks) != NUM_LEVELS - 1 or any(b < 1 for b in blocks):
        raise ValueError(f"blocks must be one int >= 1 or {NUM_LEVELS - 1} ints >= 1 "
                         f"(residual blocks per level 1..{NUM_LEVELS - 1}), got {blocks!r}")
    return blocks


def _stage(in_ch: int, out_ch: int, n: int) -> list[int]:
    """Channel list of ``n`` blocks taking ``in_ch`` to ``out_ch``."""
    return [in_ch] + [out_ch] * n


class MOSNet(nn.Module):
    """PIPO-FAN-style residual U-Net with pyramid input, 5 deep-supervised outputs and adaptive fusion.

    Args:
        in_channels: input channels (2.5D slices).
        num_classes: output classes including background.
        width: channels at full resolution; levels use ``[w, 2w, 4w, 8w, 8w]``.
        fp_dropout: Dropout2d probability of the feature perturbation.
        blocks: residual blocks per level 1..4, one int for all or 4 ints. Encoder level ``l`` and
            decoder level ``l - 1`` get ``blocks[l - 1]`` blocks; the pyramid branches and the scale
            branches follow, so equal convolutional depth holds for any setting. ``1`` reproduces
            PIPO-FAN's depth.
        norm: ``batch`` (PIPO-FAN) or ``instance`` normalisation (see :func:`models.blocks.norm2d`).

    Raises:
        ValueError: invalid sizes or norm.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 64,
                 fp_dropout: float = 0.5, blocks: int | Sequence[int] = 1, norm: str = "batch") -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or width < 1:
            raise ValueError(f"need in_channels >= 1, num_classes >= 2, width >= 1; got {in_channels}, "
                             f"{num_classes}, {width}")
        if not 0.0 <= fp_dropout < 1.0:
            raise ValueError(f"fp_dropout must be in [0, 1), got {fp_dropout}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        self.blocks = _normalise_blocks(blocks)
        nb = self.blocks
        c = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        # decoder output channels per level (PIPO-FAN: 64, 64, 128, 256 and the 512 bottleneck)
        dc = [c[0], c[0], c[1], c[2], c[4]]

        self.stem = Stem(in_channels, c[0], norm)
        # pyramid level l: stages 1..l-1 of the encoder's channel/depth progression, ending at c[l-1]
        self.pyramid = nn.ModuleList()
        self.encoder = nn.ModuleList()
        for lvl in range(1, NUM_LEVELS):
            chans = [c[0]]
            for k in range(1, lvl):
                chans += [c[k]] * nb[k - 1]
            self.pyramid.append(res_chain(chans, norm))
            self.encoder.append(res_chain(_stage(2 * c[lvl - 1], c[lvl], nb[lvl - 1]), norm))
        # decoder level l (0..3) merges e_l with the upsampled d_{l+1}
        self.decoder = nn.ModuleList(
            res_chain(_stage(c[lvl] + dc[lvl + 1], dc[lvl], nb[lvl]), norm) for lvl in range(NUM_LEVELS - 1))
        # scale branch l repeats the decoder's remaining stages l-1..0 (without the skips)
        self.branches = nn.ModuleList()
        for lvl in range(NUM_LEVELS):
            chans = [dc[lvl]]
            for k in range(lvl - 1, -1, -1):
                chans += [dc[k]] * nb[k]
            self.branches.append(res_chain(chans, norm))
        self.heads = nn.ModuleList(Head(c[0], num_classes, norm) for _ in range(NUM_LEVELS))
        self.scorer = FusionScorer(num_classes)
        self.fp_drop = nn.Dropout2d(fp_dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # small classifier weights: near-uniform initial predictions instead of logits of std ~3 that
        # the residual stack's growing variance would give
        for head in self.heads:
            nn.init.normal_(head.conv.weight, std=0.01)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"MOSNet expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % DIVISOR or w % DIVISOR:
            raise ValueError(f"MOSNet input H and W must be divisible by {DIVISOR}, got {h}x{w}")

    def forward(self, x: Tensor, perturb: bool | str = False, perturb_from: int = 0) -> MOSOutput:
        """Segment a batch of 2.5D slices.

        Args:
            x: (B, in_channels, H, W), H and W divisible by 16.
            perturb: False, or the feature perturbation of ``fp_logits``: ``"encoder"`` (True means
                this) or ``"head"`` (see the module docstring).
            perturb_from: only samples ``perturb_from:`` get a perturbed copy.

        Returns:
            MOSOutput with logits, per-scale logits (finest first), fp_logits, fusion weights.

        Raises:
            ValueError: wrong channel count, H/W not divisible by 16, unknown perturbation.
        """
        self._check_input(x)
        mode = _fp_mode(perturb)
        b = x.shape[0]
        if mode is not None and not 0 <= perturb_from < b:
            raise ValueError(f"perturb_from must be in [0, {b}), got {perturb_from}")
        size = x.shape[-2:]
        if self.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last):
            # a channels_last model runs fully channels_last (much faster on CPU with oneDNN) only if the
            # input is too; the caller then only has to convert the model
            x = x.contiguous(memory_format=torch.channels_last)

        # encoder with pyramid input
        feats = [self.stem(x)]
        y = x
        for lvl in range(1, NUM_LEVELS):
            y = F.avg_pool2d(y, 2)
            p = self.pyramid[lvl - 1](self.stem(y))
            feats.append(self.encoder[lvl - 1](torch.cat([F.max_pool2d(feats[-1], 2), p], dim=1)))
        if mode == "encoder":
            # perturbed copies of every encoder level ride along the batch through the decoder
            feats = [torch.cat([f, self.fp_drop(f[perturb_from:])]) for f in feats]

        # decoder
        dec = [feats[-1]]
        for lvl in range(NUM_LEVELS - 2, -1, -1):
            up = F.interpolate(dec[0], size=feats[lvl].shape[-2:], mode="bilinear", align_corners=False)
            dec.insert(0, self.decoder[lvl](torch.cat([feats[lvl], up], dim=1)))

        # scale outputs; "head" perturbation appends the perturbed copies inside each head
        drop = self.fp_drop if mode == "head" else None
        scales = []
        for lvl in range(NUM_LEVELS):
            logit = self.heads[lvl](self.branches[lvl](dec[lvl]), drop, perturb_from)
            if lvl:
                logit = F.interpolate(logit, size=size, mode="bilinear", align_corners=False)
            scales.append(logit)

        fused, weights = self._fuse(scales)
        if mode is not None:
            return MOSOutput(logits=fused[:b], scales=[s[:b] for s in scales], fp_logits=fused[b:],
                             weights=weights[:b])
        return MOSOutput(logits=fused, scales=scales, fp_logits=None, weights=weights)

    def _fuse(self, scales: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Adaptive weighting: (N, C, H, W) per scale -> fused (N, C, H, W) and weights (N, S)."""
        s, n = len(scales), scales[0].shape[0]
        flat = torch.cat(scales, dim=0)  # (S*N, C, H, W): one scorer call; keeps channels_last
        scores = self.scorer(flat).view(s, n)
        # softmax and weighted sum in float32: under bf16 autocast the weights would keep ~3 digits and
        # the sum of five rounded products would add more rounding to the logits every loss sees
        w = torch.softmax(scores.float(), dim=0)
        fused = (w[:, :, None, None, None] * flat.float().view(s, n, *flat.shape[1:])).sum(dim=0)
        return fused, w.t()


def _fp_mode(perturb: bool | str) -> str | None:
    """``perturb`` argument -> None (off) or one of :data:`FP_MODES`."""
    if perturb is False or perturb is None:
        return None
    if perturb is True:
        return "encoder"
    if perturb in FP_MODES:
        return str(perturb)
    raise ValueError(f"perturb must be False, True or one of {FP_MODES}, got {perturb!r}")
