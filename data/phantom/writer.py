"""Datasets on disk: per-case settings and seeds, the seed folder layout, markers for clean reruns,
and :func:`synthesize` behind ``synth.py``."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.phantom.render import PhantomSpec, make_phantom
from data.phantom.tissues import DATASET_STYLES, MARKER, DatasetStyle, label_lut
from data.volume import Volume, to_storage, write_volume
from utils.errors import InputError

# ----------------------------------------------------------------------------------------------
# Datasets on disk


def case_rng(seed: int, name: str, number: int) -> np.random.Generator:
    """The generator of case ``number`` of dataset ``name`` (independent of other cases)."""
    return np.random.default_rng([int(seed), DATASET_STYLES[name].code, int(number)])


def draw_spec(rng: np.random.Generator, style: DatasetStyle, scale: float = 1.0) -> PhantomSpec:
    """Per-case grid and intensity settings of a dataset; ``scale`` shrinks the in-plane size.

    Field-of-view variety: a case is a body-tight crop (8-30 mm left and right of the body, 15-40 mm
    in front and behind: about 310-400 x 250-330 mm, non-square) with probability
    ``style.tight_prob``, else the scanner's square field of view (358-500 mm over the styles);
    0-40 mm of extra coverage below and 0-15 mm above the organs vary the slice count.
    """
    n = max(16, int(round(style.inplane_size * scale)))
    spacing = float(rng.uniform(*style.inplane_spacing)) * style.inplane_size / n
    slice_spacing = float(rng.choice(style.slice_spacing))
    noise = float(rng.uniform(*style.noise_sigma))
    liver_t, kidney_t = int(rng.choice(style.liver_tumours)), int(rng.choice(style.kidney_tumours))
    tight = bool(rng.uniform() < style.tight_prob)
    margin = (float(rng.uniform(8.0, 30.0)), float(rng.uniform(15.0, 40.0)))
    z_margin = (float(rng.uniform(0.0, 40.0)), float(rng.uniform(0.0, 15.0)))
    return PhantomSpec(
        inplane_size=n,
        inplane_spacing=round(spacing, 6),
        slice_spacing=slice_spacing,
        hu_offset=style.hu_offset,
        noise_sigma=noise,
        liver_tumours=liver_t,
        kidney_tumours=kidney_t,
        dtype=style.dtype,
        crop_margin=margin if tight else None,
        z_margin=z_margin,
    )


def make_case(seed: int, name: str, number: int, scale: float = 1.0) -> tuple[Volume, np.ndarray]:
    """Canonical image and tissue map of case ``number`` of dataset ``name`` (what synth writes)."""
    rng = case_rng(seed, name, number)
    return make_phantom(rng, draw_spec(rng, DATASET_STYLES[name], scale))


def case_numbers(name: str, cases: int, unlabeled: int, val: int) -> dict[str, list[int]]:
    """Case numbers per split; labeled, then validation, then unlabeled, so names never clash."""
    style = DATASET_STYLES[name]
    n0 = style.first_number
    unl = unlabeled if style.unlabeled else 0
    return {"labeled": list(range(n0, n0 + cases)),
            "validation": list(range(n0 + cases, n0 + cases + val)),
            "unlabeled": list(range(n0 + cases + val, n0 + cases + val + unl))}


def _claim_folder(folder: Path) -> set[str]:
    """Files a previous synth run left in ``folder``; refuse folders synth.py did not write."""
    marker = folder / MARKER
    if not folder.exists():
        return set()
    if not folder.is_dir():
        raise InputError(folder, "exists and is not a folder")
    if marker.is_file():
        try:
            return set(json.loads(marker.read_text())["files"])
        except (ValueError, KeyError, TypeError, OSError):
            raise InputError(marker, "is not a valid phantom marker; remove the folder or choose "
                             "another --out") from None
    if any(folder.iterdir()):
        raise InputError(folder, f"exists, is not empty and was not written by synth.py (no {MARKER});"
                         " refusing to overwrite it: choose another --out")
    return set()


def _write_marker(folder: Path, files: set[str], info: dict[str, Any]) -> None:
    from utils.fileio import write_json_atomic

    write_json_atomic(folder / MARKER, {**info, "files": sorted(files)})


def write_dataset(out: str | Path, name: str, cases: int, unlabeled: int, val: int, seed: int = 0,
                  scale: float = 1.0) -> dict[str, Any]:
    """Write one dataset's phantoms in the seed layout under ``out/name``.

    Layout: ``labeled/``, ``validation/``, ``unlabeled/`` images and ``label/`` holding the labels of
    the labeled and validation cases (file names of :data:`DATASET_STYLES`). Files of a previous run
    that this run does not rewrite are removed (listed in a hidden ``.phantom.json``).

    Returns:
        Summary: folder, counts per split, in-plane size, spacing and slice ranges, dtype, seconds.

    Raises:
        InputError: the folder cannot be written, or exists with files synth.py did not write.
    """
    t0 = time.time()
    style = DATASET_STYLES[name]
    folder = Path(out) / name
    old = _claim_folder(folder)
    numbers = case_numbers(name, cases, unlabeled, val)
    plan: list[tuple[str, int, str, str | None]] = []
    for split, nums in numbers.items():
        for n in nums:
            label = f"label/{style.label_name.format(n=n)}" if split != "unlabeled" else None
            plan.append((split, n, f"{split}/{style.image_name.format(n=n)}", label))
    new = {p[2] for p in plan} | {p[3] for p in plan if p[3]}
    info = {"dataset": name, "seed": seed, "scale": scale,
            "counts": {k: len(v) for k, v in numbers.items()}}
    # Claim every file this run may touch before writing any, so an interrupted run is cleaned up.
    _write_marker(folder, old | new, info)
    lut = label_lut(style)
    spacings, slices, sizes, fovs = [], [], set(), []
    for _split, n, image_rel, label_rel in plan:
        image, tissue = make_case(seed, name, n, scale)
        stored = to_storage(image, style.direction)
        write_volume(stored, folder / image_rel, compress=image_rel.endswith(".gz"))
        if label_rel:
            labels = to_storage(image.with_array(lut[tissue]), style.direction)
            write_volume(labels, folder / label_rel, compress=label_rel.endswith(".gz"))
        g = image.geometry
        spacings.append(g.spacing)
        slices.append(g.shape[0])
        sizes.add(g.shape[1:])
        fovs.append((g.shape[2] * g.spacing[0], g.shape[1] * g.spacing[1]))
    for rel in sorted(old - new):
        parts = Path(rel).parts
        # Only files synth.py itself names: a split folder and a file name (no '..', no absolute).
        if len(parts) == 2 and parts[0] in (*numbers, "label") and parts[1] not in ("..", "."):
            (folder / rel).unlink(missing_ok=True)
    _write_marker(folder, new, info)
    # Empty splits still get their folder: the seed layout expects all of them.
    for split in ("labeled", "validation", "label", *(("unlabeled",) if style.unlabeled else ())):
        (folder / split).mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "folder": str(folder), **{k: len(v) for k, v in numbers.items()},
        "inplane_shape": [list(v) for v in sorted(sizes)], "dtype": style.dtype,
        "image_name": style.image_name, "label_name": style.label_name,
        "seconds": round(time.time() - t0, 2),
    }
    if spacings:
        sp = np.asarray(spacings)
        summary.update(inplane_spacing=[float(sp[:, 0].min()), float(sp[:, 0].max())],
                       slice_spacing=[float(sp[:, 2].min()), float(sp[:, 2].max())],
                       slices=[int(min(slices)), int(max(slices))],
                       fov_mm=[round(float(min(min(f) for f in fovs)), 1),
                               round(float(max(max(f) for f in fovs)), 1)],
                       square=sum(1 for w, h in fovs if w == h), tight=sum(1 for w, h in fovs if w != h))
    return summary


def describe(name: str, summary: dict[str, Any]) -> str:
    """One line for a dataset summary."""
    line = (f"{name}: {summary['labeled']} labeled, {summary['validation']} validation, "
            f"{summary['unlabeled']} unlabeled")
    if "slices" in summary:
        sp, ss, sl = summary["inplane_spacing"], summary["slice_spacing"], summary["slices"]
        fov = summary["fov_mm"]
        line += (f"; fields of view {fov[0]:.0f}-{fov[1]:.0f} mm, {len(summary['inplane_shape'])} grid "
                 f"shapes at {sp[0]:.2f}-{sp[1]:.2f} mm, {sl[0]}-{sl[1]} slices of "
                 f"{ss[0]:g}-{ss[1]:g} mm, {summary['dtype']}")
    return f"{line} -> {summary['folder']} ({summary['seconds']:.1f} s)"


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "output path exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(out, f"cannot create output folder ({err.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".synth-probe.", dir=out)
    except OSError as err:
        raise InputError(out, f"output folder is not writable ({err.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _write_datasets(out: Path, names: list[str], settings: tuple, workers: int) -> Iterator[tuple[str, dict]]:
    """``(name, write_dataset summary)`` in the order of ``names``; by ``workers`` processes when > 1.

    An error in a worker (an InputError) is re-raised here after the running datasets finish; a
    worker that dies (killed, out of memory) becomes an InputError naming the output folder.
    """
    if workers <= 1 or len(names) <= 1:
        for name in names:
            yield name, write_dataset(out, name, *settings)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn: SimpleITK's thread pool does not survive fork reliably (as resample.py's workers)
    spawn = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(names)), mp_context=spawn) as pool:
        futures = [pool.submit(write_dataset, out, name, *settings) for name in names]
        for name, future in zip(names, futures):
            try:
                summary = future.result()
            except BrokenProcessPool:
                raise InputError(out, "a phantom worker process died (killed or out of memory); "
                                 "run synth.py again") from None
            yield name, summary


def synthesize(out: str | Path, cases: int = 4, unlabeled: int = 4, val: int = 2, seed: int = 0,
               datasets: Sequence[str] | None = None, scale: float = 1.0,
               log: Callable[[str], None] | None = None, workers: int = 1) -> dict[str, Any]:
    """Write the phantom datasets under ``out`` (the default data of UniMOS).

    Args:
        out: output root; each dataset goes to ``out/<name>/``.
        cases / unlabeled / val: labeled, unlabeled and validation cases per dataset (BTCV has no
            unlabeled split).
        seed: non-negative seed; the same seed gives byte-identical volumes.
        datasets: names from :data:`DATASET_STYLES` (default: all).
        scale: in-plane size factor (0.5: 256 instead of 512), for tests.
        log: called with one summary line per dataset (in the order of ``datasets``).
        workers: datasets written side by side by this many processes (each case has its own seed,
            so the files are the same bytes for any count).

    Returns:
        ``{"out", "seed", "scale", "seconds", "datasets": {name: summary}}``.

    Raises:
        InputError: bad counts/seed/scale/dataset names, or ``out`` not writable; nothing is
            written then.
    """
    names = list(DATASET_STYLES) if datasets is None else list(datasets)
    unknown = [n for n in names if n not in DATASET_STYLES]
    if unknown or not names:
        raise InputError(None, f"unknown dataset(s) {unknown} (choose from {', '.join(DATASET_STYLES)})")
    for flag, value in (("--cases", cases), ("--unlabeled", unlabeled), ("--val", val),
                        ("--seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise InputError(None, f"{flag} must be a non-negative integer, got {value}")
    if not (math.isfinite(scale) and 0.0 < scale <= 2.0) or round(512 * scale) < 16:
        raise InputError(None, f"--scale must be in (1/32, 2], got {scale}")
    out = Path(out)
    _check_writable(out)
    for name in names:  # refuse foreign folders before writing anything
        _claim_folder(out / name)
    t0 = time.time()
    result: dict[str, Any] = {"out": str(out), "seed": seed, "scale": scale, "datasets": {}}
    for name, summary in _write_datasets(out, names, (cases, unlabeled, val, seed, scale), workers):
        result["datasets"][name] = summary
        if log is not None:
            log(describe(name, summary))
    result["seconds"] = round(time.time() - t0, 2)
    return result
