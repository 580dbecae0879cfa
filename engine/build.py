"""What a training run is built from: config, device, output folder, data, network, semi-supervised parts.

Pure set-up helpers called by :meth:`engine.trainer.Trainer.build`, in this order (the order of the
random-number draws is part of a seeded run's result). Everything here checks its inputs and raises
:class:`utils.errors.InputError` before anything is written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from data.config import Config, load_config
from engine.checkpoint import best_name, last_name
from engine.options import TrainOptions
from engine.runtime import DistInfo, resolve_amp, resolve_device
from utils.errors import InputError

log = logging.getLogger("unimos")


def run_config(opts: TrainOptions) -> Config:
    """The config file with ``--inplane``, ``--spacing``, ``--hu-window`` and ``--class-weights`` applied."""
    config = load_config(opts.config)
    if opts.inplane:
        config = replace(config, inplane_size=(int(opts.inplane[0]), int(opts.inplane[1])))
    if opts.spacing is not None:  # physical in-plane mode, recorded in the checkpoint's config
        config = replace(config, inplane_spacing=float(opts.spacing))
    if opts.hu_window:
        config = replace(config, hu_window=(float(opts.hu_window[0]), float(opts.hu_window[1])))
    if opts.class_weights:
        config = replace(config, class_weights=(float(opts.class_weights[0]), float(opts.class_weights[1])))
    return config


def reason(err: BaseException) -> str:
    """The first line of an error message (at most 200 characters), or its type."""
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def run_device(opts: TrainOptions) -> tuple[torch.device, torch.dtype | None]:
    """``(device, autocast dtype or None)`` for ``--device`` and ``--amp``."""
    try:
        device = resolve_device(opts.device)
        return device, resolve_amp(opts.amp, device)
    except (ValueError, RuntimeError) as err:
        raise InputError(None, f"--device {opts.device} / --amp {opts.amp}: {reason(err)}") from None


def check_out_folder(out: Path) -> None:
    """Raise InputError now when ``out`` can never be created or written (without creating it)."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "output folder is a file")
    anc = out
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise InputError(out, f"cannot create output folder: {anc} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise InputError(out, f"cannot create output folder: {anc} is not writable")


def check_existing_run(opts: TrainOptions, resume: Path | None) -> None:
    """Refuse to start afresh over this view's checkpoints in ``--out``.

    A fresh run used to replace a finished run's ``resu_best``/``resu_last`` (and rewrite its
    history) without a word. Continuing it (``--resume auto``, or a ``--resume`` that
    :func:`find_resume` turns into one of ``--out``'s own checkpoints: ``resume``) and
    ``--overwrite`` are the two ways to go on.

    Raises:
        InputError: naming the existing checkpoint.
    """
    out = Path(opts.out)
    own = (out / last_name(opts.view), out / best_name(opts.view))
    existing = [f for f in own if f.is_file()]
    if not existing or opts.overwrite or opts.resume == "auto":
        return
    if opts.resume:
        if resume is not None and resume.resolve() in {f.resolve() for f in own}:
            return  # continuing this run
        what = f"--resume {opts.resume} would continue another run into it"
    else:
        what = "a fresh run would replace it"
    raise InputError(existing[0], f"--out already holds checkpoints of view {opts.view} and {what}: "
                     "continue it with --resume auto, start over with --overwrite, or choose another --out")


def _written_by_this_job(path: Path) -> bool:
    """Whether the checkpoint at ``path`` was saved by this Slurm job (before a requeue)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    from engine.checkpoint import load_checkpoint

    try:
        return (load_checkpoint(path).get("loop") or {}).get("slurm_job") == job
    except Exception:  # unreadable: the normal checks report it
        return False


def find_resume(opts: TrainOptions) -> Path | None:
    """The checkpoint to continue from (None: start afresh).

    * ``--out``'s own last checkpoint saved by this Slurm job: a requeued job (Final.sh passes the
      same flags again) continues it, whatever ``--resume``/``--overwrite`` say; otherwise every
      requeue of ``--overwrite`` would throw the progress away again.
    * ``--overwrite``: from ``--resume PATH`` if given, else afresh (``--resume auto`` means nothing
      here: Final.sh always passes it).
    * ``--resume auto``: ``--out``'s own last checkpoint, if any.
    * ``--resume PATH``: PATH; but once ``--out`` holds its own last checkpoint (the run was stopped
      and started again by hand with the same flags), that one.
    """
    own = Path(opts.out) / last_name(opts.view)
    if own.is_file() and _written_by_this_job(own):
        if opts.resume != "auto" or opts.overwrite:
            log.info(f"note: {own} was saved by this Slurm job before its requeue: continuing it")
        return own
    if not opts.resume or (opts.resume == "auto" and opts.overwrite):
        return None
    if opts.resume == "auto":
        return own if own.is_file() else None
    p = Path(opts.resume)
    if p.is_dir():
        p = p / last_name(opts.view)
    if not p.is_file():
        raise InputError(p, "checkpoint to resume from does not exist")
    if own.is_file() and not opts.overwrite and p.resolve() != own.resolve():
        log.info(f"note: {own} exists: continuing this run from it (--resume {opts.resume} starts a "
                 "run; --overwrite starts over from it)")
        return own
    return p


@dataclass
class RunData:
    """Cache entries per split (``labeled``, ``validation``, ``unlabeled``) and whether to train semi."""

    volumes: dict[str, list]
    semi: bool


def prepare_data(opts: TrainOptions, config: Config, dist: DistInfo) -> RunData:
    """Discover the cases and build (rank 0) or open (other ranks) their cache entries."""
    from data.cache import build_cache
    from data.layout import discover

    # " LiTS" passes the flag check (which strips), so it must mean LiTS here too
    datasets = [n.strip() for n in opts.datasets.split(",")] if opts.datasets else None
    cases = discover(config, opts.data, datasets)
    by_split: dict[str, list] = {"labeled": [], "validation": [], "unlabeled": []}
    for c in cases:
        by_split[c.split].append(c)
    if not by_split["labeled"]:
        raise InputError(opts.data, "no labeled cases found (see README: data layout)")
    trained_on = sorted({c.dataset for c in by_split["labeled"]})
    labeled = {o for name in trained_on for o in config.dataset(name).labels.values()}
    never = [o for o in config.organs if o not in labeled]
    if never:
        log.info(f"note: organ(s) {never} are labeled by none of the datasets trained on ({trained_on}): "
                 "their classes get no supervision (check the config's organs and --datasets)")
    semi = opts.semi if opts.semi is not None else bool(by_split["unlabeled"])
    if semi and not by_split["unlabeled"]:
        raise InputError(opts.data, "--semi was asked for but no unlabeled volumes were found")
    cache_dir = Path(opts.cache) if opts.cache else Path(opts.data) / ".unimos_cache"
    # Rank 0 builds the cache while the others wait; then they open the same (now valid) entries.
    # Every rank passes exactly one barrier.
    if dist.enabled and not dist.is_main:
        torch.distributed.barrier()
    vols: dict[str, list] = {}
    for split in ("labeled", "validation", "unlabeled"):
        todo = by_split[split] if split != "unlabeled" or semi else []
        vols[split] = build_cache(todo, config, cache_dir, views=(opts.view,), workers=opts.workers,
                                  progress=dist.is_main and opts.progress_bars)
    if dist.enabled and dist.is_main:
        torch.distributed.barrier()
    _note_cropped_organs(vols["labeled"] + vols["validation"], config)
    log.info(f"data: {len(vols['labeled'])} labeled, {len(vols['validation'])} validation, "
             f"{len(vols['unlabeled'])} unlabeled volumes from "
             f"{sorted({c.dataset for c in cases})}; cache {cache_dir}")
    return RunData(vols, semi)


# An organ of which the cached grid keeps less than this share of the source's volume was cropped
CROPPED = 0.5


def _note_cropped_organs(volumes: list, config: Config) -> None:
    """Say which labeled organs the in-plane grid cuts away (``--spacing`` times ``--inplane`` too
    small a field of view): training and validation then silently scored what was left, e.g. a
    liver Dice of 0 on grids that held no liver. Entries cached before the check existed carry no
    record and are not checked."""
    cropped: dict[str, list[float]] = {}
    for vol in volumes:
        for organ, kept in (vol.meta.get("organ_kept") or {}).items():
            if kept < CROPPED:
                cropped.setdefault(organ, []).append(kept)
    if cropped:
        what = "; ".join(f"{organ} in {len(k)} case(s), down to {100 * min(k):.0f} %"
                         for organ, k in sorted(cropped.items()))
        log.info(f"note: the in-plane grid ({config.inplane_size[0]} x {config.inplane_size[1]}, spacing "
                 f"{config.inplane_spacing or 'padded'}) keeps less than {100 * CROPPED:.0f} % of labeled "
                 f"organs' volume: {what}; check --inplane and --spacing")


def model_args_of(opts: TrainOptions, config: Config) -> dict[str, Any]:
    """``models.build_model``'s argument for this run (stored in checkpoints)."""
    model_args: dict[str, Any] = {"in_channels": opts.slices, "num_classes": config.num_classes,
                                  "width": opts.width}
    if opts.blocks:
        model_args["blocks"] = [int(b) for b in opts.blocks.split(",")]
    model_args["norm"] = opts.norm
    return model_args


@dataclass
class Network:
    """The plain (unwrapped) network and what trains it."""

    model: torch.nn.Module
    model_args: dict[str, Any]
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler


def build_network(opts: TrainOptions, config: Config, device: torch.device,
                  amp_dtype: torch.dtype | None) -> Network:
    """Seed torch with ``--seed``, then build the network, the loss, RMSprop and the grad scaler."""
    from losses.partial import DeepSupervisedLoss
    from models import build_model

    torch.manual_seed(opts.seed)
    model_args = model_args_of(opts, config)
    model = build_model(model_args).to(device)
    if opts.channels_last or (opts.channels_last is None and device.type == "cuda"):
        model = model.to(memory_format=torch.channels_last)
    loss_fn = DeepSupervisedLoss(class_weights=config.class_weights, mode=opts.loss,
                                 dice_weight=opts.dice_weight).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=opts.lr, momentum=opts.momentum,
                                    weight_decay=opts.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Network(model, model_args, loss_fn, optimizer, scaler)


@dataclass
class SemiParts:
    """The semi-supervised step's settings, threshold schedule and (``--teacher ema``) EMA teacher."""

    config: Any  # engine.semi.SemiConfig
    thresholds: Any  # engine.semi.ThresholdSchedule
    teacher: Any = None  # engine.semi.EMATeacher | None


def build_semi(opts: TrainOptions, model: torch.nn.Module) -> SemiParts:
    """Semi-supervised parts for ``model`` (the plain network, before DDP wraps it)."""
    from engine.semi import EMATeacher, SemiConfig, ThresholdSchedule

    w_x, w_fp, w_s1, w_s2 = opts.semi_weights
    try:
        semi_cfg = SemiConfig(pseudo=opts.pseudo, teacher=opts.teacher, ema_momentum=opts.ema_momentum,
                              class_weights=tuple(opts.unsup_class_weights), w_x=w_x, w_fp=w_fp,
                              w_s1=w_s1, w_s2=w_s2, divisor=opts.semi_divisor, fp=opts.fp,
                              organ_threshold=opts.organ_threshold, dice_weight=opts.dice_weight)
        thresholds = ThresholdSchedule.from_arg(opts.threshold)
    except ValueError as err:
        raise InputError(None, str(err)) from None
    teacher = EMATeacher(model, momentum=opts.ema_momentum) if opts.teacher == "ema" else None
    return SemiParts(semi_cfg, thresholds, teacher)
