"""engine/history.py: the history CSV round trip and the step-loss meter."""

from __future__ import annotations

import pytest
import torch

from engine.history import EpochMeter, History, load_history


def test_history_csv_round_trip(tmp_path):
    h = History(tmp_path / "history_axial.csv")
    h.add({"epoch": 1, "step": 10, "loss": 0.5})
    h.add({"epoch": 2, "step": 20, "loss": 0.25, "val/score": 0.75})
    rows = load_history(h.path)
    assert rows[0]["epoch"] == 1 and rows[1]["val/score"] == pytest.approx(0.75)
    assert rows[0]["val/score"] == ""


def test_epoch_meter_means_and_state():
    m = EpochMeter()
    m.add({"loss": torch.tensor(1.0)})
    m.add({"loss": torch.tensor(3.0), "loss_x": torch.tensor(2.0)})
    # loss_x was reported by one of the two steps (as the unsupervised losses in the epoch where the
    # warm-up ends): its mean is over that step, not diluted to 1.0
    assert m.means() == {"loss": 2.0, "loss_x": 2.0}
    again = EpochMeter()
    again.load_state_dict(m.state_dict())
    assert again == m
    old = EpochMeter()
    old.load_state_dict({"sums": {"loss": 4.0, "loss_x": 2.0}, "count": 2})  # a checkpoint before counts
    assert old.means() == {"loss": 2.0, "loss_x": 1.0}
    m.reset()
    assert m.means() == {} and m.counts == {}
