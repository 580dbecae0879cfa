"""Seeded synthetic volumes and small datasets for tests (independent of data/phantom.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.volume import Geometry, Volume, write_volume


def random_direction(rng: np.random.Generator, oblique: bool = False) -> tuple[float, ...]:
    """A random axis permutation with random flips, optionally rotated by a few degrees.

    Returns:
        Row-major 3x3 direction (columns = world directions of index axes), determinant +-1.
    """
    perm = rng.permutation(3)
    d = np.zeros((3, 3))
    for col, row in enumerate(perm):
        d[row, col] = rng.choice([-1.0, 1.0])
    if oblique:
        # Small rotation: the closest anatomical axes stay unambiguous.
        ax, ay = np.deg2rad(rng.uniform(5, 15, size=2))
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        d = rx @ ry @ d
    return tuple(float(v) for v in d.ravel())


def random_volume(tmp_path: str | Path, name: str, shape: tuple[int, int, int] = (6, 7, 8),
                  spacing: tuple[float, float, float] | None = None,
                  direction: tuple[float, ...] | None = None, dtype=np.int16, seed: int = 0,
                  origin: tuple[float, float, float] | None = None) -> Path:
    """Write a seeded random volume; random spacing/origin/orientation unless given.

    Args:
        tmp_path: folder to write into.
        name: file name with its suffix (``a.nii.gz``, ``b.mha``).
        shape: numpy shape ``(nk, nj, ni)``.
        spacing / direction / origin: ITK-order geometry; None draws a random one.
        dtype: voxel type; integers span a CT-like range, uint8 0..255, floats N(0, 100).
        seed: random seed.

    Returns:
        The written path.
    """
    rng = np.random.default_rng(seed)
    if spacing is None:
        spacing = tuple(float(s) for s in rng.uniform(0.5, 3.0, size=3))
    if direction is None:
        direction = random_direction(rng)
    if origin is None:
        origin = tuple(float(o) for o in rng.uniform(-100, 100, size=3))
    dt = np.dtype(dtype)
    if dt == np.uint8:
        array = rng.integers(0, 256, size=shape).astype(dt)
    elif dt.kind in "iu":
        lo = max(-1024, int(np.iinfo(dt).min))
        array = rng.integers(lo, 2000, size=shape).astype(dt)
    else:
        array = (rng.normal(0, 100, size=shape)).astype(dt)
    path = Path(tmp_path) / name
    geo = Geometry(tuple(int(s) for s in shape), spacing, origin, direction)  # type: ignore[arg-type]
    write_volume(Volume(array, geo), path)
    return path


def phantom_pair(shape: tuple[int, int, int], label_value: int = 1, seed: int = 0,
                 fg_slices: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 image and a label map with a box organ of ``label_value``.

    Args:
        shape: numpy shape ``(nk, nj, ni)``.
        label_value: file value of the organ.
        seed: random seed.
        fg_slices: ``(first, last)`` slice range (inclusive) holding the organ; default the middle third.

    Returns:
        ``(image int16, label uint8)``.
    """
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    image = rng.normal(-800, 50, size=shape).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    k0, k1 = fg_slices if fg_slices is not None else (nk // 3, max(nk // 3, 2 * nk // 3 - 1))
    j0, i0 = nj // 4, ni // 4
    label[k0:k1 + 1, j0:j0 + nj // 2, i0:i0 + ni // 2] = label_value
    image[label > 0] = (rng.normal(60, 10, size=int((label > 0).sum()))).astype(np.int16)
    return image, label


def write_seed_dataset(root: str | Path, name: str, n_labeled: int = 2, n_unlabeled: int = 1,
                       n_val: int = 1, shape: tuple[int, int, int] = (8, 32, 32),
                       image_token: str | None = None, label_token: str | None = None,
                       label_value: int = 1, spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
                       seed: int = 0, suffix: str = ".nii.gz") -> Path:
    """Write a small seed-layout dataset: ``<root>/<name>/{labeled,unlabeled,validation,label}``.

    Image ``<image_token>_NNN`` pairs with label ``<label_token>_NNN`` (tokens None: ``case_NNN`` for
    both). Labeled cases come first, then validation, then unlabeled, numbered consecutively.

    Returns:
        The dataset folder.
    """
    folder = Path(root) / name
    geo_kw = dict(spacing=spacing, origin=(0.0, 0.0, 0.0))
    img_stem = image_token or "case"
    lab_stem = label_token or "case"
    plan = [("labeled", n_labeled), ("validation", n_val), ("unlabeled", n_unlabeled)]
    idx = 0
    for split, n in plan:
        (folder / split).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            image, label = phantom_pair(shape, label_value, seed=seed * 1000 + idx)
            geo = Geometry(shape, **geo_kw)  # type: ignore[arg-type]
            write_volume(Volume(image, geo), folder / split / f"{img_stem}_{idx:03d}{suffix}")
            if split != "unlabeled":
                write_volume(Volume(label, geo), folder / "label" / f"{lab_stem}_{idx:03d}{suffix}")
            idx += 1
    (folder / "label").mkdir(parents=True, exist_ok=True)
    return folder


def write_dicom_series(folder: str | Path, volume: Volume) -> Path:
    """Write ``volume`` (integer voxels) as a DICOM series, one file per ``k`` slice.

    Follows SimpleITK's series-writing pattern: each slice carries its own image position, the
    shared orientation and series UID, so GDCM reassembles the 3D geometry on reading.

    Returns:
        The folder.
    """
    import SimpleITK as sitk  # noqa: N813

    from data.volume import to_sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = to_sitk(volume)
    d = img.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.12345678901234567890"
    orientation = "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": series_uid + ".0",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.10g}" for p in pos),
            "0020|0037": orientation,
            "0028|0030": f"{img.GetSpacing()[1]:.10g}\\{img.GetSpacing()[0]:.10g}",
            "0018|0050": f"{img.GetSpacing()[2]:.10g}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
        writer.Execute(sl)
    return folder
