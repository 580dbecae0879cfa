"""Building blocks of MOSNet: pre-activation residual blocks, the stem, output heads, the fusion scorer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("batch", "instance")


def norm2d(kind: str, channels: int) -> nn.Module:
    """The normalisation layer of the network: ``batch`` (PIPO-FAN) or ``instance`` (as nnU-Net).

    Instance normalisation uses each image's own statistics, in training and at inference alike, so
    there are no running statistics that must fit scans of every dataset at once.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        # GroupNorm with one group per channel is instance normalisation with a per-channel affine
        # (the same statistics, eps and parameters 'weight'/'bias' as InstanceNorm2d(affine=True), so
        # checkpoints load either way). PyTorch's CPU GroupNorm kernel is faster (a width-16 training
        # step 0.41 s vs 0.45 s on one core) and, unlike InstanceNorm2d, has a channels_last kernel,
        # which makes CPU inference 1.3x faster (bench/inference.py).
        return nn.GroupNorm(channels, channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    # No bias: every 3x3 conv here is followed by a normalisation (pre-activation of the next conv).
    return nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)


class NormReLUModule(nn.Module):
    """A module whose norm-ReLU pairs apply the ReLU in place (``relu_inplace``).

    A norm's output is a fresh tensor that its backward does not need (it keeps its input and
    statistics), so the ReLU may overwrite it: the same numbers without allocating and first-touching
    another activation (6 % of a width-16 CPU forward went to the out-of-place ReLU). Set
    ``relu_inplace = False`` on an instance to run the previous out-of-place form (bench/: the old
    settings of the old-vs-new comparisons).
    """

    relu_inplace: bool = True


class PreActBlock(NormReLUModule):
    """Pre-activation residual block: ``x + conv(relu(bn(conv(relu(bn(x))))))``.

    When the channel count changes, the shortcut is a 1x1 conv on the same activated input
    ``relu(bn(x))`` (one BN shared by both paths, instead of a separate BN for the bridge).

    Args:
        in_ch: input channels.
        out_ch: output channels.
        norm: see :func:`norm2d`.
    """

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch") -> None:
        super().__init__()
        self.bn1 = norm2d(norm, in_ch)
        self.conv1 = conv3x3(in_ch, out_ch)
        self.bn2 = norm2d(norm, out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x), inplace=self.relu_inplace)
        y = self.conv2(F.relu(self.bn2(self.conv1(a)), inplace=self.relu_inplace))
        return y + (x if self.shortcut is None else self.shortcut(a))


def res_chain(channels: list[int], norm: str = "batch") -> nn.Sequential:
    """Residual blocks mapping ``channels[0] -> channels[1] -> ... -> channels[-1]`` (may be empty)."""
    return nn.Sequential(*(PreActBlock(a, b, norm) for a, b in zip(channels[:-1], channels[1:])))


class Stem(NormReLUModule):
    """First conv, shared by the full-size input and every pyramid level: conv-norm-ReLU-conv.

    Its output is not activated: the residual blocks that follow start with norm-ReLU.
    """

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch)
        self.bn = norm2d(norm, out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.bn(self.conv1(x)), inplace=self.relu_inplace))


class Head(NormReLUModule):
    """Output head of one decoder scale: norm-ReLU, then a 1x1 conv to class logits.

    ``forward(x, dropout, start)`` also returns the logits of feature-perturbed copies of samples
    ``start:`` ("head" perturbation): Dropout2d is applied to their activated features just before
    the 1x1 conv, and clean + perturbed copies go through the conv as one batch. The norm therefore
    only ever sees clean features, so the clean logits are exactly those of an unperturbed pass.
    """

    def __init__(self, in_ch: int, num_classes: int, norm: str = "batch") -> None:
        super().__init__()
        self.bn = norm2d(norm, in_ch)
        self.conv = nn.Conv2d(in_ch, num_classes, 1)

    def forward(self, x: Tensor, dropout: nn.Module | None = None, start: int = 0) -> Tensor:
        a = F.relu(self.bn(x), inplace=self.relu_inplace)
        if dropout is not None:
            a = torch.cat([a, dropout(a[start:])], dim=0)
        return self.conv(a)


class FusionScorer(nn.Module):
    """Scores one scale's logits: one scalar per image (PIPO-FAN's adaptive weighting).

    norm-ReLU-1x1 conv (C -> 1)-norm-ReLU-3x3 conv (1 -> 1), then global average + global max pooling
    over the whole image (adaptive: any H, W). PIPO-FAN normalises with BatchNorm; GroupNorm(1, .) is
    used here because it normalises each image on its own, so the score of an image does not depend on
    what else is in the batch: clean and perturbed outputs can be scored in one batch, and the clean
    fused logits equal those of an unperturbed pass.

    The two single-output convs keep ``nn.Conv2d`` parameters (a standard state_dict) but are evaluated
    as a channel dot product and nine shifted multiply-adds: oneDNN's kernels for one output channel
    are ~10x slower than that on CPU (measured: 0.11 s vs 0.014 s forward + backward on 40x4x128x128),
    and on a GPU these element-wise ops are negligible too.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, num_classes)
        self.conv1 = nn.Conv2d(num_classes, 1, 1)
        self.norm2 = nn.GroupNorm(1, 1)
        self.conv2 = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) logits -> (N,) scores."""
        # A channels_last model (CPU inference) hands over channels_last logits, and GroupNorm(1, C)
        # has no fast channels_last CPU kernel for so few channels: 4-9 ms against 0.25 ms on
        # 5 x 4 x 256 x 256 (one thread), ~5 % of a whole width-16 forward. The norm runs on a
        # contiguous copy (~0.3 ms), and its output goes back to channels_last, the layout in which
        # the channel dot product below needs no copy. Contiguous input (training) is not touched.
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        a = F.relu(self.norm1(x.contiguous()))
        if cl:
            a = a.contiguous(memory_format=torch.channels_last)
        s = torch.einsum("nchw,c->nhw", a, self.conv1.weight.view(-1).to(a.dtype))
        s = s + self.conv1.bias.to(s.dtype)
        s = F.relu(self.norm2(s[:, None]))[:, 0]
        h, w = s.shape[-2:]
        p = F.pad(s, (1, 1, 1, 1))  # zero padding, as the conv's padding=1
        k = self.conv2.weight.view(3, 3).to(s.dtype)
        out = self.conv2.bias.to(s.dtype) + sum(
            k[i, j] * p[:, i:i + h, j:j + w] for i in range(3) for j in range(3))
        return out.mean(dim=(1, 2)) + out.amax(dim=(1, 2))
