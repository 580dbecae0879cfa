"""Resampling that keeps the physical field of view: in-plane (SimpleITK) and along one array axis.

Grid convention (used by every function here)
---------------------------------------------
A grid of ``n`` voxels of size ``s`` covers the field of view ``[-s/2, (n - 1/2) s]`` around its
origin voxel. Resampling to ``m`` voxels keeps that field of view: the new spacing is
``s * n / m`` and the origin moves by ``(s_new - s) / 2`` along the axis direction, so both outer
edges stay where they were. (The original kept the origin instead, which shifts the content by half
a voxel of the size change.) New voxel ``t`` then samples the old continuous index
``(t + 1/2) * n / m - 1/2``, which always lies inside ``[-1/2, n - 1/2]``: the border voxels are
extended, never blended with a zero background.

Images are interpolated linearly (SimpleITK), labels with nearest neighbour (never linearly: that
invents label values and moves borders) in index space, where a tie (an exact 2x downsampling puts
every new centre half-way between two old ones) always goes to the upper voxel.

This module also holds the folder walk behind ``resample.py`` (:func:`resample_tree`).
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

from data.volume import (
    VOLUME_SUFFIXES,
    Geometry,
    Volume,
    read_geometry,
    read_volume,
    slice_axis_index,
    strip_volume_suffix,
    to_sitk,
    write_volume,
)
from utils.errors import InputError

DEFAULT_LABEL_DIRS = ("label", "labels", "labelsTr")
# KiTS19 keeps segmentation.nii.gz next to imaging.nii.gz, so folder names alone miss it.
DEFAULT_LABEL_PATTERNS = ("segmentation.nii.gz", "segmentation.nii")


# ----------------------------------------------------------------------------------------------
# Array / volume resampling


def _cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast interpolated floats to ``dtype``, rounding and saturating for integer types."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    if dtype.kind == "b":
        return values >= 0.5
    return values.astype(dtype, copy=False)


def source_positions(n_old: int, n_new: int) -> np.ndarray:
    """Old continuous indices sampled by each of ``n_new`` voxels (see the module docstring)."""
    return (np.arange(n_new, dtype=np.float64) + 0.5) * (n_old / n_new) - 0.5


def resample_axis(array, axis: int, n_new: int, is_label: bool):
    """Resample one axis of a numpy array or torch tensor to ``n_new`` voxels, field of view kept.

    Args:
        array: numpy array or torch tensor of any dimensionality.
        axis: the axis to resample (negative values count from the end).
        n_new: new length of that axis.
        is_label: nearest neighbour (values unchanged) instead of linear interpolation.

    Returns:
        Same type as ``array``. Labels keep their dtype; linear interpolation returns float32 for
        integer input and the input's float dtype otherwise. Returns ``array`` itself when the
        length is already ``n_new``.
    """
    n_old = array.shape[axis]
    if n_new < 1:
        raise ValueError(f"n_new must be >= 1, got {n_new}")
    if n_old == n_new:
        return array
    pos = source_positions(n_old, n_new)
    is_torch = not isinstance(array, np.ndarray)
    if is_label:
        idx = np.clip(np.floor(pos + 0.5), 0, n_old - 1).astype(np.int64)
        if is_torch:
            import torch

            return torch.index_select(array, axis, torch.from_numpy(idx).to(array.device))
        return np.take(array, idx, axis=axis)
    pos = np.clip(pos, 0.0, n_old - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n_old - 1)
    w = (pos - lo).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = n_new
    if is_torch:
        import torch

        x = array if array.is_floating_point() else array.float()
        dev = x.device
        a = torch.index_select(x, axis, torch.from_numpy(lo).to(dev))
        b = torch.index_select(x, axis, torch.from_numpy(hi).to(dev))
        wt = torch.from_numpy(w).to(dev, x.dtype).reshape(shape)
        return a + (b - a) * wt
    x = array if array.dtype.kind == "f" else array.astype(np.float32)
    a = np.take(x, lo, axis=axis)
    b = np.take(x, hi, axis=axis)
    return a + (b - a) * w.reshape(shape).astype(x.dtype)


def inplane_axes(slice_axis: int) -> tuple[int, int]:
    """The two ITK index axes other than ``slice_axis``, in increasing order."""
    return tuple(a for a in range(3) if a != slice_axis)  # type: ignore[return-value]


def resampled_geometry(geometry: Geometry, size: Sequence[int]) -> Geometry:
    """Geometry of the same field of view sampled with ``size`` voxels (ITK order ``(ni, nj, nk)``).

    Spacing becomes ``old * old_n / new_n``; the origin moves by half the change of voxel size along
    each index axis so the outer edges stay put; the direction is kept.
    """
    old_size = geometry.size
    d = geometry.direction_matrix
    spacing = [geometry.spacing[a] * old_size[a] / size[a] for a in range(3)]
    origin = np.asarray(geometry.origin, dtype=np.float64).copy()
    for a in range(3):
        origin += 0.5 * (spacing[a] - geometry.spacing[a]) * d[:, a]
    return Geometry(
        shape=(int(size[2]), int(size[1]), int(size[0])),
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=geometry.direction,
    )


def resample_inplane(volume: Volume, size: Sequence[int], is_label: bool, slice_axis: int | None = None,
                     dtype: np.dtype | type | None = None) -> Volume:
    """Resample the two in-plane axes to ``size``; slice count, field of view and direction kept.

    Args:
        volume: input volume.
        size: ``(s1, s2)``, the new sizes of the in-plane ITK index axes in increasing order
            (for the usual axial storage: ``s1`` along ``i``/x (array columns), ``s2`` along ``j``/y
            (array rows), so the array becomes ``(nk, s2, s1)``).
        is_label: nearest neighbour instead of linear interpolation.
        slice_axis: ITK index axis kept as is; default: the one closest to superior-inferior
            (:func:`data.volume.slice_axis_index`), not blindly ``k``.
        dtype: output dtype; default the input's (integer images are rounded and saturated).

    Returns:
        The resampled volume; ``volume`` itself when the in-plane size already matches and no
        dtype change is asked for.
    """
    import SimpleITK as sitk  # noqa: N813

    geo = volume.geometry
    if slice_axis is None:
        slice_axis = slice_axis_index(geo)
    new_size = list(geo.size)
    for a, s in zip(inplane_axes(slice_axis), size):
        if int(s) < 1:
            raise ValueError(f"in-plane size must be >= 1, got {tuple(size)}")
        new_size[a] = int(s)
    out_dtype = np.dtype(dtype) if dtype is not None else volume.array.dtype
    if tuple(new_size) == tuple(geo.size):
        if out_dtype == volume.array.dtype:
            return volume
        return volume.with_array(_cast_like(volume.array, out_dtype))
    new_geo = resampled_geometry(geo, new_size)
    if is_label:
        # Index-space nearest neighbour (numpy): ties such as an exact 2x downsampling always round
        # up, whereas ITK's physical-point round trip breaks them by floating-point noise.
        array = volume.array
        for a in inplane_axes(slice_axis):
            array = resample_axis(array, 2 - a, new_size[a], is_label=True)
        array = np.ascontiguousarray(array)
        if array.dtype != out_dtype:
            array = array.astype(out_dtype)
        return Volume(array, new_geo)
    # Interpolate in float64/float32 and round ourselves: ITK would truncate for integer outputs.
    src = volume.array.astype(np.float64 if volume.array.dtype == np.float64 else np.float32)
    img = to_sitk(volume.with_array(src))
    out = sitk.Resample(img, new_size, sitk.Transform(), sitk.sitkLinear, new_geo.origin, new_geo.spacing,
                        new_geo.direction, 0, img.GetPixelID())
    array = _cast_like(sitk.GetArrayFromImage(out), out_dtype)
    # Keep the computed geometry rather than ITK's float round trip, so it is exact.
    return Volume(array, new_geo)


# ----------------------------------------------------------------------------------------------
# Folder walk behind resample.py


@dataclass(frozen=True)
class Job:
    """One input of :func:`resample_tree`: a volume to resample or a file to copy."""

    src: Path
    dst: Path
    kind: str  # "image" | "label" | "copy"


def _is_dicom_dir(path: Path) -> bool:
    """True when a folder holds a DICOM series (GDCM finds a series id)."""
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if not any(p.suffix.lower() in ("", ".dcm", ".ima") for p in files):
        return False
    import SimpleITK as sitk  # noqa: N813

    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    except RuntimeError:
        return False


def _output_name(name: str) -> str:
    # A .mhd header points at a separate .raw file that an atomic rename would orphan: write .mha.
    if name.lower().endswith(".mhd"):
        return name[:-4] + ".mha"
    return name


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
        InputError: ``raw_dir`` missing or not a folder, ``out_dir`` equal to it, or no volume found.
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
            if _is_dicom_dir(root_p / d):
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
                jobs.append(Job(root_p / f, out_dir / rel.parent / _output_name(f), kind))
            elif lower.endswith((".raw", ".zraw")) and any(
                    strip_volume_suffix(m) == f.rsplit(".", 1)[0] for m in mhd_raw):
                continue  # data file of an .mhd header: folded into the .mha output
            elif Path(root_p / f).suffix.lower() in ("", ".dcm", ".ima") and _is_dicom_dir(root_p):
                continue  # a loose DICOM file beside volumes is not copied as data
            else:
                jobs.append(Job(root_p / f, out_dir / rel, "copy"))
    if not any(j.kind != "copy" for j in jobs):
        raise InputError(raw_dir, f"no volumes found (looked for {', '.join(VOLUME_SUFFIXES)} files "
                         "and DICOM series folders)")
    return jobs


def _settings(job: Job, size: tuple[int, int]) -> dict:
    return {"kind": job.kind, "size": [int(s) for s in size] if job.kind != "copy" else None}


def is_up_to_date(job: Job, size: tuple[int, int]) -> bool:
    """True when the output is exactly what a verified write made from the current input with these
    settings (content stamp: sizes, hash; see utils.fileio.stamp_matches). Modification times alone
    would trust a truncated file left by a full disk."""
    from utils.fileio import stamp_matches

    return stamp_matches(job.dst, job.src, _settings(job, size))


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


def run_job(job: Job, size: tuple[int, int]) -> str:
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
    out = resample_inplane(vol, size, is_label=job.kind == "label")
    write_volume(out, job.dst)
    write_stamp(job.dst, job.src, _settings(job, size))
    sa = "ijk"[slice_axis_index(vol.geometry)]
    return (f"{job.kind:5s} {job.src} {vol.geometry.size} -> {out.geometry.size} "
            f"(slice axis {sa}) -> {job.dst}")


def resample_tree(raw_dir: str | Path, out_dir: str | Path, size: tuple[int, int],
                  label_dirs: Sequence[str] = DEFAULT_LABEL_DIRS,
                  label_patterns: Sequence[str] = DEFAULT_LABEL_PATTERNS,
                  workers: int = 1, overwrite: bool = False, log=None) -> dict[str, int]:
    """Resample every volume under ``raw_dir`` in-plane to ``size`` into a mirror under ``out_dir``.

    All volume headers are checked before anything is written. Outputs are written atomically: when
    an input turns out bad mid-run, the outputs finished so far stay complete and the bad file's
    output never appears.

    Args:
        raw_dir: input folder (walked recursively).
        out_dir: output folder (created; subfolders mirrored).
        size: ``(s1, s2)``, see :func:`resample_inplane`.
        label_dirs: folder names whose volumes are label maps (nearest neighbour).
        label_patterns: file-name patterns (fnmatch) of label maps anywhere.
        workers: processes (> 1 uses a process pool).
        overwrite: redo outputs that are up to date (see :func:`is_up_to_date`).
        log: callable taking one line (default: print to stdout).

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
    todo = [j for j in jobs if overwrite or not is_up_to_date(j, size)]
    for j in todo:
        check_header(j)
    counts = {"resampled": 0, "copied": 0, "skipped": len(jobs) - len(todo)}

    def done(job: Job, line: str) -> None:
        counts["copied" if job.kind == "copy" else "resampled"] += 1
        log(line)

    if workers <= 1 or len(todo) <= 1:
        for j in todo:
            done(j, run_job(j, size))
        return counts
    import multiprocessing as mp

    # spawn: SimpleITK's thread pool does not survive fork reliably.
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(run_job, j, size): j for j in todo}
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


__all__ = [
    "DEFAULT_LABEL_DIRS", "DEFAULT_LABEL_PATTERNS", "Job", "inplane_axes", "plan_jobs",
    "resample_axis", "resample_inplane", "resample_tree", "resampled_geometry", "run_job",
    "source_positions",
]
