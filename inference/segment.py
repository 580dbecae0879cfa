"""Whole-volume inference: 2.5D slices, in-plane sliding window, multi-view fusion, exact geometry back.

Pipeline of :func:`segment_volume` (the preprocessing is the training cache's, :mod:`data.preprocess`)::

    canonical, orientation = prepare_canonical(volume)          # LPS, in-plane resampled to 256x256
    windowed = window_hu(canonical)                             # [-1, 1]
    for every model (one per view, possibly several per view):
        stack = view_stack(windowed, view)                      # (n, H, W)
        probs_view = softmax over 2.5D slices (edge clamped),  # sliding window when H or W > block,
                     averaged over TTA flips                    # padded to a multiple of 16 otherwise
        probs += view_to_canonical(probs_view)                  # (C, nS, 256, 256)
    probs /= number of models
    labels = argmax(resample probs in-plane to the original canonical grid), slab by slab
    labels = largest connected components per organ (optional)
    return orientation.invert(labels) on the input's exact grid

Memory: probabilities are only held on the resampled (256x256) canonical grid in float32; the way
back to the original in-plane size is done a few slices at a time straight into a uint8 argmax, so a
512x512x600 CT needs roughly 2-3 GB on the CPU (most of it transient preprocessing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.config import Config, config_from_dict
from data.preprocess import preprocess_image, view_stack, view_to_canonical
from data.sampling import slab_indices
from data.volume import VIEWS, Volume
from engine.checkpoint import load_checkpoint, resolve_checkpoint
from engine.runtime import resolve_device
from inference.postprocess import keep_largest_components
from utils.errors import InputError

DIVISOR = 16  # the network halves the input four times
PAD_VALUE = -1.0  # the lower end of the HU window, as in training/validation padding
# TTA: every flip of the slice plane (dims of a (B, C, H, W) tensor).
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))
_REQUIRED_KEYS = ("model", "model_args", "organs", "view", "slices", "block", "config")


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
    """

    model: nn.Module
    config: Config
    view: str
    slices: int
    block: int
    organs: tuple[str, ...]
    path: Path
    model_args: dict[str, Any]

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
    missing = [k for k in _REQUIRED_KEYS if k not in ckpt]
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
    model.eval().to(device)
    return LoadedModel(model=model, config=config, view=ck_view, slices=slices, block=block,
                       organs=organs, path=path, model_args=model_args)


# ----------------------------------------------------------------------------------------------
# Pure helpers: window positions and blending weights


def window_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of length ``tile`` covering ``[0, size)`` with the given stride.

    The last tile is aligned with the end, so every position is covered and no tile leaves the
    image. ``size <= tile`` gives ``[0]``.
    """
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, max(1, stride)))
    starts.append(size - tile)
    return starts


def tile_size(size: int, block: int) -> int:
    """The tile length used along an axis of length ``size``: ``block`` when the axis is longer,
    else ``size`` rounded up to a multiple of 16 (the whole axis in one, padded, tile)."""
    block = max(DIVISOR, block - block % DIVISOR)
    if size > block:
        return block
    return int(math.ceil(size / DIVISOR) * DIVISOR)


def blend_weights(tile: int, n_tiles: int, sigma_scale: float = 0.125) -> np.ndarray:
    """1D blending weights for one axis: a Gaussian (sigma = tile / 8) when tiles overlap, else ones.

    The outer 1/8th of each tile -- where a convolutional network sees the least context -- counts
    little where tiles overlap. The minimum is kept well above zero so every position has weight.
    """
    if n_tiles <= 1:
        return np.ones(tile, dtype=np.float32)
    x = np.arange(tile, dtype=np.float64) - (tile - 1) / 2.0
    g = np.exp(-0.5 * (x / (sigma_scale * tile)) ** 2)
    return np.maximum(g / g.max(), 1e-3).astype(np.float32)


@dataclass(frozen=True)
class TilePlan:
    """How a (H, W) slice is cut: padded size, tile size and tile starts per axis, blending weights."""

    height: int
    width: int
    padded: tuple[int, int]
    tile: tuple[int, int]
    starts: tuple[list[int], list[int]]
    weight: np.ndarray  # (tile_h, tile_w)

    @property
    def n_tiles(self) -> int:
        return len(self.starts[0]) * len(self.starts[1])


def plan_tiles(height: int, width: int, block: int) -> TilePlan:
    """Sliding-window plan for ``height x width`` slices with tiles of ``block`` and stride block/2."""
    th, tw = tile_size(height, block), tile_size(width, block)
    ph, pw = max(height, th), max(width, tw)
    sh, sw = window_starts(ph, th, th // 2), window_starts(pw, tw, tw // 2)
    weight = np.outer(blend_weights(th, len(sh)), blend_weights(tw, len(sw)))
    return TilePlan(height, width, (ph, pw), (th, tw), (sh, sw), weight)


# ----------------------------------------------------------------------------------------------
# Prediction of one view's stack


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=bool(amp) and device.type == "cuda")


@torch.inference_mode()
def _predict_padded(model: nn.Module, x: torch.Tensor, plan: TilePlan, weight: torch.Tensor,
                    norm: torch.Tensor, num_classes: int, amp: bool) -> torch.Tensor:
    """Blended softmax probabilities (B, C, ph, pw) of a padded batch, tile by tile."""
    b = x.shape[0]
    (th, tw), (sh, sw) = plan.tile, plan.starts
    if plan.n_tiles == 1:
        with _autocast(x.device, amp):
            logits = model(x).logits
        return torch.softmax(logits.float(), dim=1)
    acc = torch.zeros((b, num_classes, *plan.padded), dtype=torch.float32, device=x.device)
    for h0 in sh:
        for w0 in sw:
            with _autocast(x.device, amp):
                logits = model(x[..., h0:h0 + th, w0:w0 + tw]).logits
            acc[..., h0:h0 + th, w0:w0 + tw] += torch.softmax(logits.float(), dim=1) * weight
    return acc / norm


@torch.inference_mode()
def predict_stack(loaded: LoadedModel, stack: np.ndarray, out: np.ndarray, *, batch: int = 16,
                  tta: bool = False, device: torch.device | None = None, amp: bool = False,
                  progress: Any = None, tile: int | None = None) -> None:
    """Add a model's softmax probabilities for every slice of a view stack into ``out``.

    Args:
        loaded: the model (its ``slices`` and ``block`` are used).
        stack: ``(n, H, W)`` float32 windowed slices of one view.
        out: ``(C, n, H, W)`` float32 accumulator; probabilities are *added* (so several models can
            share it), each slice's probabilities summing to 1.
        batch: slices per forward pass.
        tta: also average over flips of the slice plane.
        device: compute device (default: the model's).
        amp: bf16 autocast on CUDA.
        progress: a tqdm-like object updated once per batch, or None.
        tile: sliding-window tile size; 0 = never tile (whole slices, padded to a multiple of 16);
            None = whole slices up to twice the training block per side, tiles of the block beyond.
    """
    model = loaded.model
    if device is None:
        device = next(model.parameters()).device
    n, h, w = stack.shape
    c = loaded.num_classes
    if out.shape != (c, n, h, w):
        raise ValueError(f"accumulator shape {out.shape} != {(c, n, h, w)}")
    if tile is None:
        # The network is fully convolutional with adaptive pooling and validation scores whole
        # slices, so whole slices are both faster (no overlap) and what the best checkpoint was
        # chosen on; only much larger slices are tiled, to bound activation memory.
        tile = 0 if max(h, w) <= 2 * loaded.block else loaded.block
    block = tile
    if block <= 0:  # whole slices: one tile, the slice padded to a multiple of 16
        block = tile_size(max(h, w), 10**9)
    plan = plan_tiles(h, w, block)
    ph, pw = plan.padded
    weight = torch.from_numpy(plan.weight).to(device)
    norm = torch.zeros(plan.padded, dtype=torch.float32, device=device)
    th, tw = plan.tile
    for h0 in plan.starts[0]:
        for w0 in plan.starts[1]:
            norm[h0:h0 + th, w0:w0 + tw] += weight
    flips = TTA_FLIPS if tta else ((),)
    for start in range(0, n, batch):
        centres = np.arange(start, min(start + batch, n))
        idx = slab_indices(centres, n, loaded.slices)
        x = torch.from_numpy(np.ascontiguousarray(stack[idx], dtype=np.float32)).to(device)
        if (ph, pw) != (h, w):
            x = torch.nn.functional.pad(x, (0, pw - w, 0, ph - h), value=PAD_VALUE)
        probs = None
        for dims in flips:
            xf = x.flip(dims) if dims else x
            p = _predict_padded(model, xf, plan, weight, norm, c, amp)
            p = p.flip(dims) if dims else p
            probs = p if probs is None else probs + p
        probs = probs[..., :h, :w]
        if len(flips) > 1:
            probs = probs / len(flips)
        out[:, centres[0]:centres[-1] + 1] += probs.transpose(0, 1).cpu().numpy()
        if progress is not None:
            progress.update(1)


# ----------------------------------------------------------------------------------------------
# Whole volume


def _common_config(models: Sequence[LoadedModel]) -> Config:
    first = models[0]
    for m in models[1:]:
        for what, a, b in (("organs", m.organs, first.organs),
                           ("HU window", m.config.hu_window, first.config.hu_window),
                           ("in-plane size", m.config.inplane_size, first.config.inplane_size),
                           ("in-plane spacing", (m.config.inplane_spacing,),
                            (first.config.inplane_spacing,))):
            if tuple(a) != tuple(b):
                raise InputError(m.path, f"checkpoint {what} {tuple(a)} differs from {first.path}'s "
                                 f"{tuple(b)}; models fused together must share it")
    return first.config


def probabilities_to_labels(probs: np.ndarray, out_shape: Sequence[int], device: torch.device,
                            slab_bytes: int = 64 << 20) -> np.ndarray:
    """Resample ``(C, nS, h, w)`` probabilities in-plane to ``out_shape`` (nS, H, W), then argmax.

    Linear interpolation of probabilities (field of view kept, the convention of
    :mod:`data.resample`), done a slab of slices at a time so that only the uint8 result exists at
    full resolution.

    Returns:
        uint8 class map of shape ``out_shape``.
    """
    c, n_s, h, w = probs.shape
    n_s2, big_h, big_w = (int(s) for s in out_shape)
    if n_s2 != n_s:
        raise ValueError(f"slice count changed: {n_s} -> {n_s2}")
    labels = np.empty((n_s, big_h, big_w), dtype=np.uint8)
    slab = max(1, slab_bytes // max(1, c * big_h * big_w * 4))
    for z0 in range(0, n_s, slab):
        z1 = min(z0 + slab, n_s)
        p = torch.from_numpy(probs[:, z0:z1]).to(device)
        if (big_h, big_w) != (h, w):
            # Bilinear without corner alignment samples source index (t + 1/2) * h / H - 1/2, clamped
            # to the grid: exactly data.resample's field-of-view-keeping convention (tested), and
            # much faster than two gathers.
            p = torch.nn.functional.interpolate(p, size=(big_h, big_w), mode="bilinear",
                                                align_corners=False)
        labels[z0:z1] = _argmax0(p).cpu().numpy()
    return labels


def _argmax0(p: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over dim 0 (few classes): a running maximum, much faster than Tensor.argmax on
    the CPU for a reduction over the outermost axis. Ties go to the lower class, as argmax."""
    best = p[0].clone()
    idx = torch.zeros(p.shape[1:], dtype=torch.uint8, device=p.device)
    for k in range(1, p.shape[0]):
        better = p[k] > best
        idx[better] = k
        torch.maximum(best, p[k], out=best)
    return idx


def segment_volume(models: LoadedModel | Sequence[LoadedModel], volume: Volume, *, batch: int = 16,
                   tta: bool = False, postprocess: bool = True, device: str | torch.device | None = None,
                   amp: bool | None = None, progress: bool = False, tile: int | None = None) -> Volume:
    """Segment a CT volume; the result lies on the input's exact grid.

    Args:
        models: one model or several (e.g. axial, coronal, sagittal); their softmax probabilities
            are averaged on the canonical grid (multi-view fusion). They must share organs, HU window
            and in-plane size.
        volume: CT in HU, any orientation (oblique grids are handled by their closest axes).
        batch: slices per forward pass.
        tta: average over the four flips of the slice plane too (4x slower).
        postprocess: keep the largest connected component(s) of each organ
            (``config.components``; 1 by default).
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
        amp: bf16 autocast; default on for CUDA (ignored on the CPU).
        progress: show a progress bar on stderr.
        tile: in-plane sliding-window tile size (see :func:`predict_stack`); 0 = whole
            slices (padded to a multiple of 16), ~3x faster for 256 slices and 224 blocks.

    Returns:
        uint8 label map (0 background, ``i + 1`` = ``organs[i]``) with the input's geometry.

    Raises:
        InputError: models that cannot be fused, CUDA asked for but missing.
    """
    models = [models] if isinstance(models, LoadedModel) else list(models)
    if not models:
        raise ValueError("segment_volume needs at least one model")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    config = _common_config(models)
    dev = resolve_device(device)
    amp = (dev.type == "cuda") if amp is None else bool(amp)
    for m in models:
        m.model.eval().to(dev)

    # The checkpoint's in-plane mode (old checkpoints: pad mode); never crop at inference.
    canon, orientation, plan = preprocess_image(volume, config.hu_window, config.inplane_size,
                                                config.inplane_spacing, allow_crop=False)
    image, spacing = canon.array, canon.geometry.spacing
    del canon
    c = models[0].num_classes
    probs = np.zeros((c, *image.shape), dtype=np.float32)
    views = [v for v in VIEWS if any(m.view == v for m in models)]
    bar = None
    if progress:
        from tqdm import tqdm

        n_slices = dict(zip(VIEWS, image.shape))  # slices per view: along S, P, L
        total = sum(math.ceil(n_slices[m.view] / batch) for m in models)
        bar = tqdm(total=total, desc="segment", unit="batch", leave=False)
    try:
        for view in views:
            stack = view_stack(image, spacing, view, is_label=False)
            members = [m for m in models if m.view == view]
            if view == "axial":
                for m in members:  # axial stack layout == canonical: accumulate in place
                    predict_stack(m, stack, probs, batch=batch, tta=tta, device=dev, amp=amp, progress=bar,
                                  tile=tile)
                continue
            acc = np.zeros((c, *stack.shape), dtype=np.float32)
            for m in members:
                predict_stack(m, stack, acc, batch=batch, tta=tta, device=dev, amp=amp, progress=bar,
                              tile=tile)
            del stack
            for k in range(c):  # one class at a time: the S-I resampling makes temporaries
                probs[k] += view_to_canonical(acc[k], image.shape, view)
            del acc
    finally:
        if bar is not None:
            bar.close()
    del image
    probs /= np.float32(len(models))

    # The canonical shape of the original grid: transposing a zero-stride view costs nothing.
    # Undo the in-plane plan: drop the grid padding, resample to the padded source grid, drop the
    # air padding (after the argmax: cropping commutes with it).
    canonical_shape = orientation.apply(np.broadcast_to(np.uint8(0), volume.array.shape)).shape
    probs = plan.crop_post(probs)
    labels = probabilities_to_labels(probs, (canonical_shape[0], *plan.padded), dev)
    del probs
    labels = np.ascontiguousarray(plan.crop_pre(labels))
    if postprocess:
        keep_largest_components(labels, config, inplace=True)
    out = np.ascontiguousarray(orientation.invert(labels))
    return Volume(out, volume.geometry)


# ----------------------------------------------------------------------------------------------
# Files in, files out (segment.py)


def plan_outputs(input_path: str | Path, output_path: str | Path) -> list[tuple[Path, Path]]:
    """Pair every input volume with its output file.

    * a volume file -> ``output`` (a volume file name), or ``output/<input name>`` when ``output``
      is an existing folder;
    * a folder of volume files -> ``output/<same names>`` (``output`` is a folder);
    * a DICOM series folder -> ``output`` (``.nii.gz`` file), or ``output/<folder>.nii.gz``.

    Raises:
        InputError: missing input, empty folder, output that would overwrite an input, or an output
            name without a volume suffix.
    """
    from data.volume import VOLUME_SUFFIXES, output_name
    from inference.evaluation import list_volume_files

    src, dst = Path(input_path), Path(output_path)
    if not src.exists():
        raise InputError(src, "input does not exist")

    def as_file(name: str) -> Path:
        if dst.is_dir():
            return dst / name
        if not dst.name.lower().endswith(VOLUME_SUFFIXES):
            raise InputError(dst, "output must be a volume file (.nii.gz, .nii, .mha, .nrrd) or an "
                             "existing folder")
        return dst

    if src.is_file():
        out = as_file(output_name(src.name))
        if out.resolve() == src.resolve():
            raise InputError(out, "output would overwrite the input")
        return [(src, out)]
    files = list_volume_files(src)
    if not files:  # a DICOM series folder (read_geometry says so when it is not)
        return [(src, as_file(src.name + ".nii.gz"))]
    if dst.exists() and not dst.is_dir():
        raise InputError(dst, "input is a folder of volumes, so the output must be a folder")
    if dst.resolve() == src.resolve():
        raise InputError(dst, "output folder must differ from the input folder")
    return [(f, dst / output_name(f.name)) for f in files]
