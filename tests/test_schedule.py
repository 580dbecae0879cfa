"""engine/schedule.py: the learning-rate factor and the per-step seeds."""

from __future__ import annotations

import pytest

from engine.schedule import lr_factor, rng_seed


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


def test_rng_seed_is_deterministic_and_distinct():
    assert rng_seed(0, 5, 0) == rng_seed(0, 5, 0)
    seeds = {rng_seed(0, s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200
