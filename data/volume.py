"""Volumes with their geometry, read and written without losing a voxel of alignment.

Axis-order contract (used everywhere in UniMOS)
-----------------------------------------------
* ``Volume.array`` is a numpy array indexed ``[k, j, i]`` -- SimpleITK's numpy order, the reverse of
  the ITK/NIfTI index ``(i, j, k)``.
* ``Geometry.spacing`` and ``Geometry.origin`` are in ITK order ``(x, y, z)`` = index axes
  ``(i, j, k)``, in millimetres, in ITK's LPS world frame. ``Geometry.direction`` is the row-major
  3x3 matrix whose *columns* are the world directions of the index axes ``i, j, k``.
* The *canonical* orientation is ITK "LPS": index ``i`` runs towards the patient's left, ``j``
  towards posterior, ``k`` towards superior. A canonical array is therefore ``[S, P, L]``-ordered:
  axis 0 is the slice (superior-inferior) axis, and

  - axial slices are ``array[z]``       (view ``axial``, slice axis 0),
  - coronal slices are ``array[:, y]``  (view ``coronal``, slice axis 1),
  - sagittal slices are ``array[:, :, x]`` (view ``sagittal``, slice axis 2).

  :func:`to_canonical` brings any volume there by an axis permutation and flips only (no
  interpolation), and :class:`Orientation` maps predictions back exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.readers import (  # noqa: F401 -- re-exported: callers import them from data.volume
    DICOM_GAP_TOL,
    DICOM_SUFFIXES,
    DIRECTION_TOL,
    NIFTI_SUFFIXES,
    _load_nifti2,
    _sitk,
    check_direction,
    check_finite_nifti,
    check_nifti_header,
    check_spacing,
    read_image_sitk,
)
from data.volume_writer import to_sitk, write_volume  # noqa: F401 -- re-exported
from utils.errors import InputError

VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".mha", ".mhd", ".nrrd")
VIEWS = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in the world (ITK conventions, LPS, millimetres).

    Attributes:
        shape: array shape ``(nk, nj, ni)`` (numpy order).
        spacing: voxel size along index axes ``(i, j, k)``.
        origin: world position of voxel ``(0, 0, 0)``.
        direction: row-major 3x3; column ``a`` is the world direction of index axis ``a``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def size(self) -> tuple[int, int, int]:
        """Grid size in ITK index order ``(ni, nj, nk)``."""
        return (self.shape[2], self.shape[1], self.shape[0])

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """World coordinates of continuous ITK indices ``(..., 3)`` in ``(i, j, k)`` order."""
        index = np.asarray(index, dtype=np.float64)
        return np.asarray(self.origin) + (index * np.asarray(self.spacing)) @ self.direction_matrix.T

    def same_grid(self, other: Geometry, tol: float = 1e-4) -> bool:
        """True when both grids coincide: shape exact; spacing and direction within ``tol``; origins
        within ``100 * tol`` of a voxel along each index axis (a hundredth of a voxel by default),
        plus the float32 rounding of a header's position (1e-6 of its distance from the world origin).

        The origin tolerance is in voxels of each axis, not relative to the position: relative to it,
        two label maps 1e6 mm from the world origin matched 50 mm apart, and at a scanner's usual
        -1500 mm a 0.14 mm shift passed. Per axis, so that 5 mm slices allow 0.05 mm along them (a
        label written by another tool from the same series) while 0.7 mm pixels allow 0.007 mm.
        """
        if self.shape != other.shape:
            return False
        if not (np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol)
                and np.allclose(self.direction, other.direction, atol=tol)):
            return False
        a, b = np.asarray(self.origin, dtype=np.float64), np.asarray(other.origin, dtype=np.float64)
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)  # column j: index axis j
        along = np.abs(d.T @ (a - b))  # the shift in mm along each index axis
        spacing = np.abs(np.asarray(self.spacing, dtype=np.float64))
        bound = 100 * tol * spacing + 1e-6 * max(np.linalg.norm(a), np.linalg.norm(b))
        return bool(np.all(along <= bound))

    def describe(self) -> str:
        sp = ", ".join(f"{s:.4g}" for s in self.spacing)
        org = ", ".join(f"{o:.4g}" for o in self.origin)
        return f"shape {self.shape} spacing ({sp}) origin ({org})"


@dataclass(frozen=True)
class Volume:
    """A 3D array together with its geometry. See the module docstring for the axis contract."""

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"Volume needs a 3D array, got shape {self.array.shape}")
        if tuple(self.array.shape) != tuple(self.geometry.shape):
            raise ValueError(f"array shape {self.array.shape} != geometry shape {self.geometry.shape}")

    def with_array(self, array: np.ndarray) -> Volume:
        """Same grid, new voxel values (shape must match)."""
        return Volume(array, self.geometry)


# ----------------------------------------------------------------------------------------------
# Orientation: permutations and flips only, so canonical <-> original is lossless.


@dataclass(frozen=True)
class Orientation:
    """How an original grid maps to the canonical LPS grid.

    Attributes:
        perm: ``perm[c]`` is the original ITK index axis that becomes canonical index axis ``c``.
        flip: ``flip[c]`` is True when canonical axis ``c`` runs against the original axis.
    """

    perm: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    def _numpy_axes(self) -> list[int]:
        # canonical numpy axis n is canonical index axis 2-n, i.e. original index axis perm[2-n],
        # which is original numpy axis 2-perm[2-n].
        return [2 - self.perm[2 - n] for n in range(3)]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Original-order array (last three axes) -> canonical order. Returns a view when possible."""
        lead = array.ndim - 3
        axes = list(range(lead)) + [lead + a for a in self._numpy_axes()]
        out = np.transpose(array, axes)
        flip_axes = tuple(lead + 2 - c for c in range(3) if self.flip[c])
        return np.flip(out, flip_axes) if flip_axes else out

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Canonical-order array (last three axes) -> original order."""
        lead = array.ndim - 3
        flip_axes = tuple(lead + 2 - c for c in range(3) if self.flip[c])
        if flip_axes:
            array = np.flip(array, flip_axes)
        fwd = self._numpy_axes()
        inv = [0, 0, 0]
        for n, a in enumerate(fwd):
            inv[a] = n
        return np.transpose(array, list(range(lead)) + [lead + a for a in inv])


def orientation_of(direction: np.ndarray | tuple[float, ...]) -> Orientation:
    """Find the permutation/flips that bring index axes closest to L, P, S (works for oblique grids).

    Each world axis takes the index axis with the largest absolute cosine, greedily from the most
    certain pair, so an oblique grid still gets a proper permutation.
    """
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    weights = np.abs(d).copy()
    perm = [-1, -1, -1]
    for _ in range(3):
        w, a = np.unravel_index(np.argmax(weights), weights.shape)
        perm[w] = int(a)
        weights[w, :] = -1.0
        weights[:, a] = -1.0
    flip = tuple(bool(d[w, perm[w]] < 0) for w in range(3))
    return Orientation(tuple(perm), flip)  # type: ignore[arg-type]


def slice_axis_index(geometry: Geometry) -> int:
    """The ITK index axis (0=i, 1=j, 2=k) closest to the patient's superior-inferior direction."""
    return orientation_of(geometry.direction).perm[2]


def canonical_geometry(geometry: Geometry) -> tuple[Geometry, Orientation]:
    """The geometry :func:`to_canonical` gives a volume of this geometry (no array needed)."""
    ori = orientation_of(geometry.direction)
    d = geometry.direction_matrix
    size = geometry.size
    spacing = tuple(float(geometry.spacing[ori.perm[c]]) for c in range(3))
    new_d = np.zeros((3, 3))
    start = np.zeros(3)
    for c in range(3):
        a = ori.perm[c]
        new_d[:, c] = -d[:, a] if ori.flip[c] else d[:, a]
        if ori.flip[c]:
            start[a] = size[a] - 1
    origin = geometry.index_to_world(start)
    csize = [size[ori.perm[c]] for c in range(3)]
    return Geometry(
        shape=(int(csize[2]), int(csize[1]), int(csize[0])),
        spacing=spacing,  # type: ignore[arg-type]
        origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in new_d.ravel()),
    ), ori


def to_canonical(volume: Volume) -> tuple[Volume, Orientation]:
    """Reorient a volume to canonical LPS (see module docstring) without interpolation.

    Returns:
        The canonical volume (contiguous array, geometry describing the same physical voxels) and
        the :class:`Orientation` whose ``invert`` maps canonical arrays back to the input's order.
    """
    geo, ori = canonical_geometry(volume.geometry)
    array = np.ascontiguousarray(ori.apply(volume.array))
    if tuple(array.shape) != geo.shape:
        raise AssertionError(f"canonical shape {array.shape} != {geo.shape}")  # a bug, not bad input
    return Volume(array, geo), ori


def match_grid(volume: Volume, target: Geometry, tol: float = 1e-4) -> Volume | None:
    """``volume`` on ``target``'s grid when both are the same physical voxels in another index order
    (axis permutation / flips, e.g. a dcm2niix-style label of a DICOM series), else None.

    Exact: the array is only transposed and flipped, never interpolated.
    """
    if volume.geometry.same_grid(target, tol):
        return volume
    canon, _ = to_canonical(volume)
    target_canon, target_ori = canonical_geometry(target)
    if not canon.geometry.same_grid(target_canon, tol):
        return None
    return Volume(np.ascontiguousarray(target_ori.invert(canon.array)), target)


def same_physical_grid(a: Geometry, b: Geometry, tol: float = 1e-4) -> bool:
    """True when two geometries hold the same voxels, possibly in another index order."""
    return canonical_geometry(a)[0].same_grid(canonical_geometry(b)[0], tol)


def to_storage(volume: Volume, target: Orientation | Sequence[float]) -> Volume:
    """The inverse of :func:`to_canonical`: store a canonical volume in another axis order / flips.

    Args:
        volume: a canonical volume (as :func:`to_canonical` returns, any direction close to LPS).
        target: the :class:`Orientation` that :func:`to_canonical` returned for the original grid,
            or a direction matrix (row-major signed permutation; ``volume`` must then have the
            identity direction, as the phantom generator's volumes have).

    Returns:
        The same physical voxels in the target order, with matching spacing, origin and direction, so
        that :func:`to_canonical` gives ``volume`` back exactly.

    Raises:
        ValueError: a direction that is not a signed permutation, or a non-identity ``volume``
            direction with one.
    """
    geo = volume.geometry
    if isinstance(target, Orientation):
        ori = target
    else:
        d = np.asarray(target, dtype=np.float64).reshape(3, 3)
        if not (np.allclose(np.abs(d).sum(axis=0), 1) and np.allclose(np.abs(d).sum(axis=1), 1)
                and set(np.unique(np.abs(d))) <= {0.0, 1.0}):
            raise ValueError(f"direction {tuple(target)} is not a signed permutation")
        if not np.allclose(geo.direction_matrix, np.eye(3)):
            raise ValueError("to_storage with a direction expects a canonical (identity-direction) volume")
        ori = orientation_of(d)
    cd = geo.direction_matrix
    csize = geo.size
    start = np.array([csize[c] - 1 if ori.flip[c] else 0 for c in range(3)], dtype=np.float64)
    origin = geo.index_to_world(start)
    spacing = [0.0, 0.0, 0.0]
    new_d = np.zeros((3, 3))
    for c in range(3):
        spacing[ori.perm[c]] = float(geo.spacing[c])
        new_d[:, ori.perm[c]] = -cd[:, c] if ori.flip[c] else cd[:, c]
    view = ori.invert(volume.array)
    # Copy in slabs: a permuted copy of a whole volume at once thrashes the cache (3x slower).
    array = np.empty(view.shape, dtype=view.dtype)
    for j in range(0, view.shape[1], 16):
        array[:, j:j + 16] = view[:, j:j + 16]
    return Volume(array, Geometry(shape=tuple(int(v) for v in array.shape),  # type: ignore[arg-type]
                                  spacing=tuple(spacing),  # type: ignore[arg-type]
                                  origin=tuple(float(o) for o in origin),  # type: ignore[arg-type]
                                  direction=tuple(float(v) for v in new_d.ravel())))


# ----------------------------------------------------------------------------------------------
# Reading and writing


def strip_volume_suffix(name: str) -> str:
    """``case_001.nii.gz`` -> ``case_001``."""
    lower = name.lower()
    for suf in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suf):
            return name[: -len(suf)]
    return name


def is_dicom_dir(path: str | Path) -> bool:
    """The one rule for "this folder is a DICOM series" (layout discovery, resample.py, segment.py,
    evaluate.py): at least one non-hidden file, and every one named like DICOM (no suffix, ``.dcm``,
    ``.ima``). No header is parsed, so discovery stays cheap; a folder that passes but holds no
    readable series stops with one line when it is read (:func:`read_volume`)."""
    path = Path(path)
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(p.suffix.lower() in DICOM_SUFFIXES for p in files)


def output_name(name: str) -> str:
    """The file name a volume named ``name`` is written under (resample.py, segment.py).

    A ``.mhd`` header points at a separate ``.raw`` file that an atomic rename would orphan, so
    ``.mhd`` becomes ``.mha``; other names are kept.
    """
    return name[:-4] + ".mha" if name.lower().endswith(".mhd") else name


def _geometry_of(img) -> Geometry:
    size = img.GetSize()
    return Geometry(
        shape=(int(size[2]), int(size[1]), int(size[0])),
        spacing=tuple(float(s) for s in img.GetSpacing()),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in img.GetOrigin()),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in img.GetDirection()),
    )


def read_volume(path: str | Path, check_finite: bool = True) -> Volume:
    """Read a volume (NIfTI, MHA/NRRD or DICOM series folder) with its geometry, dtype kept.

    Raises:
        InputError: see :func:`read_image_sitk`; also NaN/Inf voxels when ``check_finite``.
    """
    sitk = _sitk()
    img = read_image_sitk(path)
    array = sitk.GetArrayFromImage(img)
    if check_finite and array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InputError(path, f"contains {int((~np.isfinite(array)).sum())} NaN/Inf voxels")
        check_finite_nifti(path)
    geo = _geometry_of(img)
    if any(not math.isfinite(s) or s <= 0 for s in geo.spacing):
        raise InputError(path, f"has invalid voxel spacing {geo.spacing}")
    return Volume(array, geo)


def read_geometry(path: str | Path) -> Geometry:
    """Read only the header geometry of a volume file (cheap for NIfTI)."""
    sitk = _sitk()
    path = Path(path)
    if path.is_dir() or _load_nifti2(path) is not None:  # DICOM series, NIfTI-2: read it all
        return _geometry_of(read_image_sitk(path))
    if not path.exists():
        raise InputError(path, "file does not exist")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception:
        raise InputError(path, "cannot read volume header (corrupt or not a supported format)") from None
    if reader.GetDimension() != 3 and not (reader.GetDimension() == 4 and reader.GetSize()[3] == 1):
        raise InputError(path, f"is {reader.GetDimension()}D (size {reader.GetSize()}); expected 3D")
    size = reader.GetSize()[:3]
    direction = reader.GetDirection()
    if len(direction) == 16:
        direction = tuple(direction[r * 4 + c] for r in range(3) for c in range(3))
    check_nifti_header(path)
    check_spacing(path, reader.GetSpacing()[:3])
    check_direction(path, direction)
    return Geometry(
        shape=(int(size[2]), int(size[1]), int(size[0])),
        spacing=tuple(float(s) for s in reader.GetSpacing()[:3]),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in reader.GetOrigin()[:3]),  # type: ignore[arg-type]
        direction=tuple(float(v) for v in direction),
    )



def from_sitk(img) -> Volume:
    """Inverse of :func:`to_sitk`."""
    return Volume(_sitk().GetArrayFromImage(img), _geometry_of(img))
