"""The ablation's options (:class:`Options`, the ``--quick`` preset), variants and their checks.

:mod:`bench.ablation` re-exports every name here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from utils.errors import InputError

VIEW = "axial"

# Final.py arguments of each variant. "tal+semi" is Final.py's default semi-supervised module: no flag
# that only the ablation passes (warm-up, ramp-up, teacher and pseudo-labels are the defaults).
VARIANTS: dict[str, list[str]] = {
    "naive": ["--loss", "naive", "--no-semi"],
    "tal": ["--loss", "tal", "--no-semi"],
    "tal+semi": ["--loss", "tal", "--semi"],
}
SEMI_VARIANTS: dict[str, list[str]] = {
    "tal+semi/head": ["--loss", "tal", "--semi", "--fp", "head"],
    "tal+semi/full": ["--loss", "tal", "--semi", "--pseudo", "full"],
    "tal+semi/self": ["--loss", "tal", "--semi", "--teacher", "self"],
    "tal+semi/full+self": ["--loss", "tal", "--semi", "--pseudo", "full", "--teacher", "self"],
}

@dataclass
class Options:
    """Everything that decides the ablation's result (stored in ``ablation.json``).

    Attributes:
        out: output folder.
        labeled: labeled volumes per partial dataset, one setting each.
        unlabeled / val: unlabeled and validation volumes per partial dataset.
        held_out: BTCV volumes scored.
        scale: phantom in-plane size factor (0.5: 256x256 originals).
        steps / epochs: labeled steps of every run, split into this many epochs (validation each).
        inplane / width / blocksize / batch / unlabeled_batch / workers: the Final.py preset.
        variants: what to train for every labeled count (any variant name, semi ones included).
        extra: ``"n:variant"`` runs added (every seed); semi_variants adds the other semi variants at
            the smallest labeled count.
        single_seed: variants run with the first training seed only.
        seed, device, threads: seed of the phantoms (and of training); device; threads per process.
        train_seeds: training seeds, each run repeated once per seed (default: ``seed`` only); the
            table then gives the mean and standard deviation over seeds.
        final_args: extra Final.py arguments for every run.
        reuse: skip a run whose folder holds a finished run of the identical command.
        checkpoint: ``best`` (chosen on the partial datasets' validation volumes, what segment.py
            uses) or ``last`` (the end of the fixed step budget) is scored.
        quick: the ``--quick`` preset was applied (recorded only).
    """

    out: str
    labeled: list[int] = field(default_factory=lambda: [1, 2, 4])
    unlabeled: int = 10
    val: int = 2
    held_out: int = 4
    scale: float = 0.5
    steps: int = 360
    epochs: int = 12
    inplane: int = 96
    width: int = 16
    blocksize: int = 96
    batch: int = 8
    unlabeled_batch: int = 4
    workers: int = 1
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    extra: list[str] = field(default_factory=lambda: ["2:tal+semi/head"])
    single_seed: list[str] = field(default_factory=lambda: ["naive"])
    semi_variants: bool = False
    seed: int = 0
    train_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "auto"
    threads: int = 2
    final_args: str = ""
    reuse: bool = False
    checkpoint: str = "best"
    quick: bool = False

    @property
    def seeds(self) -> list[int]:
        return list(self.train_seeds) or [self.seed]

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.steps / self.epochs))


QUICK = {"labeled": [1, 2], "unlabeled": 1, "val": 1, "held_out": 1, "scale": 0.125,
         "steps": 6, "epochs": 3, "inplane": 32, "width": 4, "blocksize": 32, "batch": 2,
         "unlabeled_batch": 2, "workers": 0, "train_seeds": [0], "extra": []}


def setting_name(n: int) -> str:
    """Name of the setting with ``n`` labeled volumes per dataset (run folders, tables)."""
    return f"{n}lab"


def _extra_pairs(o: Options) -> list[tuple[int, str]]:
    pairs = []
    for item in o.extra:
        n, _, variant = item.partition(":")
        try:
            pairs.append((int(n), variant))
        except ValueError:
            raise InputError(None, f"--extra takes n:variant items, got {item!r}") from None
    return pairs


def check_options(o: Options) -> None:
    """Raise InputError on settings that cannot work (before anything is written)."""
    if not o.labeled or min(o.labeled) < 1 or len(set(o.labeled)) != len(o.labeled):
        raise InputError(None, f"--labeled needs distinct counts >= 1, got {o.labeled}")
    for flag, v in (("--unlabeled", o.unlabeled), ("--val", o.val), ("--held-out", o.held_out),
                    ("--steps", o.steps), ("--epochs", o.epochs), ("--batch", o.batch),
                    ("--unlabeled-batch", o.unlabeled_batch)):
        if v < (0 if flag in ("--unlabeled", "--val") else 1):
            raise InputError(None, f"{flag} must be positive, got {v}")
    if o.inplane % 16 or o.blocksize % 16 or o.blocksize > o.inplane:
        raise InputError(None, f"--inplane {o.inplane} and --blocksize {o.blocksize} must be multiples "
                         "of 16 with blocksize <= inplane")
    known = {**VARIANTS, **SEMI_VARIANTS}
    extra = _extra_pairs(o)
    bad = [v for v in o.variants if v not in known] + [v for _, v in extra if v not in known]
    bad += [f"{n}:{v}" for n, v in extra if n not in o.labeled]
    if bad or not o.variants:
        raise InputError(None, f"unknown or empty variants {bad} (variants {tuple(known)}; --extra counts "
                         f"must be among --labeled {o.labeled})")
    if len(set(o.seeds)) != len(o.seeds):
        raise InputError(None, f"--train-seeds has duplicates: {o.seeds}")
    if o.checkpoint not in ("best", "last"):
        raise InputError(None, f"--checkpoint must be best or last, got {o.checkpoint!r}")
    semi = any("--semi" in known[v] for v in [*o.variants, *(v for _, v in extra)]) or o.semi_variants
    if semi and o.unlabeled < 1:
        raise InputError(None, "semi-supervised variants need --unlabeled >= 1")
