"""Training data loaders: which global samples each optimizer step gets, and the DataLoader around them.

Indices are global sample numbers: step ``s`` of a run with per-rank batch ``B`` on ``W`` ranks uses
samples ``s*B*W ... (s+1)*B*W - 1`` and rank ``r`` takes every ``W``-th of them starting at ``r``
(:class:`StepBatchSampler`). A :class:`data.sampling.SliceDataset` draws sample ``n`` from its own
seeded generator, so the batches of a step are the same whether the run was resumed, how many
loader workers fetch them, and (together over the ranks) how many ranks there are.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

import torch


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

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.batch * self.world
        for s in range(self.start, self.stop):
            base = s * per_step
            yield [base + self.rank + self.world * j for j in range(self.batch)]


def ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 -- DataLoader's worker_init_fn
    """Loader workers ignore SIGTERM / SIGUSR1.

    Slurm signals every process of a job (scancel, preemption). A loader worker killed by it would
    make the trainer fail at its next batch instead of checkpointing; the trainer alone handles the
    signal (engine/preempt.py) and then shuts its workers down.
    """
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def step_loader(dataset: torch.utils.data.Dataset, sampler: StepBatchSampler, collate: Callable,
                workers: int, pin: bool) -> torch.utils.data.DataLoader:
    """A DataLoader yielding one collated batch per step of ``sampler``.

    Args:
        dataset: indexed by global sample number.
        sampler: the steps (and this rank's samples) to load.
        collate: ``collate_labeled`` or ``collate_unlabeled``.
        workers: worker processes (0: load in this process); workers persist for the whole run.
        pin: pinned host memory (CUDA training).
    """
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        # A private generator keeps worker seeding from consuming the global RNG stream.
        generator=torch.Generator().manual_seed(0))
