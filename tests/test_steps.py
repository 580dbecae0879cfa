"""engine/steps.py: the update every training step ends with (backward, clipping, optimizer, scaler)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.steps import apply_update


def _setup(enabled: bool):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=enabled, init_scale=1024.0)
    return model, opt, scaler


def test_finite_loss_updates_the_weights():
    model, opt, scaler = _setup(False)
    before = model.weight.detach().clone()
    apply_update(model(torch.ones(2, 3)).sum(), model, opt, scaler)
    assert not torch.equal(before, model.weight)


def test_non_finite_loss_without_scaler_stops_the_run():
    model, opt, scaler = _setup(False)
    loss = model(torch.ones(2, 3)).sum() * float("inf")
    with pytest.raises(FloatingPointError, match="step 7"):
        apply_update(loss, model, opt, scaler, step=7)


def test_fp16_overflow_is_skipped_by_the_grad_scaler():
    """With a scaler (fp16 AMP) an overflow is routine: the step is skipped and the scale lowered."""
    model, opt, scaler = _setup(True)
    before = model.weight.detach().clone()
    loss = model(torch.ones(2, 3)).sum() * float("inf")
    apply_update(loss, model, opt, scaler)
    assert torch.equal(before, model.weight)  # no update from inf/NaN gradients
    assert scaler.get_scale() == 512.0        # backoff factor 0.5
    # and the next finite step trains again
    apply_update(model(torch.ones(2, 3)).sum(), model, opt, scaler)
    assert not torch.equal(before, model.weight)


def _nan_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as tdist

    from engine.runtime import DistInfo

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, opt, scaler = _setup(False)
    loss = model(torch.ones(2, 3)).sum() * (float("nan") if rank == 1 else 1.0)
    try:
        apply_update(loss, model, opt, scaler, step=5, dist=DistInfo(rank=rank, world=2))
        outcome = "updated"
    except FloatingPointError as err:
        outcome = str(err)
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)
    # no rank tears its gloo connections down while the other still uses them (engine/runtime.py's
    # shutdown_distributed: without it a rank aborted now and then in the full suite)
    tdist.barrier()
    tdist.destroy_process_group()


def test_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's NaN must stop rank 0 at the same step too: alone, rank 0 would wait in DDP's gradient
    all-reduce until the collective timeout (30 min by default), not stop."""
    import torch.multiprocessing as mp

    mp.start_processes(_nan_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    assert (tmp_path / "rank1.txt").read_text().startswith("loss became nan at step 5")
    assert (tmp_path / "rank0.txt").read_text().startswith("the loss of another rank became non-finite at "
                                                           "step 5")
