"""evaluate.py and inference.evaluation: pairing, label maps, reports, bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from data.config import load_config
from data.volume import Geometry, Volume, write_volume
from inference.evaluation import case_key, class_spec, pair_cases, parse_labels, summarize
from utils.errors import InputError, run_cli

GEO = Geometry((8, 20, 24), (0.9, 0.8, 2.5), (1.0, 2.0, 3.0))


def _write(path: Path, array: np.ndarray, geo: Geometry = GEO) -> Path:
    write_volume(Volume(array, geo), path)
    return path


def _boxes(shift: int = 0, liver_value: int = 1, kidney_value: int | None = 2) -> np.ndarray:
    a = np.zeros(GEO.shape, np.uint8)
    a[2:6, 5:15, 4 + shift:12 + shift] = liver_value  # 4 x 10 x 8 = 320 voxels
    if kidney_value is not None:
        a[1:3, 16:19, 16:20] = kidney_value           # 2 x 3 x 4 = 24 voxels
    return a


def _cli(argv: list[str]) -> int:
    import evaluate

    with pytest.raises(SystemExit) as ex:
        run_cli(evaluate.main, argv)
    return int(ex.value.code)


def test_parse_labels_and_keys():
    assert parse_labels("liver:1, kidney:2") == {"liver": (1,), "kidney": (2,)}
    assert parse_labels("kidney:2,3,liver:5") == {"kidney": (2, 3), "liver": (5,)}
    for bad in ("liver", "liver:0", "liver:1,kidney:1", "liver:x", "2,liver:1", "liver:1,2,2",
                "liver:1,liver:2", "liver:1,x"):
        with pytest.raises(InputError):
            parse_labels(bad)
    assert case_key(Path("volume-7.nii"), "volume") == "-7"
    assert case_key(Path("segmentation-7.nii.gz"), "segmentation") == "-7"
    assert case_key(Path("case_1.nii.gz")) == "case_1"


def test_class_spec_dataset_limits_organs():
    cfg = load_config()
    spec = class_spec(cfg, gt_dataset="LiTS")
    assert spec.organs == ("liver",) and spec.gt_values == ((1,),)
    spec = class_spec(cfg, parse_labels("spleen:1,liver:6"), gt_dataset="BTCV")
    assert spec.organs == ("spleen", "liver") and spec.pred_values == ((1,), (6,))
    assert spec.gt_values == ((3,), (1,))
    with pytest.raises(InputError, match="NoSuch"):
        class_spec(cfg, gt_dataset="NoSuch")


def test_pair_cases(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "g").mkdir()
    for n in ("volume-1.nii.gz", "volume-2.nii.gz"):
        (tmp_path / "p" / n).write_bytes(b"x")
    for n in ("segmentation-2.nii", "segmentation-3.nii"):
        (tmp_path / "g" / n).write_bytes(b"x")
    pairs, lone_p, lone_g = pair_cases(tmp_path / "p", tmp_path / "g", "volume", "segmentation")
    assert [(p.key, p.pred.name, p.gt.name) for p in pairs] == [("-2", "volume-2.nii.gz",
                                                                 "segmentation-2.nii")]
    assert [p.name for p in lone_p] == ["volume-1.nii.gz"]
    assert [p.name for p in lone_g] == ["segmentation-3.nii"]
    with pytest.raises(InputError, match="no ground truth"):
        pair_cases(tmp_path / "p", tmp_path / "g")


def test_summary_skips_non_finite():
    per_case = [{"liver": {"dice": 0.5, "hd95": 2.0, "assd": 1.0, "vol_pred_ml": 1.0, "vol_gt_ml": 1.0}},
                {"liver": {"dice": 0.0, "hd95": math.inf, "assd": math.inf, "vol_pred_ml": 0.0,
                           "vol_gt_ml": 1.0}}]
    s = summarize(per_case, ["liver"])["liver"]
    assert s["dice"]["mean"] == pytest.approx(0.25) and s["dice"]["sd"] == pytest.approx(math.sqrt(0.125))
    assert s["hd95"]["mean"] == 2.0 and s["hd95"]["n_not_finite"] == 1


def test_cli_folders_report(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    _write(pred / "a.nii.gz", _boxes(shift=1))
    _write(gt / "a.nii.gz", _boxes())
    _write(pred / "b.nii.gz", _boxes(kidney_value=None))  # kidney missed: distances not finite
    _write(gt / "b.nii.gz", _boxes())
    img = tmp_path / "img"
    for n in ("a", "b"):
        _write(img / f"{n}.nii.gz", np.full(GEO.shape, 40, np.int16))
    out = tmp_path / "rep" / "report.csv"
    code = _cli(["--pred", str(pred), "--gt", str(gt), "--out", str(out), "--png", str(tmp_path / "png"),
                 "--image", str(img)])
    text = capsys.readouterr().out
    assert code == 0 and "liver" in text and "±" in text
    rows = list(csv.DictReader(out.open()))
    assert [r["case"] for r in rows] == ["a", "b"]
    # a: liver boxes of 320 voxels shifted by one column -> 280 shared -> Dice 0.875
    assert float(rows[0]["liver_dice"]) == pytest.approx(0.875)
    # shift of one voxel along x (0.9 mm): HD95 is exactly one voxel
    assert float(rows[0]["liver_hd95"]) == pytest.approx(0.9)
    vox_ml = 0.9 * 0.8 * 2.5 / 1000
    assert float(rows[0]["liver_vol_gt_ml"]) == pytest.approx(320 * vox_ml, rel=1e-5)
    assert float(rows[1]["kidney_dice"]) == 0.0 and rows[1]["kidney_hd95"] == "inf"
    assert float(rows[0]["spleen_dice"]) == 1.0 and float(rows[0]["spleen_hd95"]) == 0.0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["cases"][1]["kidney_hd95"] is None
    assert rep["summary"]["liver"]["dice"]["mean"] == pytest.approx((0.875 + 1.0) / 2)
    assert rep["summary"]["kidney"]["hd95"]["n_not_finite"] == 1
    assert (tmp_path / "png" / "a.png").is_file() and (tmp_path / "png" / "b.png").is_file()


def test_cli_gt_dataset_tokens_and_values(tmp_path, capsys):
    # LiTS: segmentation-7.nii (liver 1, tumour 2) pairs with the prediction volume-7.nii.gz;
    # the tumour counts as liver and only the liver is scored.
    gt = _boxes(kidney_value=None)
    gt[3:5, 8:10, 6:8] = 2
    pred = _boxes(kidney_value=2)  # a kidney in the prediction is not scored against LiTS
    _write(tmp_path / "gt" / "segmentation-7.nii", gt)
    _write(tmp_path / "pred" / "volume-7.nii.gz", pred)
    out = tmp_path / "r.csv"
    code = _cli(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--gt-dataset", "LiTS",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["case"] == "volume-7" and float(rows[0]["liver_dice"]) == 1.0
    assert "kidney_dice" not in rows[0]


def test_cli_labels_btcv(tmp_path, capsys):
    # BTCV values: liver 6, spleen 1; the prediction uses liver 1 (--labels), spleen absent in both.
    gt = _boxes(liver_value=6, kidney_value=3)  # 3 = left kidney -> kidney
    pred = _boxes(kidney_value=2)
    _write(tmp_path / "gt.nii.gz", gt)
    _write(tmp_path / "pred.nii.gz", pred)
    out = tmp_path / "r.csv"
    code = _cli(["--pred", str(tmp_path / "pred.nii.gz"), "--gt", str(tmp_path / "gt.nii.gz"),
                 "--gt-dataset", "BTCV", "--labels", "liver:1,kidney:2,spleen:3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    row = next(csv.DictReader(out.open()))
    assert float(row["liver_dice"]) == 1.0 and float(row["kidney_dice"]) == 1.0


@pytest.mark.parametrize("problem", ["grid", "undeclared", "missing", "extra_pred_value"])
def test_cli_bad_input(tmp_path, capsys, problem):
    pred = _write(tmp_path / "pred.nii.gz", _boxes())
    gt_arr = _boxes()
    gt_geo = GEO
    args_extra: list[str] = []
    if problem == "grid":
        gt_geo = Geometry(GEO.shape, (1.0, 0.8, 2.5), GEO.origin)
    elif problem == "undeclared":
        gt_arr[0, 0, 0] = 9  # not a LiTS value
        args_extra = ["--gt-dataset", "LiTS"]
    elif problem == "extra_pred_value":
        arr = _boxes()
        arr[0, 0, 0] = 7
        pred = _write(tmp_path / "pred.nii.gz", arr)
    gt = _write(tmp_path / "gt.nii.gz", gt_arr, gt_geo)
    if problem == "missing":
        gt = tmp_path / "nothing.nii.gz"
    out = tmp_path / "r.csv"
    code = _cli(["--pred", str(pred), "--gt", str(gt), "--out", str(out), *args_extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:")
    assert (str(pred) if problem == "extra_pred_value" else str(gt)) in err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_overlay_physical_aspect_and_contours():
    from inference.overlay import render_overlay

    shape = (10, 40, 60)  # 10 slices of 5 mm: 50 mm tall, 60 mm wide (1 mm pixels)
    image = Volume(np.full(shape, 100, np.int16), Geometry(shape, (1.0, 1.0, 5.0), (0.0, 0.0, 0.0)))
    pred = np.zeros(shape, np.uint8)
    pred[3:7, 10:30, 20:40] = 1
    rgb = render_overlay(image, pred, pred, ("liver", "kidney"), panel=120)
    header, label_h, panel = 34, 16, 120
    assert rgb.shape == (header + label_h + panel, 3 * panel, 3)  # one organ row
    coronal = rgb[header + label_h:, panel:2 * panel]
    rows, cols = np.nonzero(coronal.any(axis=2))
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert (w, h) == (120, 100)  # 60 mm x 50 mm scaled to fit 120 pixels
    # prediction contour (organ colour) drawn on top of the identical ground truth contour
    assert (coronal == (255, 70, 70)).all(axis=2).sum() > 0
