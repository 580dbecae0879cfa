"""Typed training options: what ``Final.py`` parses, as one dataclass that :func:`engine.trainer.fit` takes.

Field names are ``Final.py``'s argparse destinations and the defaults are its defaults
(tests/test_options.py checks both), so ``TrainOptions.from_namespace(build_parser().parse_args())``
and ``TrainOptions(data=..., out=...)`` in a test or notebook describe the same run. Sequences are
tuples. See ``python Final.py --help`` for what each option means.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, fields
from typing import Any

from utils.errors import InputError


def phase_steps(value: float, epochs: int, steps_per_epoch: int) -> int:
    """A phase length in steps: ``value`` is a fraction of training (< 1) or a number of epochs (>= 1)."""
    value = float(value)
    if value < 1:
        return int(round(value * epochs * steps_per_epoch))
    return int(round(value * steps_per_epoch))


@dataclass
class TrainOptions:
    """One view's training run (``Final.py``'s options, same names and defaults)."""

    # data
    config: str | None = None
    data: str = "./data"
    datasets: str | None = None
    cache: str | None = None
    inplane: tuple[int, int] | None = None
    spacing: float | None = None
    hu_window: tuple[float, float] | None = None
    view: str = "axial"
    slices: int = 3
    blocksize: int = 224
    fg_prob: float = 0.8
    flip: bool = False
    intensity_jitter: tuple[float, float] = (0.1, 0.15)
    weak_rot90: bool = False
    mix: str = "batch"
    workers: int = 2
    # model
    width: int = 64
    blocks: str | None = None
    norm: str = "instance"
    # optimisation
    epochs: int = 2500
    steps_per_epoch: int = 100
    batchsize: int = 8
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "step"
    lr_decay: float = 0.99
    lr_decay_every: int = 40
    warmup_steps: int = 0
    clip_grad: float = 0.0
    loss: str = "tal"
    class_weights: tuple[float, float] | None = None
    dice_weight: float = 0.0
    # semi-supervised
    semi: bool | None = None
    unlabeled_batchsize: int = 0
    teacher: str = "ema"
    ema_momentum: float = 0.99
    pseudo: str = "merged"
    threshold: str = "schedule"
    organ_threshold: float | None = 0.5
    unsup_class_weights: tuple[float, float] = (1.0, 1.0)
    semi_weights: tuple[float, float, float, float] = (2.0, 0.5, 0.25, 0.25)
    semi_divisor: float = 2.0
    semi_warmup: float = 0.3
    semi_rampup: float = 0.1
    fp: str = "encoder"
    cutmix_pairs: str = "dataset"
    # run
    out: str = "./runs/unimos"
    device: str = "auto"
    amp: str = "none"
    channels_last: bool | None = None
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    time_budget: float = 0.0
    val_every: int = 1
    val_batch: int = 16
    progress: bool | None = None
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):  # argparse gives lists for nargs options: keep one type
            v = getattr(self, f.name)
            if isinstance(v, list):
                setattr(self, f.name, tuple(v))
        from models.mosnet import DIVISOR

        if self.blocksize % DIVISOR:
            raise InputError(None, f"--blocksize {self.blocksize} must be a multiple of {DIVISOR}")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> TrainOptions:
        """Options from ``Final.py``'s parsed arguments.

        Raises:
            TypeError: ``ns`` has a destination that is not a field (a new flag training would ignore).
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(vars(ns)) - names)
        if unknown:
            raise TypeError(f"TrainOptions has no field for {', '.join(unknown)} "
                            "(add it to engine/options.py)")
        return cls(**{k: v for k, v in vars(ns).items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), e.g. for checkpoints (loaded with weights_only=True) and JSON."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def phase_steps(self, value: float) -> int:
        """``--semi-warmup`` / ``--semi-rampup`` in steps: a fraction of training (< 1) or epochs (>= 1)."""
        return phase_steps(value, self.epochs, self.steps_per_epoch)

    @property
    def progress_bars(self) -> bool:
        """``--progress``; unset (None) means on when stderr is a terminal, off in logs and CI."""
        if self.progress is None:
            return sys.stderr.isatty()
        return bool(self.progress)
