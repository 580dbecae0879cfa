"""Writing volumes: exact geometry, atomic and verified (:func:`write_volume`, re-exported by
:mod:`data.volume`)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data.readers import _sitk, check_direction, check_nifti_header, check_spacing
from utils.errors import InputError

if TYPE_CHECKING:
    from data.volume import Volume


def to_sitk(volume: Volume):
    """A SimpleITK image with the volume's values and exact geometry."""
    sitk = _sitk()
    img = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    img.SetSpacing(volume.geometry.spacing)
    img.SetOrigin(volume.geometry.origin)
    img.SetDirection(volume.geometry.direction)
    return img

@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Capture what C++ code writes to file descriptor 2 (ITK's NIfTI writer reports a short write
    there and returns normally). Yields a list that holds the captured lines afterwards."""
    lines: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (daemonised): nothing to capture
        yield lines
        return
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            lines.extend(ln for ln in buf.read().decode("utf-8", "replace").splitlines() if ln.strip())


def _verify_written(tmp: Path, volume: Volume, target: Path) -> None:
    """Read back the header of a freshly written volume: size, spacing and (NIfTI) data length."""
    sitk = _sitk()
    try:
        check_nifti_header(tmp)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(tmp))
        reader.ReadImageInformation()
        size = tuple(reader.GetSize()[:3])
    except InputError as err:
        raise InputError(target, f"written file failed verification ({err.problem}); the previous "
                         "file, if any, is unchanged") from None
    except Exception:
        raise InputError(target, "written file failed verification (header unreadable: disk full?); "
                         "the previous file, if any, is unchanged") from None
    if size != volume.geometry.size:
        raise InputError(target, f"written file failed verification (size {size} instead of "
                         f"{volume.geometry.size})")


# An .mhd header keeps its voxels in a separate file that ITK names after the temporary file being
# written: only the header would be renamed, and the orphaned data file is later cleaned up as stale.
MHD_OUTPUT = "cannot write .mhd (its voxels go to a separate file that cannot be replaced atomically); " \
    "name the output .mha (the same format in one file)"


def write_volume(volume: Volume, path: str | Path, compress: bool = True) -> None:
    """Write a volume with its exact geometry, atomically and verified (no partial file on failure).

    The temporary file's header is read back (and a NIfTI's data length checked) before it is
    renamed over ``path``; ITK's writer reports a full disk only on stderr, so anything it prints
    there also counts as a failure.

    Raises:
        InputError: when the output folder cannot be created or written, the disk is full, the
            volume's direction is not orthonormal (NIfTI would store a different grid), or ``path``
            is an ``.mhd`` header (see ``MHD_OUTPUT``).
    """
    from utils.fileio import atomic_path

    sitk = _sitk()
    path = Path(path)
    if path.name.lower().endswith(".mhd"):
        raise InputError(path, MHD_OUTPUT)
    check_direction(path, volume.geometry.direction)
    check_spacing(path, volume.geometry.spacing)
    img = to_sitk(volume)
    with atomic_path(path, verify=lambda tmp: _verify_written(tmp, volume, path)) as tmp:
        with _stderr_captured() as noise:
            try:
                sitk.WriteImage(img, str(tmp), compress)
            except RuntimeError as err:
                raise InputError(path, f"cannot write volume ({str(err).strip().splitlines()[-1]})") from None
        if any("rror" in ln or "fail" in ln.lower() or "short" in ln.lower() for ln in noise):
            first = next(ln for ln in noise if "rror" in ln or "fail" in ln.lower() or "short" in ln.lower())
            raise InputError(path, f"cannot write volume ({first.strip()[:200]}); the previous file, "
                             "if any, is unchanged")
