"""Per-epoch history: the step-loss meter, the ``history_{view}.csv`` rows, TensorBoard and the log line.

Rank 0 writes the CSV (rewritten atomically at each row, columns in first-seen order) and, with
``--tensorboard``, the same scalars as TensorBoard events under ``OUT/tensorboard``.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from utils.errors import InputError
from utils.fileio import write_text_atomic

# Step values shown in the epoch log line (when the row has them).
_LINE_KEYS = ("loss_x", "loss_fp", "loss_s1", "loss_s2", "mask_ratio", "conf_mean")


@dataclass
class EpochMeter:
    """Sums and counts of the logged step values since the last history row (saved in checkpoints).

    Each value is averaged over the steps that reported it: the unsupervised losses and the mask ratio
    exist only from the semi-supervised phase on, so in the epoch where the warm-up ends they are the
    mean of its semi-supervised steps, not diluted by the supervised ones.
    """

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach())
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.counts.get(k, 0)) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = {str(k): float(v) for k, v in state.get("sums", {}).items()}
        if "counts" in state:
            self.counts = {str(k): int(v) for k, v in state["counts"].items()}
        else:  # checkpoints before per-value counts: one step count for every value
            self.counts = dict.fromkeys(self.sums, int(state.get("count", 0)))


def tensorboard_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``.

    Raises:
        InputError: the ``tensorboard`` package is not installed (one line, no traceback).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise InputError(None, f"--tensorboard needs the tensorboard package ({err}); "
                               "pip install tensorboard, or leave --tensorboard off") from None
    return SummaryWriter


@dataclass
class History:
    """Per-epoch metrics, written as CSV (and TensorBoard events when opened) by rank 0."""

    path: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    writer: Any = None

    def open_tensorboard(self, folder: Path) -> None:
        """Also write every row's numbers as TensorBoard scalars under ``folder``.

        Raises:
            InputError: tensorboard is not installed.
        """
        self.writer = tensorboard_writer_class()(str(folder))

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
            self.writer = None  # closing twice (the run's normal end, then its finally) is harmless


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def load_history(path: Path) -> list[dict[str, Any]]:
    """Rows of an existing history CSV (so a resumed run keeps its curve)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def _parse(v: str) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v else f


def epoch_line(row: dict[str, Any], epoch: int, epochs: int) -> str:
    """The one log line of a history row."""
    parts = [f"epoch {epoch}/{epochs}", f"step {row['step']}", f"lr {row['lr']:.2e}",
             f"loss {row.get('loss', float('nan')):.4f}"]
    parts += [f"{k} {row[k]:.3f}" for k in _LINE_KEYS if k in row]
    if "val/score" in row:
        organs = [f"{k[4:]} {v:.3f}" for k, v in row.items() if k.startswith("val/") and k != "val/score"]
        parts.append(f"val {row['val/score']:.4f} [" + ", ".join(organs) + "]")
    parts.append(f"{row['slices_per_s']:.1f} slices/s")
    parts.append(f"{row['time_s']:.0f}s")
    return " | ".join(parts)
