"""Post-processing of label maps: keep each organ's largest connected component(s).

Kidneys come as two components (``config.components``), every other organ as one. Removed voxels
become background. Connectivity is 26-neighbourhood (3D), so a thin diagonal bridge keeps an organ
in one piece.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from data.config import Config
from utils.metrics import bounding_box


def largest_components(mask: np.ndarray, keep: int = 1) -> np.ndarray:
    """The ``keep`` largest connected components of a boolean mask (26-connectivity in 3D).

    Ties are broken by label order (first found first), so the result is deterministic.

    Returns:
        Boolean mask of the same shape.
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros_like(mask)
    box = bounding_box(mask)
    if box is None or keep < 1:
        return out
    sub = mask[box]
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    comp, n = ndimage.label(sub, structure=structure)
    if n <= keep:
        out[box] = sub
        return out
    sizes = np.bincount(comp.ravel())[1:]
    # stable sort on -size: equal sizes keep label order
    kept = np.argsort(-sizes, kind="stable")[:keep] + 1
    lut = np.zeros(n + 1, dtype=bool)
    lut[kept] = True
    out[box] = lut[comp]
    return out


def keep_largest_components(labels: np.ndarray, config: Config, inplace: bool = False) -> np.ndarray:
    """Keep, per organ, its ``config.components.get(organ, 1)`` largest connected components.

    Args:
        labels: integer class map (class ``i + 1`` = ``config.organs[i]``).
        config: organs and component counts.
        inplace: modify ``labels`` instead of a copy.

    Returns:
        The cleaned class map (``labels`` itself when ``inplace``).
    """
    out = labels if inplace else labels.copy()
    for i, organ in enumerate(config.organs):
        cls = i + 1
        mask = out == cls
        box = bounding_box(mask)
        if box is None:
            continue
        sub = mask[box]
        keep = largest_components(sub, int(config.components.get(organ, 1)))
        region = out[box]
        region[sub & ~keep] = 0
    return out
