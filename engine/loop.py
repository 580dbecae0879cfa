"""The training loop behind ``Final.py``: data, model, optimizer, semi-supervision, checkpoints, DDP.

``fit(args)`` takes the parsed ``Final.py`` arguments and returns a summary dict (rank 0 also writes
it to ``OUT/train_summary_{view}.json``). See engine/train.py for the step and the batching design,
engine/semi.py for the semi-supervised step and engine/distributed.py for what DDP computes.

Bookkeeping is by global optimizer step. An epoch is ``--steps-per-epoch`` steps; at its end the loop
writes one history row (means of the step losses since the previous row, averaged over the ranks),
validates every ``--val-every`` epochs and at the last step, and then saves ``best`` (when the score
improved) and ``last``. Only rank 0 writes files.

Stopping and resuming
---------------------
* SIGTERM / SIGUSR1 (engine/preempt.py): after the current step all ranks agree to stop (an
  all-reduce at every step boundary), rank 0 saves ``last`` -- mid-epoch too -- and ``fit`` returns
  with ``stop == "preempted"``; ``Final.py`` then exits with :data:`engine.preempt.EXIT_REQUEUE`.
  Nothing is validated under the deadline: when the stop falls on an epoch end, that epoch's row,
  validation and best/last are marked pending in the checkpoint and the resumed run does them first.
* ``--time-budget``: validates, writes a row for the partial epoch, saves best/last, then stops.
* ``--resume``: restores the network, optimizer, grad scaler, EMA teacher, threshold schedule, best
  score, the loss sums of an unfinished epoch and the history rows up to the checkpoint's step. That
  is all an exact continuation needs: every random number is a function of the step (torch is
  reseeded from ``(seed, step, rank)`` before each step, the semi-supervised generator likewise) or
  of the global sample index (the datasets draw sample ``n`` from its own seeded generator in
  whichever process loads it), never of how many steps this process has run.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from data.config import Config, load_config
from engine.checkpoint import best_name, last_name, load_checkpoint, save_checkpoint
from engine.preempt import PreemptionFlag
from engine.runtime import (
    DistInfo,
    init_distributed,
    resolve_amp,
    resolve_device,
    shutdown_distributed,
    unwrap,
)
from engine.train import (
    History,
    checkpoint_payload,
    load_history,
    lr_factor,
    rng_seed,
    supervised_step,
    validate,
    write_json,
)
from utils.errors import InputError

# Stop codes agreed on by all ranks (the largest wins).
_GO, _BUDGET, _PREEMPT = 0, 1, 2
# Arguments that change which samples or updates a step gets: a resume with other values is valid
# training but no longer the continuation of the same run.
_RESUME_ARGS = ("batchsize", "unlabeled_batchsize", "steps_per_epoch", "seed", "mix", "lr", "schedule",
                "flip", "weak_rot90", "intensity_jitter", "fg_prob", "blocksize")


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields, for each optimizer step from ``start`` to ``stop``, this rank's sample indices.

    Step ``s`` uses global samples ``s*B*world ... (s+1)*B*world - 1``; rank ``r`` takes every
    ``world``-th of them starting at ``r``. Indices are global sample numbers, so the dataset
    draws sample ``n`` identically whether the run was resumed or not.
    """

    def __init__(self, start: int, stop: int, batch: int, rank: int = 0, world: int = 1) -> None:
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        per_step = self.batch * self.world
        for s in range(self.start, self.stop):
            base = s * per_step
            yield [base + self.rank + self.world * j for j in range(self.batch)]


@dataclass
class EpochMeter:
    """Sums of the logged step values since the last history row (saved in checkpoints)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {str(k): float(v) for k, v in state.get("sums", {}).items()}
        self.count = int(state.get("count", 0))


def _log(dist: DistInfo, msg: str) -> None:
    if dist.is_main:
        print(msg, flush=True)


def _overrides(config: Config, args: Any) -> Config:
    if getattr(args, "inplane", None):
        config = replace(config, inplane_size=(int(args.inplane[0]), int(args.inplane[1])))
    if getattr(args, "spacing", None) is not None:  # physical in-plane mode, kept in the checkpoint
        if not 0 < args.spacing < 100:
            raise InputError(None, f"--spacing must be an in-plane spacing in mm, got {args.spacing}")
        config = replace(config, inplane_spacing=float(args.spacing))
    if getattr(args, "hu_window", None):
        config = replace(config, hu_window=(float(args.hu_window[0]), float(args.hu_window[1])))
    if getattr(args, "class_weights", None):
        config = replace(config, class_weights=(float(args.class_weights[0]), float(args.class_weights[1])))
    return config


def _find_resume(args: Any) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "auto":
        p = Path(args.out) / last_name(args.view)
        return p if p.is_file() else None
    p = Path(args.resume)
    if p.is_dir():
        p = p / last_name(args.view)
    if not p.is_file():
        raise InputError(p, "checkpoint to resume from does not exist")
    return p


def _ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 -- DataLoader's worker_init_fn
    # Slurm signals every process of a job (scancel, preemption). A loader worker killed by it would
    # make the trainer fail at its next batch instead of checkpointing; the trainer alone handles
    # the signal and then shuts its workers down.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _loader(dataset, sampler, collate, workers: int, pin: bool):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        # A private generator keeps worker seeding from consuming the global RNG stream.
        generator=torch.Generator().manual_seed(0))


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _runtime(args: Any) -> tuple[torch.device, torch.dtype | None]:
    try:
        device = resolve_device(args.device)
        return device, resolve_amp(args.amp, device)
    except (ValueError, RuntimeError) as err:
        raise InputError(None, f"--device {args.device} / --amp {args.amp}: {_reason(err)}") from None


def _prepare_data(args: Any, config: Config, dist: DistInfo) -> tuple[dict[str, list], bool, list]:
    """Discover the cases and build (rank 0) or open (other ranks) their cache entries."""
    from data.cache import build_cache
    from data.layout import discover

    datasets = args.datasets.split(",") if args.datasets else None
    cases = discover(config, args.data, datasets)
    by_split: dict[str, list] = {"labeled": [], "validation": [], "unlabeled": []}
    for c in cases:
        by_split[c.split].append(c)
    if not by_split["labeled"]:
        raise InputError(args.data, "no labeled cases found (see README: data layout)")
    semi = args.semi if args.semi is not None else bool(by_split["unlabeled"])
    if semi and not by_split["unlabeled"]:
        raise InputError(args.data, "--semi was asked for but no unlabeled volumes were found")
    cache_dir = Path(args.cache) if args.cache else Path(args.data) / ".unimos_cache"
    # Rank 0 builds the cache while the others wait; then they open the same (now valid) entries.
    # Every rank passes exactly one barrier.
    if dist.enabled and not dist.is_main:
        torch.distributed.barrier()
    vols: dict[str, list] = {}
    for split in ("labeled", "validation", "unlabeled"):
        todo = by_split[split] if split != "unlabeled" or semi else []
        vols[split] = build_cache(todo, config, cache_dir, views=(args.view,), workers=args.workers,
                                  progress=dist.is_main and args.progress)
    if dist.enabled and dist.is_main:
        torch.distributed.barrier()
    _log(dist, f"data: {len(vols['labeled'])} labeled, {len(vols['validation'])} validation, "
               f"{len(vols['unlabeled'])} unlabeled volumes from "
               f"{sorted({c.dataset for c in cases})}; cache {cache_dir}")
    return vols, semi, cases


def _restore(path: Path, args: Any, config: Config, model_args: dict, model: torch.nn.Module,
             optimizer, scaler, teacher, thresholds, dist: DistInfo) -> dict[str, Any]:
    """Load a training checkpoint into the run's objects. Returns the checkpoint.

    Raises:
        InputError: foreign, corrupt or mismatching checkpoint, or one without training state.
    """
    from models import LEGACY_NORM

    ckpt = load_checkpoint(path, expect={"organs": list(config.organs), "view": args.view,
                                         "slices": args.slices, "width": args.width})
    stored = {"norm": LEGACY_NORM, **(ckpt.get("model_args") or {})}
    if stored != model_args:
        only_norm = {**stored, "norm": args.norm} == model_args
        hint = f" (resume with --norm {stored['norm']})" if only_norm else ""
        raise InputError(path, f"checkpoint model {stored} differs from the requested {model_args}{hint}")
    missing = [k for k in ("model", "optimizer", "step", "best_score") if k not in ckpt]
    if missing:
        raise InputError(path, f"checkpoint has no {', '.join(missing)}; cannot resume training from it")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        if teacher is not None:
            if "ema" in ckpt:
                teacher.load_state_dict(ckpt["ema"])
            else:  # a supervised checkpoint continued semi-supervised: the teacher starts as the model
                teacher.module.load_state_dict(ckpt["model"])
        if thresholds is not None and ckpt.get("semi_state"):
            thresholds.load_state_dict(ckpt["semi_state"].get("thresholds", {}))
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"checkpoint state does not fit this run ({_reason(err)})") from None
    old = ckpt.get("args", {})
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, (list, tuple)) else v

    changed = [f"--{k.replace('_', '-')} {old[k]} -> {getattr(args, k)}" for k in _RESUME_ARGS
               if k in old and plain(old[k]) != plain(getattr(args, k, old[k]))]
    world = old.get("world")
    if world is not None and world != dist.world:
        changed.append(f"world size {world} -> {dist.world}")
    if changed:
        _log(dist, f"note: resuming with changed settings ({'; '.join(changed)}): training goes on, "
                   "but is not the exact continuation of the checkpoint's run")
    return ckpt


def fit(args: Any) -> dict[str, Any]:
    """Train one view's model (see the module docstring).

    Args:
        args: ``Final.py``'s parsed arguments.

    Returns:
        Summary: ``view, steps, total_steps, stop ("done" | "time budget" | "preempted"), best_score,
        validation (last scores), seconds, semi, device, world, rank``.

    Raises:
        InputError: bad data, config, device or checkpoint.
    """
    t_start = time.time()
    config = _overrides(load_config(args.config), args)
    device, amp_dtype = _runtime(args)
    dist = init_distributed(device)
    try:
        return _fit(args, config, device, amp_dtype, dist, t_start)
    finally:
        shutdown_distributed()


def _fit(args: Any, config: Config, device: torch.device, amp_dtype: torch.dtype | None,
         dist: DistInfo, t_start: float) -> dict[str, Any]:
    from data.sampling import SliceDataset, collate_labeled, collate_unlabeled
    from engine.distributed import (
        barrier,
        broadcast_buffers,
        mean_over_ranks,
        stop_code,
        wrap_ddp,
    )
    from losses.partial import DeepSupervisedLoss
    from models import build_model

    out = Path(args.out)
    _check_out_folder(out)  # created at the first write: a failed start leaves nothing behind
    vols, semi, _ = _prepare_data(args, config, dist)

    # ---- model, loss, optimizer, teacher (all built from the plain network, before DDP wraps it)
    torch.manual_seed(args.seed)
    model_args: dict[str, Any] = {"in_channels": args.slices, "num_classes": config.num_classes,
                                  "width": args.width}
    if args.blocks:
        model_args["blocks"] = [int(b) for b in args.blocks.split(",")]
    model_args["norm"] = args.norm
    model = build_model(model_args).to(device)
    if args.channels_last or (args.channels_last is None and device.type == "cuda"):
        model = model.to(memory_format=torch.channels_last)
    loss_fn = DeepSupervisedLoss(class_weights=config.class_weights, mode=args.loss,
                                 dice_weight=args.dice_weight).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    spe = args.steps_per_epoch
    total_steps = args.epochs * spe

    semi_cfg = teacher = thresholds = None
    if semi:
        from engine.semi import EMATeacher, SemiConfig, ThresholdSchedule

        w_x, w_fp, w_s1, w_s2 = args.semi_weights
        try:
            semi_cfg = SemiConfig(pseudo=args.pseudo, teacher=args.teacher, ema_momentum=args.ema_momentum,
                                  class_weights=tuple(args.unsup_class_weights), w_x=w_x, w_fp=w_fp,
                                  w_s1=w_s1, w_s2=w_s2, divisor=args.semi_divisor)
            thresholds = ThresholdSchedule.from_arg(args.threshold)
        except ValueError as err:
            raise InputError(None, str(err)) from None
        teacher = EMATeacher(model, momentum=args.ema_momentum) if args.teacher == "ema" else None

    start_step, best_score = 0, -math.inf
    meter = EpochMeter()
    pending_end, elapsed_before = False, 0.0
    history = History(out / f"history_{args.view}.csv")
    resume_path = _find_resume(args)
    if resume_path is not None:
        ckpt = _restore(resume_path, args, config, model_args, model, optimizer, scaler, teacher,
                        thresholds, dist)
        start_step, best_score = int(ckpt["step"]), float(ckpt["best_score"])
        loop_state = ckpt.get("loop") or {}
        meter.load_state_dict(loop_state.get("meter", {}))
        pending_end = bool(loop_state.get("pending_end", False))
        elapsed_before = float(loop_state.get("elapsed_s", 0.0))
        history.rows = [r for r in load_history(history.path) if _int(r.get("step")) <= start_step]
        _log(dist, f"resumed from {resume_path} at step {start_step} of {total_steps}"
                   + (" (its epoch end is still to be logged)" if pending_end else ""))
        del ckpt
        if start_step >= total_steps and not pending_end:
            _log(dist, f"nothing to do: the checkpoint is at step {start_step} of {total_steps}")

    model = wrap_ddp(model, device, dist, sync_bn=args.sync_bn)
    train_model = torch.compile(model) if args.compile else model
    if dist.is_main and args.tensorboard:
        history.open_tensorboard(out / "tensorboard")

    # ---- data loaders (one iterator for the whole run: no per-epoch worker restarts)
    pin = device.type == "cuda"
    # Global sample indices (see StepBatchSampler) with one "epoch" of the dataset per training
    # epoch, so sample n is drawn from default_rng([seed, n // per_epoch, n % per_epoch]).
    global_batch = args.batchsize * dist.world
    ub = args.unlabeled_batchsize or args.batchsize
    semi_from = args.semi_warmup * spe  # first step of the semi-supervised phase
    lab_iter = unl_iter = None
    if args.workers > 0:
        # Loader workers share the trainer's heap copy-on-write. A full garbage collection (in a
        # worker or here) writes to the header of every tracked object and so duplicates those pages
        # (~70 MB at width 4, at some random epoch); objects frozen before the fork are never visited.
        gc.collect()
        gc.freeze()
    if start_step < total_steps:
        lab_ds = SliceDataset(vols["labeled"], config, view=args.view, slices=args.slices,
                              block=args.blocksize, samples_per_epoch=spe * global_batch,
                              seed=args.seed, fg_prob=args.fg_prob, flips=args.flip, labeled=True,
                              intensity=tuple(args.intensity_jitter),
                              alternate_every=global_batch if args.mix == "alternate" else 0)
        lab_iter = iter(_loader(lab_ds, StepBatchSampler(start_step, total_steps, args.batchsize,
                                                         dist.rank, dist.world),
                                collate_labeled, args.workers, pin))
        if semi and max(start_step, semi_from) < total_steps:
            unl_ds = SliceDataset(vols["unlabeled"], config, view=args.view, slices=args.slices,
                                  block=args.blocksize, samples_per_epoch=spe * 2 * ub * dist.world,
                                  seed=args.seed + 7919, fg_prob=0.0, flips=args.flip, rot90=args.weak_rot90,
                                  labeled=False)
            unl_iter = iter(_loader(unl_ds, StepBatchSampler(max(start_step, semi_from), total_steps,
                                                             2 * ub, dist.rank, dist.world),
                                    collate_unlabeled, args.workers, pin))

    # ---- loop
    budget_s = args.time_budget * 60 if args.time_budget else math.inf
    step = start_step
    slices_seen, window_t0 = 0, time.time()
    stop_reason = "done"
    last_val: dict[str, float] = {}

    def factor_at(s: int) -> float:
        return lr_factor(args.schedule, s, total_steps, spe, args.lr_decay, args.lr_decay_every,
                         args.warmup_steps)

    def seconds() -> float:
        return elapsed_before + time.time() - t_start

    def save(kind: str, pending: bool = False) -> None:
        semi_state = {"thresholds": thresholds.state_dict()} if thresholds is not None else None
        payload = checkpoint_payload(model, model_args, config, args, epoch=step // spe, step=step,
                                     best_score=best_score, optimizer=optimizer,
                                     scaler=scaler if scaler.is_enabled() else None,
                                     ema=teacher, semi_state=semi_state)
        payload["args"]["world"] = dist.world
        payload["loop"] = {"meter": meter.state_dict(), "pending_end": pending, "elapsed_s": seconds()}
        save_checkpoint(payload, out / (best_name(args.view) if kind == "best" else last_name(args.view)))

    def finish_epoch(final: bool) -> None:
        """History row, validation when due, best/last checkpoints (at ``step``)."""
        nonlocal best_score, last_val, slices_seen, window_t0
        epoch = math.ceil(step / spe)
        row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": args.lr * factor_at(max(step - 1, 0)),
                               "time_s": round(seconds(), 1),
                               "slices_per_s": slices_seen * dist.world / max(time.time() - window_t0, 1e-9)}
        row.update(mean_over_ranks(meter.means(), dist, device))
        if thresholds is not None:
            row["threshold"] = thresholds.value(max(step - 1, 0) / total_steps)
        meter.reset()
        validated = epoch % args.val_every == 0 or final
        if validated:
            if vols["validation"]:
                net = unwrap(model)
                broadcast_buffers(net, dist)  # every rank evaluates the network rank 0 saves
                last_val = validate(net, vols["validation"], config, args.view, args.slices, device,
                                    amp_dtype, batch=args.val_batch, dist=dist)
                row.update({f"val/{k}": v for k, v in last_val.items()})
                score = last_val["score"]
            else:
                score = -row.get("loss", 0.0)
            improved = score > best_score
            if improved:
                best_score = score
            if dist.is_main:
                if improved:
                    save("best")
                save("last")
        if dist.is_main:
            history.add(row)
        _log(dist, _epoch_line(row, epoch, args.epochs))
        slices_seen, window_t0 = 0, time.time()

    preempt = PreemptionFlag().install()
    try:
        model.train()
        while step < total_steps or pending_end:
            if pending_end:
                finish_epoch(final=step >= total_steps)
                pending_end = False
                continue
            torch.manual_seed(rng_seed(args.seed, step, dist.rank))
            for g in optimizer.param_groups:
                g["lr"] = args.lr * factor_at(step)
            batch = next(lab_iter).to(device, non_blocking=pin)
            if semi and step >= semi_from:
                from engine.semi import rampup, semi_step

                unl = next(unl_iter).to(device, non_blocking=pin)
                unl_a, unl_b = unl.split(ub)
                gen = torch.Generator(device=device).manual_seed(rng_seed(args.seed + 1, step, dist.rank))
                losses = semi_step(train_model, teacher, batch, unl_a, unl_b, loss_fn,
                                   thresholds.value(step / total_steps), semi_cfg, gen,
                                   amp_dtype=amp_dtype,
                                   unsup_scale=rampup(step - semi_from, args.semi_rampup * spe))
                slices_seen += batch.image.shape[0] + unl.image.shape[0]
            else:
                losses = supervised_step(train_model, batch, loss_fn, amp_dtype)
                slices_seen += batch.image.shape[0]
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at step {step}; try --amp none "
                                         "or a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if teacher is not None:
                teacher.update(unwrap(model))
            meter.add(losses)
            del batch, losses, loss
            step += 1

            at_end = step % spe == 0 or step == total_steps
            code = _PREEMPT if preempt.requested else _BUDGET if time.time() - t_start > budget_s else _GO
            code = stop_code(code, dist, device)
            if code == _PREEMPT:
                meter.sums = mean_over_ranks(meter.sums, dist, device)
                if dist.is_main:
                    save("last", pending=at_end)
                barrier(dist)  # no rank leaves (and makes torchrun kill the others) before the save
                stop_reason = "preempted"
                who = signal.Signals(preempt.received).name if preempt.received else "another rank's signal"
                _log(dist, f"{who} received: saved "
                           f"{out / last_name(args.view)} at step {step}; exit code 3 asks for a requeue")
                break
            if at_end or code == _BUDGET:
                finish_epoch(final=step == total_steps or code == _BUDGET)
            if code == _BUDGET:
                stop_reason = "time budget"
                _log(dist, f"time budget of {args.time_budget} min reached at step {step}")
                break
    finally:
        preempt.uninstall()
        history.close()
        if args.workers > 0:
            gc.unfreeze()  # an in-process caller (tests, notebooks) gets its collector back

    summary = {"view": args.view, "steps": step, "total_steps": total_steps, "stop": stop_reason,
               "best_score": best_score, "validation": last_val, "seconds": seconds(),
               "semi": semi, "device": str(device), "world": dist.world, "rank": dist.rank}
    if dist.is_main:
        write_json(out / f"train_summary_{args.view}.json", summary)
    return summary


def _check_out_folder(out: Path) -> None:
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


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _epoch_line(row: dict[str, Any], epoch: int, epochs: int) -> str:
    parts = [f"epoch {epoch}/{epochs}", f"step {row['step']}", f"lr {row['lr']:.2e}",
             f"loss {row.get('loss', float('nan')):.4f}"]
    for k in ("loss_x", "loss_fp", "loss_s1", "loss_s2", "mask_ratio", "conf_mean"):
        if k in row:
            parts.append(f"{k} {row[k]:.3f}")
    if "val/score" in row:
        organs = [f"{k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("val/") and k != "val/score"]
        parts.append(f"val {row['val/score']:.4f} [" + ", ".join(organs) + "]")
    parts.append(f"{row['slices_per_s']:.1f} slices/s")
    parts.append(f"{row['time_s']:.0f}s")
    return " | ".join(parts)
