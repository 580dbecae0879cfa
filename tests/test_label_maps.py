"""Label maps of other tools (issue 15): `other: background`, several values per organ, consistent
prediction / ground-truth mapping, ground truth in another index order, NIfTI-2, DICOM --image."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from data.config import config_from_dict, config_to_dict, load_config
from data.volume import (
    Geometry,
    Volume,
    match_grid,
    read_volume,
    same_physical_grid,
    to_storage,
    write_volume,
)
from inference.evaluation import class_spec, parse_labels, score_volumes
from tests.helpers import write_dicom_series
from tests.test_evaluate import GEO, _boxes, _cli, _write
from utils.errors import InputError

# A many-structure ground truth (BTCV-like ids): 1 spleen, 2 right kidney, 3 left kidney, 5 liver,
# anything else (up to 40 structures) something UniMOS does not model.
MANY = {"organs": ["liver", "kidney", "spleen"],
        "datasets": {"Many": {"labels": {1: "spleen", 2: "kidney", 3: "kidney", 5: "liver",
                                         "other": "background"}}}}


def _many_gt() -> np.ndarray:
    a = _boxes(liver_value=5, kidney_value=2)
    a[5:7, 16:19, 2:6] = 3        # left kidney
    a[0, 0:4, 0:4] = 17           # structures the model ignores
    a[7, 10:12, 20:24] = 40
    return a


def test_other_background_config_round_trip_and_mapping():
    cfg = config_from_dict(MANY)
    ds = cfg.dataset("Many")
    assert ds.other_background
    classes = cfg.map_labels(ds, _many_gt(), "gt.nii.gz")
    assert set(np.unique(classes)) == {0, 1, 2}
    assert (classes[0, 0:4, 0:4] == 0).all() and (classes[5:7, 16:19, 2:6] == 2).all()
    assert cfg.map_labels(ds, np.array([300, 5], np.int32), "x").tolist() == [0, 1]  # past the table
    again = config_from_dict(config_to_dict(cfg))
    assert again.dataset("Many").other_background
    # without `other`, an undeclared value is still an error; `other` may only be background
    strict = config_from_dict({**MANY, "datasets": {"S": {"labels": {1: "spleen"}}}})
    with pytest.raises(InputError, match="not declared"):
        strict.map_labels(strict.dataset("S"), np.array([1, 17]), "gt.nii.gz")
    with pytest.raises(InputError, match="other"):
        config_from_dict({**MANY, "datasets": {"S": {"labels": {1: "spleen", "other": "liver"}}}})


def test_several_values_per_organ_score_like_the_dataset_map(tmp_path):
    # The case: a prediction in the ground truth's own (BTCV-like) values.
    gt = _write(tmp_path / "gt.nii.gz", _many_gt())
    pred = _write(tmp_path / "pred.nii.gz", _many_gt())
    cfg = tmp_path / "many.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(MANY))
    out = tmp_path / "r.csv"
    code = _cli(["--pred", str(pred), "--gt", str(gt), "--config", str(cfg), "--gt-dataset", "Many",
                 "--labels", "kidney:2,3,liver:5,spleen:1", "--out", str(out)])
    assert code == 0
    row = next(csv.DictReader(out.open()))
    assert float(row["kidney_dice"]) == 1.0 and float(row["liver_dice"]) == 1.0
    # kidney:2 alone would score one kidney of two against both (the silent 0.66): refused
    code = _cli(["--pred", str(pred), "--gt", str(gt), "--config", str(cfg), "--gt-dataset", "Many",
                 "--labels", "kidney:2,liver:5", "--out", str(out)])
    assert code == 2


def test_labels_with_dataset_for_config_class_predictions_still_work():
    cfg = load_config()
    spec = class_spec(cfg, parse_labels("liver:1,kidney:2,spleen:3"), gt_dataset="BTCV")
    pred = Volume(_boxes(), GEO)
    gt = Volume(_boxes(liver_value=6, kidney_value=3), GEO)
    m = score_volumes(pred, gt, spec, Path("pred.nii.gz"), Path("gt.nii.gz"))
    assert m["liver"]["dice"] == 1.0 and m["kidney"]["dice"] == 1.0
    # Scoring two organs of a UniMOS prediction against BTCV: its 3 is the spleen, left out on
    # purpose; that BTCV's 3 is a kidney says nothing about it (it was refused, with a hint that
    # would have scored the spleen as kidney).
    spec = class_spec(cfg, parse_labels("liver:1,kidney:2"), gt_dataset="BTCV")
    with_spleen = _boxes()
    with_spleen[0, 0:3, 0:3] = 3
    m = score_volumes(Volume(with_spleen, GEO), gt, spec, Path("pred.nii.gz"), Path("gt.nii.gz"))
    assert set(m) >= {"liver", "kidney"} and "spleen" not in m
    assert m["liver"]["dice"] == 1.0 and m["kidney"]["dice"] == 1.0


@pytest.mark.parametrize("direction", [(-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),   # dcm2niix / RAS-like
                                       (0, 0, 1.0, 0, 1.0, 0, -1.0, 0, 0)])    # slices first
def test_ground_truth_in_another_index_order_is_reoriented_exactly(tmp_path, direction):
    pred = Volume(_boxes(), GEO)
    stored = to_storage(Volume(_boxes(), GEO), direction)  # same voxels, other order
    assert not stored.geometry.same_grid(GEO) and same_physical_grid(stored.geometry, GEO)
    back = match_grid(stored, GEO)
    assert back is not None and back.geometry == GEO
    np.testing.assert_array_equal(back.array, pred.array)
    # through evaluate.py
    _write(tmp_path / "pred.nii.gz", pred.array)
    write_volume(stored, tmp_path / "gt.nii.gz")
    out = tmp_path / "r.csv"
    assert _cli(["--pred", str(tmp_path / "pred.nii.gz"), "--gt", str(tmp_path / "gt.nii.gz"),
                 "--out", str(out)]) == 0
    assert float(next(csv.DictReader(out.open()))["liver_dice"]) == 1.0


def test_ground_truth_on_another_physical_grid_is_still_refused(tmp_path):
    moved = Geometry(GEO.shape, GEO.spacing, (1.0, 2.0, 3.5))  # shifted by 0.5 mm
    assert match_grid(Volume(_boxes(), moved), GEO) is None
    _write(tmp_path / "pred.nii.gz", _boxes())
    _write(tmp_path / "gt.nii.gz", _boxes(), moved)
    assert _cli(["--pred", str(tmp_path / "pred.nii.gz"), "--gt", str(tmp_path / "gt.nii.gz"),
                 "--out", str(tmp_path / "r.csv")]) == 2


def test_nifti2_is_read_with_its_geometry(tmp_path):
    nib = pytest.importorskip("nibabel")
    arr = _boxes()  # numpy [k, j, i]
    write_volume(Volume(arr, GEO), tmp_path / "one.nii.gz")
    one = nib.load(str(tmp_path / "one.nii.gz"))
    two = nib.Nifti2Image(np.asanyarray(one.dataobj), one.affine)
    nib.save(two, str(tmp_path / "two.nii.gz"))
    vol = read_volume(tmp_path / "two.nii.gz")
    assert vol.geometry.same_grid(GEO)
    np.testing.assert_array_equal(vol.array, arr)
    out = tmp_path / "r.csv"
    assert _cli(["--pred", str(tmp_path / "one.nii.gz"), "--gt", str(tmp_path / "two.nii.gz"),
                 "--out", str(out)]) == 0


def test_evaluate_image_accepts_a_dicom_folder(tmp_path):
    ct = np.where(_boxes() > 0, 60, -100).astype(np.int16)
    series = write_dicom_series(tmp_path / "series", Volume(ct, GEO))
    geo = read_volume(series).geometry
    _write(tmp_path / "pred.nii.gz", _boxes(), geo)
    _write(tmp_path / "gt.nii.gz", _boxes(), geo)
    out = tmp_path / "r.csv"
    assert _cli(["--pred", str(tmp_path / "pred.nii.gz"), "--gt", str(tmp_path / "gt.nii.gz"),
                 "--out", str(out), "--png", str(tmp_path / "png"), "--image", str(series)]) == 0
    assert (tmp_path / "png" / "pred.png").is_file()


def test_training_label_in_another_index_order_is_reoriented(tmp_path):
    from data.cache import build_cache
    from tests.test_cache import CONFIG, _case

    flipped = _case(tmp_path / "a", name="c1")
    ref = build_cache([flipped], CONFIG, tmp_path / "cache_a", views=("axial",), progress=False)[0]
    # the same label stored with its first two index axes flipped: same voxels, other order
    lab = read_volume(flipped.label)
    write_volume(to_storage(*_canonical_pair(lab)), flipped.label)
    again = build_cache([flipped], CONFIG, tmp_path / "cache_b", views=("axial",), progress=False)[0]
    np.testing.assert_array_equal(again.label("axial")[:], ref.label("axial")[:])


def _canonical_pair(volume: Volume):
    from data.volume import to_canonical

    canon, _ = to_canonical(volume)
    return canon, (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
