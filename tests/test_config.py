"""Config loading: the default reproduces the seed; every invalid field is one clear InputError."""

from __future__ import annotations

import numpy as np
import pytest

from data.config import config_from_dict, config_to_dict, load_config
from utils.errors import InputError


def test_default_config_is_the_seed():
    cfg = load_config()
    assert cfg.organs == ("liver", "kidney", "spleen")
    assert cfg.num_classes == 4
    names = [d.name for d in cfg.datasets]
    assert names[:3] == ["LiTS", "KiTS", "MSDSpleen"]
    lits = cfg.dataset("LiTS")
    assert cfg.labeled_classes(lits) == (0, 1)
    assert cfg.labeled_classes(cfg.dataset("KiTS")) == (0, 2)
    assert cfg.labeled_classes(cfg.dataset("MSDSpleen")) == (0, 3)
    btcv = cfg.dataset("BTCV")
    assert cfg.is_fully_labeled(btcv) and btcv.optional
    assert cfg.labeled_mask(lits).tolist() == [True, True, False, False]


def test_label_mapping_folds_tumour_and_btcv_values():
    cfg = load_config()
    arr = np.array([[0, 1, 2]], dtype=np.int16)
    assert cfg.map_labels(cfg.dataset("LiTS"), arr, "x").tolist() == [[0, 1, 1]]
    assert cfg.map_labels(cfg.dataset("KiTS"), arr, "x").tolist() == [[0, 2, 2]]
    btcv = np.array([0, 1, 2, 3, 4, 6, 8, 13], dtype=np.uint8)
    assert cfg.map_labels(cfg.dataset("BTCV"), btcv, "x").tolist() == [0, 3, 2, 2, 0, 1, 0, 0]


@pytest.mark.parametrize("array, message", [
    (np.array([0, 1, 3]), "label values [3] are not declared"),
    (np.array([0.0, 0.5]), "non-integer"),
    (np.array([0, -1]), "negative"),
    (np.array([0.0, np.nan]), "NaN"),
])
def test_undeclared_or_broken_label_values_name_the_file(array, message):
    cfg = load_config()
    with pytest.raises(InputError) as err:
        cfg.map_labels(cfg.dataset("LiTS"), array, "/data/LiTS/label/segmentation-3.nii")
    assert "segmentation-3.nii" in str(err.value) and message in str(err.value)


def _raw():
    return {"organs": ["liver", "spleen"], "datasets": {"A": {"labels": {1: "liver"}}}}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(organs=[]), "'organs'"),
    (lambda r: r.update(organs=["liver", "liver"]), "unique"),
    (lambda r: r.update(bogus=1), "unknown keys"),
    (lambda r: r["datasets"]["A"].update(labels={1: "heart"}), "unknown organ 'heart'"),
    (lambda r: r["datasets"]["A"].update(labels={0: "liver"}), "1..255"),
    (lambda r: r["datasets"]["A"].update(layout="zip"), "layout"),
    (lambda r: r["datasets"]["A"].update(image_token="volume"), "both image_token"),
    (lambda r: r["datasets"]["A"].update(labels={4: "background"}), "labels no organ"),
    (lambda r: r.update(hu_window=[200, -200]), "low < high"),
])
def test_invalid_configs_raise_input_error(mutate, message):
    raw = _raw()
    mutate(raw)
    with pytest.raises(InputError) as err:
        config_from_dict(raw, source="my.yaml")
    assert "my.yaml" in str(err.value) and message in str(err.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("organs: [liver\n")
    with pytest.raises(InputError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_round_trips_through_plain_dict():
    cfg = load_config()
    again = config_from_dict(config_to_dict(cfg))
    assert again.organs == cfg.organs and again.datasets == cfg.datasets
    assert again.hu_window == cfg.hu_window and again.components == cfg.components
