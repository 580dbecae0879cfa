"""DDP helpers: SyncBatchNorm that also works on CPU/gloo, model wrapping, small collectives.

Launch: ``torchrun --nproc_per_node N Final.py ...`` (one node) or ``srun torchrun --nnodes M ...``
with a c10d rendezvous (see ``Final.sh``); :func:`engine.runtime.init_distributed` joins the group.

What a DDP step computes, compared with one process that sees the whole global batch:

* Data: :class:`data.loaders.StepBatchSampler` gives rank ``r`` the global samples
  ``s*B*W + r + W*j`` of step ``s``, and a sample depends only on its global index, so the ranks
  together see exactly the single process's batch of ``B*W`` samples.
* Gradients: DDP averages the ranks' gradients, i.e. it descends ``mean_r L_r``. The losses are
  normalised per rank (weighted cross-entropy: ``sum_r' w*nll / sum_r' w`` over that rank's pixels),
  so ``mean_r L_r`` equals the global-batch loss ``sum w*nll / sum w`` only when every rank has the
  same weight sum ``sum w`` -- e.g. equal class weights and no ignored (padding) pixels. In general
  it is a re-weighting of the ranks (each rank's pixels count by ``1 / (W * its weight sum)`` instead
  of ``1 / total weight sum``), the same approximation every DDP segmentation trainer makes; the
  confidence-masked unsupervised losses keep masked pixels in the denominator, so the same holds.
  Soft Dice is a per-sample mean over kept (sample, class) pairs and has the same caveat.
* BatchNorm: plain BN normalises with each rank's batch statistics (``B`` samples, not ``B*W``) and
  DDP then broadcasts rank 0's running statistics at every forward. ``--sync-bn`` normalises with
  the statistics of the global batch, which makes a DDP step equal to the single-process step (up to
  float summation order). PyTorch's ``nn.SyncBatchNorm`` only runs on accelerators; on CPU
  :class:`SyncBatchNormCPU` does the same with two differentiable all-reduces per layer, so the
  equality is testable with the gloo backend (tests/test_distributed.py).
* Randomness: torch is reseeded per step from ``(seed, step, rank)``, so dropout and the strong
  augmentation of the semi-supervised step differ between ranks (as they must: different samples)
  and a DDP run is reproducible for a given world size, but not equal to a single-process run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from engine.runtime import DistInfo


def _world(group: Any) -> int:
    if not (tdist.is_available() and tdist.is_initialized()):
        return 1
    return tdist.get_world_size(group)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the incoming gradients.

    With ``y = sum_r x_r`` used by every rank's loss ``L_r``, the gradient of ``sum_r L_r`` with
    respect to ``x_r`` is ``sum_r' dL_r'/dy``: the all-reduced gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        g = grad.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(g, group=ctx.group)
        return g, None


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks, for CPU tensors (gloo); plain BatchNorm otherwise.

    ``nn.SyncBatchNorm`` refuses CPU input (and DDP refuses it in CPU modules). Here, in training
    mode with a process group of several ranks, the batch mean and the biased variance are computed
    over all ranks' samples with a differentiable all-reduce (its backward all-reduces the
    gradients, so every rank gets the gradient of the sum of all ranks' losses through the shared
    statistics); the running statistics are updated with the
    unbiased variance of the global batch, as ``nn.BatchNorm2d`` does in one process. In eval mode,
    or without a process group, it is ``nn.BatchNorm2d``. The state dict is BatchNorm's.

    Args:
        as ``nn.BatchNorm2d``, plus ``process_group`` (default: the whole world).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and _world(self.process_group) > 1):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()
        dims = [0, *range(2, x.ndim)]
        shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
        group = self.process_group or tdist.group.WORLD
        count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64)
        tdist.all_reduce(count, group=group)
        n = float(count.item())
        # Two passes (mean, then squared deviations) instead of E[x^2] - E[x]^2: no cancellation.
        mean = _SumOverRanks.apply(x.sum(dims), group) / n
        centred = x - mean.view(shape)
        var = _SumOverRanks.apply((centred * centred).sum(dims), group) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                     else self.momentum)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device | str = "cpu",
                           process_group: Any = None) -> nn.Module:
    """BatchNorm layers of ``module`` synchronised over the ranks.

    On CUDA (and other accelerators) this is ``nn.SyncBatchNorm.convert_sync_batchnorm``; on CPU
    every BatchNorm becomes a :class:`SyncBatchNormCPU`. Parameter and buffer tensors are reused,
    so an optimizer or EMA copy built before the conversion still refers to the right tensors.

    Returns:
        The converted module (a new object when ``module`` itself is a BatchNorm layer).
    """
    if torch.device(device).type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNormCPU):
        out = SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, "cpu", process_group))
    return out


def wrap_ddp(model: nn.Module, device: torch.device, dist: DistInfo, sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` (with synchronised BatchNorm if asked); ``model`` when single.

    Build the optimizer and the EMA teacher before (they keep referring to the same tensors).
    """
    if not dist.enabled:
        return model
    if sync_bn:
        model = convert_sync_batchnorm(model, device)
    for p in model.parameters():
        # channels_last gives 4D weights with size-1 dims (the fusion scorer's 1-channel convs)
        # strides autograd does not reproduce for their gradients; DDP then warns about every one.
        # Both layouts are contiguous, so this changes no value and no kernel.
        if p.dim() == 4 and p.is_contiguous() and p.stride() != _contiguous_strides(p.shape):
            p.data = p.data.clone(memory_format=torch.contiguous_format)
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def broadcast_buffers(module: nn.Module, dist: DistInfo, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    Without ``--sync-bn`` each rank's running statistics drift apart between DDP forwards; doing this
    before validation makes every rank evaluate the network rank 0 checkpoints.
    """
    if not dist.enabled:
        return
    for buf in module.buffers():
        tdist.broadcast(buf, src)


def stop_code(code: int, dist: DistInfo, device: torch.device) -> int:
    """The largest of the ranks' stop codes (0 = go on), so that all ranks stop at the same step."""
    if not dist.enabled:
        return code
    flag = torch.tensor([code], dtype=torch.int32, device=device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
    return int(flag.item())


def mean_over_ranks(values: dict[str, float], dist: DistInfo, device: torch.device) -> dict[str, float]:
    """Average a dict of floats over the ranks (every rank must pass the same keys in the same order)."""
    if not dist.enabled or not values:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    tdist.all_reduce(t)
    return {k: float(v) / dist.world for k, v in zip(values, t.tolist())}


def barrier(dist: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.enabled:
        tdist.barrier()


__all__ = ["SyncBatchNormCPU", "barrier", "broadcast_buffers", "convert_sync_batchnorm",
           "mean_over_ranks", "stop_code", "wrap_ddp"]
