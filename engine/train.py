"""Supervised step, validation and the training loop behind ``Final.py``.

Design notes
------------
* Everything is indexed by the global optimizer step. Sample ``n`` of the run is drawn from
  ``default_rng([seed, n])`` by the dataset, and torch's RNG is reseeded from ``(seed, step, rank)``
  at every step (dropout, strong augmentation), so a run resumed from any step replays exactly what
  an uninterrupted run does, whatever the number of loader workers.
* One batch mixes datasets (sample ``n`` comes from dataset ``n % n_datasets``; the target adaptive
  loss takes each sample's labeled classes), or ``--mix alternate`` gives each step one dataset, as
  the original alternated datasets by epoch.
* An epoch is ``--steps-per-epoch`` optimizer steps; validation and checkpoints happen every
  ``--val-every`` epochs and at the end.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data.config import Config
from data.sampling import PAD_IMAGE, slab_indices
from engine.runtime import DistInfo, autocast, unwrap
from utils.fileio import write_text_atomic

# ----------------------------------------------------------------------------------------------
# One step


def supervised_step(model: nn.Module, batch, loss_fn: nn.Module,
                    amp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Forward + target adaptive loss on a labeled batch (no backward, no optimizer step).

    Returns:
        ``{"loss": total (for backward), "loss_x": same value detached, ...}``.
    """
    with autocast(batch.image.device, amp_dtype):
        out = model(batch.image)
    losses = loss_fn(out, batch.label, batch.labeled_mask)
    return {"loss": losses["loss"], "loss_x": losses["loss"].detach()}


# ----------------------------------------------------------------------------------------------
# Validation on cached volumes (full slices, no tiling: the network is fully convolutional)


def _pad16(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=PAD_IMAGE)
    return x, (h, w)


@torch.no_grad()
def predict_view_stack(model: nn.Module, stack: np.ndarray, slices: int, device: torch.device,
                       amp_dtype: torch.dtype | None = None, batch: int = 16,
                       labeled_mask: np.ndarray | None = None) -> np.ndarray:
    """Argmax labels for every slice of a ``(n, H, W)`` view stack (2.5D, edge-clamped).

    With ``labeled_mask`` the argmax is taken in that dataset's merged label space (organs it does
    not label are merged into background), which is how partial datasets are scored.
    """
    from losses.partial import merge_log_probs

    n = stack.shape[0]
    out = np.zeros(stack.shape, dtype=np.uint8)
    mask_t = None if labeled_mask is None else torch.as_tensor(labeled_mask, device=device)[None]
    for start in range(0, n, batch):
        centres = np.arange(start, min(start + batch, n))
        idx = slab_indices(centres, n, slices)
        x = torch.from_numpy(np.ascontiguousarray(stack[idx], dtype=np.float32)).to(device)
        x, (h, w) = _pad16(x)
        with autocast(device, amp_dtype):
            logits = model(x).logits
        logits = logits[..., :h, :w].float()
        if mask_t is not None:
            logits = merge_log_probs(logits, mask_t.expand(logits.shape[0], -1))
        out[centres] = logits.argmax(1).to(torch.uint8).cpu().numpy()
    return out


def dice_per_class(pred: np.ndarray, label: np.ndarray, classes: list[int]) -> dict[int, float]:
    """Volume Dice per class; NaN where the class is absent from both (nothing to score)."""
    valid = label != 255
    result = {}
    for c in classes:
        p = (pred == c) & valid
        g = label == c
        denom = int(p.sum()) + int(g.sum())
        result[c] = float("nan") if denom == 0 else 2.0 * int((p & g).sum()) / denom
    return result


@torch.no_grad()
def validate(model: nn.Module, volumes: list, config: Config, view: str, slices: int,
             device: torch.device, amp_dtype: torch.dtype | None = None, batch: int = 16,
             dist: DistInfo | None = None) -> dict[str, float]:
    """Dice per dataset and organ on validation volumes, in each dataset's merged label space.

    Volumes are split across ranks and the per-volume scores gathered, so every rank returns the
    same numbers. Returns ``{"<dataset>/<organ>": mean Dice, ..., "score": mean of those}``.
    """
    dist = dist or DistInfo()
    was_training = model.training
    model.eval()
    rows: list[tuple[str, str, float]] = []
    for i, vol in enumerate(volumes):
        if i % dist.world != dist.rank:
            continue
        ds = config.dataset(vol.dataset)
        mask = config.labeled_mask(ds)
        pred = predict_view_stack(model, vol.image(view), slices, device, amp_dtype, batch,
                                  labeled_mask=None if mask.all() else mask)
        classes = [c for c in config.labeled_classes(ds) if c > 0]
        for c, d in dice_per_class(pred, np.asarray(vol.label(view)), classes).items():
            rows.append((ds.name, config.organs[c - 1], d))
    if dist.enabled:
        import torch.distributed as tdist

        gathered: list[Any] = [None] * dist.world
        tdist.all_gather_object(gathered, rows)
        rows = [r for part in gathered for r in part]
    model.train(was_training)
    table: dict[str, list[float]] = {}
    for dname, organ, d in rows:
        if not math.isnan(d):
            table.setdefault(f"{dname}/{organ}", []).append(d)
    result = {k: float(np.mean(v)) for k, v in sorted(table.items())}
    result["score"] = float(np.mean(list(result.values()))) if result else float("nan")
    return result


# ----------------------------------------------------------------------------------------------
# Schedules


def lr_factor(schedule: str, step: int, total_steps: int, steps_per_epoch: int,
              decay: float = 0.99, decay_every: int = 40, warmup_steps: int = 0) -> float:
    """Multiplier of the base LR at ``step``.

    ``step``: the original's ``lr * decay ** (epoch // decay_every)``; ``poly``: ``(1 - t)^0.9``;
    ``cosine``: half cosine to 0. All with an optional linear warm-up.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    t = min(1.0, step / max(1, total_steps))
    if schedule == "step":
        base = decay ** ((step // max(1, steps_per_epoch)) // max(1, decay_every))
    elif schedule == "poly":
        base = (1.0 - t) ** 0.9
    elif schedule == "cosine":
        base = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        raise ValueError(f"unknown LR schedule {schedule!r}")
    return warm * base


# ----------------------------------------------------------------------------------------------
# Bookkeeping


@dataclass
class History:
    """Per-epoch metrics, written as CSV (and TensorBoard events when available) by rank 0."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None

    def open_tensorboard(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return
        self.writer = SummaryWriter(str(folder))

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in self.rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in keys})
        write_text_atomic(self.path, buf.getvalue())
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.writer.add_scalar(k, v, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def load_history(path: Path) -> list[dict[str, Any]]:
    """Rows of an existing history CSV (so a resumed run keeps its curve)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = []
        for r in csv.DictReader(fh):
            rows.append({k: _parse(v) for k, v in r.items()})
        return rows


def _parse(v: str) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v else f


def rng_seed(seed: int, step: int, rank: int) -> int:
    """A per-step seed: deterministic, distinct per rank, far from neighbouring steps' streams."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
               % (2**63 - 1))


def plain_args(args: Any) -> dict[str, Any]:
    """argparse values as plain data (checkpoints are loaded with weights_only=True)."""
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, (str, int, float, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [str(x) if isinstance(x, Path) else x for x in v]
    return out


def checkpoint_payload(model: nn.Module, model_args: dict, config: Config, args: Any, *,
                       epoch: int, step: int, best_score: float, optimizer=None, scaler=None,
                       ema=None, semi_state: dict | None = None) -> dict[str, Any]:
    """Everything a checkpoint holds (see engine/checkpoint.py)."""
    from data.config import config_to_dict

    payload: dict[str, Any] = {
        "model": unwrap(model).state_dict(),
        "model_args": dict(model_args),
        "organs": list(config.organs),
        "view": args.view,
        "slices": int(args.slices),
        "block": int(args.blocksize),
        "width": int(model_args["width"]),
        "config": config_to_dict(config),
        "epoch": int(epoch),
        "step": int(step),
        "best_score": float(best_score),
        "args": plain_args(args),
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if ema is not None:
        payload["ema"] = ema.state_dict()
    if semi_state is not None:
        payload["semi_state"] = semi_state
    return payload


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
