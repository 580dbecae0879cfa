"""data.layout: case discovery and pairing for the seed, MSD and KiTS19 layouts, and its errors.

Discovery never opens a volume, so empty placeholder files are enough here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from data.config import config_from_dict
from data.layout import Case, detect_layout, discover
from utils.errors import InputError


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _config(**datasets):
    return config_from_dict({"organs": ["liver", "kidney", "spleen"], "datasets": datasets})


LITS = {"labels": {1: "liver", 2: "liver"}, "image_token": "volume", "label_token": "segmentation"}
KITS = {"labels": {1: "kidney"}, "image_token": "scan", "label_token": "label"}
SPLEEN = {"labels": {1: "spleen"}}


def test_seed_layout_tokens_pairing_and_order(tmp_path):
    d = tmp_path / "LiTS"
    _touch(d / "labeled" / "volume-10.nii", d / "labeled" / "volume-2.nii",
           d / "validation" / "volume-7.nii", d / "unlabeled" / "volume-30.nii",
           d / "label" / "segmentation-2.nii", d / "label" / "segmentation-10.nii",
           d / "label" / "segmentation-7.nii", d / "labeled" / "notes.txt", d / "label" / "._hidden.nii")
    k = tmp_path / "KiTS"
    _touch(k / "labeled" / "scan_00007.nii.gz", k / "label" / "label_00007.nii.gz")
    cases = discover(_config(LiTS=LITS, KiTS=KITS), tmp_path)
    assert [(c.dataset, c.case_id, c.split) for c in cases] == [
        ("LiTS", "volume-2", "labeled"), ("LiTS", "volume-10", "labeled"),
        ("LiTS", "volume-7", "validation"), ("LiTS", "volume-30", "unlabeled"),
        ("KiTS", "scan_00007", "labeled")]
    assert cases[0].label == d / "label" / "segmentation-2.nii"
    assert cases[1].label == d / "label" / "segmentation-10.nii"
    assert cases[2].label == d / "label" / "segmentation-7.nii"
    assert cases[3].label is None
    assert cases[4] == Case("KiTS", "scan_00007", k / "labeled" / "scan_00007.nii.gz",
                            k / "label" / "label_00007.nii.gz", "labeled")
    only = discover(_config(LiTS=LITS, KiTS=KITS), tmp_path, datasets=["KiTS"])
    assert [c.dataset for c in only] == ["KiTS"]


def test_seed_layout_same_names_and_dicom_folder(tmp_path):
    d = tmp_path / "MSDSpleen"
    _touch(d / "labeled" / "spleen_1.nii.gz", d / "label" / "spleen_1.nii.gz",
           d / "unlabeled" / "ct_a" / "IM0001", d / "unlabeled" / "ct_a" / "IM0002")
    cases = discover(_config(MSDSpleen=SPLEEN), tmp_path)
    assert [(c.case_id, c.split) for c in cases] == [("spleen_1", "labeled"), ("ct_a", "unlabeled")]
    assert cases[1].image == d / "unlabeled" / "ct_a"


def test_msd_layout(tmp_path):
    d = tmp_path / "Task09_Spleen"
    _touch(d / "dataset.json")
    for n in (2, 3, 10, 6, 8):
        _touch(d / "imagesTr" / f"spleen_{n}_0000.nii.gz", d / "labelsTr" / f"spleen_{n}.nii.gz")
    _touch(d / "imagesTr" / "._spleen_2.nii.gz", d / "imagesTs" / "spleen_1.nii.gz")
    cfg = _config(Spleen={**SPLEEN, "path": "Task09_Spleen", "layout": "auto", "val_fraction": 0.4})
    cases = discover(cfg, tmp_path)
    assert [(c.case_id, c.split) for c in cases] == [
        ("spleen_2", "labeled"), ("spleen_3", "labeled"), ("spleen_6", "labeled"),
        ("spleen_8", "validation"), ("spleen_10", "validation"), ("spleen_1", "unlabeled")]
    assert cases[0].image.name == "spleen_2_0000.nii.gz"
    assert cases[0].label == d / "labelsTr" / "spleen_2.nii.gz"
    assert detect_layout(d) == "msd"


def test_kits19_layout(tmp_path):
    d = tmp_path / "kits19" / "data"
    for n in range(4):
        _touch(d / f"case_{n:05d}" / "imaging.nii.gz")
        if n < 3:
            _touch(d / f"case_{n:05d}" / "segmentation.nii.gz")
    cfg = _config(KiTS={**KITS, "path": str(d), "val_fraction": 0.34})
    cases = discover(cfg, tmp_path / "elsewhere")  # absolute path wins over the data root
    assert [(c.case_id, c.split, c.label is not None) for c in cases] == [
        ("case_00000", "labeled", True), ("case_00001", "labeled", True),
        ("case_00002", "validation", True), ("case_00003", "unlabeled", False)]
    assert detect_layout(d) == "kits19"


def test_optional_missing_is_skipped(tmp_path):
    _touch(tmp_path / "MSDSpleen" / "labeled" / "a.nii", tmp_path / "MSDSpleen" / "label" / "a.nii")
    cfg = _config(MSDSpleen=SPLEEN, BTCV={**SPLEEN, "optional": True})
    assert [c.dataset for c in discover(cfg, tmp_path)] == ["MSDSpleen"]


@pytest.mark.parametrize("setup, bad", [
    # dataset folder missing
    (lambda d: None, lambda d: d),
    # no images at all
    (lambda d: (d / "labeled").mkdir(parents=True), lambda d: d),
    # labeled image without label
    (lambda d: _touch(d / "labeled" / "volume-1.nii", d / "labeled" / "volume-2.nii",
                      d / "label" / "segmentation-1.nii"), lambda d: d / "labeled" / "volume-2.nii"),
    # validation image without label
    (lambda d: _touch(d / "validation" / "volume-3.nii"), lambda d: d / "validation" / "volume-3.nii"),
    # label without image
    (lambda d: _touch(d / "labeled" / "volume-1.nii", d / "label" / "segmentation-1.nii",
                      d / "label" / "segmentation-9.nii"), lambda d: d / "label" / "segmentation-9.nii"),
    # two images with the same key
    (lambda d: _touch(d / "labeled" / "volume-1.nii", d / "labeled" / "volume-1.nii.gz",
                      d / "label" / "segmentation-1.nii"), lambda d: d / "labeled" / "volume-1.nii.gz"),
    # same key across splits
    (lambda d: _touch(d / "labeled" / "volume-1.nii", d / "unlabeled" / "volume-1.nii",
                      d / "label" / "segmentation-1.nii"), lambda d: d / "unlabeled" / "volume-1.nii"),
], ids=["missing-folder", "no-images", "labeled-no-label", "validation-no-label", "label-no-image",
        "duplicate-key", "duplicate-across-splits"])
def test_seed_errors_name_the_file(tmp_path, setup, bad):
    d = tmp_path / "LiTS"
    setup(d)
    with pytest.raises(InputError) as err:
        discover(_config(LiTS=LITS), tmp_path)
    assert err.value.path == str(bad(d))


def test_msd_errors(tmp_path):
    d = tmp_path / "Spleen"
    _touch(d / "dataset.json", d / "imagesTr" / "s_1_0000.nii.gz", d / "imagesTr" / "s_1_0001.nii.gz",
           d / "labelsTr" / "s_1.nii.gz")
    with pytest.raises(InputError, match="multi-channel") as err:
        discover(_config(Spleen=SPLEEN), tmp_path)
    assert err.value.path.endswith("s_1_0001.nii.gz")
    (d / "imagesTr" / "s_1_0001.nii.gz").unlink()
    _touch(d / "labelsTr" / "s_2.nii.gz")
    with pytest.raises(InputError, match="no image") as err:
        discover(_config(Spleen=SPLEEN), tmp_path)
    assert err.value.path.endswith("s_2.nii.gz")


def test_kits_label_without_image_and_unknown_dataset(tmp_path):
    d = tmp_path / "KiTS"
    _touch(d / "case_00000" / "imaging.nii.gz", d / "case_00001" / "segmentation.nii.gz")
    with pytest.raises(InputError) as err:
        discover(_config(KiTS={**KITS, "layout": "kits19"}), tmp_path)
    assert err.value.path == str(d / "case_00001" / "segmentation.nii.gz")
    with pytest.raises(InputError, match="unknown datasets"):
        discover(_config(KiTS=KITS), tmp_path, datasets=["Nope"])
