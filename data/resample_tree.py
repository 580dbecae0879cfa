"""The folder walk behind ``resample.py``: mirror a dataset tree, resampling every volume in-plane.

Each volume is brought to the in-plane grid the way training sees it (:mod:`data.inplane`: padded with
air to the grid's aspect, or resampled to a spacing and padded/cropped), and stored back in its own
axis order. A volume whose field of view already has the grid's aspect goes through the plain
field-of-view-keeping resampling of :func:`data.resample.resample_inplane`, as before.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.inplane import apply_plan, plan_inplane
from data.resample import resample_inplane
from data.volume import (
    VOLUME_SUFFIXES,
    Volume,
    is_dicom_dir,
    output_name,
    read_geometry,
    read_volume,
    slice_axis_index,
    strip_volume_suffix,
    to_canonical,
    to_storage,
    write_volume,
)
from utils.errors import InputError, naming
from utils.fileio import check_distinct_outputs

DEFAULT_LABEL_DIRS = ("label", "labels", "labelsTr")
# KiTS19 keeps segmentation.nii.gz next to imaging.nii.gz, so folder names alone miss it.
DEFAULT_LABEL_PATTERNS = ("segmentation.nii.gz", "segmentation.nii")

@dataclass(frozen=True)
class Job:
    """One input of :func:`resample_tree`: a volume to resample or a file to copy."""

    src: Path
    dst: Path
    kind: str  # "image" | "label" | "copy"


def _is_label(rel: Path, label_dirs: Sequence[str], label_patterns: Sequence[str]) -> bool:
    if any(part in label_dirs for part in rel.parts[:-1]):
        return True
    return any(fnmatch.fnmatch(rel.name, pat) for pat in label_patterns)


def plan_jobs(raw_dir: Path, out_dir: Path, label_dirs: Sequence[str] = DEFAULT_LABEL_DIRS,
              label_patterns: Sequence[str] = DEFAULT_LABEL_PATTERNS) -> list[Job]:
    """List what :func:`resample_tree` will do, mirroring ``raw_dir``'s folders under ``out_dir``.

    DICOM series folders become one NIfTI file ``<folder>.nii.gz``; ``.mhd`` becomes ``.mha``;
    other files (``dataset.json``, ...) are copied; hidden files are skipped.

    Raises:
        InputError: ``raw_dir`` missing or not a folder, ``out_dir`` equal to it, no volume found, or
            two inputs with one output (``a.mhd`` and ``a.mha``; ``case1/`` DICOM and ``case1.nii.gz``).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.exists():
        raise InputError(raw_dir, "input folder does not exist")
    if not raw_dir.is_dir():
        raise InputError(raw_dir, "input is not a folder")
    raw_res, out_res = raw_dir.resolve(), out_dir.resolve()
    if raw_res == out_res:
        raise InputError(out_dir, "output folder must differ from the input folder")
    jobs: list[Job] = []
    for root, dirs, files in os.walk(raw_dir):
        root_p = Path(root)
        # Never descend into our own output when it sits inside the input.
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (root_p / d).resolve() != out_res)
        for d in list(dirs):
            if is_dicom_dir(root_p / d):
                rel = (root_p / d).relative_to(raw_dir)
                kind = "label" if _is_label(rel / "x", label_dirs, label_patterns) else "image"
                jobs.append(Job(root_p / d, out_dir / rel.parent / (rel.name + ".nii.gz"), kind))
                dirs.remove(d)
        mhd_raw = {f for f in files if f.lower().endswith(".mhd")}
        for f in sorted(files):
            if f.startswith("."):
                continue
            if not (root_p / f).exists():
                raise InputError(root_p / f, "is a dangling symbolic link (its target does not exist)")
            rel = (root_p / f).relative_to(raw_dir)
            lower = f.lower()
            if lower.endswith(VOLUME_SUFFIXES):
                kind = "label" if _is_label(rel, label_dirs, label_patterns) else "image"
                jobs.append(Job(root_p / f, out_dir / rel.parent / output_name(f), kind))
            elif lower.endswith((".raw", ".zraw")) and any(
                    strip_volume_suffix(m) == f.rsplit(".", 1)[0] for m in mhd_raw):
                continue  # data file of an .mhd header: folded into the .mha output
            elif Path(root_p / f).suffix.lower() in ("", ".dcm", ".ima") and is_dicom_dir(root_p):
                continue  # a loose DICOM file beside volumes is not copied as data
            else:
                jobs.append(Job(root_p / f, out_dir / rel, "copy"))
    if not any(j.kind != "copy" for j in jobs):
        raise InputError(raw_dir, f"no volumes found (looked for {', '.join(VOLUME_SUFFIXES)} files "
                         "and DICOM series folders)")
    check_distinct_outputs((j.src, j.dst) for j in jobs)
    return jobs


def _settings(job: Job, size: tuple[int, int], spacing_mm: float | None = None) -> dict:
    if job.kind == "copy":
        return {"kind": job.kind, "size": None}
    return {"kind": job.kind, "size": [int(s) for s in size], "spacing_mm": spacing_mm}


def is_up_to_date(job: Job, size: tuple[int, int], spacing_mm: float | None = None) -> bool:
    """True when the output is exactly what a verified write made from the current input with these
    settings (content stamp: sizes, hash; see utils.fileio.stamp_matches). Modification times alone
    would trust a truncated file left by a full disk."""
    from utils.fileio import stamp_matches

    return stamp_matches(job.dst, job.src, _settings(job, size, spacing_mm))


def check_header(job: Job) -> None:
    """Cheap pre-flight check of a volume's header (NIfTI/MHA/NRRD), so bad files stop the run early.

    DICOM folders are only checked when read (reading their header means reading the series).

    Raises:
        InputError: missing, empty, unreadable, 4D or zero-sized input.
    """
    if job.kind == "copy" or job.src.is_dir():
        return
    if job.src.stat().st_size == 0:
        raise InputError(job.src, "file is empty")
    geo = read_geometry(job.src)
    if 0 in geo.shape:
        raise InputError(job.src, f"has a zero-sized dimension (shape {geo.shape})")
    if any(not np.isfinite(s) or s <= 0 for s in geo.spacing):
        raise InputError(job.src, f"has invalid voxel spacing {geo.spacing}")


def resample_to_grid(volume: Volume, size: Sequence[int], is_label: bool,
                     spacing_mm: float | None = None) -> Volume:
    """Bring a volume's slice plane to the grid as training does, stored in the volume's own order.

    Args:
        volume: input volume (any orientation).
        size: ``(s1, s2)`` = (columns, rows) of the canonical slice plane.
        is_label: nearest neighbour and background padding instead of linear and air.
        spacing_mm: None = pad mode, else spacing mode (see :mod:`data.inplane`).

    Returns:
        The resampled volume with its exact geometry and the input's dtype (integers rounded).
    """
    canon, orientation = to_canonical(volume)
    plan = plan_inplane(canon.array.shape[1:], canon.geometry.spacing, size, spacing_mm)
    if plan.pre == ((0, 0), (0, 0)) and plan.post == ((0, 0), (0, 0)) and size[0] == size[1]:
        # Already the grid's (square) aspect: the plain resampling on the stored grid, as before
        # padding existed. Only for a square grid: resample_inplane gives s1 to the lower-numbered
        # stored in-plane axis, which is the rows, not the columns, of a transposed storage order.
        return resample_inplane(volume, size, is_label=is_label)
    out = apply_plan(canon, plan, is_label=is_label)
    if not is_label and volume.array.dtype != out.array.dtype:
        dtype = volume.array.dtype
        values = out.array
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            values = np.clip(np.rint(values), info.min, info.max)
        out = out.with_array(values.astype(dtype))
    return to_storage(out, orientation)


def run_job(job: Job, size: tuple[int, int], spacing_mm: float | None = None) -> str:
    """Resample (or copy) one input; the output appears complete or not at all.

    Returns:
        A one-line description for the log.

    Raises:
        InputError: naming the input when it cannot be read (corrupt, 4D, NaN, ...).
    """
    from utils.fileio import atomic_path, write_stamp

    if job.kind == "copy":
        expected = job.src.stat().st_size

        def same_size(tmp: Path) -> None:
            if tmp.stat().st_size != expected:
                raise InputError(job.dst, f"cannot write output (short copy: {tmp.stat().st_size} of "
                                 f"{expected} bytes)")

        with atomic_path(job.dst, verify=same_size, allow_empty=expected == 0) as tmp:
            shutil.copyfile(job.src, tmp)
        write_stamp(job.dst, job.src, _settings(job, size))
        return f"copied {job.dst}"
    vol = read_volume(job.src)
    with naming(job.src):
        out = resample_to_grid(vol, size, is_label=job.kind == "label", spacing_mm=spacing_mm)
    write_volume(out, job.dst)
    write_stamp(job.dst, job.src, _settings(job, size, spacing_mm))
    sa = "ijk"[slice_axis_index(vol.geometry)]
    return (f"{job.kind:5s} {job.src} {vol.geometry.size} -> {out.geometry.size} "
            f"(slice axis {sa}) -> {job.dst}")


def resample_tree(raw_dir: str | Path, out_dir: str | Path, size: tuple[int, int],
                  label_dirs: Sequence[str] = DEFAULT_LABEL_DIRS,
                  label_patterns: Sequence[str] = DEFAULT_LABEL_PATTERNS,
                  workers: int = 1, overwrite: bool = False, log=None,
                  spacing_mm: float | None = None) -> dict[str, int]:
    """Resample every volume under ``raw_dir`` in-plane to ``size`` into a mirror under ``out_dir``.

    All volume headers are checked before anything is written. Outputs are written atomically: when
    an input turns out bad mid-run, the outputs finished so far stay complete and the bad file's
    output never appears.

    Args:
        raw_dir: input folder (walked recursively).
        out_dir: output folder (created; subfolders mirrored).
        size: ``(s1, s2)``, see :func:`resample_to_grid`.
        label_dirs: folder names whose volumes are label maps (nearest neighbour).
        label_patterns: file-name patterns (fnmatch) of label maps anywhere.
        workers: processes (> 1 uses a process pool).
        overwrite: redo outputs that are up to date (see :func:`is_up_to_date`).
        log: callable taking one line (default: print to stdout).
        spacing_mm: None = pad slices with air to the grid's aspect, then resize; else resample to
            this in-plane spacing, then pad or crop to the grid (:mod:`data.inplane`).

    Returns:
        Counts ``{"resampled", "copied", "skipped"}``.

    Raises:
        InputError: naming the first bad input.
    """
    log = log or print  # progress on stdout: stderr is kept for the one error line
    jobs = plan_jobs(Path(raw_dir), Path(out_dir), label_dirs, label_patterns)
    from utils.fileio import check_writable, clean_stale_parts

    check_writable(out_dir)
    clean_stale_parts(out_dir)  # temporary files of a killed earlier run
    todo = [j for j in jobs if overwrite or not is_up_to_date(j, size, spacing_mm)]
    for j in todo:
        check_header(j)
    counts = {"resampled": 0, "copied": 0, "skipped": len(jobs) - len(todo)}

    def done(job: Job, line: str) -> None:
        counts["copied" if job.kind == "copy" else "resampled"] += 1
        log(line)

    if workers <= 1 or len(todo) <= 1:
        for j in todo:
            done(j, run_job(j, size, spacing_mm))
        return counts
    import multiprocessing as mp

    # spawn: SimpleITK's thread pool does not survive fork reliably.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, j, size, spacing_mm): j for j in todo}
        finished, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        # Let jobs already running finish (their outputs are complete), then report the first error.
        wait(pending)
        error: BaseException | None = None
        for f, j in futures.items():
            if f.cancelled():
                continue
            exc = f.exception()
            if exc is None:
                done(j, f.result())
            elif error is None:
                error = exc
        if error is not None:
            raise error
    return counts


__all__ = ["DEFAULT_LABEL_DIRS", "DEFAULT_LABEL_PATTERNS", "Job", "plan_jobs", "resample_to_grid",
           "resample_tree", "run_job"]
