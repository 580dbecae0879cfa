"""Preemption and --resume: a run stopped by a signal and resumed ends exactly like an uninterrupted run.

The uninterrupted references are ``tiny_runs`` (Final.py subprocesses, 2 epochs x 2 steps, workers 0).
Stopped runs call ``engine.trainer.fit`` in-process; the stop is a real SIGUSR1 sent to this process from
inside the N-th training step (the step function is wrapped, nothing in the loop is test-specific),
so the loop's own handler, step-boundary check, checkpoint and resume are what is tested.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine.semi
import engine.steps
from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.preempt import EXIT_REQUEUE
from engine.trainer import fit
from tests.conftest import REPO, run_script, script_env, train_argv, train_options
from utils.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

LAST = "resu_last_axial.pth.tar"
# Columns that depend on the wall clock, not on the computation.
CLOCK = ("time_s", "slices_per_s")
MODES = {"sup": {"semi": False}, "semi": {"semi": True, "teacher": "ema"}}


def _stop_after(monkeypatch, n: int, sig: int = signal.SIGUSR1) -> None:
    """Send ``sig`` to this process during the n-th training step (supervised or semi-supervised)."""
    calls = {"n": 0}

    def wrap(fn):
        def step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                os.kill(os.getpid(), sig)
            return fn(*args, **kwargs)
        return step

    monkeypatch.setattr(engine.steps, "supervised_step", wrap(engine.steps.supervised_step))
    monkeypatch.setattr(engine.semi, "semi_step", wrap(engine.semi.semi_step))


def _history(path):
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in CLOCK} for row in csv.DictReader(fh)]


def _state_diff(a: dict, b: dict) -> float:
    """Max abs difference over every tensor of two (nested) state dicts; inf when structures differ."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return float("inf")
        return max((_state_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return float("inf")
        return max((_state_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0 if a == b else float("inf")


def _assert_same_run(out, ref) -> dict[str, float]:
    """The stopped-and-resumed run in ``out`` ended exactly like ``ref``; returns the differences."""
    got, want = load_checkpoint(out / LAST), load_checkpoint(ref / LAST)
    diffs = {key: _state_diff(got[key], want[key]) for key in ("model", "optimizer", "ema") if key in want}
    assert set(diffs) == {key for key in ("model", "optimizer", "ema") if key in got}
    assert got["step"] == want["step"] == 4
    assert got["best_score"] == want["best_score"]
    assert diffs == dict.fromkeys(diffs, 0.0), diffs  # bit-identical on CPU
    assert _history(out / "history_axial.csv") == _history(ref / "history_axial.csv")
    best_got, best_want = load_checkpoint(out / "resu_best_axial.pth.tar"), \
        load_checkpoint(ref / "resu_best_axial.pth.tar")
    assert best_got["step"] == best_want["step"]
    assert _state_diff(best_got["model"], best_want["model"]) == 0.0
    return diffs


@pytest.mark.parametrize(("mode", "stop_after", "workers"), [
    ("sup", 1, 0),                                            # mid-epoch
    ("semi", 2, 0),                                           # right at the end of epoch 1
    pytest.param("sup", 2, 2, marks=pytest.mark.slow),
    pytest.param("semi", 1, 2, marks=pytest.mark.slow),
    pytest.param("semi", 3, 0, marks=pytest.mark.slow),
])
def test_stop_and_resume_is_exact(tiny_data, tiny_runs, tmp_path, monkeypatch, mode, stop_after, workers):
    extra = {**MODES[mode], "workers": workers}
    _stop_after(monkeypatch, stop_after)
    first = fit(train_options(tiny_data, tmp_path, **extra))
    assert first["stop"] == "preempted" and first["steps"] == stop_after
    ckpt = load_checkpoint(tmp_path / LAST)
    at_epoch_end = stop_after % 2 == 0
    assert ckpt["step"] == stop_after
    assert ckpt["loop"]["pending_end"] is at_epoch_end
    assert ckpt["loop"]["meter"]["counts"]["loss"] == (2 if at_epoch_end else 1)
    # Nothing is validated or logged under the deadline: the epoch's row is still to come.
    rows = _history(tmp_path / "history_axial.csv") if (tmp_path / "history_axial.csv").exists() else []
    assert [r["step"] for r in rows] == [str(s) for s in (2,) if s < stop_after]
    monkeypatch.undo()

    second = fit(train_options(tiny_data, tmp_path, **extra, resume="auto"))
    assert second["stop"] == "done" and second["steps"] == 4
    _assert_same_run(tmp_path, tiny_runs[mode])


def test_sigterm_to_final_py_then_resume(tiny_data, tiny_runs, tmp_path):
    """The real thing: SIGTERM to every process of a running Final.py (as Slurm's scancel does,
    loader workers included), exit code 3, then `--resume` (auto) finishes the run exactly."""
    argv = [sys.executable, "Final.py", *train_argv(tiny_data, tmp_path, "--no-semi", "--workers", "2")]
    proc = subprocess.Popen(argv, cwd=REPO, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:  # the end of epoch 1 is logged after its validation
            if line.startswith("epoch 1/2"):
                os.killpg(proc.pid, signal.SIGTERM)
                break
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    assert load_checkpoint(tmp_path / LAST)["step"] in (3, 4)
    done = run_script("Final.py", *train_argv(tiny_data, tmp_path, "--no-semi", "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    _assert_same_run(tmp_path, tiny_runs["sup"])


def test_time_budget_stop_validates_and_resumes(tiny_data, tiny_runs, tmp_path):
    """A --time-budget stop keeps the run usable (best/last, a row for the partial epoch) and resumable."""
    first = fit(train_options(tiny_data, tmp_path, semi=False, time_budget=1e-9))
    assert first["stop"] == "time budget" and first["steps"] == 1
    assert "score" in first["validation"]
    assert (tmp_path / "resu_best_axial.pth.tar").is_file()
    rows = _history(tmp_path / "history_axial.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "1")]  # the partial epoch's row
    second = fit(train_options(tiny_data, tmp_path, semi=False, resume="auto"))
    assert second["steps"] == 4
    got, want = load_checkpoint(tmp_path / LAST), load_checkpoint(tiny_runs["sup"] / LAST)
    assert _state_diff(got["model"], want["model"]) == 0.0  # the weights do not depend on the stop
    assert _state_diff(got["optimizer"], want["optimizer"]) == 0.0
    # Each step is counted in exactly one row: the partial row, then the rest of epoch 1.
    rows = _history(tmp_path / "history_axial.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "1"), ("1", "2"), ("2", "4")]
    ref = _history(tiny_runs["sup"] / "history_axial.csv")
    assert rows[2] == ref[1]


def test_resume_refuses_foreign_and_mismatching_checkpoints(tiny_data, tiny_runs, tmp_path, capsys):
    """Exit code 2 and one line naming the file; nothing written to the output folder."""
    from Final import main
    from utils.errors import run_cli

    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    ckpt = load_checkpoint(tiny_runs["sup"] / LAST)
    wider = tmp_path / "wide.pth.tar"
    save_checkpoint({**ckpt, "width": 8, "model_args": {**ckpt["model_args"], "width": 8}}, wider)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes((tiny_runs["sup"] / LAST).read_bytes()[:5000])
    coronal = tmp_path / "coronal.pth.tar"
    save_checkpoint({**ckpt, "view": "coronal"}, coronal)
    no_optim = tmp_path / "inference_only.pth.tar"
    save_checkpoint({k: v for k, v in ckpt.items() if k != "optimizer"}, no_optim)
    blocks = tmp_path / "blocks.pth.tar"
    save_checkpoint({**ckpt, "model_args": {**ckpt["model_args"], "blocks": [2, 2, 2, 2]}}, blocks)
    cases = [(foreign, "not a UniMOS checkpoint"), (wider, "width is 8 but 4"),
             (truncated, "not a loadable checkpoint"), (coronal, "view is 'coronal'"),
             (no_optim, "has no optimizer"), (blocks, "(resume with --blocks 2,2,2,2)"),
             (tmp_path / "missing.pth.tar", "does not exist")]
    for path, message in cases:
        out = tmp_path / f"out_{path.stem}"
        with pytest.raises(SystemExit) as exc:
            run_cli(main, train_argv(tiny_data, out, "--no-semi", "--resume", str(path)))
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert exc.value.code == 2, err
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and message in lines[0], lines
        assert not out.exists()


def test_crash_while_saving_leaves_the_previous_checkpoints(tiny_data, tiny_runs, tmp_path, monkeypatch):
    """torch.save dies half-way through a file (disk full): best/last stay the complete previous ones,
    no temporary file is left, and --resume from them still reproduces the uninterrupted run."""
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:  # epoch 1: best and last
            return real_save(obj, f, *args, **kwargs)
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04" + bytes(4096))  # the start of a zip archive, then nothing
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    # A full disk is one line naming the checkpoint (InputError), not an OSError traceback.
    with pytest.raises(InputError, match="No space left"):
        fit(train_options(tiny_data, tmp_path, semi=False))
    monkeypatch.undo()
    assert calls["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "args_axial.json", "history_axial.csv", "resu_best_axial.pth.tar", "resu_last_axial.pth.tar",
        "train.log"]
    for name in ("resu_best_axial.pth.tar", LAST):
        assert load_checkpoint(tmp_path / name)["step"] == 2
    assert fit(train_options(tiny_data, tmp_path, semi=False, resume="auto"))["steps"] == 4
    _assert_same_run(tmp_path, tiny_runs["sup"])


def test_resume_with_changed_schedule_settings_says_so_and_uses_them(tiny_data, tiny_runs, tmp_path,
                                                                     capsys):
    """--epochs moves the LR schedule, the threshold milestones and the warm-up: a resume that changes
    it (or the teacher's momentum, or the threshold) is noted as not the exact continuation, and the
    command line's values are the ones used (the momentum and the schedule are also in the restored
    state, which would otherwise win silently)."""
    import shutil

    shutil.copy(tiny_runs["semi"] / LAST, tmp_path / LAST)
    summary = fit(train_options(tiny_data, tmp_path, semi=True, teacher="ema", resume="auto", epochs=3,
                                ema_momentum=0.5, threshold="0.6"))
    assert summary["steps"] == 6
    note = next(ln for ln in capsys.readouterr().out.splitlines() if "changed settings" in ln)
    for part in ("--epochs 2 -> 3", "--ema-momentum 0.99 -> 0.5", "--threshold schedule -> 0.6"):
        assert part in note, note
    got = load_checkpoint(tmp_path / LAST)
    assert got["ema"]["momentum"] == 0.5
    assert got["semi_state"]["thresholds"] == {"values": [0.6], "milestones": []}


def test_checkpoints_from_before_dataset_pairing_say_they_paired_by_index():
    """A checkpoint written before --cutmix-pairs (or while its default was index) ran with index
    pairing: resuming it with today's default is reported as a change, not taken as a continuation."""
    from engine.options import TrainOptions
    from engine.resume import changed_settings

    opts = TrainOptions()
    assert opts.cutmix_pairs == "dataset"
    assert changed_settings({"batchsize": opts.batchsize}, opts, 1) == ["--cutmix-pairs index -> dataset"]
    assert changed_settings({"cutmix_pairs": "dataset"}, opts, 1) == []
    assert changed_settings({}, TrainOptions(cutmix_pairs="index"), 1) == []


def test_resume_refuses_other_preprocessing_and_a_checkpoint_past_the_end(tiny_data, tiny_runs, tmp_path):
    """The HU window and the in-plane grid are what the network's input means: a resume that changes
    them is refused (it was recorded as the whole run's setting, and segment.py then used it). A
    checkpoint at step 4 resumed with 1 epoch of 2 steps is refused too (it exited 0, "step 4 of 2")."""
    import shutil

    shutil.copy(tiny_runs["sup"] / LAST, tmp_path / LAST)
    with pytest.raises(InputError, match=r"trained with hu_window \[-200\.0, 200\.0\].*--hu-window"):
        fit(train_options(tiny_data, tmp_path, semi=False, resume="auto", hu_window=(-1000.0, 1000.0)))
    with pytest.raises(InputError, match=r"at step 4, past the 2 steps of this command"):
        fit(train_options(tiny_data, tmp_path, semi=False, resume="auto", epochs=1))


def test_resume_of_a_finished_run_keeps_its_summary_and_notes_other_changes(tiny_data, tiny_runs, tmp_path,
                                                                           capsys):
    """Final.sh always passes --resume auto: resubmitting a finished job ("nothing to do") rewrote
    train_summary with empty validation scores. And the loss, the datasets, the optimizer's settings
    are now noted when they change."""
    import json
    import shutil

    from engine.options import TrainOptions
    from engine.resume import changed_settings

    for f in (LAST, "train_summary_axial.json", "history_axial.csv"):
        shutil.copy(tiny_runs["sup"] / f, tmp_path / f)
    before = json.loads((tmp_path / "train_summary_axial.json").read_text())
    assert before["validation"] and before["steps"] == 4
    fit(train_options(tiny_data, tmp_path, semi=False, resume="auto"))
    assert "nothing to do" in capsys.readouterr().out
    after = json.loads((tmp_path / "train_summary_axial.json").read_text())
    assert after["validation"] == before["validation"]
    old = TrainOptions().to_dict()
    new = TrainOptions(loss="naive", datasets="LiTS,KiTS", weight_decay=1e-4, warmup_steps=10)
    notes = changed_settings(old, new, 1)
    for part in ("--loss tal -> naive", "--datasets None -> LiTS,KiTS", "--weight-decay 0.0 -> 0.0001",
                 "--warmup-steps 0 -> 10"):
        assert part in notes, notes


def test_a_fresh_run_does_not_replace_a_finished_run(tiny_data, tiny_runs, tmp_path, capsys):
    """A fresh start in an --out holding this view's checkpoints replaced them (and the history)
    silently: refused, naming the checkpoint, nothing touched. --resume auto continues the run; so
    does --resume OTHER once the run has its own last checkpoint (a requeued Final.sh job passes the
    same --resume again). --overwrite starts over and removes what it replaces: the old best
    checkpoint outlived it (until validation beat the restored score) and segment.py served it."""
    import shutil

    from utils.fileio import sha256_file as sha256_of

    out = tmp_path / "run"
    shutil.copytree(tiny_runs["sup"], out)
    before = {f.name: sha256_of(f) for f in out.iterdir() if f.is_file()}
    with pytest.raises(InputError, match=r"--out already holds checkpoints of view axial") as err:
        fit(train_options(tiny_data, out, semi=False))
    assert err.value.path == str(out / LAST)
    assert {f.name: sha256_of(f) for f in out.iterdir() if f.is_file()} == before

    other = tmp_path / "other"
    shutil.copytree(tiny_runs["semi"], other)
    summary = fit(train_options(tiny_data, out, semi=False, resume=str(other)))
    assert summary["steps"] == 4
    assert f"note: {out / LAST} exists: continuing this run" in capsys.readouterr().out
    assert sha256_of(out / "resu_best_axial.pth.tar") == before["resu_best_axial.pth.tar"]

    # over from OTHER with lr 0: validation cannot beat OTHER's restored best, so the best checkpoint
    # here must be OTHER's (carried over), not the replaced run's
    fit(train_options(tiny_data, out, semi=False, overwrite=True, resume=str(other / LAST), epochs=3,
                      lr=0.0))
    assert sha256_of(out / "resu_best_axial.pth.tar") == sha256_of(other / "resu_best_axial.pth.tar")
    summary = fit(train_options(tiny_data, out, semi=False, overwrite=True, epochs=1))
    assert summary["steps"] == 2 and load_checkpoint(out / LAST)["step"] == 2


def test_resuming_into_a_new_folder_brings_the_best_checkpoint_along(tiny_data, tiny_runs, tmp_path):
    """The restored best score is the source run's: until validation beat it, the new --out held no
    best checkpoint, and segment.py --network-path NEWOUT found none."""
    from utils.fileio import sha256_file

    src = tiny_runs["sup"]
    out = tmp_path / "continued"
    # lr 0: the final validation scores the step-4 weights again, which cannot beat the source's
    # best, so only the copy can be there
    fit(train_options(tiny_data, out, semi=False, resume=str(src / LAST), epochs=3, lr=0.0))
    best = out / "resu_best_axial.pth.tar"
    assert sha256_file(best) == sha256_file(src / "resu_best_axial.pth.tar")
    # and the curve goes on from the source run's (--out had none)
    rows, ref = _history(out / "history_axial.csv"), _history(src / "history_axial.csv")
    assert [r["step"] for r in rows] == ["2", "4", "6"] and rows[:2] == ref


def test_a_second_run_in_the_same_out_is_refused_while_the_first_lives(tiny_data, tmp_path, monkeypatch):
    """Two runs started in one --out wrote over each other's checkpoints and history, both exiting 0.
    A live holder (here a sleeping process of this machine) refuses the second; a lock left by a dead
    process, or by this Slurm job before its requeue, is taken over; the run removes its own lock."""
    import json

    from utils.fileio import _proc_start

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".run_axial.lock"
    from utils.fileio import _HOST

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": _HOST, "pid": holder.pid, "start": _proc_start(holder.pid),
                                    "since": "today"}))
        with pytest.raises(InputError, match=r"\.run_axial\.lock: --out's axial training is in use by "
                                             rf"another run \(host {_HOST}, pid {holder.pid}"):
            fit(train_options(tiny_data, out, semi=False, epochs=1, steps_per_epoch=1))
        assert not list(out.glob("*.pth.tar"))
    finally:
        holder.kill()
        holder.wait()
    fit(train_options(tiny_data, out, semi=False, epochs=1, steps_per_epoch=1))  # the holder is gone
    assert not lock.exists() and (out / LAST).is_file()
    lock.write_text("")  # a run starting this moment has created it and not yet written it
    with pytest.raises(InputError, match="in use by another run"):
        fit(train_options(tiny_data, out, semi=False, epochs=1, steps_per_epoch=1, overwrite=True))
    os.utime(lock, (time.time() - 120, time.time() - 120))  # ... or one killed then, long ago
    fit(train_options(tiny_data, out, semi=False, epochs=1, steps_per_epoch=1, overwrite=True))
    assert not lock.exists()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued on another node
    fit(train_options(tiny_data, out, semi=False, epochs=1, steps_per_epoch=1, overwrite=True))
    assert not lock.exists()
    # on this machine the same job's live process is checked like any other (two runs of one
    # allocation): refused
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": _HOST, "pid": holder.pid, "start": _proc_start(holder.pid),
                                    "slurm_job": "77"}))
        with pytest.raises(InputError, match="in use by another run"):
            fit(train_options(tiny_data, out, semi=False, epochs=1, steps_per_epoch=1, overwrite=True))
    finally:
        holder.kill()
        holder.wait()


def test_overwrite_under_final_sh_starts_over_once_and_a_requeue_continues(tiny_data, tiny_runs, tmp_path,
                                                                          monkeypatch):
    """Final.sh passes --resume auto and, after a requeue, the same flags again. --overwrite then never
    started afresh (auto found the old run), and --resume OTHER --overwrite threw the progress away
    at every requeue. Now the job's own checkpoint is continued, and only then."""
    import shutil

    from utils.fileio import sha256_file

    out = tmp_path / "run"
    shutil.copytree(tiny_runs["sup"], out)  # an earlier, finished run
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    summary = fit(train_options(tiny_data, out, semi=False, resume="auto", overwrite=True, epochs=1))
    assert summary["steps"] == 2  # started afresh, not "nothing to do" on the old run
    last = sha256_file(out / LAST)
    summary = fit(train_options(tiny_data, out, semi=False, resume="auto", overwrite=True, epochs=1))
    assert summary["steps"] == 2 and sha256_file(out / LAST) == last  # requeued: continued, nothing to do
    other = tiny_runs["semi"] / LAST
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # a new job: from OTHER, replacing the run
    fit(train_options(tiny_data, out, semi=False, resume=str(other), overwrite=True, epochs=3))
    done = sha256_file(out / LAST)
    summary = fit(train_options(tiny_data, out, semi=False, resume=str(other), overwrite=True, epochs=3))
    assert summary["steps"] == 6 and sha256_file(out / LAST) == done  # its requeue keeps the progress
