"""engine/validation.py: Dice per class and the untiled 2.5D prediction of a view stack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.validation import dice_per_class, predict_view_stack
from models import DEFAULT_NORM, MOSNet


def test_dice_per_class_hand_computed():
    pred = np.array([[1, 1, 0, 2]])
    label = np.array([[1, 0, 0, 255]])
    d = dice_per_class(pred, label, [1, 2, 3])
    assert d[1] == pytest.approx(2 * 1 / (2 + 1))
    assert math.isnan(d[2])  # predicted 2 only on an ignored voxel: nothing to score
    assert math.isnan(d[3])


def test_predict_view_stack_pads_crops_and_merges(one_thread):
    torch.manual_seed(0)
    model = MOSNet(3, 4, 2, norm=DEFAULT_NORM).eval()
    stack = np.random.default_rng(0).uniform(-1, 1, size=(5, 20, 24)).astype(np.float32)  # not /16
    full = predict_view_stack(model, stack, 3, torch.device("cpu"), batch=2)
    assert full.shape == stack.shape and full.dtype == np.uint8 and full.max() < 4
    merged = predict_view_stack(model, stack, 3, torch.device("cpu"), batch=4,
                                labeled_mask=np.array([True, False, True, False]))
    assert set(np.unique(merged)) <= {0, 2}  # unlabeled organs merge into background
    # merged organ 2 beats background + organs 1 and 3 together, so it also beat each of them alone
    assert not (merged == 2)[full != 2].any()


def test_validate_matches_a_plain_argmax_and_leaves_the_model_as_it_was(one_thread):
    """validate() predicts with a channels_last copy on the CPU and max().indices: the labels of the
    plain forward + argmax (Dice 1 against them), and the trained model keeps its layout and mode."""
    from types import SimpleNamespace

    from data.config import load_config
    from engine.validation import validate

    torch.manual_seed(0)
    cfg = load_config()
    model = MOSNet(3, 4, 4, norm=DEFAULT_NORM)
    image = np.random.default_rng(0).uniform(-1, 1, size=(6, 32, 48)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(image[np.clip(np.arange(6)[:, None] + np.array([-1, 0, 1]), 0, 5)])
        ref = model.eval()(x).logits.argmax(1).numpy().astype(np.uint8)
    model.train()
    got = predict_view_stack(model.eval(), image, 3, torch.device("cpu"), batch=4)
    np.testing.assert_array_equal(got, ref)
    model.train()
    full = next(d for d in cfg.datasets if cfg.labeled_mask(d).all())  # BTCV: no merging
    vol = SimpleNamespace(dataset=full.name, image=lambda view: image, label=lambda view: ref)
    scores = validate(model, [vol], cfg, "axial", 3, torch.device("cpu"), batch=4)
    present = {int(c) for c in np.unique(ref) if c > 0}
    assert present and all(scores[f"{full.name}/{cfg.organs[c - 1]}"] == 1.0 for c in present)
    assert model.training
    assert not model.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
