"""Checkpoints: written atomically, loaded without running code, checked against what the caller expects.

Layout of a checkpoint (a plain dict, loadable with ``torch.load(weights_only=True)``)::

    format       "unimos-checkpoint"
    version      1
    model        state_dict of the (unwrapped) network
    model_args   {"in_channels", "num_classes", "width", ...}  -- enough to rebuild the network
    organs       ["liver", "kidney", "spleen"]
    view         "axial" | "coronal" | "sagittal"
    slices       2.5D input slices
    block        training crop size
    config       config_to_dict(config)  -- preprocessing (HU window, in-plane size) and datasets
    epoch, step  progress (epoch = completed epochs)
    best_score   best validation score so far
    args         the Final.py arguments (plain values)
    optimizer, scheduler, ema, semi_state, rng  -- present in training checkpoints, for --resume

Best/last checkpoints are named as the original: ``resu_best_{view}.pth.tar`` and
``resu_last_{view}.pth.tar``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.errors import InputError
from utils.fileio import atomic_path

FORMAT = "unimos-checkpoint"
VERSION = 1


def best_name(view: str) -> str:
    return f"resu_best_{view}.pth.tar"


def last_name(view: str) -> str:
    return f"resu_last_{view}.pth.tar"


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Save ``payload`` (plus format/version tags) atomically: temp file, fsync, rename."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def resolve_checkpoint(path: str | Path, view: str) -> Path:
    """A checkpoint file, or the folder holding ``resu_best_{view}.pth.tar``.

    Raises:
        InputError: when neither exists.
    """
    p = Path(path)
    if p.is_dir():
        cand = p / best_name(view)
        if not cand.is_file():
            raise InputError(cand, f"no checkpoint for view '{view}' in this folder")
        return cand
    if not p.is_file():
        raise InputError(p, "checkpoint does not exist")
    return p


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a UniMOS checkpoint safely and check it matches ``expect``.

    Args:
        path: checkpoint file.
        expect: keys that must be equal in the checkpoint (e.g. ``{"organs": [...], "view": "axial",
            "slices": 3}``); a value of None is not checked.

    Raises:
        InputError: missing/corrupt/foreign file, or a mismatch with ``expect``.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "checkpoint does not exist")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # any failure to unpickle means the same thing to the user
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise InputError(p, f"not a loadable checkpoint (corrupt, truncated, or not safe to load: "
                         f"{reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise InputError(p, "not a UniMOS checkpoint (no 'format: unimos-checkpoint' tag)")
    if int(ckpt.get("version", 0)) > VERSION:
        raise InputError(p, f"checkpoint version {ckpt.get('version')} is newer than this code ({VERSION})")
    for key, want in (expect or {}).items():
        if want is None:
            continue
        have = ckpt.get(key)
        if isinstance(want, tuple):
            want = list(want)
        if isinstance(have, tuple):
            have = list(have)
        if have != want:
            raise InputError(p, f"checkpoint {key} is {have!r} but {want!r} was asked for")
    return ckpt
