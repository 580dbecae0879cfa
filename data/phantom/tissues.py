"""Tissues of the phantoms (HU ranges, texture) and the dataset styles: how each imitated dataset
looks on disk (file names, grid, storage orientation, intensities, label values)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BASE_SIZE = 256  # largest in-plane grid painted before upsampling
MAX_DEFORM = 0.2  # organ surface deformation, as a fraction of the radius (bounds the z extent)
PADDING_HU = -1024.0  # outside the circular reconstruction field of view
MARKER = ".phantom.json"  # lists the files synth.py wrote in a dataset folder (rerun clean-up)


# ----------------------------------------------------------------------------------------------
# Tissues


@dataclass(frozen=True)
class Tissue:
    """One tissue class of the phantom.

    Attributes:
        name: identifier (also used by the dataset label tables).
        hu: range the case's mean HU is drawn from (uniformly).
        texture: amplitude (HU, one standard deviation) of smooth intensity variation inside.
    """

    name: str
    hu: tuple[float, float]
    texture: float


TISSUES: tuple[Tissue, ...] = (
    Tissue("air", (-1000.0, -1000.0), 0.0),
    Tissue("fat", (-120.0, -85.0), 8.0),
    Tissue("muscle", (42.0, 58.0), 4.0),
    Tissue("bowel", (15.0, 40.0), 10.0),
    Tissue("lung", (-880.0, -820.0), 20.0),
    Tissue("bone", (450.0, 650.0), 50.0),
    Tissue("disc", (70.0, 100.0), 5.0),
    Tissue("canal", (15.0, 35.0), 3.0),
    Tissue("aorta", (185.0, 245.0), 4.0),
    Tissue("ivc", (110.0, 160.0), 4.0),
    Tissue("liver", (100.0, 122.0), 4.0),
    Tissue("liver_tumour", (35.0, 60.0), 4.0),
    Tissue("gallbladder", (2.0, 18.0), 2.0),
    Tissue("stomach", (25.0, 45.0), 6.0),
    Tissue("stomach_gas", (-950.0, -850.0), 10.0),
    Tissue("pancreas", (80.0, 105.0), 5.0),
    Tissue("spleen", (106.0, 128.0), 4.0),
    Tissue("kidney_r", (155.0, 195.0), 6.0),
    Tissue("kidney_l", (155.0, 195.0), 6.0),
    Tissue("kidney_tumour_r", (60.0, 100.0), 5.0),
    Tissue("kidney_tumour_l", (60.0, 100.0), 5.0),
)
TISSUE_ID: dict[str, int] = {t.name: i for i, t in enumerate(TISSUES)}

# Organ -> its tissues (what a label of that organ covers); used by tests and summaries.
ORGAN_TISSUES: dict[str, tuple[str, ...]] = {
    "liver": ("liver", "liver_tumour"),
    "kidney": ("kidney_r", "kidney_l", "kidney_tumour_r", "kidney_tumour_l"),
    "spleen": ("spleen",),
}


# ----------------------------------------------------------------------------------------------
# Dataset styles: how each real dataset looks on disk


@dataclass(frozen=True)
class DatasetStyle:
    """File layout, grid, storage orientation and intensities of one imitated dataset.

    Attributes:
        name: dataset folder name (as in ``configs/default.yaml``).
        code: part of every case's random seed, so a case does not depend on ``--datasets``.
        image_name / label_name: file name patterns, formatted with the case number ``n``.
        first_number: number of the first case.
        inplane_size: in-plane voxels at ``scale`` 1 (square).
        inplane_spacing: in-plane spacing range (mm) at ``scale`` 1, drawn per case.
        slice_spacing: slice spacings (mm) drawn from per case.
        direction: storage direction matrix (row-major; columns = LPS directions of index axes).
        dtype: image dtype on disk.
        hu_offset: calibration shift added to every voxel (HU).
        noise_sigma: range of the image noise standard deviation (HU), drawn per case.
        labels: tissue name -> value in this dataset's label files (other tissues are 0).
        liver_tumours / kidney_tumours: tumour counts drawn from per case.
        unlabeled: whether the dataset has an unlabeled/ split.
        tight_prob: probability that a case is a body-tight, non-square crop instead of the
            scanner's square field of view (``inplane_size`` x ``inplane_spacing``: 358-500 mm).
    """

    name: str
    code: int
    image_name: str
    label_name: str
    first_number: int
    inplane_size: int
    inplane_spacing: tuple[float, float]
    slice_spacing: tuple[float, ...]
    direction: tuple[float, ...]
    dtype: str
    hu_offset: float
    noise_sigma: tuple[float, float]
    labels: dict[str, int]
    liver_tumours: tuple[int, ...] = (0,)
    kidney_tumours: tuple[int, ...] = (0,)
    unlabeled: bool = True
    tight_prob: float = 0.3


_RAS_LIKE = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # i -> right, j -> anterior (dcm2niix)
# KiTS19: i runs superior -> inferior, j posterior, k left; numpy's last axis is the slice axis.
_SLICES_FIRST = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0)
_ANTERIOR_INFERIOR = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)  # slices stored top-down
_LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

DATASET_STYLES: dict[str, DatasetStyle] = {
    "LiTS": DatasetStyle(
        name="LiTS", code=1, image_name="volume-{n}.nii", label_name="segmentation-{n}.nii",
        first_number=0, inplane_size=512, inplane_spacing=(0.70, 0.96),
        slice_spacing=(2.5, 3.0, 4.0, 5.0), direction=_RAS_LIKE, dtype="int16", hu_offset=0.0,
        noise_sigma=(10.0, 16.0), labels={"liver": 1, "liver_tumour": 2},
        liver_tumours=(0, 1, 1, 2, 2, 3)),
    "KiTS": DatasetStyle(
        name="KiTS", code=2, image_name="scan_{n:05d}.nii.gz", label_name="label_{n:05d}.nii.gz",
        first_number=0, inplane_size=512, inplane_spacing=(0.72, 0.97),
        slice_spacing=(3.0, 4.0, 5.0), direction=_SLICES_FIRST, dtype="int16", hu_offset=0.0,
        noise_sigma=(12.0, 18.0),
        labels={"kidney_r": 1, "kidney_l": 1, "kidney_tumour_r": 2, "kidney_tumour_l": 2},
        kidney_tumours=(1,)),
    "MSDSpleen": DatasetStyle(
        name="MSDSpleen", code=3, image_name="spleen_{n}.nii.gz", label_name="spleen_{n}.nii.gz",
        first_number=1, inplane_size=256, inplane_spacing=(1.40, 1.92), slice_spacing=(5.0,),
        direction=_ANTERIOR_INFERIOR, dtype="float32", hu_offset=30.0, noise_sigma=(14.0, 20.0),
        labels={"spleen": 1}),
    "BTCV": DatasetStyle(
        name="BTCV", code=4, image_name="img{n:04d}.nii.gz", label_name="label{n:04d}.nii.gz",
        first_number=1, inplane_size=512, inplane_spacing=(0.70, 0.94), slice_spacing=(2.5, 3.0, 4.0),
        direction=_LPS, dtype="int16", hu_offset=-10.0, noise_sigma=(10.0, 16.0),
        labels={"spleen": 1, "kidney_r": 2, "kidney_l": 3, "gallbladder": 4, "liver": 6,
                "stomach": 7, "stomach_gas": 7, "aorta": 8, "ivc": 9, "pancreas": 11},
        unlabeled=False),
}


def label_lut(style: DatasetStyle) -> np.ndarray:
    """Lookup table tissue id -> label value of ``style``'s label files (uint8)."""
    lut = np.zeros(len(TISSUES), dtype=np.uint8)
    for name, value in style.labels.items():
        lut[TISSUE_ID[name]] = value
    return lut


def dataset_labels(tissue_map: np.ndarray, name: str) -> np.ndarray:
    """The label file values of dataset ``name`` for a tissue map (same shape, uint8)."""
    return label_lut(DATASET_STYLES[name])[tissue_map]
