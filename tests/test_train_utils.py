"""Pieces of the training loop that need no data: schedules, step sampler, Dice, history, seeds, options."""

from __future__ import annotations

import math

import numpy as np
import pytest

from data.loaders import StepBatchSampler
from engine.history import History, load_history
from engine.schedule import lr_factor, rng_seed
from engine.validation import dice_per_class


def test_step_schedule_matches_the_original():
    # lr * 0.99 every 40 epochs; 10 steps per epoch.
    assert lr_factor("step", 0, 10_000, 10) == 1.0
    assert lr_factor("step", 399, 10_000, 10) == 1.0
    assert lr_factor("step", 400, 10_000, 10) == pytest.approx(0.99)
    assert lr_factor("step", 800, 10_000, 10) == pytest.approx(0.99**2)


def test_poly_cosine_and_warmup():
    assert lr_factor("poly", 50, 100, 10) == pytest.approx(0.5**0.9)
    assert lr_factor("cosine", 50, 100, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("poly", 0, 100, 10, warmup_steps=4) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        lr_factor("exp", 0, 1, 1)


def test_step_sampler_shards_global_indices():
    one = list(StepBatchSampler(2, 4, batch=4))
    assert one == [[8, 9, 10, 11], [12, 13, 14, 15]]
    r0 = list(StepBatchSampler(2, 4, batch=2, rank=0, world=2))
    r1 = list(StepBatchSampler(2, 4, batch=2, rank=1, world=2))
    # Two ranks of batch 2 see exactly the samples one process of batch 4 sees.
    for a, b, full in zip(r0, r1, one):
        assert sorted(a + b) == full
    # Resuming at step 3 yields what the uninterrupted sampler yields from step 3 on.
    assert list(StepBatchSampler(3, 4, batch=4)) == one[1:]


def test_dice_per_class_hand_computed():
    pred = np.array([[1, 1, 0, 2]])
    label = np.array([[1, 0, 0, 255]])
    d = dice_per_class(pred, label, [1, 2, 3])
    assert d[1] == pytest.approx(2 * 1 / (2 + 1))
    assert math.isnan(d[2])  # predicted 2 only on an ignored voxel: nothing to score
    assert math.isnan(d[3])


def test_history_csv_round_trip(tmp_path):
    h = History(tmp_path / "history_axial.csv")
    h.add({"epoch": 1, "step": 10, "loss": 0.5})
    h.add({"epoch": 2, "step": 20, "loss": 0.25, "val/score": 0.75})
    rows = load_history(h.path)
    assert rows[0]["epoch"] == 1 and rows[1]["val/score"] == pytest.approx(0.75)
    assert rows[0]["val/score"] == ""


def test_rng_seed_is_deterministic_and_distinct():
    assert rng_seed(0, 5, 0) == rng_seed(0, 5, 0)
    seeds = {rng_seed(0, s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200
