"""Functions of the global optimizer step: the learning-rate factor, the per-step seeds and the
ramp-up of the unsupervised losses.

Everything random in training is a function of the step (torch is reseeded from ``rng_seed(seed,
step, rank)`` before each step) or of the global sample index (data/loaders.py), never of how many
steps this process has run, so a resumed run continues exactly.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("step", "poly", "cosine")


def lr_factor(schedule: str, step: int, total_steps: int, steps_per_epoch: int,
              decay: float = 0.99, decay_every: int = 40, warmup_steps: int = 0) -> float:
    """Multiplier of the base LR at ``step``.

    ``step``: the original's ``lr * decay ** (epoch // decay_every)``; ``poly``: ``(1 - t)^0.9``;
    ``cosine``: half cosine to 0. All with an optional linear warm-up.

    Raises:
        ValueError: unknown ``schedule``.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    t = min(1.0, step / max(1, total_steps))
    if schedule == "step":
        base = decay ** ((step // max(1, steps_per_epoch)) // max(1, decay_every))
    elif schedule == "poly":
        base = (1.0 - t) ** 0.9
    elif schedule == "cosine":
        base = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown LR schedule {schedule!r}")
    return warm * base


def rng_seed(seed: int, step: int, rank: int) -> int:
    """A per-step seed: deterministic, distinct per rank, far from neighbouring steps' streams."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
               % (2**63 - 1))


def rampup(step: int, length: int) -> float:
    """Weight of the unsupervised losses ``step`` steps into the semi-supervised phase.

    The sigmoid-shaped ``exp(-5 (1 - t)^2)`` of the mean teacher (Laine & Aila 2017; Tarvainen & Valpola
    2017), ``t = step / length``, and 1 from ``length`` on (``length <= 0``: always 1). Switching the
    consistency losses on at full weight jolts an adaptive optimizer whose statistics were built on the
    supervised gradients alone.
    """
    if length <= 0 or step >= length:
        return 1.0
    t = max(0.0, float(step)) / float(length)
    return math.exp(-5.0 * (1.0 - t) ** 2)
