"""One validation layer for command-line flags: types, ranges and choices, checked before any data is
touched.

argparse checks types and ``choices``; everything else (ranges, pairs, finite floats, flags that
depend on each other, paths) is here, as one table per script. Every problem is an
:class:`~utils.errors.InputError` naming the flag: ``error: --lr: must be > 0, got -1.0``.

Scripts call ``validate_<script>_args(args)`` right after parsing; Final.py also calls
:func:`preflight_final` (config, data root, writable output/cache folders, stale temporary files)
before any volume is read.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.errors import InputError

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
AMP_CHOICES = ("none", "bf16", "fp16", "auto")
BLOCK_LEVELS = 4  # models.mosnet.NUM_LEVELS - 1 (literal: importing models loads torch)


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric flag (each element when the flag takes several).

    Attributes:
        low / high: bounds; ``low_open`` / ``high_open`` make them strict.
        multiple: the value must be a multiple of this (e.g. 16 for crop sizes).
        allow_none: the flag may be left unset (None).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    multiple: int | None = None
    allow_none: bool = True

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        if self.multiple:
            parts.append(f"a multiple of {self.multiple}")
        return " and ".join(parts) or "finite"

    def ok(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return not (self.multiple and value % self.multiple)


def flag_name(dest: str) -> str:
    """``lr_decay`` -> ``--lr-decay`` (the spelling shown in messages)."""
    return "--" + dest.replace("_", "-")


def check_ranges(args: Any, table: dict[str, Range], names: dict[str, str] | None = None) -> None:
    """Check every flag of ``table`` on ``args`` (scalars or sequences of numbers).

    Raises:
        InputError: naming the first flag whose value is out of range or not finite.
    """
    names = names or {}
    for dest, rng in table.items():
        value = getattr(args, dest, None)
        flag = names.get(dest, flag_name(dest))
        if value is None:
            if not rng.allow_none:
                raise InputError(flag, "needs a value")
            continue
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if not rng.ok(v):
                shown = " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in values)
                raise InputError(flag, f"must be {rng.describe()}, got {shown}")


def check_finite_floats(args: Any) -> None:
    """argparse's ``type=float`` accepts ``nan`` and ``inf``; no UniMOS flag means either."""
    for dest, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise InputError(flag_name(dest), f"must be a finite number, got {v}")


def check_device(flag: str, value: str) -> None:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` (availability is checked when it is used)."""
    if not DEVICE_RE.match(value):
        raise InputError(flag, f"must be auto, cpu, cuda or cuda:N, got {value!r}")


def parse_blocks(text: str) -> tuple[int, ...]:
    """``--blocks``: one count for every level (``2``) or one per level (``1,1,2,2``).

    Raises:
        InputError: anything else.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        blocks = tuple(int(p) for p in parts)
    except ValueError:
        blocks = ()
    if len(blocks) == 1:
        blocks = blocks * BLOCK_LEVELS
    if len(blocks) != BLOCK_LEVELS or any(b < 1 for b in blocks):
        raise InputError("--blocks", f"must be one integer >= 1 or {BLOCK_LEVELS} comma-separated "
                         f"integers >= 1 (levels 1..{BLOCK_LEVELS}), got {text!r}")
    return blocks


def check_pair_order(flag: str, pair: Sequence[float] | None) -> None:
    if pair is not None and not pair[0] < pair[1]:
        raise InputError(flag, f"must be LOW HIGH with LOW < HIGH, got {pair[0]:g} {pair[1]:g}")


# ----------------------------------------------------------------------------------------------
# Final.py

FINAL_RANGES: dict[str, Range] = {
    "inplane": Range(low=16, high=16384),
    "spacing": Range(low=0, low_open=True, high=100, high_open=True),
    "slices": Range(low=1, high=64),
    "blocksize": Range(low=16, high=16384, multiple=16),
    "fg_prob": Range(low=0, high=1),
    "intensity_jitter": Range(low=0, high=1),
    "workers": Range(low=0, high=256),
    "width": Range(low=1, high=4096),
    "epochs": Range(low=1),
    "steps_per_epoch": Range(low=1),
    "batchsize": Range(low=1),
    "lr": Range(low=0, low_open=True),
    "momentum": Range(low=0, high=1, high_open=True),
    "weight_decay": Range(low=0),
    "lr_decay": Range(low=0, low_open=True, high=1),
    "lr_decay_every": Range(low=1),
    "warmup_steps": Range(low=0),
    "clip_grad": Range(low=0),
    "class_weights": Range(low=0),
    "dice_weight": Range(low=0),
    "unlabeled_batchsize": Range(low=0),
    "ema_momentum": Range(low=0, high=1, high_open=True),
    "organ_threshold": Range(low=0, high=1),
    "unsup_class_weights": Range(low=0),
    "semi_weights": Range(low=0),
    "semi_divisor": Range(low=0, low_open=True),
    "semi_warmup": Range(low=0),
    "semi_rampup": Range(low=0),
    "seed": Range(low=0, high=2**32 - 1),
    "time_budget": Range(low=0),
    "val_every": Range(low=1),
    "val_batch": Range(low=1),
}
FINAL_NAMES = {"batchsize": "-b/--batchsize", "slices": "-s/--slices"}


def validate_final_args(args: Any) -> None:
    """Check Final.py's flags (types came from argparse): ranges, pairs, choices, forms.

    Normalises ``args.blocks`` to one count per level (``"2"`` -> ``"2,2,2,2"``) and ``args.amp``.

    Raises:
        InputError: naming the flag.
    """
    check_finite_floats(args)
    check_ranges(args, FINAL_RANGES, FINAL_NAMES)
    if args.slices % 2 == 0:
        raise InputError("-s/--slices", f"must be odd (the centre slice is the target), got {args.slices}")
    check_pair_order("--hu-window", args.hu_window)
    if args.class_weights is not None and args.class_weights[1] <= 0:
        raise InputError("--class-weights", "organ weight must be > 0 (organs would never be learnt)")
    if args.unsup_class_weights[1] <= 0:
        raise InputError("--unsup-class-weights", "organ weight must be > 0")
    if sum(args.semi_weights) <= 0:
        raise InputError("--semi-weights", "at least one weight must be > 0")
    total = args.epochs * args.steps_per_epoch
    if args.warmup_steps >= total:
        raise InputError("--warmup-steps", f"{args.warmup_steps} is not below the {total} steps of training "
                         "(--epochs x --steps-per-epoch): the learning rate would never reach --lr")
    from engine.options import phase_steps

    semi_from = phase_steps(args.semi_warmup, args.epochs, args.steps_per_epoch)
    if args.semi is True and semi_from >= total:
        raise InputError("--semi-warmup", f"{args.semi_warmup:g} starts the semi-supervised phase at step "
                         f"{semi_from}, after the last of {total} steps: --semi would train nothing "
                         "semi-supervised (shorten the warm-up or drop --semi)")
    if args.blocks is not None:
        args.blocks = ",".join(str(b) for b in parse_blocks(args.blocks))
    if args.threshold.strip().lower() != "schedule":
        try:
            t = float(args.threshold)
        except ValueError:
            t = float("nan")
        if not 0.0 <= t <= 1.0:
            raise InputError("--threshold",
                             f"must be 'schedule' or a number in [0, 1], got {args.threshold!r}")
    check_device("--device", args.device)
    if args.amp not in AMP_CHOICES:  # argparse checks choices; a programmatic Namespace may not
        raise InputError("--amp", f"must be one of {', '.join(AMP_CHOICES)}, got {args.amp!r}")
    if args.datasets is not None:
        names = [n.strip() for n in args.datasets.split(",")]
        if not all(names):
            raise InputError("--datasets", f"must be comma-separated dataset names, got {args.datasets!r}")
        if len(set(names)) != len(names):
            raise InputError("--datasets", f"names a dataset twice: {args.datasets!r}")
    if args.resume not in (None, "auto"):
        resume = Path(args.resume)
        if resume.is_dir():  # a run folder: its last checkpoint of this view
            resume = resume / f"resu_last_{args.view}.pth.tar"
        if not resume.is_file():
            raise InputError(resume, "--resume checkpoint does not exist")


def preflight_final(args: Any) -> None:
    """Everything Final.py can check before reading a volume: the config (and the flags that refer
    to it), the data root, and writable output and cache folders (really written; stale
    temporary files of killed runs are removed there).

    Raises:
        InputError: naming the file, folder or flag.
    """
    from data.config import load_config
    from utils.fileio import check_writable, clean_stale_parts

    config = load_config(args.config)
    grid = tuple(args.inplane) if args.inplane else tuple(config.inplane_size)
    if min(grid) < 16:  # as --inplane: a [1, 300] grid from the config trained and validated nothing
        raise InputError(config.source if not args.inplane else "--inplane",
                         f"in-plane grid {grid[0]} x {grid[1]} is below 16 pixels on a side")
    if args.blocksize > max(grid):
        raise InputError("--blocksize", f"{args.blocksize} is larger than the in-plane grid {grid[0]} x "
                         f"{grid[1]}: every training crop would be mostly padding")
    if args.datasets is not None:
        known = [d.name for d in config.datasets]
        unknown = [n.strip() for n in args.datasets.split(",") if n.strip() not in known]
        if unknown:
            raise InputError("--datasets",
                             f"unknown datasets {unknown} (configured in {config.source}: {known})")
    data = Path(args.data)
    if not data.exists():
        raise InputError(data, "--data folder does not exist")
    if not data.is_dir():
        raise InputError(data, "--data is not a folder (it should hold one folder per dataset)")
    # Under torchrun every rank runs this at the same time: a folder that one rank created for the
    # write test and removed again vanished under another rank's feet (FileNotFoundError), so with
    # several processes the folders are kept.
    keep = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")
    out = check_writable(args.out, "--out folder", keep=keep)
    clean_stale_parts(out, recursive=False)
    _check_resume(args, config, out)
    cache = Path(args.cache) if args.cache else data / ".unimos_cache"
    check_writable(cache, "cache folder", keep=keep)
    clean_stale_parts(cache)


def _check_resume(args: Any, config: Any, out: Path) -> None:
    """A foreign, truncated or mismatching --resume checkpoint is found before the cache is built.

    The training loop loads it again (and checks the model arguments and state); this first load
    costs about a second for a full-size checkpoint.
    """
    if not args.resume:
        return
    from engine.checkpoint import load_checkpoint

    name = f"resu_last_{args.view}.pth.tar"
    if args.resume == "auto":
        if getattr(args, "overwrite", False):
            return  # the checkpoints there are to be replaced (or, requeued, checked when loaded)
        path = out / name
        if not path.is_file():
            return  # nothing to resume yet: a fresh start
    else:
        path = Path(args.resume)
        path = path / name if path.is_dir() else path
    load_checkpoint(path, expect={"organs": list(config.organs), "view": args.view, "slices": args.slices,
                                  "width": args.width})


# ----------------------------------------------------------------------------------------------
# The other scripts

RESAMPLE_RANGES = {"s1": Range(low=1, high=16384), "s2": Range(low=1, high=16384),
                   "size": Range(low=1, high=16384),
                   "workers": Range(low=1, high=256),
                   "spacing": Range(low=0, low_open=True, high=100, high_open=True)}


def validate_resample_args(args: Any) -> None:
    """resample.py: sizes, workers, non-empty label folder/pattern lists.

    Raises:
        InputError: naming the flag.
    """
    check_ranges(args, RESAMPLE_RANGES, {"s1": "-s1/--size1", "s2": "-s2/--size2"})


SEGMENT_RANGES = {"slices": Range(low=1, high=64), "width": Range(low=1, high=4096),
                  "batch": Range(low=1), "tile": Range(low=0)}


def validate_segment_args(args: Any) -> None:
    """segment.py: ranges and the device (files are checked by segment.py before any work).

    Raises:
        InputError: naming the flag.
    """
    check_ranges(args, SEGMENT_RANGES)
    if args.tile and (args.tile % 16 or args.tile < 32):
        # 16 leaves the network's bottleneck (1/16 scale) 1 x 1 pixel, where instance norm is undefined
        raise InputError("--tile", f"must be 0 (whole slices) or a multiple of 16 from 32 up, got "
                         f"{args.tile}")
    check_device("--device", args.device)
    if args.evaluating and not args.label_filename:
        raise InputError("--evaluating", "needs --label-filename")
    from utils.fileio import check_writable, clean_stale_parts

    if args.png:
        check_writable(args.png, "--png folder")
        clean_stale_parts(args.png, recursive=False)
    out = Path(args.output)
    clean_stale_parts(out if out.is_dir() else out.parent, recursive=False)  # a killed run's parts


def validate_evaluate_args(args: Any) -> None:
    """evaluate.py: the report's folder and --png's are written before scoring.

    Raises:
        InputError: naming the flag or folder.
    """
    from utils.fileio import check_writable, clean_stale_parts

    if args.png and not args.image:
        raise InputError("--png", "needs --image (the CT the overlays are drawn on)")
    if not args.out.lower().endswith(".csv"):
        raise InputError(args.out, "report must be a .csv file")
    if Path(args.out).is_dir():
        raise InputError(args.out, "report path is a folder")
    check_writable(Path(args.out).parent, "report folder")
    clean_stale_parts(Path(args.out).parent, recursive=False)  # a killed run's temporary files
    if args.png:
        check_writable(args.png, "--png folder")
        clean_stale_parts(args.png, recursive=False)


SYNTH_RANGES = {"cases": Range(low=1, high=10000), "unlabeled": Range(low=0, high=10000),
                "val": Range(low=0, high=10000), "seed": Range(low=0, high=2**32 - 1),
                "scale": Range(low=0, low_open=True, high=8), "workers": Range(low=1, high=256)}


def validate_synth_args(args: Any) -> None:
    """synth.py: counts, seed, scale, dataset names; the output folder is really written.

    Raises:
        InputError: naming the flag or folder.
    """
    from utils.fileio import check_writable, clean_stale_parts

    check_finite_floats(args)
    check_ranges(args, SYNTH_RANGES)
    names = [n.strip() for n in args.datasets.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise InputError("--datasets", f"must be distinct comma-separated names, got {args.datasets!r}")
    check_writable(args.out, "--out folder")
    clean_stale_parts(args.out)  # temporary files of a killed earlier run


DEMO_RANGES = {"cases": Range(low=1), "unlabeled": Range(low=0), "val": Range(low=0),
               "seed": Range(low=0, high=2**32 - 1), "size": Range(low=16, high=16384, multiple=16),
               "block": Range(low=16, high=16384, multiple=16), "width": Range(low=1, high=4096),
               "batch": Range(low=1), "epochs": Range(low=1), "steps_per_epoch": Range(low=1),
               "val_every": Range(low=1), "unlabeled_batch": Range(low=0), "semi_warmup": Range(low=0),
               "workers": Range(low=0, high=256)}


def validate_demo_args(args: Any) -> None:
    """demo.py: the same kinds of checks as the scripts it runs, before the first one starts.

    Raises:
        InputError: naming the flag.
    """
    check_finite_floats(args)
    check_ranges(args, DEMO_RANGES)
    if args.block > args.size:
        raise InputError("--block", f"must be <= --size ({args.size}), got {args.block}")
    check_device("--device", args.device)
    if args.blocks is not None:
        parse_blocks(args.blocks)
    if args.unlabeled == 0 and args.semi:
        raise InputError("--semi", "needs unlabeled phantoms (--unlabeled > 0), or use --no-semi")


__all__ = [
    "AMP_CHOICES", "DEMO_RANGES", "FINAL_RANGES", "RESAMPLE_RANGES", "SEGMENT_RANGES", "SYNTH_RANGES",
    "Range", "check_device", "check_finite_floats", "check_ranges", "parse_blocks", "preflight_final",
    "validate_demo_args", "validate_evaluate_args", "validate_final_args", "validate_resample_args",
    "validate_segment_args", "validate_synth_args",
]
