"""engine/steps.py: the update every training step ends with (backward, clipping, optimizer, scaler)."""

from __future__ import annotations

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
