"""The ablation's data: phantoms, their in-plane resampling, training roots, held-out cases.

:mod:`bench.ablation` re-exports every name here.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.errors import InputError

if TYPE_CHECKING:
    from bench.ablation_options import Options

PARTIAL = ("LiTS", "KiTS", "MSDSpleen")
HELD_OUT = "BTCV"
SYNTH_STAMP = ".ablation_synth.json"
RESAMPLE_STAMP = ".ablation_resampled.json"



def _synth_settings(o: Options) -> dict[str, Any]:
    return {"seed": o.seed, "scale": o.scale, "cases": max(o.labeled), "unlabeled": o.unlabeled,
            "val": o.val, "held_out": o.held_out}


def _read_stamp(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepare_phantoms(o: Options, log=print) -> Path:
    """Synthesize the phantoms into ``out/phantoms`` unless the same ones are already there."""
    from data.phantom import synthesize

    raw = Path(o.out) / "phantoms"
    want = _synth_settings(o)
    stamp = raw / SYNTH_STAMP
    if _read_stamp(stamp) == want:
        log(f"phantoms: reusing {raw}")
        return raw
    stamp.unlink(missing_ok=True)
    t0 = time.time()
    synthesize(raw, cases=max(o.labeled), unlabeled=o.unlabeled, val=o.val, seed=o.seed, datasets=PARTIAL,
               scale=o.scale, log=lambda line: log("  " + line))
    synthesize(raw, cases=0, unlabeled=0, val=o.held_out, seed=o.seed, datasets=[HELD_OUT], scale=o.scale,
               log=lambda line: log("  " + line))
    from utils.fileio import write_json_atomic

    write_json_atomic(stamp, want)
    log(f"phantoms: {time.time() - t0:.0f} s")
    return raw


def resample_partial(o: Options, raw: Path, log=print) -> Path:
    """Resample the partial datasets in-plane to ``--inplane`` into ``out/resampled``.

    Reused when it was made from the same phantoms at the same size; otherwise rebuilt from scratch
    (resampled files of phantoms that no longer exist must not stay behind as training cases).

    Raises:
        InputError: ``out/resampled`` exists, is not empty and was not written by this script.
    """
    from data.resample_tree import resample_tree
    from utils.fileio import write_json_atomic

    res = Path(o.out) / "resampled"
    want = {"phantoms": _synth_settings(o), "inplane": o.inplane}
    stamp = res / RESAMPLE_STAMP
    if _read_stamp(stamp) == want:
        log(f"resampled data: reusing {res}")
        return res
    if res.exists():
        if not stamp.is_file() and any(res.iterdir()):
            raise InputError(res, f"exists, is not empty and holds no {RESAMPLE_STAMP}; choose another --out")
        shutil.rmtree(res)
    t0 = time.time()
    for ds in PARTIAL:
        resample_tree(raw / ds, res / ds, (o.inplane, o.inplane), log=lambda _line: None)
    write_json_atomic(stamp, want)
    log(f"resampled to {o.inplane}x{o.inplane}: {res} ({time.time() - t0:.0f} s)")
    return res


def make_training_root(res: Path, root: Path, labeled: int) -> dict[str, dict[str, int]]:
    """A seed-layout data root of symlinks into ``res`` keeping the first ``labeled`` labeled cases.

    Args:
        res: resampled data root (one folder per partial dataset).
        root: folder to (re)create; only ever holds symlinks written here.
        labeled: labeled cases kept per dataset (in natural case order).

    Returns:
        dataset -> counts per split.

    Raises:
        InputError: a dataset has fewer labeled cases than asked for; ``root`` holds anything but
            folders and symlinks (it is not a root this function made).
    """
    from data.config import load_config
    from data.layout import discover

    config = load_config()
    if root.exists():
        foreign = [p for p in root.rglob("*") if not p.is_symlink() and not p.is_dir()]
        if foreign or not root.is_dir():
            raise InputError(foreign[0] if foreign else root, "is not a symlink this script made; "
                             "choose another --out")
        shutil.rmtree(root)  # only symlinks: removing them leaves their targets alone
    counts: dict[str, dict[str, int]] = {}
    for ds in PARTIAL:
        cases = discover(config, res, [ds])
        lab = [c for c in cases if c.split == "labeled"]
        if len(lab) < labeled:
            raise InputError(res / ds, f"has {len(lab)} labeled cases, {labeled} asked for")
        keep = lab[:labeled] + [c for c in cases if c.split != "labeled"]
        folder = root / ds
        for sub in ("labeled", "validation", "unlabeled", "label"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for c in keep:
            (folder / c.split / c.image.name).symlink_to(c.image.resolve())
            if c.label is not None:
                (folder / "label" / c.label.name).symlink_to(c.label.resolve())
        counts[ds] = {s: sum(c.split == s for c in keep) for s in ("labeled", "validation", "unlabeled")}
    return counts


def held_out_cases(raw: Path) -> list[Any]:
    """The BTCV validation cases (original grids) scored by the ablation."""
    from data.config import load_config
    from data.layout import discover

    cases = [c for c in discover(load_config(), raw, [HELD_OUT]) if c.split == "validation"]
    if not cases:
        raise InputError(raw / HELD_OUT, "no held-out validation volumes")
    return cases
