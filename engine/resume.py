"""``--resume``: load a training checkpoint into a freshly built run, after checking it fits.

An exact continuation needs the network, optimizer, grad scaler, EMA teacher weights, best score, the
loss sums of an unfinished epoch and the history rows up to the checkpoint's step
(:class:`engine.trainer.Trainer` restores the last three). The threshold schedule and the teacher's
momentum come from the command line (the checkpoint keeps them as a record; a resume that changes them
says so). Everything random is a function of the step or of the global sample index
(engine/schedule.py, data/loaders.py), so nothing else is needed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engine.build import Network, SemiParts, reason
from engine.checkpoint import TrainingCheckpoint
from engine.options import TrainOptions
from engine.runtime import DistInfo
from utils.errors import InputError

log = logging.getLogger("unimos")

# Options that change which samples or updates a step gets: a resume with other values is valid
# training but no longer the continuation of the same run. --epochs moves the total step count, and
# with it the learning-rate schedule, the threshold milestones and the semi-supervised warm-up.
RESUME_ARGS = ("batchsize", "unlabeled_batchsize", "steps_per_epoch", "seed", "mix", "lr", "schedule",
               "flip", "weak_rot90", "intensity_jitter", "fg_prob", "blocksize", "epochs", "semi_warmup",
               "semi_rampup", "organ_threshold", "ema_momentum", "threshold", "cutmix_pairs",
               # what each step optimises and with which data (a reviewer found these changed silently)
               "datasets", "loss", "class_weights", "dice_weight", "semi", "teacher", "pseudo",
               "unsup_class_weights", "semi_weights", "semi_divisor", "fp", "momentum", "weight_decay",
               "warmup_steps", "lr_decay", "lr_decay_every", "clip_grad")
# What the network's input means: a checkpoint trained on one HU window or in-plane grid would be
# continued (and then served by segment.py) on another, its first steps on inputs it never saw.
PREPROCESSING = {"hu_window": "--hu-window", "inplane_size": "--inplane", "inplane_spacing": "--spacing"}
# The Final.py flag behind each model argument, for the hint of a mismatching --resume
MODEL_FLAGS = {"norm": "--norm", "blocks": "--blocks", "width": "--width", "in_channels": "--slices"}
# What a checkpoint written before an option existed (or changed its default) ran with
LEGACY_ARGS = {"cutmix_pairs": "index"}


def load_for_resume(path: Path, opts: TrainOptions, organs: list[str],
                    model_args: dict[str, Any]) -> TrainingCheckpoint:
    """The checkpoint at ``path``, checked against this run's organs, view, slices and network.

    Raises:
        InputError: unreadable or foreign file, another view/organs/slices/network, or no optimizer state.
    """
    from models import LEGACY_NORM

    ckpt = TrainingCheckpoint.load(path, expect={"organs": list(organs), "view": opts.view,
                                                 "slices": opts.slices, "width": opts.width})
    stored = {"norm": LEGACY_NORM, **(ckpt.model_args or {})}
    if stored != model_args:
        flags = []
        for key in sorted(set(stored) | set(model_args)):
            if stored.get(key) != model_args.get(key) and key in MODEL_FLAGS:
                value = stored.get(key)
                text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
                flags.append(f"{MODEL_FLAGS[key]} {text}")
        hint = f" (resume with {' '.join(flags)})" if flags else ""
        raise InputError(path, f"checkpoint model {stored} differs from the requested {model_args}{hint}")
    return ckpt


def load_states(ckpt: TrainingCheckpoint, path: Path, net: Network, semi: SemiParts | None) -> None:
    """Network, optimizer, grad scaler and EMA teacher weights from ``ckpt``.

    Raises:
        InputError: a state does not fit this run's objects.
    """
    teacher = semi.teacher if semi is not None else None
    try:
        # a best checkpoint that serves the EMA weights keeps the student's under student_model
        net.model.load_state_dict(ckpt.student_model if ckpt.student_model is not None else ckpt.model)
        net.optimizer.load_state_dict(ckpt.optimizer)
        if ckpt.scaler is not None and net.scaler.is_enabled():
            net.scaler.load_state_dict(ckpt.scaler)
        if teacher is not None:
            if ckpt.ema is not None:
                teacher.load_state_dict(ckpt.ema)
            else:  # a supervised checkpoint continued semi-supervised: the teacher starts as the model
                teacher.module.load_state_dict(ckpt.model)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"checkpoint state does not fit this run ({reason(err)})") from None


def check_preprocessing(path: Path, stored: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse a resume whose preprocessing (HU window, in-plane grid or spacing) differs from the
    checkpoint's config.

    Raises:
        InputError: naming the checkpoint, the setting and both values.
    """
    if not stored:
        return
    for key, flag in PREPROCESSING.items():
        if key in stored and stored[key] != current.get(key):
            raise InputError(path, f"the checkpoint was trained with {key} {stored[key]}, this run asks "
                             f"for {current.get(key)} ({flag} or the config): resume with the checkpoint's "
                             "value, or start a new run")


def check_progress(path: Path, step: int, total_steps: int, opts: TrainOptions) -> None:
    """Refuse a checkpoint that is already past the steps this command trains.

    Raises:
        InputError: naming the checkpoint and both step counts.
    """
    if step > total_steps:
        raise InputError(path, f"the checkpoint is at step {step}, past the {total_steps} steps of this "
                         f"command (--epochs {opts.epochs} x --steps-per-epoch {opts.steps_per_epoch}); "
                         "resume with the checkpoint's --epochs or more")


def changed_settings(old_args: dict[str, Any], opts: TrainOptions, world: int) -> list[str]:
    """``RESUME_ARGS`` (and the world size) whose values differ from the checkpoint's run."""
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, (list, tuple)) else v

    old_args = {**LEGACY_ARGS, **old_args}
    changed = [f"--{k.replace('_', '-')} {old_args[k]} -> {getattr(opts, k)}" for k in RESUME_ARGS
               if k in old_args and plain(old_args[k]) != plain(getattr(opts, k, old_args[k]))]
    old_world = old_args.get("world")
    if old_world is not None and old_world != world:
        changed.append(f"world size {old_world} -> {world}")
    return changed


def restore(path: Path, opts: TrainOptions, config: dict[str, Any], net: Network, semi: SemiParts | None,
            dist: DistInfo, total_steps: int) -> TrainingCheckpoint:
    """Check and load ``path`` into the run's objects (see :func:`load_for_resume`, :func:`load_states`,
    :func:`check_preprocessing`, :func:`check_progress`).

    Args:
        config: this run's config as ``data.config.config_to_dict`` gives it.

    Logs the settings that differ from the checkpoint's run. Returns the checkpoint.
    """
    ckpt = load_for_resume(path, opts, list(config["organs"]), net.model_args)
    check_preprocessing(path, ckpt.config, config)
    check_progress(path, int(ckpt.step), total_steps, opts)
    load_states(ckpt, path, net, semi)
    if semi is not None and semi.teacher is not None:
        # the teacher's state carries its momentum; the command line's applies (the same value in an
        # exact continuation), as the threshold schedule built from --threshold does
        semi.teacher.momentum = float(opts.ema_momentum)
    changed = changed_settings(ckpt.args or {}, opts, dist.world)
    if changed:
        log.info(f"note: resuming with changed settings ({'; '.join(changed)}): training goes on, "
                 "but is not the exact continuation of the checkpoint's run")
    return ckpt
