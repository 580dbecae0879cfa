"""2.5D slabs: which slices form the input of one centre slice (training, validation and inference).

Kept apart from :mod:`data.sampling` (the training dataset) so that inference does not import the
training data pipeline.
"""

from __future__ import annotations

import numpy as np


def slab_indices(centres: np.ndarray, n: int, slices: int) -> np.ndarray:
    """Slice indices of the 2.5D inputs centred on ``centres`` in a stack of ``n`` slices.

    The one definition shared by training, validation and inference: ``slices`` adjacent slices with
    the centre slice in the middle (channel ``slices // 2``), indices clamped to the stack's ends.

    Returns:
        ``(len(centres), slices)`` int64 array.
    """
    offsets = np.arange(slices) - slices // 2
    return np.clip(np.asarray(centres, dtype=np.int64)[:, None] + offsets[None, :], 0, n - 1)


__all__ = ["slab_indices"]
