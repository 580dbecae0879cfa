"""Loading a training checkpoint for inference: the network and what it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.config import Config, config_from_dict
from data.volume import VIEWS
from engine.checkpoint import INFERENCE_KEYS, load_checkpoint, resolve_checkpoint
from models.mosnet import DIVISOR
from utils.errors import InputError

# TTA: every flip of the slice plane (dims of a (B, C, H, W) tensor).
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))



@dataclass
class LoadedModel:
    """A network ready for inference and what it was trained with.

    Attributes:
        model: the network, in eval mode.
        config: the training config (organs, HU window, in-plane size, components).
        view: ``axial`` | ``coronal`` | ``sagittal``.
        slices: 2.5D input slices (the network's input channels).
        block: training crop size; wider slices are processed with a sliding window of this size.
        organs: organ names; class ``i + 1`` is ``organs[i]``.
        path: the checkpoint file.
        model_args: the arguments that rebuilt the network.
        tta_flips: the slice-plane flips test-time augmentation may average over: the ones the
            network was trained with (``--flip``: all four; otherwise none but the identity, since
            a left-right mirror puts the liver where the spleen is).
    """

    model: nn.Module
    config: Config
    view: str
    slices: int
    block: int
    organs: tuple[str, ...]
    path: Path
    model_args: dict[str, Any]
    tta_flips: tuple[tuple[int, ...], ...] = ((),)

    @property
    def num_classes(self) -> int:
        return len(self.organs) + 1


def load_model(checkpoint_path: str | Path, view: str | None = None,
               expect: dict[str, Any] | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint for inference and check it is what the caller asked for.

    Args:
        checkpoint_path: a checkpoint file, or a folder holding ``resu_best_{view}.pth.tar``.
        view: the view wanted (a folder needs it; default ``axial``); checked against the file.
        expect: other values the checkpoint must have, e.g. ``{"organs": [...], "slices": 3,
            "width": 16}`` (``width`` is checked against ``model_args``); None values are skipped.
        device: where to put the network.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        InputError: missing view checkpoint, unreadable or foreign file, or a mismatch (names the file).
    """
    from models import build_model

    if view is not None and view not in VIEWS:
        raise InputError(None, f"view must be one of {VIEWS}, got {view!r}")
    path = resolve_checkpoint(checkpoint_path, view or "axial")
    want = dict(expect or {})
    width = want.pop("width", None)
    if view is not None:
        want["view"] = view
    ckpt = load_checkpoint(path, expect=want, map_location="cpu")
    missing = [k for k in INFERENCE_KEYS if k not in ckpt]
    if missing:
        raise InputError(path, f"checkpoint lacks {missing}; is it a training checkpoint of UniMOS?")
    model_args = dict(ckpt["model_args"])
    if width is not None and model_args.get("width") != width:
        raise InputError(path, f"checkpoint width is {model_args.get('width')!r} but {width!r} was asked for")
    config = config_from_dict(ckpt["config"], source=f"{path} (stored config)")
    organs = tuple(ckpt["organs"])
    slices, block, ck_view = int(ckpt["slices"]), int(ckpt["block"]), str(ckpt["view"])
    if organs != config.organs:
        raise InputError(path, f"checkpoint organs {list(organs)} differ from its config's "
                         f"{list(config.organs)}")
    if ck_view not in VIEWS:
        raise InputError(path, f"checkpoint view {ck_view!r} is not one of {VIEWS}")
    if model_args.get("in_channels") != slices or model_args.get("num_classes") != len(organs) + 1:
        raise InputError(path, f"checkpoint model_args {model_args} do not fit slices={slices} and "
                         f"{len(organs)} organs")
    if block < DIVISOR:
        raise InputError(path, f"checkpoint block size {block} is smaller than {DIVISOR}")
    try:
        model = build_model(model_args)
        model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError, TypeError) as err:
        reason = str(err).strip().splitlines()[0][:200]
        raise InputError(path, f"weights do not fit the stored model_args ({reason})") from None
    # channels_last: oneDNN's convolutions and GroupNorm (the instance norm) both have channels_last
    # kernels, 1.3x faster on CPU (bench/inference.py); MOSNet converts its input to match
    model.eval().to(device).to(memory_format=torch.channels_last)
    trained_flips = bool((ckpt.get("args") or {}).get("flip", False))
    return LoadedModel(model=model, config=config, view=ck_view, slices=slices, block=block,
                       organs=organs, path=path, model_args=model_args,
                       tta_flips=TTA_FLIPS if trained_flips else ((),))


__all__ = ["DIVISOR", "TTA_FLIPS", "LoadedModel", "load_model"]
