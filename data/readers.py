"""Reading checks behind :func:`data.volume.read_volume`: SimpleITK reading with one-line errors.

What ITK lets through is checked here: NIfTI headers (zero-sized dimensions, truncated files, zero or
NaN pixdim from the header's own bytes), NIfTI-2 (which SimpleITK cannot read), DICOM series
(complete and evenly spaced within :data:`DICOM_GAP_TOL`), direction matrices (orthonormal within
:data:`DIRECTION_TOL`) and voxel spacing. :mod:`data.volume` re-exports the public names.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from utils.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A direction matrix must be orthonormal within this (max |D^T D - I| entry): NIfTI cannot store a
# sheared grid, so writing one would move voxels; float32 headers are good to about 1e-6.
DIRECTION_TOL = 1e-3
# Slice positions of a DICOM series may differ from even spacing by this fraction of the spacing
# (plus 1e-3 mm) before the series counts as incomplete.
DICOM_GAP_TOL = 0.05
# Files of a DICOM series folder are named like this (no suffix, .dcm, .ima; case-insensitive).
DICOM_SUFFIXES = ("", ".dcm", ".ima")


def _sitk():
    import SimpleITK as sitk  # noqa: N813 -- imported lazily: scripts start fast, tests stay light

    # ITK/GDCM warnings (e.g. "Non uniform sampling or missing slices") would leak onto stderr
    # before the one-line error; every condition they describe is checked here and reported.
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    return sitk


def check_direction(path: str | Path, direction: tuple[float, ...] | np.ndarray) -> None:
    """Reject a direction matrix that is not orthonormal within :data:`DIRECTION_TOL`.

    Raises:
        InputError: naming the file (a sheared or scaled grid would be altered when written).
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.isfinite(d).all():
        raise InputError(path, "has a non-finite direction matrix")
    err = float(np.abs(d.T @ d - np.eye(3)).max())
    if err > DIRECTION_TOL:
        raise InputError(path, f"direction matrix is not orthonormal (sheared or scaled grid; "
                         f"max |D^T D - I| = {err:.3g} > {DIRECTION_TOL:g})")


def check_spacing(path: str | Path, spacing: tuple[float, ...]) -> None:
    """Reject zero, negative or non-finite voxel spacing.

    Raises:
        InputError: naming the file.
    """
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise InputError(path, f"has invalid voxel spacing {tuple(spacing)} (must be finite and > 0)")


def _dicom_positions(folder: Path, files: list[str]) -> None:
    """Check a DICOM series is complete and evenly spaced (ITK only warns and stretches it).

    Raises:
        InputError: naming the folder and the gap, or a slice file that cannot be read.
    """
    sitk = _sitk()
    if len(files) < 2:
        return
    origins, direction = [], None
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        try:
            r.ReadImageInformation()
        except Exception:
            raise InputError(f, "DICOM slice is corrupt or unreadable") from None
        origins.append(r.GetOrigin()[:3])
        if direction is None:
            if len(r.GetDirection()) != 9:
                return  # not 3D slices: GDCM/ITK report what is wrong when reading
            direction = np.asarray(r.GetDirection(), dtype=np.float64).reshape(3, 3)
    normal = np.cross(direction[:, 0], direction[:, 1])
    pos = np.sort(np.asarray(origins) @ normal)
    gaps = np.diff(pos)
    step = float(np.median(gaps))
    if step <= 1e-6:
        raise InputError(folder, "DICOM series has slices at the same position (duplicate slices)")
    bad = np.flatnonzero(np.abs(gaps - step) > DICOM_GAP_TOL * step + 1e-3)
    if bad.size:
        k = int(bad[0])
        raise InputError(folder, f"DICOM series is incomplete or unevenly spaced: gap of {gaps[k]:.3g} mm "
                         f"between slices {k} and {k + 1} (at {pos[k]:.4g} and {pos[k + 1]:.4g} mm) "
                         f"where the series spacing is {step:.3g} mm")


def _check_all_parsed(folder: Path, series: list[tuple[str, ...]]) -> None:
    """Refuse a DICOM folder with a file that belongs to no series.

    GDCM silently leaves out a file it cannot parse. In the middle of a series that shows up as a
    gap (:func:`_dicom_positions`), but a corrupt first or last slice would just make the volume one
    slice shorter, so every file of the folder must be in some series (``DICOMDIR`` aside).

    Raises:
        InputError: naming the first such file.
    """
    parsed = {Path(f).resolve() for files in series for f in files}
    for f in sorted(folder.iterdir()):
        if (f.is_file() and not f.name.startswith(".") and f.suffix.lower() in DICOM_SUFFIXES
                and f.name.upper() != "DICOMDIR" and f.resolve() not in parsed):
            raise InputError(f, "DICOM file is corrupt or unreadable (GDCM finds no series in it)")


def _is_nifti_file(path: Path) -> bool:
    """A regular file named ``.nii`` / ``.nii.gz`` (case-insensitive): the files the NIfTI checks read."""
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def _load_nifti2(path: Path):
    """The nibabel image of a NIfTI-2 file (header only, data lazy), or None for anything else."""
    if not _is_nifti_file(path):
        return None
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception:
        return None  # SimpleITK's reader reports the problem
    return img if isinstance(img, nib.Nifti2Image) else None


def _nifti2_image(path: Path):
    """A NIfTI-2 file as a SimpleITK image (SimpleITK 2.5's reader does not know NIfTI-2), or None
    for anything else. nibabel's affine (sform when set, else qform; RAS) is converted to LPS."""
    img = _load_nifti2(path)
    if img is None:
        return None
    data = np.asanyarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"is a {data.ndim}D NIfTI-2 volume (shape {data.shape}); expected 3D")
    affine = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(img.affine, dtype=np.float64)[:3]  # RAS -> LPS
    spacing = np.linalg.norm(affine[:, :3], axis=0)
    if not np.all(spacing > 0):
        raise InputError(path, f"has a singular affine (voxel sizes {spacing.tolist()})")
    sitk = _sitk()
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    out.SetSpacing([float(v) for v in spacing])
    out.SetOrigin([float(v) for v in affine[:, 3]])
    out.SetDirection([float(v) for v in (affine[:, :3] / spacing).ravel()])
    return out


def _read_image(path: Path):
    sitk = _sitk()
    nifti2 = _nifti2_image(path)
    if nifti2 is not None:
        return nifti2
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        ids = reader.GetGDCMSeriesIDs(str(path))
        if not ids:
            raise InputError(path, "folder holds no DICOM series")
        series = [reader.GetGDCMSeriesFileNames(str(path), sid) for sid in ids]
        _check_all_parsed(path, series)
        # A folder may hold scouts or several reconstructions: take the series with most slices.
        files = max(series, key=len)
        _dicom_positions(path, list(files))
        reader.SetFileNames(files)
        return reader.Execute()
    return sitk.ReadImage(str(path))


def read_image_sitk(path: str | Path):
    """Read a NIfTI/MHA/NRRD file or DICOM series folder as a 3D SimpleITK image.

    Raises:
        InputError: missing, unreadable, corrupt, not 3D (4D / multi-component), zero-sized.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(path, "file is empty")
    check_nifti_header(path)
    try:
        img = _read_image(path)
    except InputError:
        raise
    except Exception as err:  # SimpleITK raises RuntimeError with a multi-line ITK dump
        first = str(err).strip().splitlines()
        reason = next((ln.strip() for ln in first if "rror" in ln or "annot" in ln), "")
        # "ITK ERROR: MetaImageIO(0x55d0c8a1b2c0): ..." -> "MetaImageIO: ..." (no object address)
        reason = re.sub(r"\(0x[0-9a-fA-F]+\)", "", reason.replace("ITK ERROR: ", ""))
        if path.is_file() and _is_gzip(path) and not path.name.lower().endswith(".gz"):
            reason = f"(the file is gzip-compressed: name it {path.name}.gz) {reason}"
        raise InputError(path, f"cannot read volume (corrupt or not a supported format) {reason}"
                         .rstrip()) from None
    sitk = _sitk()
    if "complex" in img.GetPixelIDTypeAsString():
        raise InputError(path, f"has complex voxels ({img.GetPixelIDTypeAsString()}); expected real CT "
                         "intensities or integer labels")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                         "expected a scalar 3D volume")
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        if size[3] != 1:
            raise InputError(path, f"is a 4D volume (size {tuple(size)}); expected 3D")
        img = sitk.Extract(img, size[:3] + [0], [0, 0, 0, 0])
    if img.GetDimension() != 3:
        raise InputError(path, f"is {img.GetDimension()}D; expected a 3D volume")
    if 0 in img.GetSize():
        raise InputError(path, f"has a zero-sized dimension (size {img.GetSize()})")
    check_spacing(path, img.GetSpacing())
    check_direction(path, img.GetDirection())
    return img


def check_finite_nifti(path: str | Path) -> None:
    """Reject float NIfTI files holding NaN/Inf.

    SimpleITK's NIfTI reader silently turns NaN into 0, so :func:`read_volume` calls this
    for float NIfTI files; nibabel reads the stored values. Integer files cannot hold NaN and are not decoded.

    Raises:
        InputError: naming the file, when it holds NaN/Inf voxels.
    """
    path = Path(path)
    if not _is_nifti_file(path):
        return
    nib = _quiet_nibabel()
    try:
        img = nib.load(str(path))
        if img.get_data_dtype().kind != "f":
            return
        data = np.asanyarray(img.dataobj)
    except Exception:
        return  # unreadable files are reported by the SimpleITK reader with a better message
    if not np.isfinite(data).all():
        raise InputError(path, f"contains {int((~np.isfinite(data)).sum())} NaN/Inf voxels")


def _quiet_nibabel():
    import logging

    import nibabel as nib

    # nibabel logs header fixes ("pixdim[1,2,3] should be non-zero; setting 0 dims to 1") to stderr;
    # the conditions are checked here and reported in the one error line.
    logging.getLogger("nibabel").setLevel(logging.ERROR)
    return nib


def _is_gzip(path: Path) -> bool:
    """Whether the file starts with the gzip magic bytes (whatever its name says): readers open
    ``.nii.gz`` files by their content, so the checks must too."""
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _nifti_header(path: Path, gz: bool):
    """The NIfTI-1 or NIfTI-2 header (with extensions) of ``path``, opened by content, not by name."""
    import gzip

    nib = _quiet_nibabel()
    with (gzip.open if gz else open)(path, "rb") as fh:
        first = fh.read(4)
        fh.seek(0)
        two = 540 in (int.from_bytes(first, "little"), int.from_bytes(first, "big"))
        return (nib.Nifti2Header if two else nib.Nifti1Header).from_fileobj(fh)


def _raw_pixdim(path: Path, gz: bool) -> tuple[float, float, float] | None:
    """pixdim[1..3] as stored in a NIfTI-1/2 header (None when the header cannot be parsed); ``gz``:
    the file is gzip-compressed (:func:`_is_gzip`)."""
    import gzip
    import struct

    try:
        opener = gzip.open if gz else open
        with opener(path, "rb") as fh:
            head = fh.read(540)
        for order in ("<", ">"):
            size = struct.unpack(order + "i", head[:4])[0]
            if size == 348:
                return struct.unpack(order + "3f", head[80:92])
            if size == 540:
                return struct.unpack(order + "3d", head[112:136])
    except (OSError, EOFError, struct.error):
        return None
    return None


def _check_qform_sform(path: Path, header) -> None:
    """Refuse a NIfTI whose qform and sform place the voxels differently.

    Readers choose between them differently: ITK (hence SimpleITK and this project) by the transform
    codes (with sform_code 2 it reads the qform, with 1 the sform), nibabel, FSL and most viewers the
    sform. A label map written from such a file lines up with its image in some tools and lies
    elsewhere in others (a file whose sform was shifted 30 mm, or sheared, was read by its qform
    without a word). Tolerance: 1e-3 of the smallest voxel size in position, 1e-4 in the
    direction/scale part (headers store float32).
    """
    try:
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        if qcode <= 0 or scode <= 0:
            return
        q, s = header.get_qform(), header.get_sform()
    except Exception:
        return  # an unreadable transform is SimpleITK's to report
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(s))):
        return
    zooms = np.abs(np.asarray(header.get_zooms()[:3], dtype=np.float64))
    step = float(zooms[zooms > 0].min()) if np.any(zooms > 0) else 1.0
    shift = float(np.abs(q[:3, 3] - s[:3, 3]).max())
    linear = float(np.abs(q[:3, :3] - s[:3, :3]).max() / max(np.abs(q[:3, :3]).max(), 1e-12))
    if shift > 1e-3 * step or linear > 1e-4:
        raise InputError(path, f"its qform and sform disagree (by {shift:.4g} mm in position, "
                         f"{linear:.2g} relative in orientation/spacing): tools choose between them "
                         "differently (ITK by their codes, most others the sform); make them agree, or set "
                         "the wrong one's code to 0, and rerun")


def check_nifti_header(path: str | Path) -> None:
    """Catch what SimpleITK's NIfTI reader lets through: zero-sized dimensions and truncated files.

    SimpleITK reads a header with ``dim[3] = 0`` as one slice and fills a truncated ``.nii.gz``
    with partial data. The header (read by nibabel, cheap) gives the data size; an uncompressed
    file must hold it, and a gzip stream's trailer records its uncompressed length (mod 2**32).

    Raises:
        InputError: naming the file.
    """
    path = Path(path)
    if not _is_nifti_file(path):
        return
    gz = _is_gzip(path)  # a plain file named .nii.gz is read as plain data (ITK looks at the bytes)
    try:
        header = _nifti_header(path, gz)
        shape = tuple(int(d) for d in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        # Writers (ITK among them) may leave vox_offset at 0; the data then follows the header,
        # the 4 extension-flag bytes and any extensions.
        after_header = int(header.sizeof_hdr) + 4 + int(header.extensions.get_sizeondisk())
        offsets = {int(header.get_data_offset()), after_header}
    except Exception:
        return  # not readable as NIfTI by nibabel: SimpleITK's reader reports it
    if any(d == 0 for d in shape):
        raise InputError(path, f"has a zero-sized dimension (NIfTI dim {shape})")
    # ITK's reader (and nibabel's header check) turn a zero or NaN pixdim into 1 mm: check the
    # header's own bytes.
    zooms = _raw_pixdim(path, gz)
    if zooms is not None and len(shape) >= 3:
        check_spacing(path, zooms)
    _check_qform_sform(path, header)
    nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
    expected = max(offsets) + nbytes
    if gz:
        with open(path, "rb") as fh:
            fh.seek(-4, 2)
            isize = int.from_bytes(fh.read(4), "little")
        if all(isize != (o + nbytes) % 2**32 for o in offsets):
            raise InputError(path, "is truncated or corrupt (the gzip stream does not hold the "
                             f"{expected} bytes its NIfTI header announces)")
    elif path.stat().st_size < min(offsets) + nbytes:
        raise InputError(path, f"is truncated ({path.stat().st_size} bytes; the NIfTI header "
                         f"announces {expected})")
