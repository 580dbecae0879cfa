"""Segmentation networks; ``build_model(model_args)`` rebuilds one from a checkpoint's ``model_args``."""

from __future__ import annotations

from typing import Any

from torch import nn

from models.mosnet import MOSNet, MOSOutput

__all__ = ["DEFAULT_NORM", "LEGACY_NORM", "MODEL_DEFAULTS", "MOSNet", "MOSOutput", "build_model"]

# Paper-like default (GPU, 224x224 crops): PIPO-FAN widths 64..512 and one residual block per level.
MODEL_DEFAULTS: dict[str, Any] = {"in_channels": 3, "num_classes": 4, "width": 64, "blocks": [1, 1, 1, 1]}
_KEYS = {"in_channels", "num_classes", "width", "blocks", "fp_dropout", "norm"}
# What Final.py trains.
DEFAULT_NORM = "instance"
# What model_args without "norm" mean: checkpoints written before the option hold batch-norm networks.
LEGACY_NORM = "batch"


def build_model(model_args: dict[str, Any]) -> nn.Module:
    """Build MOSNet from plain values (the ``model_args`` stored in checkpoints).

    Args:
        model_args: ``{"in_channels", "num_classes", "width"}`` and optionally ``"blocks"`` (int or 4
            ints), ``"fp_dropout"`` and ``"norm"`` (``batch`` when absent: checkpoints written before
            the option keep their meaning); missing keys take ``MODEL_DEFAULTS``.

    Returns:
        A freshly initialised MOSNet.

    Raises:
        ValueError: unknown keys or invalid values.
    """
    unknown = set(model_args) - _KEYS
    if unknown:
        raise ValueError(f"unknown model_args {sorted(unknown)}; known: {sorted(_KEYS)}")
    args = {**MODEL_DEFAULTS, **model_args}
    blocks = args["blocks"]
    return MOSNet(in_channels=int(args["in_channels"]), num_classes=int(args["num_classes"]),
                  width=int(args["width"]), fp_dropout=float(args.get("fp_dropout", 0.5)),
                  blocks=blocks if isinstance(blocks, int) else tuple(blocks),
                  norm=str(args.get("norm", LEGACY_NORM)))
