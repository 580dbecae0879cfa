"""data/loaders.py: which global samples each step and rank gets."""

from __future__ import annotations

from data.loaders import StepBatchSampler


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
