"""Find the cases of each configured dataset on disk: seed, MSD/nnU-Net and KiTS19 layouts.

Layouts (``DatasetSpec.layout``; ``auto`` detects them in this order):

* ``msd``: ``dataset.json`` and/or ``imagesTr/`` + ``labelsTr/`` (+ ``imagesTs/``). Training images
  may carry nnU-Net's ``_0000`` channel suffix. The last ``val_fraction`` of the sorted labeled cases
  are validation; ``imagesTs`` cases are unlabeled.
* ``kits19``: ``case_XXXXX/imaging.nii.gz`` (+ ``segmentation.nii.gz``); cases without a
  segmentation are unlabeled; validation as for MSD.
* ``seed``: ``labeled/``, ``validation/``, ``unlabeled/`` image folders and one ``label/`` folder.
  An image pairs with the label whose *case key* matches: the file name without its volume suffix
  with ``image_token`` (images) or ``label_token`` (labels) removed, so ``volume-7.nii`` pairs with
  ``segmentation-7.nii`` and ``scan_00007.nii.gz`` with ``label_00007.nii.gz``. Without tokens the
  names must be equal. Labels whose key matches an unlabeled image are ignored.

DICOM series folders count as images everywhere. Cases come out sorted (dataset order of the
config, then split, then natural order of the case id), so the result is deterministic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from data.config import Config, DatasetSpec
from data.volume import VOLUME_SUFFIXES, is_dicom_dir, strip_volume_suffix
from utils.errors import InputError

SPLITS = ("labeled", "validation", "unlabeled")
SEED_DIRS = ("label", "labeled", "unlabeled", "validation")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


@dataclass(frozen=True)
class Case:
    """One image (and its label map, if any) of a dataset.

    Attributes:
        dataset: the dataset's name in the config.
        case_id: file name without volume suffix (and without nnU-Net's ``_0000``).
        image: image file or DICOM series folder.
        label: label map, or None for unlabeled cases.
        split: ``labeled`` | ``unlabeled`` | ``validation``.
    """

    dataset: str
    case_id: str
    image: Path
    label: Path | None
    split: str


def _natural_key(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _case_sort_key(case: Case) -> tuple:
    return (SPLITS.index(case.split), _natural_key(case.case_id))


def _volumes_in(folder: Path) -> list[Path]:
    """Volume files and DICOM series folders directly inside ``folder`` (hidden files skipped)."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue  # also skips macOS "._x.nii.gz" resource forks shipped with MSD
        # Skipping these silently made the error blame the case's label map instead.
        if not p.exists():
            raise InputError(p, "is a dangling symbolic link (its target does not exist)")
        is_file_volume = p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
        if p.is_dir() and p.name.lower().endswith(VOLUME_SUFFIXES):
            raise InputError(p, "is a folder, expected a volume file")
        if is_file_volume or (p.is_dir() and is_dicom_dir(p)):
            out.append(p)
    return out


def _stem(path: Path) -> str:
    return strip_volume_suffix(path.name)


def case_key(path: Path, token: str | None = None) -> str:
    """The name that pairs an image with its label (training) and a prediction with its ground truth
    (scoring): the file name without its volume suffix, minus the first ``token``.

    ``volume-7.nii`` with token ``volume`` -> ``-7``, which pairs with ``segmentation-7.nii`` (token
    ``segmentation``).
    """
    stem = _stem(path)
    return stem.replace(token, "", 1) if token else stem


def index_by_key(paths: list[Path], key_of, what: str) -> dict[str, Path]:
    """``{case key: path}``; two paths with one key are an error.

    Raises:
        InputError: naming the second path of a duplicate key.
    """
    index: dict[str, Path] = {}
    for p in paths:
        k = key_of(p)
        if k in index:
            raise InputError(p, f"two {what} with the same case key {k!r}: also {index[k]}")
        index[k] = p
    return index


def detect_layout(folder: Path) -> str:
    """``msd`` | ``kits19`` | ``seed`` for a dataset folder.

    Raises:
        InputError: when none of the layouts fits.
    """
    if (folder / "dataset.json").is_file() or (folder / "imagesTr").is_dir():
        return "msd"
    if any(p.is_dir() and p.name.startswith("case_") and any(p.glob("imaging.*"))
           for p in folder.iterdir()):
        return "kits19"
    if any((folder / d).is_dir() for d in SEED_DIRS):
        return "seed"
    raise InputError(folder, "cannot tell the dataset layout: expected labeled/ + label/ (seed), "
                     "dataset.json + imagesTr/ (MSD) or case_XXXXX/imaging.nii.gz (KiTS19)")


def _split_validation(labeled: list[tuple[str, Path, Path]],
                      fraction: float) -> list[tuple[str, Path, Path, str]]:
    """Mark the last ``fraction`` of the sorted labeled cases as validation (at least one stays labeled)."""
    labeled = sorted(labeled, key=lambda t: _natural_key(t[0]))
    n = len(labeled)
    n_val = min(int(math.floor(n * fraction + 0.5)), max(n - 1, 0))
    return [(cid, img, lab, "validation" if i >= n - n_val else "labeled")
            for i, (cid, img, lab) in enumerate(labeled)]


def _discover_seed(spec: DatasetSpec, folder: Path) -> list[Case]:
    images = {split: _volumes_in(folder / split) for split in SPLITS}
    labels = _volumes_in(folder / "label")
    all_images = [p for split in SPLITS for p in images[split]]
    if not all_images:
        raise InputError(folder, "no images found in labeled/, validation/ or unlabeled/")
    img_index = index_by_key(all_images, lambda p: case_key(p, spec.image_token), "images")
    lab_index = index_by_key(labels, lambda p: case_key(p, spec.label_token), "label maps")
    for k, lab in lab_index.items():
        if k not in img_index:
            raise InputError(lab, f"label map has no image (case key {k!r}; image_token "
                             f"{spec.image_token!r}, label_token {spec.label_token!r})")
    cases = []
    for split in SPLITS:
        for img in images[split]:
            label = None
            if split != "unlabeled":
                label = lab_index.get(case_key(img, spec.image_token))
                if label is None:
                    raise InputError(img, f"{split} image has no label map in {folder / 'label'} "
                                     f"(case key {case_key(img, spec.image_token)!r})")
            cases.append(Case(spec.name, _stem(img), img, label, split))
    return cases


def _msd_case_id(path: Path) -> str:
    stem = _stem(path)
    m = _CHANNEL.match(stem)
    if m is None:
        return stem
    if m.group("ch") != "0000":
        raise InputError(path, "is channel " + m.group("ch") + " of a multi-channel case; UniMOS "
                         "takes single-channel CT (only _0000 files)")
    return m.group("case")


def _discover_msd(spec: DatasetSpec, folder: Path) -> list[Case]:
    train = _volumes_in(folder / "imagesTr")
    test = _volumes_in(folder / "imagesTs")
    labels = _volumes_in(folder / "labelsTr")
    if not train and not test:
        raise InputError(folder, "no images found in imagesTr/ or imagesTs/")
    tr_index = index_by_key(train, _msd_case_id, "images")
    ts_index = index_by_key(test, _msd_case_id, "images")
    lab_index = index_by_key(labels, _stem, "label maps")
    for k, lab in lab_index.items():
        if k not in tr_index:
            raise InputError(lab, f"label map has no image in {folder / 'imagesTr'} (case {k!r})")
    labeled = []
    for cid, img in tr_index.items():
        if cid not in lab_index:
            raise InputError(img, f"training image has no label map in {folder / 'labelsTr'}")
        labeled.append((cid, img, lab_index[cid]))
    cases = [Case(spec.name, cid, img, lab, split)
             for cid, img, lab, split in _split_validation(labeled, spec.val_fraction)]
    cases += [Case(spec.name, cid, img, None, "unlabeled") for cid, img in ts_index.items()]
    return cases


def _discover_kits19(spec: DatasetSpec, folder: Path) -> list[Case]:
    labeled, unlabeled = [], []
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("case_")):
        imgs = [p for p in _volumes_in(case_dir) if _stem(p) == "imaging"]
        segs = [p for p in _volumes_in(case_dir) if _stem(p) == "segmentation"]
        for found, what in ((imgs, "imaging"), (segs, "segmentation")):
            if len(found) > 1:
                raise InputError(found[1], f"two {what} volumes in one case: also {found[0]}")
        if not imgs:
            if segs:
                raise InputError(segs[0], "label map has no image (imaging.nii.gz) beside it")
            continue
        if segs:
            labeled.append((case_dir.name, imgs[0], segs[0]))
        else:
            unlabeled.append(Case(spec.name, case_dir.name, imgs[0], None, "unlabeled"))
    if not labeled and not unlabeled:
        raise InputError(folder, "no images found (case_XXXXX/imaging.nii.gz)")
    cases = [Case(spec.name, cid, img, lab, split)
             for cid, img, lab, split in _split_validation(labeled, spec.val_fraction)]
    return cases + unlabeled


_DISCOVER = {"seed": _discover_seed, "msd": _discover_msd, "kits19": _discover_kits19}


def discover_dataset(spec: DatasetSpec, data_root: str | Path) -> list[Case]:
    """Cases of one dataset (empty when its folder is missing and it is optional).

    Raises:
        InputError: see :func:`discover`.
    """
    folder = spec.folder(data_root)
    if not folder.is_dir():
        if spec.optional and not folder.exists():
            return []
        raise InputError(folder, f"dataset folder of {spec.name} does not exist"
                         if not folder.exists() else "dataset path is not a folder")
    layout = detect_layout(folder) if spec.layout == "auto" else spec.layout
    return sorted(_DISCOVER[layout](spec, folder), key=_case_sort_key)


def discover(config: Config, data_root: str | Path, datasets: list[str] | None = None) -> list[Case]:
    """All cases of the configured datasets under ``data_root``.

    Args:
        config: the configuration (dataset order, layouts, pairing tokens).
        data_root: folder holding the dataset folders.
        datasets: names to include (default: all of the config, in config order).

    Returns:
        Cases sorted by dataset (config order), split (labeled, validation, unlabeled), case id.

    Raises:
        InputError: unknown dataset name, dataset folder missing (unless optional), no images,
            labeled/validation image without label, label without image, two images (or labels)
            with the same case key, multi-channel nnU-Net case.
    """
    names = [d.name for d in config.datasets]
    if datasets is not None:
        unknown = [n for n in datasets if n not in names]
        if unknown:
            raise InputError(config.source, f"unknown datasets {unknown} (configured: {names})")
    specs = [d for d in config.datasets if datasets is None or d.name in datasets]
    cases: list[Case] = []
    for spec in specs:
        found = discover_dataset(spec, data_root)
        if spec.folder(data_root).is_dir() and not any(c.split != "unlabeled" for c in found):
            # Training on would never show the model this dataset's organs.
            folder = spec.folder(data_root)
            where = {"seed": folder / "labeled", "msd": folder / "imagesTr"}.get(
                spec.layout if spec.layout != "auto" else detect_layout(folder), folder)
            raise InputError(where, f"dataset {spec.name} has no labeled cases (empty or missing)")
        cases += found
    return cases


__all__ = ["Case", "SPLITS", "detect_layout", "discover", "discover_dataset"]
