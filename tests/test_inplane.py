"""data.inplane: slices padded to the grid's aspect (never stretched), the spacing mode, and the exact
way back to the input grid through segment_volume for non-square, flipped and oblique inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.config import config_from_dict, config_to_dict, load_config
from data.inplane import AIR_HU, apply_plan, plan_inplane
from data.preprocess import prepare_with_plan, window_hu
from data.resample import resample_inplane
from data.resample_tree import resample_to_grid
from data.volume import Geometry, Volume, to_canonical, to_storage
from inference.segment import predict_stack, probabilities_to_labels, segment_volume
from tests.helpers import random_direction
from tests.test_segment import HU, ConvModel, IntensityModel, loaded

torch.set_num_threads(1)


def _config(inplane: tuple[int, int], spacing: float | None = None):
    raw = config_to_dict(load_config())
    raw["inplane_size"] = list(inplane)
    raw["inplane_spacing"] = spacing
    return config_from_dict(raw)


def _blobs(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for cls in (1, 2, 3):
        lo = [int(rng.integers(0, s - 4)) for s in shape]
        hi = [int(lo[a] + rng.integers(3, max(4, shape[a] // 2))) for a in range(3)]
        lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = cls
    return lab


def _stored_case(seed: int, canon_shape=(9, 20, 30), oblique: bool = False):
    """A canonical 1 mm phantom with a non-square slice (20 x 30), stored in a random orientation."""
    rng = np.random.default_rng(seed)
    labels = _blobs(rng, canon_shape)
    image = np.vectorize(HU.get)(labels).astype(np.int16)
    canon = Volume(image, Geometry(canon_shape, (1.0, 1.0, 1.0), (5.0, -3.0, 2.0)))
    direction = random_direction(rng)
    stored = to_storage(canon, direction)
    stored_labels = to_storage(canon.with_array(labels), direction).array
    if oblique:  # rotate the whole grid a little: still the same permutation, now oblique
        a = np.deg2rad(12.0)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        d = rot @ stored.geometry.direction_matrix
        geo = stored.geometry
        stored = Volume(stored.array, Geometry(geo.shape, geo.spacing, geo.origin,
                                               tuple(float(v) for v in d.ravel())))
    return stored, stored_labels


# ----------------------------------------------------------------------------------------------
# plans


def test_plan_square_field_of_view_is_not_padded():
    plan = plan_inplane((512, 512), (0.7, 0.7, 2.0), (256, 256))
    assert plan.pre == ((0, 0), (0, 0)) and plan.post == ((0, 0), (0, 0)) and plan.output == (256, 256)
    # non-square voxels count in millimetres: 512 x 0.7 mm by 400 x 0.9 mm = 358.4 x 360 mm
    plan = plan_inplane((400, 512), (0.7, 0.9, 2.0), (256, 256))
    assert plan.pre == ((0, 0), (1, 1)) and plan.padded == (400, 514)


def test_plan_pads_the_short_side_to_a_square():
    # 101 rows x 122 columns of 3 mm (the body-tight CT of the issue): 21 rows of air added
    plan = plan_inplane((101, 122), (3.0, 3.0, 3.0), (256, 256))
    assert plan.pre == ((10, 11), (0, 0)) and plan.padded == (122, 122) and plan.output == (256, 256)
    # a non-square grid: its aspect (cols / rows = 2) in millimetres
    plan = plan_inplane((10, 10), (1.0, 1.0, 1.0), (64, 32))
    assert plan.padded == (10, 20) and plan.resized == (32, 64)


def test_plan_spacing_mode_pads_or_crops():
    plan = plan_inplane((101, 122), (3.0, 3.0, 3.0), (256, 256), spacing_mm=1.5)
    assert plan.pre == ((0, 0), (0, 0)) and plan.resized == (202, 244)
    assert plan.post == ((27, 27), (6, 6)) and plan.output == (256, 256)
    crop = plan_inplane((300, 400), (1.0, 1.0, 1.0), (256, 256), spacing_mm=1.5)
    assert crop.resized == (200, 267) and crop.post == ((28, 28), (-5, -6)) and crop.output == (256, 256)
    keep = plan_inplane((300, 400), (1.0, 1.0, 1.0), (256, 256), spacing_mm=1.5, allow_crop=False)
    assert keep.post == ((28, 28), (0, 0)) and keep.output == (256, 267)
    assert keep.crop_post(np.zeros((256, 267))).shape == (200, 267)
    with pytest.raises(ValueError):  # a crop cannot be undone
        crop.crop_post(np.zeros((256, 256)))


def test_padding_is_exact_and_air():
    # grid = padded size: no resampling, so every original voxel must reappear at its world position
    rng = np.random.default_rng(0)
    arr = rng.integers(-900, 900, (3, 6, 10)).astype(np.int16)
    vol = Volume(arr, Geometry((3, 6, 10), (1.5, 1.5, 2.0), (1.0, 2.0, 3.0)))
    canon, _ = to_canonical(vol)
    plan = plan_inplane(canon.array.shape[1:], canon.geometry.spacing, (10, 10))
    out = apply_plan(canon, plan, is_label=False)
    assert out.array.shape == (3, 10, 10) and plan.pre == ((2, 2), (0, 0))
    np.testing.assert_array_equal(out.array[:, 2:8], arr)
    assert (out.array[:, :2] == AIR_HU).all() and (out.array[:, 8:] == AIR_HU).all()
    np.testing.assert_allclose(out.geometry.index_to_world(np.array([0, 2, 0])),
                               vol.geometry.index_to_world(np.array([0, 0, 0])), atol=1e-9)
    lab = apply_plan(canon.with_array((arr > 0).astype(np.uint8)), plan, is_label=True)
    assert lab.array.dtype == np.uint8 and (lab.array[:, :2] == 0).all()
    # an unsigned image cannot hold -1024: it is padded with its lowest value, never wrapped around
    mr = apply_plan(canon.with_array((arr + 1000).astype(np.uint16)), plan, is_label=False)
    assert (mr.array[:, :2] == 0).all()


def test_no_stretch_a_disc_stays_a_disc():
    # a 40 mm disc in a 60 x 120 mm slice, brought to 64 x 64: same extent along both axes
    yy, xx = np.mgrid[0:60, 0:120]
    disc = (((yy - 30) ** 2 + (xx - 50) ** 2) <= 20 ** 2).astype(np.uint8)[None].repeat(2, 0)
    vol = Volume(disc, Geometry(disc.shape, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
    out, _, plan = prepare_with_plan(vol, (64, 64), is_label=True)
    rows, cols = np.nonzero(out.array[0])
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1
    assert out.geometry.spacing[0] == pytest.approx(out.geometry.spacing[1])


# ----------------------------------------------------------------------------------------------
# square inputs: exactly the seed's preprocessing and segmentation


def _seed_segmentation(lm, volume: Volume) -> np.ndarray:
    """The pipeline before padding existed: stretch-resample the canonical slice to the grid."""
    cfg = lm.config
    canon, ori = to_canonical(volume)
    res = resample_inplane(canon, cfg.inplane_size, is_label=False, slice_axis=2, dtype=np.float32)
    image = window_hu(res.array, cfg.hu_window)
    probs = np.zeros((lm.num_classes, *image.shape), np.float32)
    predict_stack(lm, image, probs, batch=4, device=torch.device("cpu"))
    shape = ori.apply(np.broadcast_to(np.uint8(0), volume.array.shape)).shape
    return np.ascontiguousarray(ori.invert(probabilities_to_labels(probs, shape, torch.device("cpu"))))


@pytest.mark.parametrize("seed", [0, 1])
def test_square_inputs_segment_exactly_as_before(seed):
    rng = np.random.default_rng(seed)
    # square field of view from non-square voxels too: 40 x 0.9 mm by 45 x 0.8 mm = 36 mm both
    shape, spacing = ((5, 40, 40), (0.9, 0.9, 2.0)) if seed == 0 else ((5, 45, 40), (0.9, 0.8, 2.0))
    arr = rng.uniform(-300, 300, shape).astype(np.float32)
    vol = to_storage(Volume(arr, Geometry(shape, spacing, (1.0, 2.0, 3.0))), random_direction(rng))
    lm = loaded(ConvModel(), _config((32, 32)), "axial", block=16)
    canon, _, plan = prepare_with_plan(vol, (32, 32), is_label=False)
    assert plan.pre == ((0, 0), (0, 0))
    seed_canon = resample_inplane(to_canonical(vol)[0], (32, 32), is_label=False, slice_axis=2,
                                  dtype=np.float32)
    np.testing.assert_array_equal(canon.array, seed_canon.array)
    assert canon.geometry == seed_canon.geometry
    out = segment_volume(lm, vol, postprocess=False, device="cpu", batch=4)
    np.testing.assert_array_equal(out.array, _seed_segmentation(lm, vol))


# ----------------------------------------------------------------------------------------------
# non-square, flipped, oblique: probabilities back exactly onto the input grid


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("oblique", [False, True])
def test_segment_non_square_maps_back_exactly(seed, oblique):
    vol, labels = _stored_case(seed, oblique=oblique)
    # grid 30 x 30 = the padded slice: no resampling, so the known model returns the phantom exactly
    cfg = _config((30, 30))
    for view in ("axial", "coronal"):
        out = segment_volume(loaded(IntensityModel(1), cfg, view, 16), vol, postprocess=False,
                             device="cpu", batch=4)
        assert out.geometry == vol.geometry and out.array.shape == labels.shape
        np.testing.assert_array_equal(out.array, labels)


def test_segment_non_square_resampled_and_spacing_mode():
    vol, labels = _stored_case(5)
    for cfg in (_config((48, 48)), _config((24, 24), spacing=1.0), _config((32, 32), spacing=0.5)):
        out = segment_volume(loaded(IntensityModel(1), cfg, "axial", 16), vol, postprocess=False,
                             device="cpu", batch=4)
        assert out.geometry == vol.geometry
        agree = (out.array == labels).mean()
        assert agree > (0.999 if cfg.inplane_spacing == 1.0 else 0.97), (cfg.inplane_size, agree)


def test_old_checkpoint_config_means_pad_mode():
    raw = config_to_dict(load_config())
    raw.pop("inplane_spacing")
    assert config_from_dict(raw).inplane_spacing is None
    raw["inplane_spacing"] = -1
    with pytest.raises(Exception, match="inplane_spacing"):
        config_from_dict(raw)


# ----------------------------------------------------------------------------------------------
# resample.py's form: stored back in the input's own order


def test_resample_to_grid_non_square_keeps_order_and_physics():
    vol, labels = _stored_case(3)
    img = resample_to_grid(vol, (30, 30), is_label=False)
    lab = resample_to_grid(vol.with_array(labels), (30, 30), is_label=True)
    assert img.array.dtype == vol.array.dtype and lab.array.dtype == np.uint8
    assert img.geometry == lab.geometry and img.geometry.direction == vol.geometry.direction
    # back to canonical, crop the air: the original canonical voxels, exactly
    canon_in, _ = to_canonical(vol.with_array(labels))
    canon_out, _ = to_canonical(lab)
    np.testing.assert_array_equal(canon_out.array[:, 5:25], canon_in.array)
    assert (canon_out.array[:, :5] == 0).all()
    np.testing.assert_allclose(canon_out.geometry.index_to_world(np.array([0, 5, 0])),
                               canon_in.geometry.index_to_world(np.array([0, 0, 0])), atol=1e-6)


@pytest.mark.parametrize("transposed", [False, True])
def test_resample_to_grid_non_square_grid_goes_to_the_canonical_axes(transposed):
    # A 30 x 20 mm slice (columns L x rows P) onto a 15 x 10 grid: already the grid's aspect, so
    # nothing is padded, and s1 = 15 must land on the columns however the volume is stored (slices
    # first, or rows and columns swapped), or the 2 mm pixels become 1.33 x 3 mm ones.
    labels = np.zeros((9, 20, 30), np.uint8)
    labels[:, 4:16, 6:12] = 1
    canon = Volume(labels, Geometry((9, 20, 30), (1.0, 1.0, 2.0), (5.0, -3.0, 2.0)))
    d = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0) if transposed else (0.0, 0.0, 1.0, 1.0, 0.0, 0.0,
                                                                         0.0, 1.0, 0.0)
    stored = to_storage(canon, d)
    assert stored.array.shape != canon.array.shape
    out = resample_to_grid(stored, (15, 10), is_label=True)
    back, _ = to_canonical(out)
    assert back.array.shape == (9, 10, 15)
    np.testing.assert_allclose(back.geometry.spacing, (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(back.array, labels[:, 1::2, 1::2])


@pytest.mark.parametrize("spacing_mm", [None, 3.0])
def test_plan_refuses_slices_far_larger_than_input_and_grid(spacing_mm):
    """A header's spacing in the wrong unit (1e6 mm pixels) asked SimpleITK for a 2e7 x 2e7 slice and
    ended in an allocation traceback; the plan now refuses it (the caller names the file)."""
    from utils.errors import InputError

    big = (1e6, 1.0, 1.0) if spacing_mm is None else (1e6, 1e6, 1.0)  # pad mode: a very long side
    with pytest.raises(InputError, match="check the voxel spacing") as err:
        plan_inplane((64, 64), big, (32, 32), spacing_mm=spacing_mm)
    assert err.value.path is None
    # legitimate extremes pass: a 0.5 mm grid from 5 mm pixels, a 1:8 field of view padded square
    plan_inplane((64, 64), (5.0, 5.0, 1.0), (256, 256), spacing_mm=0.5)
    plan_inplane((64, 512), (1.0, 1.0, 1.0), (256, 256))


def test_plan_allows_strong_but_real_upsampling():
    """Coarse pixels (11 mm, a small phantom) resampled to 1 mm grow 121x in area: allowed."""
    plan = plan_inplane((23, 32), (11.25, 11.25, 5.0), (32, 32), spacing_mm=1.0)
    assert plan.resized == (259, 360)
