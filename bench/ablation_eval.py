"""Scoring an ablation run: Dice of its checkpoints on the held-out volumes (original grids).

:mod:`bench.ablation` re-exports :func:`evaluate`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.ablation_data import HELD_OUT
from bench.ablation_options import VIEW
from utils.errors import InputError


def evaluate(run_dir: Path, cases: list[Any], device: str, batch: int = 16,
             checkpoints: tuple[str, ...] = ("best",)) -> dict[str, dict[str, Any]]:
    """Dice per organ of the run's checkpoints on the held-out cases (original grids).

    Every held-out volume is read once and segmented by each checkpoint in turn.

    Args:
        run_dir: Final.py ``--out`` folder (``resu_{checkpoint}_axial.pth.tar``).
        cases: held-out :class:`data.layout.Case` list (image + label of a fully labeled dataset).
        device: inference device.
        batch: slices per forward pass.
        checkpoints: any of ``best`` and ``last``.

    Returns:
        Per checkpoint name: ``{"dice": {organ: mean}, "mean": mean over organs,
        "per_case": {case_id: {organ: dice}}, "checkpoint_step", "seconds" (segmentation time)}``.

    Raises:
        InputError: missing/unfit checkpoint, unreadable volumes, grid mismatch.
    """
    import numpy as np

    from data.config import load_config
    from data.volume import read_volume
    from engine.checkpoint import best_name, last_name, load_checkpoint
    from inference.segment import load_model, resolve_device, segment_volume
    from utils.metrics import dice

    dev = resolve_device(device)
    models, steps = {}, {}
    for name in checkpoints:
        path = run_dir / (best_name(VIEW) if name == "best" else last_name(VIEW))
        models[name] = load_model(path, view=VIEW, device=dev)
        steps[name] = load_checkpoint(path).get("step")  # a best checkpoint from the warm-up is worth knowing
    config = load_config()  # the BTCV label values come from the config of this repository
    spec = config.dataset(HELD_OUT)
    per_case: dict[str, dict[str, dict[str, float]]] = {name: {} for name in checkpoints}
    seconds = dict.fromkeys(checkpoints, 0.0)
    for case in cases:
        image, gt = read_volume(case.image), read_volume(case.label)
        if not image.geometry.same_grid(gt.geometry):
            raise InputError(case.label, f"grid differs from its image {case.image}")
        gt_classes = config.map_labels(spec, gt.array, case.label)
        for name, model in models.items():
            t = time.time()
            pred = segment_volume(model, image, batch=batch, device=dev).array
            per_case[name][case.case_id] = {
                o: dice(pred == model.config.organ_index(o), gt_classes == config.organ_index(o))
                for o in model.organs}
            seconds[name] += time.time() - t
    results = {}
    for name, model in models.items():
        means = {o: float(np.mean([d[o] for d in per_case[name].values()])) for o in model.organs}
        results[name] = {"dice": means, "mean": float(np.mean(list(means.values()))),
                         "per_case": per_case[name], "checkpoint_step": steps[name],
                         "seconds": round(seconds[name], 1)}
    return results
