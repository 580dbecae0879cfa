"""Checkpoints: one schema, written atomically, loaded without running code, checked against expectations.

The schema is :class:`TrainingCheckpoint` (this module alone writes and reads it; version
:data:`VERSION`). On disk a checkpoint is a plain dict, loadable with ``torch.load(weights_only=True)``::

    format       "unimos-checkpoint"
    version      1
    model        state_dict of the (unwrapped) network
    model_args   {"in_channels", "num_classes", "width", "norm"[, "blocks"]}: models.build_model's
                 argument (no "norm": models.LEGACY_NORM, checkpoints written before the option)
    organs       ["liver", "kidney", "spleen"]
    view         "axial" | "coronal" | "sagittal"
    slices       2.5D input slices
    block        training crop size
    width        model_args["width"] (kept at the top level for the --resume check)
    config       config_to_dict(config): preprocessing (HU window, in-plane size) and datasets
    epoch, step  progress: completed epochs (step // steps_per_epoch) and optimizer steps
    best_score   best validation score so far (-inf before the first validation)
    args         the run's TrainOptions as plain values, plus "world" (the DDP world size)
    optimizer    optimizer.state_dict()                                  [training checkpoints]
    scaler       GradScaler state (fp16 AMP only)                       [optional]
    ema          EMA teacher state (--teacher ema)                      [optional]
    semi_state   {"thresholds": ThresholdSchedule state} (semi runs)   [optional]
                 a record: --resume builds the schedule from --threshold
    loop         {"meter": EpochMeter state, "pending_end": bool, "elapsed_s": float, "served"}: an
                 unfinished epoch's loss sums, whether its end (row, validation, best/last) is still to
                 be done, the seconds trained so far and what resu_best serves [training checkpoints]
    served       "student" | "ema": whose weights "model" holds. resu_best serves the EMA teacher
                 when it validated better than the student                [default "student"]
    student_model  the student's state_dict when "model" holds the EMA weights (for --resume)

Inference (inference/segment.py) needs model, model_args, organs, view, slices, block and config;
``--resume`` needs model, optimizer, step and best_score too.

Best/last checkpoints are named as the original: ``resu_best_{view}.pth.tar`` and
``resu_last_{view}.pth.tar``.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from utils.errors import InputError
from utils.fileio import atomic_path

FORMAT = "unimos-checkpoint"
VERSION = 1


# Keys inference cannot do without (inference/segment.py), and those --resume cannot do without.
INFERENCE_KEYS = ("model", "model_args", "organs", "view", "slices", "block", "config")
RESUME_KEYS = ("model", "optimizer", "step", "best_score")


@dataclass
class TrainingCheckpoint:
    """What a training checkpoint holds (see the module docstring for each field)."""

    model: dict[str, Any]
    model_args: dict[str, Any]
    organs: list[str]
    view: str
    slices: int
    block: int
    config: dict[str, Any]
    epoch: int
    step: int
    best_score: float
    args: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    semi_state: dict[str, Any] | None = None
    loop: dict[str, Any] | None = None
    # "student" or "ema": which weights "model" holds. A best checkpoint serves the EMA teacher's
    # weights when they validated better; the student's then stay in student_model for a resume.
    served: str = "student"
    student_model: dict[str, Any] | None = None

    @property
    def width(self) -> int:
        return int(self.model_args["width"])

    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (without format/version, which :func:`save_checkpoint` adds).

        Optional fields that are None are left out.
        """
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.default is MISSING:
                out[f.name] = value
            if f.name == "block":
                out["width"] = self.width
        return out

    @classmethod
    def from_dict(cls, ckpt: dict[str, Any], path: str | Path | None = None) -> TrainingCheckpoint:
        """The schema of a loaded checkpoint dict.

        Raises:
            InputError: a key --resume needs is missing (names ``path``).
        """
        missing = [k for k in RESUME_KEYS if k not in ckpt]
        if missing:
            raise InputError(path, f"checkpoint has no {', '.join(missing)}; cannot resume training from it")
        # Hand-made or very old files may lack descriptive keys; the resume checks then see them empty.
        empty: dict[str, Any] = {"model_args": {}, "organs": [], "view": "", "slices": 0, "block": 0,
                                 "config": {}, "epoch": 0, "args": {}}
        return cls(**{**empty, **{f.name: ckpt[f.name] for f in fields(cls) if f.name in ckpt}})

    def save(self, path: str | Path) -> None:
        """Write atomically (see :func:`save_checkpoint`)."""
        save_checkpoint(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, Any] | None = None) -> TrainingCheckpoint:
        """Load for ``--resume`` (see :func:`load_checkpoint` for ``expect``).

        Raises:
            InputError: unreadable, foreign, mismatching, or without what --resume needs.
        """
        return cls.from_dict(load_checkpoint(path, expect=expect), path)


def best_name(view: str) -> str:
    return f"resu_best_{view}.pth.tar"


def last_name(view: str) -> str:
    return f"resu_last_{view}.pth.tar"


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Save ``payload`` (plus format/version tags) atomically: temp file, fsync, rename."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def resolve_checkpoint(path: str | Path, view: str) -> Path:
    """A checkpoint file, or the folder holding ``resu_best_{view}.pth.tar``.

    Raises:
        InputError: when neither exists.
    """
    p = Path(path)
    if p.is_dir():
        cand = p / best_name(view)
        if not cand.is_file():
            raise InputError(cand, f"no checkpoint for view '{view}' in this folder")
        return cand
    if not p.is_file():
        raise InputError(p, "checkpoint does not exist")
    return p


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a UniMOS checkpoint safely and check it matches ``expect``.

    Args:
        path: checkpoint file.
        expect: keys that must be equal in the checkpoint (e.g. ``{"organs": [...], "view": "axial",
            "slices": 3}``); a value of None is not checked.

    Raises:
        InputError: missing/corrupt/foreign file, or a mismatch with ``expect``.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "checkpoint does not exist")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # any failure to unpickle means the same thing to the user
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise InputError(p, f"not a loadable checkpoint (corrupt, truncated, or not safe to load: "
                         f"{reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(p, "not a UniMOS checkpoint (no 'format: unimos-checkpoint' tag)")
    if int(ckpt.get("version", 0)) > VERSION:
        raise InputError(p, f"checkpoint version {ckpt.get('version')} is newer than this code ({VERSION})")
    for key, want in (expect or {}).items():
        if want is None:
            continue
        have = ckpt.get(key)
        if isinstance(want, tuple):
            want = list(want)
        if isinstance(have, tuple):
            have = list(have)
        if have != want:
            raise InputError(p, f"checkpoint {key} is {have!r} but {want!r} was asked for")
    return ckpt
