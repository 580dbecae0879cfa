"""The confidence-threshold schedule and the mean (EMA) teacher of the semi-supervised step.

Both keep state between steps (engine/checkpoint.py stores them for ``--resume``); :mod:`engine.semi`
re-exports them.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from engine.runtime import unwrap

# ----------------------------------------------------------------------------------------------
# Confidence threshold


class ThresholdSchedule:
    """Piecewise-constant confidence threshold over training progress (a fraction in ``[0, 1]``).

    The default is the original's: 0.7 until epoch 700 of 2500 (28 %), 0.8 until 1400 (56 %), then 0.9.

    Args:
        values: thresholds, one more than ``milestones``.
        milestones: increasing progress fractions where the next value starts.

    Raises:
        ValueError: on lengths that do not match, values outside ``[0, 1]`` or unsorted milestones.
    """

    def __init__(self, values: Sequence[float] = (0.7, 0.8, 0.9),
                 milestones: Sequence[float] = (0.28, 0.56)) -> None:
        self.values, self.milestones = self._check(values, milestones)

    @staticmethod
    def _check(values: Sequence[float], milestones: Sequence[float]) -> tuple[list[float], list[float]]:
        vals = [float(v) for v in values]
        ms = [float(m) for m in milestones]
        if len(vals) != len(ms) + 1:
            raise ValueError(f"threshold schedule needs one more value than milestones, got {vals} / {ms}")
        if any(not 0.0 <= v <= 1.0 for v in vals):
            raise ValueError(f"thresholds must be in [0, 1], got {vals}")
        if any(not 0.0 <= m <= 1.0 for m in ms) or ms != sorted(ms):
            raise ValueError(f"threshold milestones must be increasing fractions in [0, 1], got {ms}")
        return vals, ms

    @classmethod
    def fixed(cls, value: float) -> ThresholdSchedule:
        """A constant threshold."""
        return cls(values=(value,), milestones=())

    @classmethod
    def from_arg(cls, arg: str | float | None) -> ThresholdSchedule:
        """From a command-line value: ``"schedule"`` (or None) for the default, else a number.

        Raises:
            ValueError: on anything else.
        """
        if arg is None or (isinstance(arg, str) and arg.strip().lower() == "schedule"):
            return cls()
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(f"--threshold must be 'schedule' or a number in [0, 1], got {arg!r}") from None
        return cls.fixed(value)

    def value(self, progress: float) -> float:
        """Threshold at ``progress`` (completed fraction of training; a milestone starts its value)."""
        return self.values[bisect.bisect_right(self.milestones, float(progress))]

    __call__ = value

    def state_dict(self) -> dict[str, list[float]]:
        return {"values": list(self.values), "milestones": list(self.milestones)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; an empty dict leaves the schedule unchanged."""
        if state:
            self.values, self.milestones = self._check(state["values"], state["milestones"])

    def __repr__(self) -> str:
        return f"ThresholdSchedule(values={self.values}, milestones={self.milestones})"


# ----------------------------------------------------------------------------------------------
# Mean teacher


class EMATeacher:
    """Exponential moving average of a model: ``ema = m * ema + (1 - m) * param``; buffers are copied.

    The copy is of the unwrapped network (DDP and ``torch.compile`` wrappers are removed), kept in eval
    mode without gradients. Buffers (BatchNorm running statistics) are copied from the student at every
    update, as the brief of this module asks: they are statistics of activations, not weights to average.

    Args:
        model: the student (possibly wrapped).
        momentum: ``m`` in ``[0, 1)``.

    Raises:
        ValueError: momentum out of range.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.99) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.module = copy.deepcopy(unwrap(model))
        self.module.eval()
        self.module.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (call after the optimizer step).

        Raises:
            ValueError: when ``model`` does not have the teacher's parameters.
        """
        src = unwrap(model)
        ema_p = list(self.module.parameters())
        src_p = [p.detach() for p in src.parameters()]
        if len(ema_p) != len(src_p) or any(a.shape != b.shape for a, b in zip(ema_p, src_p)):
            raise ValueError("EMATeacher.update: the model's parameters do not match the teacher's")
        # lerp(ema, p, 1 - m) = m * ema + (1 - m) * p; one fused kernel per group instead of one per tensor
        torch._foreach_lerp_(ema_p, [p.to(a.dtype) for a, p in zip(ema_p, src_p)], 1.0 - self.momentum)
        for a, b in zip(self.module.buffers(), src.buffers()):
            a.copy_(b)
        self.updates += 1

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average at ``model``'s current weights and buffers (the update count too)."""
        self.module.load_state_dict(unwrap(model).state_dict())
        self.updates = 0

    def __call__(self, x: Tensor, **kwargs: Any) -> Any:
        """Forward of the averaged network (in eval mode)."""
        return self.module(x, **kwargs)

    def to(self, device: torch.device | str) -> EMATeacher:
        self.module.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "momentum": self.momentum, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averaged weights (momentum and update count too, when present)."""
        self.module.load_state_dict(state["model"])
        self.momentum = float(state.get("momentum", self.momentum))
        self.updates = int(state.get("updates", 0))
