"""The training loop behind ``Final.py``: ``fit(options)`` builds a :class:`Trainer` and runs it.

Read top to bottom: :func:`fit` -> :meth:`Trainer.build` (engine/build.py: data, network, semi parts;
engine/resume.py: ``--resume``) -> :meth:`Trainer.run` -> :meth:`Trainer.train_step`
(engine/steps.py ``supervised_step`` or engine/semi.py ``semi_step``, then ``apply_update``) and
:meth:`Trainer.end_epoch` (history row, engine/validation.py ``validate``, :meth:`Trainer.save`).

Bookkeeping is by global optimizer step. An epoch is ``--steps-per-epoch`` steps; at its end the loop
writes one history row (means of the step losses since the previous row, averaged over the ranks),
validates every ``--val-every`` epochs and at the last step, and then saves ``best`` (when the score
improved) and ``last``. Only rank 0 writes files: ``history_{view}.csv``, ``resu_best/last_{view}.pth.tar``,
``train_summary_{view}.json``, ``train.log``, ``args_{view}.json`` (engine/logs.py) and, with
``--tensorboard``, ``tensorboard/``.

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
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from data.config import Config
from engine import steps
from engine.build import (
    build_network,
    build_semi,
    check_existing_run,
    check_out_folder,
    find_resume,
    prepare_data,
    run_config,
    run_device,
)
from engine.checkpoint import TrainingCheckpoint, best_name, last_name
from engine.history import EpochMeter, History, epoch_line, load_history, tensorboard_writer_class
from engine.logs import RunLog, write_run_record
from engine.options import TrainOptions
from engine.preempt import PreemptionFlag
from engine.runtime import DistInfo, init_distributed, shutdown_distributed, unwrap
from engine.schedule import lr_factor, rng_seed
from utils.errors import InputError
from utils.fileio import write_json_atomic

log = logging.getLogger("unimos")

# Stop codes agreed on by all ranks (the largest wins).
_GO, _BUDGET, _PREEMPT = 0, 1, 2


def fit(opts: TrainOptions) -> dict[str, Any]:
    """Train one view's model (see the module docstring).

    Args:
        opts: the run's options (``TrainOptions.from_namespace(args)`` for ``Final.py``'s arguments).

    Returns:
        Summary: ``view, steps, total_steps, stop ("done" | "time budget" | "preempted"), best_score,
        validation (last scores), seconds, semi, semi_from_step (the first semi-supervised step), device,
        world, rank``.

    Raises:
        InputError: bad data, config, device or checkpoint.
    """
    if not isinstance(opts, TrainOptions):
        raise TypeError(f"fit takes TrainOptions (TrainOptions.from_namespace(args)), "
                        f"not {type(opts).__name__}")
    t_start = time.time()
    config = run_config(opts)
    device, amp_dtype = run_device(opts)
    dist = init_distributed(device)
    run_log = RunLog(dist.rank)
    ended = False
    try:
        trainer = Trainer(opts, config, device, amp_dtype, dist, t_start)
        trainer.build()
        summary = trainer.run(run_log)
        ended = True
        return summary
    finally:
        run_log.close()
        shutdown_distributed(synchronize=ended)


class Trainer:
    """One view's training run: its objects, its progress (``step``, ``best_score``, ...) and the loop."""

    def __init__(self, opts: TrainOptions, config: Config, device: torch.device,
                 amp_dtype: torch.dtype | None, dist: DistInfo, t_start: float) -> None:
        self.opts, self.config, self.device, self.amp_dtype, self.dist = opts, config, device, amp_dtype, dist
        self.t_start = t_start
        self.out = Path(opts.out)
        self.spe = opts.steps_per_epoch
        self.total_steps = opts.epochs * self.spe
        self.semi_from = opts.phase_steps(opts.semi_warmup)  # first step of the semi-supervised phase
        self.rampup_steps = opts.phase_steps(opts.semi_rampup)
        self.ub = opts.unlabeled_batchsize or opts.batchsize  # unlabeled batch of each weak view
        self.pin = device.type == "cuda"
        # progress (restored by --resume)
        self.step, self.best_score = 0, -math.inf
        self.meter = EpochMeter()
        self.pending_end, self.elapsed_before = False, 0.0
        self.history = History(self.out / f"history_{opts.view}.csv")
        # this process's counters
        self.last_val: dict[str, float] = {}
        self.stop_reason = "done"
        self.served = "student"  # which weights resu_best holds (the better on validation)
        self.slices_seen, self.window_t0 = 0, time.time()
        self.lab_iter = self.unl_iter = None
        self.resumed_from: Path | None = None
        self.lock: Path | None = None  # rank 0's lock on this view's files in --out

    # ---- set-up

    def build(self) -> None:
        """Data, network, loss, optimizer, semi-supervised parts, ``--resume``, DDP, TensorBoard."""
        from engine.distributed import wrap_ddp

        opts, dist = self.opts, self.dist
        check_out_folder(self.out)  # created by run(): a failed start leaves nothing behind
        resume_path = find_resume(opts)
        check_existing_run(opts, resume_path)
        if opts.tensorboard:
            tensorboard_writer_class()  # fail now, not after the data is cached
        data = prepare_data(opts, self.config, dist)
        self.volumes, self.semi = data.volumes, data.semi
        if self.semi and self.semi_from >= self.total_steps:
            # said out loud (an explicit --semi with such a warm-up is refused with the flags): the
            # summary's "semi": true alone read as a run that took semi-supervised steps
            log.info(f"note: --semi-warmup {opts.semi_warmup:g} starts the semi-supervised phase at step "
                     f"{self.semi_from}, after the last of {self.total_steps} steps: no unsupervised loss "
                     "is trained (the EMA teacher still follows the student and is validated)")
        # all built from the plain network, before DDP wraps it
        self.net = build_network(opts, self.config, self.device, self.amp_dtype)
        self.semi_parts = build_semi(opts, self.net.model) if self.semi else None
        if resume_path is not None:
            self.restore(resume_path)
        self.model = wrap_ddp(self.net.model, self.device, dist, sync_bn=opts.sync_bn)
        self.train_model = torch.compile(self.model) if opts.compile else self.model
        if dist.is_main and opts.tensorboard:
            self.history.open_tensorboard(self.out / "tensorboard")

    def restore(self, path: Path) -> None:
        """Continue from the training checkpoint at ``path`` (see engine/resume.py)."""
        from data.config import config_to_dict
        from engine.resume import restore

        ckpt = restore(path, self.opts, config_to_dict(self.config), self.net, self.semi_parts, self.dist,
                       self.total_steps)
        self.resumed_from = path
        self.step, self.best_score = int(ckpt.step), float(ckpt.best_score)
        loop_state = ckpt.loop or {}
        self.meter.load_state_dict(loop_state.get("meter", {}))
        self.pending_end = bool(loop_state.get("pending_end", False))
        self.elapsed_before = float(loop_state.get("elapsed_s", 0.0))
        self.served = str(loop_state.get("served", "student"))
        # the curve of the run being continued: the checkpoint's own folder (not --out's history,
        # which under --resume OTHER --overwrite belongs to the run being replaced)
        source = path.resolve().parent / self.history.path.name
        self.history.rows = [r for r in load_history(source) if _int(r.get("step")) <= self.step]
        log.info(f"resumed from {path} at step {self.step} of {self.total_steps}"
                 + (" (its epoch end is still to be logged)" if self.pending_end else ""))
        if self.step >= self.total_steps and not self.pending_end:
            log.info(f"nothing to do: the checkpoint is at step {self.step} of {self.total_steps}")

    def open_loaders(self) -> None:
        """One loader iterator per stream for the whole run (no per-epoch worker restarts)."""
        from data.loaders import StepBatchSampler, step_loader
        from data.sampling import SliceDataset, collate_labeled, collate_unlabeled

        opts, dist, spe = self.opts, self.dist, self.spe
        if self.step >= self.total_steps:
            return
        # Global sample indices (see StepBatchSampler) with one "epoch" of the dataset per training
        # epoch, so sample n is drawn from default_rng([seed, n // per_epoch, n % per_epoch]).
        global_batch = opts.batchsize * dist.world
        lab_ds = SliceDataset(self.volumes["labeled"], self.config, view=opts.view, slices=opts.slices,
                              block=opts.blocksize, samples_per_epoch=spe * global_batch,
                              seed=opts.seed, fg_prob=opts.fg_prob, flips=opts.flip, labeled=True,
                              intensity=tuple(opts.intensity_jitter),
                              alternate_every=global_batch if opts.mix == "alternate" else 0)
        lab_steps = StepBatchSampler(self.step, self.total_steps, opts.batchsize, dist.rank, dist.world)
        self.lab_iter = iter(step_loader(lab_ds, lab_steps, collate_labeled, opts.workers, self.pin))
        first_semi = max(self.step, self.semi_from)
        if self.semi and first_semi < self.total_steps:
            from data.sampling import organ_slice_ranges

            # unlabeled slices are drawn where the body is, inside the slice range that holds the
            # labeled organs in the same dataset's labeled volumes
            unl_ds = SliceDataset(self.volumes["unlabeled"], self.config, view=opts.view, slices=opts.slices,
                                  block=opts.blocksize, samples_per_epoch=spe * 2 * self.ub * dist.world,
                                  seed=opts.seed + 7919, fg_prob=0.0, flips=opts.flip,
                                  rot90=opts.weak_rot90, labeled=False,
                                  slice_ranges=organ_slice_ranges(self.volumes["labeled"], opts.view),
                                  pair_halves=self.ub * dist.world if opts.cutmix_pairs == "dataset" else 0)
            unl_steps = StepBatchSampler(first_semi, self.total_steps, 2 * self.ub, dist.rank, dist.world)
            self.unl_iter = iter(step_loader(unl_ds, unl_steps, collate_unlabeled, opts.workers, self.pin))

    # ---- the loop

    def run(self, run_log: RunLog | None = None) -> dict[str, Any]:
        """Train from ``step`` to the end (or a stop). Returns the summary (see :func:`fit`)."""
        opts = self.opts
        if opts.workers > 0:
            # Loader workers share the trainer's heap copy-on-write. A full garbage collection (in a
            # worker or here) writes to the header of every tracked object and so duplicates those
            # pages (~70 MB at width 4, at some random epoch); objects frozen before the fork are
            # never visited.
            gc.collect()
            gc.freeze()
        try:
            if self.dist.is_main:
                self._open_records(run_log)  # inside: a failed start releases the lock it took
            self.open_loaders()
            self.slices_seen, self.window_t0 = 0, time.time()
            preempt = PreemptionFlag().install()
            try:
                self._loop(preempt)
            finally:
                preempt.uninstall()
            return self._summary()  # written while the lock is still held
        finally:
            self.close_loaders()
            self.history.close()
            if self.lock is not None:
                from utils.fileio import release_run_lock

                release_run_lock(self.lock)
            if opts.workers > 0:
                gc.unfreeze()  # an in-process caller (tests, notebooks) gets its collector back

    def close_loaders(self) -> None:
        """Stop the loader workers now (also when the run ends with an error).

        Workers ignore SIGTERM (data/loaders.py). After an error (one raised in a worker included)
        the traceback keeps the loader iterator alive until the interpreter exits, and then
        multiprocessing's exit handler sends its daemonic workers SIGTERM and waits for them: the
        run hung after printing its error, with its workers left running.
        """
        for it in (self.lab_iter, self.unl_iter):
            shutdown = getattr(it, "_shutdown_workers", None)  # torch's own orderly shutdown
            if shutdown is None:
                continue
            shutdown()
            for w in getattr(it, "_workers", []):  # one that did not leave in time: SIGKILL
                if w.is_alive():
                    w.kill()
                    w.join()
        self.lab_iter = self.unl_iter = None

    def _loop(self, preempt: PreemptionFlag) -> None:
        from engine.distributed import stop_code

        budget_s = self.opts.time_budget * 60 if self.opts.time_budget else math.inf
        self.model.train()
        while self.step < self.total_steps or self.pending_end:
            if self.pending_end:
                self.end_epoch(final=self.step >= self.total_steps)
                self.pending_end = False
                continue
            self.train_step()
            at_end = self.step % self.spe == 0 or self.step == self.total_steps
            over_budget = time.time() - self.t_start > budget_s
            code = _PREEMPT if preempt.requested else _BUDGET if over_budget else _GO
            code = stop_code(code, self.dist, self.device)
            if code == _PREEMPT:
                self._stop_preempted(preempt, at_end)
                return
            if at_end or code == _BUDGET:
                self.end_epoch(final=self.step == self.total_steps or code == _BUDGET)
            if code == _BUDGET:
                self.stop_reason = "time budget"
                log.warning(f"WARNING: time budget of {self.opts.time_budget} min reached: stopped at step "
                            f"{self.step} of {self.total_steps}; this run is NOT the configured training "
                            "(a slower machine trains less)")
                return

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``."""
        o = self.opts
        return o.lr * lr_factor(o.schedule, step, self.total_steps, self.spe, o.lr_decay, o.lr_decay_every,
                                o.warmup_steps)

    @property
    def teacher(self) -> Any:
        """The EMA teacher (``--teacher ema`` with unlabeled data), or None."""
        return self.semi_parts.teacher if self.semi_parts is not None else None

    def train_step(self) -> None:
        """One optimizer step at ``self.step`` (supervised, or semi-supervised after the warm-up)."""
        opts, step = self.opts, self.step
        torch.manual_seed(rng_seed(opts.seed, step, self.dist.rank))
        for g in self.net.optimizer.param_groups:
            g["lr"] = self.lr_at(step)
        batch = next(self.lab_iter).to(self.device, non_blocking=self.pin)
        teacher = self.teacher
        if teacher is not None and step == self.semi_from:
            # The EMA of the warm-up is an average over weights from random ones onwards: ~100 steps
            # behind (momentum 0.99), it validated at 0.22 where the student had 0.63 when the
            # semi-supervised phase began on the ablation's phantoms, and its pseudo-labels were that
            # bad. The teacher starts as the student, and averages from there.
            teacher.reset(unwrap(self.model))
        if self.semi and step >= self.semi_from:
            losses = self._semi_losses(batch)
        else:
            losses = steps.supervised_step(self.train_model, batch, self.net.loss_fn, self.amp_dtype)
            self.slices_seen += batch.image.shape[0]
        net = self.net
        try:
            steps.apply_update(losses["loss"], self.model, net.optimizer, net.scaler, opts.clip_grad, step,
                               self.dist)
        except FloatingPointError as err:  # diverged: one line, the checkpoints written so far kept
            raise InputError(self.out, f"training stopped: {err}") from None
        if teacher is not None:
            teacher.update(unwrap(self.model))
        self.meter.add(losses)
        self.step += 1

    def _semi_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """engine/semi.py's step on ``batch`` and the step's unlabeled batch (two weak views)."""
        from engine import semi

        step, parts, rank = self.step, self.semi_parts, self.dist.rank
        unl = next(self.unl_iter).to(self.device, non_blocking=self.pin)
        unl_a, unl_b = unl.split(self.ub)
        gen = torch.Generator(device=self.device).manual_seed(rng_seed(self.opts.seed + 1, step, rank))
        ramp = semi.rampup(step - self.semi_from, self.rampup_steps)
        losses = semi.semi_step(self.train_model, parts.teacher, batch, unl_a, unl_b, self.net.loss_fn,
                                parts.thresholds.value(step / self.total_steps), parts.config, gen,
                                amp_dtype=self.amp_dtype, unsup_scale=ramp)
        self.slices_seen += batch.image.shape[0] + unl.image.shape[0]
        return losses

    def end_epoch(self, final: bool) -> None:
        """History row, validation when due, best/last checkpoints (at ``step``)."""
        from engine.distributed import mean_over_ranks

        opts, dist, step = self.opts, self.dist, self.step
        epoch = math.ceil(step / self.spe)
        row: dict[str, Any] = {
            "epoch": epoch, "step": step, "lr": self.lr_at(max(step - 1, 0)),
            "time_s": round(self.seconds(), 1),
            "slices_per_s": self.slices_seen * dist.world / max(time.time() - self.window_t0, 1e-9)}
        row.update(mean_over_ranks(self.meter.means(), dist, self.device))
        if self.semi_parts is not None:
            row["threshold"] = self.semi_parts.thresholds.value(max(step - 1, 0) / self.total_steps)
        self.meter.reset()
        if epoch % opts.val_every == 0 or final:
            row.update(self._validate_and_save(-row.get("loss", 0.0)))
        if dist.is_main:
            self.history.add(row)
        log.info(epoch_line(row, epoch, opts.epochs))
        self.slices_seen, self.window_t0 = 0, time.time()

    def _validate_and_save(self, fallback_score: float) -> dict[str, float]:
        """Validate (score = ``fallback_score`` without validation volumes), save best/last.

        Returns the row's ``val/...`` columns.
        """
        from engine.distributed import broadcast_buffers
        from engine.validation import validate

        columns: dict[str, float] = {}
        if self.volumes["validation"]:
            net = unwrap(self.model)
            broadcast_buffers(net, self.dist)  # every rank evaluates the network rank 0 saves
            self.last_val = validate(net, self.volumes["validation"], self.config, self.opts.view,
                                     self.opts.slices, self.device, self.amp_dtype,
                                     batch=self.opts.val_batch, dist=self.dist)
            columns = {f"val/{k}": v for k, v in self.last_val.items()}
            score, candidate = self.last_val["score"], "student"
            teacher = self.teacher
            if teacher is not None:
                # the mean teacher is often the better model: validated beside the student, and the
                # better of the two is what resu_best serves to segment.py. Its BatchNorm statistics
                # are copied from each rank's own student after every step: rank 0's, as it saves them.
                broadcast_buffers(teacher.module, self.dist)
                ema_val = validate(teacher.module, self.volumes["validation"], self.config, self.opts.view,
                                   self.opts.slices, self.device, self.amp_dtype,
                                   batch=self.opts.val_batch, dist=self.dist)
                columns.update({f"val_ema/{k}": v for k, v in ema_val.items()})
                if ema_val["score"] > score:
                    score, candidate = ema_val["score"], "ema"
        else:
            score, candidate = fallback_score, "student"
        improved = score > self.best_score
        if improved:
            self.best_score, self.served = score, candidate
        if self.dist.is_main:
            if improved:
                self.save("best")
            self.save("last")
        return columns

    def _stop_preempted(self, preempt: PreemptionFlag, at_end: bool) -> None:
        from engine.distributed import barrier, mean_over_ranks

        self.meter.sums = mean_over_ranks(self.meter.sums, self.dist, self.device)
        if self.dist.is_main:
            self.save("last", pending=at_end)
        barrier(self.dist)  # no rank leaves (and makes torchrun kill the others) before the save
        self.stop_reason = "preempted"
        who = signal.Signals(preempt.received).name if preempt.received else "another rank's signal"
        log.info(f"{who} received: saved {self.out / last_name(self.opts.view)} at step {self.step}; "
                 "exit code 3 asks for a requeue")

    # ---- files

    def seconds(self) -> float:
        """Training seconds so far, over all the runs of a resumed training."""
        return self.elapsed_before + time.time() - self.t_start

    def save(self, kind: str, pending: bool = False) -> None:
        """Write the ``best`` or ``last`` checkpoint (rank 0); ``pending``: the epoch end is still to do."""
        from data.config import config_to_dict

        parts, scaler = self.semi_parts, self.net.scaler
        args = {**self.opts.to_dict(), "world": self.dist.world}
        ckpt = TrainingCheckpoint(
            model=unwrap(self.model).state_dict(), model_args=dict(self.net.model_args),
            organs=list(self.config.organs), view=self.opts.view, slices=int(self.opts.slices),
            block=int(self.opts.blocksize), config=config_to_dict(self.config),
            epoch=self.step // self.spe, step=self.step, best_score=float(self.best_score), args=args,
            optimizer=self.net.optimizer.state_dict(),
            scaler=scaler.state_dict() if scaler.is_enabled() else None,
            ema=self.teacher.state_dict() if self.teacher is not None else None,
            semi_state={"thresholds": parts.thresholds.state_dict()} if parts is not None else None,
            loop={"meter": self.meter.state_dict(), "pending_end": pending, "elapsed_s": self.seconds(),
                  "served": self.served,
                  # a requeued job continues this checkpoint whatever its flags say (engine.build)
                  "slurm_job": os.environ.get("SLURM_JOB_ID")})
        if kind == "best" and self.served == "ema" and self.teacher is not None:
            ckpt.student_model, ckpt.model = ckpt.model, self.teacher.module.state_dict()
            ckpt.served = "ema"
        ckpt.save(self.out / (best_name(self.opts.view) if kind == "best" else last_name(self.opts.view)))

    def _open_records(self, run_log: RunLog | None) -> None:
        """Create the output folder; ``train.log`` and ``args_{view}.json`` in it (rank 0)."""
        from utils.fileio import acquire_run_lock

        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = acquire_run_lock(self.out / f".run_{self.opts.view}.lock",
                                     f"--out's {self.opts.view} training")
        self._clear_overwritten()
        if run_log is not None:
            run_log.open_file(self.out / "train.log")
        write_run_record(self.out / f"args_{self.opts.view}.json", self.opts.to_dict(),
                         {"world": self.dist.world, "device": str(self.device), "start_step": self.step})
        self._carry_best_over()

    @property
    def _resumed_elsewhere(self) -> bool:
        """Resumed from a checkpoint outside ``--out`` (another run's)."""
        return self.resumed_from is not None and self.resumed_from.resolve().parent != self.out.resolve()

    def _clear_overwritten(self) -> None:
        """``--overwrite``: remove this view's checkpoints, history and summary of the run being
        replaced, now that every check has passed. Left in place, its best checkpoint survived until
        validation beat the new run's restored best score (maybe never), and segment.py served it."""
        if not self.opts.overwrite:
            return
        if self.resumed_from is not None and not self._resumed_elsewhere:
            return  # continuing this very run (a requeued job): nothing is replaced
        view = self.opts.view
        for name in (best_name(view), last_name(view), f"history_{view}.csv", f"train_summary_{view}.json"):
            if (self.out / name).is_file():
                (self.out / name).unlink()
                log.info(f"--overwrite: removed {self.out / name} of the run this one replaces")

    def _carry_best_over(self) -> None:
        """Resumed from another folder's checkpoint: bring that run's best checkpoint along.

        The restored best score is that checkpoint's, so validation only writes a best here once it
        beats it; until then a new ``--out`` held no best checkpoint at all (segment.py then found
        none there). Copied atomically; an existing best here is never replaced.
        """
        import shutil

        from utils.fileio import atomic_path

        src = self.resumed_from
        if src is None or not self._resumed_elsewhere:
            return
        best, here = src.parent / best_name(self.opts.view), self.out / best_name(self.opts.view)
        if best.is_file() and not here.exists():
            with atomic_path(here) as tmp:
                shutil.copyfile(best, tmp)
            log.info(f"copied {best} to {here}: the best checkpoint so far, until validation beats it")

    def _summary(self) -> dict[str, Any]:
        path = self.out / f"train_summary_{self.opts.view}.json"
        # a run that validated nothing (a resume of a finished run: "nothing to do") keeps the scores
        # the summary already holds for this step; an empty dict there erased the final validation
        validation = self.last_val or _previous_validation(path, self.step)
        summary = {"view": self.opts.view, "steps": self.step, "total_steps": self.total_steps,
                   "stop": self.stop_reason, "best_score": self.best_score, "served": self.served,
                   "validation": validation,
                   "seconds": self.seconds(), "semi": self.semi,
                   "semi_from_step": self.semi_from if self.semi else None, "device": str(self.device),
                   "world": self.dist.world, "rank": self.dist.rank}
        if self.dist.is_main:
            write_json_atomic(path, summary)
        return summary


def _previous_validation(path: Path, step: int) -> dict[str, float]:
    """The validation scores of the summary at ``path`` if it was written at ``step``, else {}."""
    import json

    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(old, dict) or old.get("steps") != step or not isinstance(old.get("validation"), dict):
        return {}
    return old["validation"]


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1
