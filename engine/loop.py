"""The training loop behind ``Final.py``: data, model, optimizer, semi-supervision, checkpoints.

``fit(args)`` takes the parsed ``Final.py`` arguments. See engine/train.py for the determinism and
batching design; engine/semi.py for the semi-supervised step.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from data.config import Config, load_config
from engine.checkpoint import best_name, last_name, load_checkpoint, save_checkpoint
from engine.preempt import EXIT_REQUEUE, PreemptionFlag
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


def _log(dist: DistInfo, msg: str) -> None:
    if dist.is_main:
        print(msg, flush=True)


def _overrides(config: Config, args: Any) -> Config:
    if getattr(args, "inplane", None):
        config = replace(config, inplane_size=(int(args.inplane[0]), int(args.inplane[1])))
    if getattr(args, "hu_window", None):
        config = replace(config, hu_window=(float(args.hu_window[0]), float(args.hu_window[1])))
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


def _loader(dataset, sampler, collate, workers: int, pin: bool):
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        # A private generator keeps worker seeding from consuming the global RNG stream.
        generator=torch.Generator().manual_seed(0))


def fit(args: Any) -> dict[str, Any]:
    """Train one view's model. Returns a summary dict (also written as JSON by rank 0).

    Raises:
        InputError: bad data, config or checkpoint.
    """
    from data.cache import build_cache
    from data.layout import discover
    from data.sampling import SliceDataset, collate_labeled, collate_unlabeled
    from losses.partial import DeepSupervisedLoss
    from models import build_model

    t_start = time.time()
    config = _overrides(load_config(args.config), args)
    device = resolve_device(args.device)
    dist = init_distributed(device)
    amp_dtype = resolve_amp(args.amp, device)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if dist.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(out, f"cannot create output folder ({err.strerror})") from None
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
    views = (args.view,)
    # Rank 0 builds the cache; the others wait, then open the same (now valid) entries.
    vols: dict[str, list] = {}
    for turn in ((0,) if not dist.enabled else (0, 1)):
        if dist.enabled and (turn == 0) != dist.is_main:
            torch.distributed.barrier()
            continue
        for split in ("labeled", "validation", "unlabeled"):
            if split == "unlabeled" and not semi:
                vols[split] = []
                continue
            vols[split] = build_cache(by_split[split], config, cache_dir, views=views,
                                      workers=args.workers, progress=dist.is_main and args.progress)
        if dist.enabled and dist.is_main:
            torch.distributed.barrier()
    _log(dist, f"data: {len(vols['labeled'])} labeled, {len(vols['validation'])} validation, "
               f"{len(vols['unlabeled'])} unlabeled volumes from "
               f"{sorted({c.dataset for c in cases})}; cache {cache_dir}")

    # ---- model, loss, optimizer
    model_args = {"in_channels": args.slices, "num_classes": config.num_classes, "width": args.width}
    if args.blocks:
        model_args["blocks"] = [int(b) for b in args.blocks.split(",")]
    model = build_model(model_args).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = DeepSupervisedLoss(class_weights=config.class_weights, mode=args.loss,
                                 dice_weight=args.dice_weight).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    steps_per_epoch = args.steps_per_epoch
    total_steps = args.epochs * steps_per_epoch

    semi_cfg = teacher = thresholds = None
    if semi:
        from engine.semi import EMATeacher, SemiConfig, ThresholdSchedule

        semi_cfg = SemiConfig(pseudo=args.pseudo, teacher=args.teacher, ema_momentum=args.ema_momentum)
        thresholds = ThresholdSchedule.from_arg(args.threshold)
        teacher = EMATeacher(model, momentum=args.ema_momentum) if args.teacher == "ema" else None

    start_step, best_score = 0, -math.inf
    history = History(out / f"history_{args.view}.csv")
    resume_path = _find_resume(args)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, expect={"organs": list(config.organs), "view": args.view,
                                                     "slices": args.slices, "width": args.width})
        if ckpt.get("model_args") != model_args:
            raise InputError(resume_path, f"checkpoint model {ckpt.get('model_args')} differs from "
                             f"the requested {model_args}")
        unwrap(model).load_state_dict(ckpt["model"])
        if "optimizer" not in ckpt:
            raise InputError(resume_path, "checkpoint has no optimizer state; cannot resume training")
        optimizer.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if teacher is not None and "ema" in ckpt:
            teacher.load_state_dict(ckpt["ema"])
        if thresholds is not None and ckpt.get("semi_state"):
            thresholds.load_state_dict(ckpt["semi_state"].get("thresholds", {}))
        start_step, best_score = int(ckpt["step"]), float(ckpt["best_score"])
        history.rows = [r for r in load_history(history.path) if int(r.get("step", 0)) <= start_step]
        _log(dist, f"resumed from {resume_path} at step {start_step} (epoch {ckpt['epoch']})")

    if dist.enabled:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_model = torch.compile(model) if args.compile else model
    if dist.is_main and args.tensorboard:
        history.open_tensorboard(out / "tensorboard")

    # ---- data loaders (one iterator for the whole run: no per-epoch worker restarts)
    pin = device.type == "cuda"
    # Global sample indices (see StepBatchSampler) with one "epoch" of the dataset per training
    # epoch, so sample n is drawn from default_rng([seed, n // per_epoch, n % per_epoch]).
    global_batch = args.batchsize * dist.world
    lab_ds = SliceDataset(vols["labeled"], config, view=args.view, slices=args.slices,
                          block=args.blocksize, samples_per_epoch=steps_per_epoch * global_batch,
                          seed=args.seed, fg_prob=args.fg_prob, flips=not args.no_flip, labeled=True,
                          alternate_every=global_batch if args.mix == "alternate" else 0)
    lab_iter = iter(_loader(lab_ds, StepBatchSampler(start_step, total_steps, args.batchsize,
                                                     dist.rank, dist.world),
                            collate_labeled, args.workers, pin))
    unl_iter = None
    ub = args.unlabeled_batchsize or args.batchsize
    if semi:
        unl_ds = SliceDataset(vols["unlabeled"], config, view=args.view, slices=args.slices,
                              block=args.blocksize, samples_per_epoch=steps_per_epoch * 2 * ub * dist.world,
                              seed=args.seed + 7919, fg_prob=0.0, flips=True, rot90=True, labeled=False)
        unl_iter = iter(_loader(unl_ds, StepBatchSampler(start_step, total_steps, 2 * ub,
                                                         dist.rank, dist.world),
                                collate_unlabeled, args.workers, pin))

    # ---- loop
    preempt = PreemptionFlag().install()
    budget_s = args.time_budget * 60 if args.time_budget else math.inf
    step = start_step
    epoch_sums: dict[str, float] = {}
    epoch_count = 0
    epoch_t0 = time.time()
    slices_seen = 0
    stop_reason = "done"
    model.train()
    last_val: dict[str, float] = {}

    def save(kind: str, epoch: int) -> None:
        semi_state = {"thresholds": thresholds.state_dict()} if thresholds is not None else None
        payload = checkpoint_payload(model, model_args, config, args, epoch=epoch, step=step,
                                     best_score=best_score, optimizer=optimizer,
                                     scaler=scaler if scaler.is_enabled() else None,
                                     ema=teacher, semi_state=semi_state)
        save_checkpoint(payload, out / (best_name(args.view) if kind == "best" else last_name(args.view)))

    try:
        while step < total_steps:
            torch.manual_seed(rng_seed(args.seed, step, dist.rank))
            factor = lr_factor(args.schedule, step, total_steps, steps_per_epoch, args.lr_decay,
                               args.lr_decay_every, args.warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = args.lr * factor
            batch = next(lab_iter).to(device, non_blocking=pin)
            epoch_idx = step // steps_per_epoch
            if semi and epoch_idx >= args.semi_warmup:
                from engine.semi import semi_step

                unl = next(unl_iter).to(device, non_blocking=pin)
                unl_a, unl_b = unl.split(ub)
                gen = torch.Generator(device=device).manual_seed(rng_seed(args.seed + 1, step, dist.rank))
                losses = semi_step(train_model, teacher, batch, unl_a, unl_b, loss_fn,
                                   thresholds.value(step / total_steps), semi_cfg, gen,
                                   amp_dtype=amp_dtype)
                slices_seen += batch.image.shape[0] + unl.image.shape[0]
            else:
                if semi:
                    next(unl_iter)  # keep the unlabeled stream aligned with the step counter
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
            for k, v in losses.items():
                epoch_sums[k] = epoch_sums.get(k, 0.0) + float(v.detach())
            epoch_count += 1
            step += 1

            stop_now = preempt.requested or (time.time() - t_start) > budget_s
            if dist.enabled:
                flag = torch.tensor([1.0 if stop_now else 0.0], device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop_now = bool(flag.item() > 0)
            end_of_epoch = step % steps_per_epoch == 0 or step == total_steps
            if not (end_of_epoch or stop_now):
                continue

            epoch = (step + steps_per_epoch - 1) // steps_per_epoch
            elapsed = time.time() - epoch_t0
            row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": args.lr * factor,
                                   "time_s": round(time.time() - t_start, 1),
                                   "slices_per_s": slices_seen * dist.world / max(elapsed, 1e-9)}
            row.update({k: v / max(1, epoch_count) for k, v in epoch_sums.items()})
            if thresholds is not None:
                row["threshold"] = thresholds.value(step / total_steps)
            final = step == total_steps or stop_now
            if preempt.requested:
                save("last", epoch)
                _log(dist, f"signal {preempt.received} received: saved {out / last_name(args.view)} "
                           f"at step {step}; exiting with {EXIT_REQUEUE} so the job is requeued")
                stop_reason = "preempted"
                break
            if epoch % args.val_every == 0 or final:
                if vols["validation"]:
                    last_val = validate(model, vols["validation"], config, args.view, args.slices,
                                        device, amp_dtype, batch=args.val_batch, dist=dist)
                    row.update({f"val/{k}": v for k, v in last_val.items()})
                    score = last_val["score"]
                else:
                    score = -row.get("loss", 0.0)
                if dist.is_main:
                    if score > best_score:
                        best_score = score
                        save("best", epoch)
                    save("last", epoch)
                    history.add(row)
            elif dist.is_main:
                history.add(row)
            _log(dist, _epoch_line(row, epoch, args.epochs))
            epoch_sums, epoch_count, slices_seen, epoch_t0 = {}, 0, 0, time.time()
            if stop_now:
                stop_reason = "time budget"
                _log(dist, f"time budget of {args.time_budget} min reached at step {step}")
                break
    finally:
        preempt.uninstall()
        history.close()

    summary = {"view": args.view, "steps": step, "total_steps": total_steps, "stop": stop_reason,
               "best_score": best_score, "validation": last_val, "seconds": time.time() - t_start,
               "semi": semi, "device": str(device), "world": dist.world}
    if dist.is_main:
        write_json(out / f"train_summary_{args.view}.json", summary)
    shutdown_distributed()
    if stop_reason == "preempted":
        sys.exit(EXIT_REQUEUE)
    return summary


def _epoch_line(row: dict[str, Any], epoch: int, epochs: int) -> str:
    parts = [f"epoch {epoch}/{epochs}", f"step {row['step']}", f"lr {row['lr']:.2e}",
             f"loss {row.get('loss', float('nan')):.4f}"]
    for k in ("loss_x", "loss_fp", "loss_s1", "loss_s2", "mask_ratio", "conf_mean"):
        if k in row and k != "loss":
            parts.append(f"{k} {row[k]:.3f}")
    if "val/score" in row:
        organs = [f"{k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("val/") and k != "val/score"]
        parts.append(f"val {row['val/score']:.4f} [" + ", ".join(organs) + "]")
    parts.append(f"{row['slices_per_s']:.1f} slices/s")
    parts.append(f"{row['time_s']:.0f}s")
    return " | ".join(parts)

