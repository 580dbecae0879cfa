"""Preprocess each volume once; training then slices memory-mapped ``.npy`` arrays.

Layout of one entry ``<cache_dir>/<dataset>/<case_id>-<key>/``::

    meta.json            case, key inputs, geometries, orientation, per-view shape + foreground slices
    image_axial.npy      float32 [nS, H, W]: window_hu(prepare_canonical(image)) (the canonical array)
    label_axial.npy      uint8   [nS, H, W]: config.map_labels(label) on the same grid (labeled cases)
    image_coronal.npy    ... other views, derived from the axial arrays with data.preprocess.view_stack

The key hashes the identity of the image and label files (resolved path, size, mtime, ctime and
inode number; for a DICOM folder those of each of its files), the preprocessing settings (HU window,
in-plane size and spacing mode, the dataset's file value -> class map) and :data:`CACHE_VERSION`.
Views are *not* part of the key: every view derives from the axial arrays, so a missing view is
added to an existing entry on demand instead of duplicating the entry. A new entry is built in a
temporary folder and renamed into place (atomic); views added later are written atomically under a
file lock.

An existing entry is reused only when it is whole: meta.json readable and of this version, and every
array it lists as long as its ``.npy`` header says (header, dtype and shape checked against meta.json;
the data itself is not read). Anything else (a truncated or damaged array, e.g. a copy cut short) is
stale and the entry is rebuilt before training. Damage that appears later, once training has
started, fails where the array is mapped with one line naming the file.

File identity, not content: hashing whole datasets on every run would cost more than building the
cache. Size and mtime alone missed a file rewritten at the same size whose mtime was put back
(``touch -r``, ``cp -p``, ``rsync -a`` from a backup): training silently used the old arrays. The
ctime cannot be set that way (any write, chmod, chown, link or timestamp change sets it to now) and a
replaced file has a new inode. The cost: a change of metadata alone (chmod, chown, ``touch`` even
with the same times) or a copy of the data folder (new inodes, new ctimes; a moved folder also has a
new path) rebuilds the entries of the files concerned once. Reading a file changes neither, so an
untouched dataset keeps its entries across runs. Shared file systems (NFS, Lustre) report the
server's inode numbers and ctimes, so the nodes of a multi-node run compute the same keys. Not so
for data staged to each node's local disk (``rsync -a``) with one shared ``--cache``: every node's
copy has its own inodes, so each node keys (and builds) its own entries; give each node its own
``--cache`` there, or read the data from the shared file system. FUSE mounts that invent inode
numbers per mount rebuild the cache on every run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data.config import IGNORE_INDEX, Config
from data.layout import Case
from data.preprocess import prepare_canonical, view_stack, window_hu
from data.volume import VIEWS, Geometry, Volume, match_grid, read_volume
from utils.errors import InputError, naming
from utils.fileio import apply_umask, atomic_path, part_name, write_failure, write_json_atomic

# 2: slices padded to the grid's aspect (data/inplane.py), no longer stretched
# 3: input identity adds ctime and inode number (per file for DICOM folders)
CACHE_VERSION = 3
# A slice counts as foreground when it holds at least this many labeled-organ voxels; a few stray
# voxels at an organ's tip make poor training centres.
FG_MIN_VOXELS = 16
# What each entry's arrays hold (_valid_entry checks the files against these).
_DTYPES = {"image": np.dtype(np.float32), "label": np.dtype(np.uint8)}


def _stat_identity(st: os.stat_result) -> dict[str, int]:
    # mtime can be put back (touch -r, cp -p, rsync -a); ctime cannot, and a replaced file has a new
    # inode (see the module docstring for what this costs)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _file_stamp(path: Path) -> dict[str, Any]:
    """Identity of a file (resolved path, size, mtime, ctime, inode), or of a DICOM folder: its path,
    file count and total size, and a digest of each file's name and identity (a folder of hundreds of
    slices would make meta.json long; one rewritten slice changes the digest)."""
    p = path.resolve()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        per_file = [[f.name, _stat_identity(f.stat())] for f in files]
        digest = hashlib.sha256(json.dumps(per_file, sort_keys=True).encode()).hexdigest()[:16]
        return {"path": str(p), "files": len(files), "size": sum(st["size"] for _, st in per_file),
                "files_digest": digest}
    return {"path": str(p), **_stat_identity(p.stat())}


def cache_key_inputs(case: Case, config: Config) -> dict[str, Any]:
    """Everything a cache entry depends on (hashed into its key).

    Raises:
        InputError: image or label missing.
    """
    for p in (case.image, case.label):
        if p is not None and not p.exists():
            raise InputError(p, "file does not exist")
    spec = config.dataset(case.dataset)
    lut = config.label_lut(spec)
    return {
        "version": CACHE_VERSION,
        "image": _file_stamp(case.image),
        "label": _file_stamp(case.label) if case.label is not None else None,
        "hu_window": [float(v) for v in config.hu_window],
        "inplane_size": [int(v) for v in config.inplane_size],
        "inplane_spacing": config.inplane_spacing,
        "label_map": {str(v): int(lut[v]) for v in sorted(spec.labels)},
        "other_background": spec.other_background,
    }


def _digest(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def cache_key(case: Case, config: Config) -> str:
    """Hex digest (16 characters) of :func:`cache_key_inputs`."""
    return _digest(cache_key_inputs(case, config))


def _geo_dict(g: Geometry) -> dict[str, Any]:
    return {"shape": list(g.shape), "spacing": list(g.spacing), "origin": list(g.origin),
            "direction": list(g.direction)}


def foreground_slices(label_stack: np.ndarray, min_voxels: int = FG_MIN_VOXELS) -> np.ndarray:
    """Indices (axis 0) of slices with at least ``min_voxels`` voxels of a class > 0 (not IGNORE_INDEX)."""
    fg = (label_stack > 0) & (label_stack != IGNORE_INDEX)
    counts = fg.reshape(fg.shape[0], -1).sum(axis=1)
    return np.flatnonzero(counts >= min_voxels).astype(np.int64)


def _open_npy(path: Path) -> np.ndarray:
    """``path`` memory-mapped read-only as a plain ndarray; a damaged file is an InputError.

    Entries are checked before training (:func:`_valid_entry`), so this only fails for a file
    damaged since then, possibly in a loader worker: one line naming the file, not a traceback.
    """
    try:
        # a plain ndarray over the map: every slice of an np.memmap runs two Python methods
        # (__getitem__, __array_finalize__), ~5 us of each 2.5D sample's ~45 us
        return np.load(path, mmap_mode="r").view(np.ndarray)
    except (OSError, ValueError) as err:
        raise InputError(path, f"cache file is truncated or damaged ({err}); "
                         "a rerun rebuilds its entry") from None


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    # Several DataLoader workers or DDP ranks may add the same view at once.
    with open(folder / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class CachedVolume:
    """One cache entry: metadata plus lazily opened read-only memory maps per view.

    Pickles without its open memory maps, so DataLoader workers reopen them cheaply.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            raise InputError(meta_path, "cache entry is missing or unreadable") from None
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "meta": self.meta, "_arrays": {}}

    def __repr__(self) -> str:
        return f"CachedVolume({self.dataset}/{self.case_id}, views={sorted(self.views)})"

    @property
    def case(self) -> Case:
        c = self.meta["case"]
        return Case(c["dataset"], c["case_id"], Path(c["image"]),
                    Path(c["label"]) if c["label"] else None, c["split"])

    @property
    def dataset(self) -> str:
        return self.meta["case"]["dataset"]

    @property
    def case_id(self) -> str:
        return self.meta["case"]["case_id"]

    @property
    def has_label(self) -> bool:
        return bool(self.meta["has_label"])

    @property
    def views(self) -> dict[str, Any]:
        return self.meta["views"]

    @property
    def canonical_geometry(self) -> Geometry:
        g = self.meta["canonical_geometry"]
        return Geometry(tuple(g["shape"]), tuple(g["spacing"]), tuple(g["origin"]), tuple(g["direction"]))

    def _array(self, kind: str, view: str) -> np.ndarray:
        name = f"{kind}_{view}"
        arr = self._arrays.get(name)
        if arr is None:
            if view not in self.meta["views"]:
                self.ensure_view(view)
            arr = _open_npy(self.folder / f"{name}.npy")
            self._arrays[name] = arr
        return arr

    def image(self, view: str = "axial") -> np.ndarray:
        """Windowed image ``(n, H, W)`` float32 of ``view``, memory-mapped, read-only (built on first
        use)."""
        return self._array("image", view)

    def label(self, view: str = "axial") -> np.ndarray | None:
        """Class map ``(n, H, W)`` uint8 of ``view``, memory-mapped, read-only; None for unlabeled
        cases."""
        return self._array("label", view) if self.has_label else None

    def foreground(self, view: str = "axial") -> np.ndarray:
        """Indices of ``view``'s slices with labeled organs (empty for unlabeled cases)."""
        if view not in self.meta["views"]:
            self.ensure_view(view)
        return np.asarray(self.meta["views"][view]["foreground"], dtype=np.int64)

    def ensure_view(self, view: str) -> None:
        """Add ``view``'s arrays to this entry if missing (derived from the axial arrays)."""
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        if view in self.meta["views"]:
            return
        with _locked(self.folder):
            self.meta = json.loads((self.folder / "meta.json").read_text())
            if view in self.meta["views"]:
                return
            spacing = self.meta["canonical_geometry"]["spacing"]
            image = view_stack(_open_npy(self.folder / "image_axial.npy"), spacing, view,
                               is_label=False)
            _save_npy(self.folder / f"image_{view}.npy", image)
            info: dict[str, Any] = {"shape": list(image.shape), "foreground": []}
            if self.has_label:
                label = view_stack(_open_npy(self.folder / "label_axial.npy"), spacing,
                                   view, is_label=True)
                _save_npy(self.folder / f"label_{view}.npy", label)
                info["foreground"] = foreground_slices(label).tolist()
            self.meta["views"][view] = info
            write_json_atomic(self.folder / "meta.json", self.meta)


def _build_entry(case: Case, config: Config, key_inputs: dict[str, Any], target: Path) -> None:
    """Read, preprocess and write one entry into a temp folder, then rename it to ``target``."""
    image_vol = read_volume(case.image)
    label_vol = None
    if case.label is not None:
        label_vol = read_volume(case.label)
        # The same voxels in another index order (flipped / permuted axes) are reoriented exactly.
        matched = match_grid(label_vol, image_vol.geometry)
        if matched is None:
            raise InputError(case.label, f"label grid ({label_vol.geometry.describe()}) does not match "
                             f"image {case.image} ({image_vol.geometry.describe()})")
        label_vol = matched
    with naming(case.image):
        canon, orientation = prepare_canonical(image_vol, config.inplane_size, is_label=False,
                                               spacing_mm=config.inplane_spacing)
    image = window_hu(canon.array, config.hu_window)
    meta: dict[str, Any] = {
        "format": "unimos-cache",
        "version": CACHE_VERSION,
        "case": {"dataset": case.dataset, "case_id": case.case_id, "image": str(case.image),
                 "label": str(case.label) if case.label is not None else None, "split": case.split},
        "key_inputs": key_inputs,
        "has_label": label_vol is not None,
        "source_geometry": _geo_dict(image_vol.geometry),
        "canonical_geometry": _geo_dict(canon.geometry),
        "orientation": {"perm": list(orientation.perm), "flip": list(orientation.flip)},
        "views": {"axial": {"shape": list(image.shape), "foreground": []}},
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # The host/pid in the name lets a later run remove this folder if this one is killed.
        tmp = Path(tempfile.mkdtemp(prefix=part_name(target, ""), suffix=".part", dir=target.parent))
    except OSError as err:
        raise write_failure(target.parent, err) from None
    apply_umask(tmp, folder=True)  # mkdtemp makes it 0700: collaborators could not read the cache
    try:
        _write_entry_files(tmp, target, image, label_vol, case, config, meta)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def organ_kept(source: np.ndarray, source_spacing: Sequence[float], cached: np.ndarray,
               cached_spacing: Sequence[float], organs: Sequence[str]) -> dict[str, float]:
    """The fraction of each labeled organ's volume (mm³) that the in-plane preprocessing kept.

    About 1 normally (nearest-neighbour resampling moves boundaries by a voxel at most); well below
    1 when ``--spacing`` or ``--inplane`` crop the organ out of the grid (a reviewer trained and
    validated on grids that held no liver without a word). Organs the source does not label are
    left out.
    """
    n = len(organs) + 1
    src = np.bincount(source.ravel(), minlength=n)[1:n] * float(np.prod(source_spacing))
    dst = np.bincount(cached.ravel(), minlength=n)[1:n] * float(np.prod(cached_spacing))
    return {organ: round(float(d / s_), 4) for organ, s_, d in zip(organs, src, dst) if s_ > 0}


def _write_entry_files(tmp: Path, target: Path, image: np.ndarray, label_vol: Volume | None, case: Case,
                       config: Config, meta: dict[str, Any]) -> None:
    try:
        np.save(tmp / "image_axial.npy", image)
        if label_vol is not None:
            spec = config.dataset(case.dataset)
            classes = config.map_labels(spec, label_vol.array, case.label)
            # Map on the source grid (nearest neighbour commutes with the value map).
            label_canon, _ = prepare_canonical(label_vol.with_array(classes), config.inplane_size,
                                               is_label=True, spacing_mm=config.inplane_spacing)
            np.save(tmp / "label_axial.npy", label_canon.array)
            meta["views"]["axial"]["foreground"] = foreground_slices(label_canon.array).tolist()
            meta["organ_kept"] = organ_kept(classes, label_vol.geometry.spacing, label_canon.array,
                                            label_canon.geometry.spacing, config.organs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        expected = {"image_axial.npy": image.nbytes}
        for name, nbytes in expected.items():  # a short write leaves less than the array's bytes
            if (tmp / name).stat().st_size < nbytes:
                raise InputError(target, f"cannot write cache entry ({name} is short: disk full?)")
    except (OSError, RuntimeError) as err:
        raise write_failure(target, err) from None
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "meta.json").is_file():
            raise
        # Another process built the same entry first: identical content, keep theirs.


def entry_folder(case: Case, config: Config, cache_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """Where ``case``'s entry lives and the key inputs it was (or will be) built from."""
    inputs = cache_key_inputs(case, config)
    return Path(cache_dir) / case.dataset / f"{case.case_id}-{_digest(inputs)}", inputs


def _npy_complete(path: Path, shape: Sequence[int], dtype: np.dtype) -> bool:
    """Whether ``path`` is a whole ``.npy`` of ``shape`` and ``dtype``: its header announces them and
    the file is exactly as long as header plus data. Reads the header only (about 128 bytes), so
    checking every entry before training stays cheap; a truncated file would otherwise fail when it
    is memory-mapped, possibly inside a loader worker."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as fh:
            read = readers.get(np.lib.format.read_magic(fh))
            if read is None:  # np.save writes 1.0 (2.0 for huge headers); anything else is not ours
                return False
            file_shape, fortran, file_dtype = read(fh)
            data_start = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except (OSError, ValueError):  # missing, unreadable, or a damaged header
        return False
    if fortran or file_dtype != dtype or list(file_shape) != [int(n) for n in shape]:
        return False
    return size == data_start + file_dtype.itemsize * int(np.prod(file_shape, dtype=np.int64))


def _valid_entry(folder: Path) -> bool:
    """Whether ``folder`` is a complete entry of this :data:`CACHE_VERSION`: a readable meta.json and,
    for every view it lists, arrays whose headers and file sizes match (see :func:`_npy_complete`)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or "axial" not in meta["views"]:
            return False
        kinds = [("image", _DTYPES["image"])] + ([("label", _DTYPES["label"])] if meta["has_label"] else [])
        return all(_npy_complete(folder / f"{kind}_{view}.npy", info["shape"], dtype)
                   for view, info in meta["views"].items() for kind, dtype in kinds)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing or malformed meta.json
        return False


def cache_one(case: Case, config: Config, cache_dir: str | Path,
              views: Sequence[str] = ("axial",)) -> CachedVolume:
    """Build (or reuse) one case's entry and make sure ``views`` exist.

    Raises:
        InputError: unreadable volume, undeclared label values (naming the label file), image/label
            grid mismatch (naming both files).
    """
    folder, inputs = entry_folder(case, config, cache_dir)
    if not _valid_entry(folder):
        if folder.exists():
            # stale or damaged (an older version, a truncated array): rebuilt from the inputs
            shutil.rmtree(folder, ignore_errors=True)
        _build_entry(case, config, inputs, folder)
    vol = CachedVolume(folder)
    for view in views:
        vol.ensure_view(view)
    return vol


def _cache_one_path(case: Case, config: Config, cache_dir: str, views: tuple[str, ...]) -> str:
    return str(cache_one(case, config, cache_dir, views).folder)


def build_cache(cases: Sequence[Case], config: Config, cache_dir: str | Path,
                views: Sequence[str] = ("axial",), workers: int = 0,
                progress: bool = True) -> list[CachedVolume]:
    """Preprocess ``cases`` into ``cache_dir`` once and return their entries (in the order given).

    Args:
        cases: from :func:`data.layout.discover`.
        config: HU window, in-plane size, label maps.
        cache_dir: cache root (created).
        views: views to have ready (others are added on first use).
        workers: processes for building (0 or 1: in this process).
        progress: show a progress bar on stderr.

    Returns:
        One :class:`CachedVolume` per case.

    Raises:
        InputError: see :func:`cache_one`.
    """
    for v in views:
        if v not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {v!r}")
    views = tuple(views)
    cache_dir = Path(cache_dir)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), desc="cache", unit="vol", leave=False)
    try:
        if workers <= 1 or len(cases) <= 1:
            out = []
            for c in cases:
                out.append(cache_one(c, config, cache_dir, views))
                if bar is not None:
                    bar.update()
            return out
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_cache_one_path, c, config, str(cache_dir), views) for c in cases]
            folders = []
            for f in futures:
                folders.append(f.result())
                if bar is not None:
                    bar.update()
        return [CachedVolume(f) for f in folders]
    finally:
        if bar is not None:
            bar.close()


__all__ = ["CACHE_VERSION", "CachedVolume", "FG_MIN_VOXELS", "build_cache", "cache_key", "cache_one",
           "foreground_slices"]
