"""utils.metrics: hand-computed cases, empty-mask conventions, and agreement with MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from utils.metrics import (
    assd,
    dice,
    evaluate_case,
    hd95,
    overlap_stats,
    surface,
    surface_distances,
    volume_ml,
)


def test_dice_hand_computed():
    pred = np.zeros((4, 4), bool)
    gt = np.zeros((4, 4), bool)
    pred[0, :3] = True  # 3 voxels
    gt[0, 1:] = True    # 3 voxels, 2 shared
    assert overlap_stats(pred, gt).tp == 2
    assert dice(pred, gt) == pytest.approx(2 * 2 / 6)


def test_empty_conventions():
    z = np.zeros((5, 6, 7), bool)
    one = z.copy()
    one[2, 3, 3] = True
    sp = (2.0, 1.0, 0.5)
    assert dice(z, z) == 1.0
    assert hd95(z, z, sp) == 0.0 and assd(z, z, sp) == 0.0
    assert dice(one, z) == 0.0 and dice(z, one) == 0.0
    for a, b in ((one, z), (z, one)):
        assert math.isinf(hd95(a, b, sp)) and math.isinf(assd(a, b, sp))
    res = evaluate_case(z.astype(np.uint8), one.astype(np.uint8), sp, {"liver": 1, "spleen": 3})
    assert res["liver"]["dice"] == 0.0 and math.isinf(res["liver"]["hd95"])
    assert res["spleen"] == {"dice": 1.0, "hd95": 0.0, "assd": 0.0, "vol_pred_ml": 0.0, "vol_gt_ml": 0.0}


def test_surface_distances_hand_computed_anisotropic():
    # Two single-voxel masks 3 voxels apart along z (2 mm) and 4 along x (0.5 mm):
    # distance sqrt(6^2 + 2^2) mm in both directions.
    a = np.zeros((6, 3, 8), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = True
    b[4, 1, 5] = True
    d_ab, d_ba = surface_distances(a, b, (2.0, 1.0, 0.5))
    expect = math.hypot(6.0, 2.0)
    assert d_ab.tolist() == pytest.approx([expect]) and d_ba.tolist() == pytest.approx([expect])
    assert hd95(a, b, (2.0, 1.0, 0.5)) == pytest.approx(expect)
    assert assd(a, b, (2.0, 1.0, 0.5)) == pytest.approx(expect)


def test_shifted_slab_distances():
    # gt: rows 0..3 of a 2D image, pred: rows 0..4 (one row thicker, spacing 3 mm along rows).
    gt = np.zeros((10, 5), bool)
    gt[2:6, 1:4] = True
    pred = np.zeros_like(gt)
    pred[2:7, 1:4] = True
    d_pg, d_gp = surface_distances(pred, gt, (3.0, 1.0))
    # pred surface (12 voxels): rows 2 and 6 (3 each) + the side voxels of rows 3..5. Only row 6
    # is off gt's surface, 3 mm (one row) away from row 5.
    assert sorted(d_pg.tolist()) == pytest.approx([0.0] * 9 + [3.0] * 3)
    # gt surface (10 voxels): all on pred's surface except the centre of row 5, which is interior
    # to pred; its nearest pred surface voxel is the side voxel 1 mm away.
    assert sorted(d_gp.tolist()) == pytest.approx([0.0] * 9 + [1.0])
    assert assd(pred, gt, (3.0, 1.0)) == pytest.approx((9.0 + 1.0) / (12 + 10))
    assert hd95(pred, gt, (3.0, 1.0)) == pytest.approx(np.percentile([0.0] * 9 + [3.0] * 3, 95))


def test_volume_ml():
    m = np.ones((10, 10, 10), bool)
    assert volume_ml(m, (2.0, 1.0, 0.5)) == pytest.approx(1.0)


def test_surface_border_voxels_count():
    m = np.ones((3, 3, 3), bool)
    s = surface(m)
    assert s.sum() == 26 and not s[1, 1, 1]


def test_shape_and_spacing_errors():
    with pytest.raises(ValueError):
        dice(np.zeros((2, 2), bool), np.zeros((2, 3), bool))
    with pytest.raises(ValueError):
        hd95(np.ones((2, 2), bool), np.ones((2, 2), bool), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError):
        hd95(np.ones((2, 2), bool), np.ones((2, 2), bool), (1.0, 0.0))


def _random_blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
    return noise > np.quantile(noise, rng.uniform(0.6, 0.9))


@pytest.mark.parametrize("seed", range(5))
def test_against_monai(seed):
    import monai.metrics as monai_metrics  # requirements-dev.txt
    import torch
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(12, 30, size=3))
    spacing = tuple(float(s) for s in rng.uniform(0.4, 5.0, size=3))
    pred = _random_blob(rng, shape)
    gt = _random_blob(rng, shape)

    def onehot(m: np.ndarray):
        t = torch.from_numpy(m.astype(np.float32))
        return torch.stack([1 - t, t])[None]

    yp, y = onehot(pred), onehot(gt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m_dice = monai_metrics.compute_dice(yp, y, include_background=False).item()
        m_hd = monai_metrics.compute_hausdorff_distance(yp, y, percentile=95, spacing=spacing).item()
        m_assd = monai_metrics.compute_average_surface_distance(yp, y, symmetric=True,
                                                                spacing=spacing).item()
    res = evaluate_case(pred.astype(np.uint8), gt.astype(np.uint8), spacing, {"organ": 1})["organ"]
    assert res["dice"] == pytest.approx(m_dice, rel=1e-5)
    assert res["hd95"] == pytest.approx(m_hd, rel=1e-4)
    assert res["assd"] == pytest.approx(m_assd, rel=1e-4)
    assert res["vol_gt_ml"] == pytest.approx(gt.sum() * np.prod(spacing) / 1000)


def test_crop_equals_full_array():
    # A mask touching the array border: cropping must not change the surfaces.
    rng = np.random.default_rng(7)
    pred = _random_blob(rng, (20, 20, 20))
    gt = _random_blob(rng, (20, 20, 20))
    pred[0] = True
    sp = (2.5, 0.7, 0.9)
    d_pg, d_gp = surface_distances(pred, gt, sp)
    s_p, s_g = surface(pred), surface(gt)
    full_pg = ndimage.distance_transform_edt(~s_g, sampling=sp)[s_p]
    full_gp = ndimage.distance_transform_edt(~s_p, sampling=sp)[s_g]
    np.testing.assert_allclose(d_pg, full_pg)
    np.testing.assert_allclose(d_gp, full_gp)
