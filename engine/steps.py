"""The supervised training step, and the update every step ends with.

A step function runs the forward pass and the losses and returns a dict of losses (``"loss"`` for
backward, the others detached, for the history); the semi-supervised step is
:func:`engine.semi.semi_step`. :func:`apply_update` then does backward, clipping and the optimizer
step. :class:`engine.trainer.Trainer` wires them.
"""

from __future__ import annotations

import torch
from torch import nn

from data.sampling import LabeledBatch
from engine.runtime import DistInfo, autocast


def supervised_step(model: nn.Module, batch: LabeledBatch, loss_fn: nn.Module,
                    amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Forward + target adaptive loss on a labeled batch (no backward, no optimizer step).

    Returns:
        ``{"loss": total (for backward), "loss_x": same value detached}``.
    """
    with autocast(batch.image.device, amp_dtype):
        out = model(batch.image)
    losses = loss_fn(out, batch.label, batch.labeled_mask)
    return {"loss": losses["loss"], "loss_x": losses["loss"].detach()}


def apply_update(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, clip_grad: float = 0.0, step: int = 0,
                 dist: DistInfo | None = None) -> None:
    """Backward of ``loss``, optional gradient-norm clipping, optimizer and grad-scaler step.

    With an enabled (fp16) grad scaler a non-finite loss is not an error: its inf/NaN gradients make
    the scaler skip the optimizer step and lower its scale, which is how fp16 overflow is handled.
    Under DDP (``dist``) the ranks agree first, so that all of them stop at the same step: a rank that
    stopped alone would leave the others waiting in the gradient all-reduce until a timeout.

    Raises:
        FloatingPointError: ``loss`` is not finite (on any rank) without a grad scaler (``step`` is
            named).
    """
    if not scaler.is_enabled():
        finite = bool(torch.isfinite(loss.detach()))
        if dist is not None and dist.enabled:
            import torch.distributed as tdist

            flag = torch.tensor([int(finite)], dtype=torch.int32, device=loss.device)
            tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
            if finite and not flag.item():
                raise FloatingPointError(f"the loss of another rank became non-finite at step {step}; "
                                         "try --amp none or a lower --lr")
        if not finite:
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; try --amp none "
                                     "or a lower --lr")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
