"""data.resample, data.preprocess and the resample.py command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.preprocess import (
    prepare_canonical,
    restore_inplane,
    si_length,
    view_stack,
    view_to_canonical,
    window_hu,
)
from data.resample import resample_axis, resample_inplane, resampled_geometry
from data.resample_tree import resample_tree
from data.volume import Geometry, Volume, read_volume, to_canonical, write_volume
from tests.helpers import random_direction, write_dicom_series
from utils.errors import InputError

REPO = Path(__file__).resolve().parent.parent


def _edges(geo: Geometry) -> np.ndarray:
    """World positions of the 8 outer corners of the field of view (index -0.5 and n - 0.5)."""
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=float)
    return geo.index_to_world(corners * np.asarray(geo.size) - 0.5)


# ---------------------------------------------------------------------------------------------
# resample_axis: hand-computed values


def test_resample_axis_linear_hand_values():
    # downsample 4 -> 2: new voxels sample old indices 0.5 and 2.5
    np.testing.assert_allclose(resample_axis(np.array([0.0, 1, 2, 3]), 0, 2, False), [0.5, 2.5])
    # upsample 2 -> 4: old indices -0.25 (border kept), 0.25, 0.75, 1.25 (border kept)
    np.testing.assert_allclose(resample_axis(np.array([0.0, 2.0]), 0, 4, False), [0, 0.5, 1.5, 2])


def test_resample_axis_nearest_and_torch():
    import torch
    lab = np.array([[1, 2]], dtype=np.uint8)
    out = resample_axis(lab, 1, 4, True)
    np.testing.assert_array_equal(out, [[1, 1, 2, 2]])
    assert out.dtype == np.uint8
    t = resample_axis(torch.tensor([[0.0, 1, 2, 3]]), -1, 2, False)
    np.testing.assert_allclose(t.numpy(), [[0.5, 2.5]])
    same = np.zeros((3, 5))
    assert resample_axis(same, 1, 5, False) is same


def test_window_hu_hand_values():
    out = window_hu(np.array([-300, -200, 0, 100, 200, 1000], dtype=np.int16), (-200, 200))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1, -1, 0, 0.5, 1, 1])


# ---------------------------------------------------------------------------------------------
# resample_inplane: geometry and values


@pytest.mark.parametrize("oblique", [False, True])
def test_resampled_geometry_keeps_field_of_view(oblique):
    rng = np.random.default_rng(1)
    geo = Geometry((7, 9, 11), (0.7, 0.9, 3.0), (5.0, -3.0, 12.0), random_direction(rng, oblique))
    new = resampled_geometry(geo, (4, 6, 7))
    np.testing.assert_allclose(_edges(new), _edges(geo), atol=1e-9)
    np.testing.assert_allclose(new.spacing, (0.7 * 11 / 4, 0.9 * 9 / 6, 3.0))
    assert new.direction == geo.direction


def test_resample_inplane_ramp_values_and_geometry():
    # values = 10 * i: linear interpolation reproduces the ramp exactly at the new centres
    ramp = np.broadcast_to(10.0 * np.arange(8, dtype=np.float32), (3, 6, 8)).copy()
    geo = Geometry((3, 6, 8), (1.0, 2.0, 5.0), (0.0, 0.0, 0.0))
    out = resample_inplane(Volume(ramp, geo), (4, 3), is_label=False)
    assert out.array.shape == (3, 3, 4)  # slice count kept; s1 along i, s2 along j
    # new voxel t samples old index 2t + 0.5
    np.testing.assert_allclose(out.array[1, 1], [5.0, 25.0, 45.0, 65.0], atol=1e-4)
    np.testing.assert_allclose(out.geometry.spacing, (2.0, 4.0, 5.0))
    # origin moves by half the voxel-size change so the edges stay put
    np.testing.assert_allclose(out.geometry.origin, (0.5, 1.0, 0.0))
    np.testing.assert_allclose(_edges(out.geometry), _edges(geo))


def test_resample_constant_image_has_no_border_artefact():
    vol = Volume(np.full((2, 5, 5), 500, dtype=np.int16), Geometry((2, 5, 5), (1, 1, 2), (0, 0, 0)))
    out = resample_inplane(vol, (13, 11), is_label=False)
    assert out.array.dtype == np.int16
    assert np.all(out.array == 500)


def test_integer_images_are_rounded():
    arr = np.array([[[0, 1]]], dtype=np.int16)  # (1, 1, 2)
    vol = Volume(arr, Geometry((1, 1, 2), (1, 1, 1), (0, 0, 0)))
    out = resample_inplane(vol, (4, 1), is_label=False)
    # old indices -0.25, 0.25, 0.75, 1.25 -> 0, 0.25, 0.75, 1 -> rounded 0, 0, 1, 1
    np.testing.assert_array_equal(out.array[0, 0], [0, 0, 1, 1])


def test_slice_axis_from_direction_slices_first_storage():
    # index axis i runs superior: it is the slice axis, j and k are in-plane
    d = (0.0, 1.0, 0.0,
         0.0, 0.0, 1.0,
         1.0, 0.0, 0.0)
    geo = Geometry((20, 30, 5), (2.5, 0.8, 0.9), (0, 0, 0), d)
    vol = Volume(np.zeros((20, 30, 5), dtype=np.int16), geo)
    out = resample_inplane(vol, (16, 12), is_label=False)
    assert out.geometry.size == (5, 16, 12)
    np.testing.assert_allclose(out.geometry.spacing, (2.5, 0.8 * 30 / 16, 0.9 * 20 / 12))


def test_labels_nearest_no_new_values():
    rng = np.random.default_rng(4)
    lab = rng.choice(np.array([0, 3, 7], dtype=np.uint8), size=(3, 17, 19))
    vol = Volume(lab, Geometry((3, 17, 19), (0.8, 0.8, 2.0), (0, 0, 0), random_direction(rng)))
    for size in ((8, 9), (40, 31)):
        out = resample_inplane(vol, size, is_label=True)
        assert out.array.dtype == np.uint8
        assert set(np.unique(out.array)) <= {0, 3, 7}
    # upsampling by an integer factor repeats each voxel exactly (no shift)
    block = np.arange(4, dtype=np.uint8).reshape(1, 2, 2)
    up = resample_inplane(Volume(block, Geometry((1, 2, 2), (1, 1, 1), (0, 0, 0))), (4, 4), is_label=True)
    np.testing.assert_array_equal(up.array[0], np.kron(block[0], np.ones((2, 2), dtype=np.uint8)))
    # exact 2x downsampling: every tie goes to the upper voxel, whatever the spacing's float noise
    row = np.array([[[1, 2, 3, 4, 5, 6, 7, 8]]], dtype=np.uint8)
    for sp in (1.0, 0.7, 0.976):
        down = resample_inplane(Volume(row, Geometry((1, 1, 8), (sp, sp, 2.0), (-250.3, 1, 2))), (4, 1),
                                is_label=True)
        np.testing.assert_array_equal(down.array[0, 0], [2, 4, 6, 8])


# ---------------------------------------------------------------------------------------------
# preprocess


def test_prepare_canonical_noop_size_and_resample():
    rng = np.random.default_rng(2)
    arr = rng.integers(-500, 500, size=(4, 8, 6)).astype(np.int16)
    # 6 x 8 voxels of 0.8 mm: the field of view has the aspect of a 6 x 8 grid, so nothing is padded
    geo = Geometry((4, 8, 6), (0.8, 0.8, 2.0), (1, 2, 3), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    vol = Volume(arr, geo)
    direct, ori = to_canonical(vol)
    canon, ori2 = prepare_canonical(vol, (6, 8), is_label=False)  # already 6 x 8
    assert ori == ori2
    assert canon.array.dtype == np.float32
    np.testing.assert_array_equal(canon.array, direct.array.astype(np.float32))
    canon2, _ = prepare_canonical(vol, (3, 4), is_label=False)
    assert canon2.array.shape == (4, 4, 3)
    np.testing.assert_allclose(_edges(canon2.geometry)[[0, 7]].sum(0), _edges(direct.geometry)[[0, 7]].sum(0))
    lab, _ = prepare_canonical(vol.with_array((arr > 0).astype(np.uint8)), (3, 4), is_label=True)
    assert lab.array.dtype == np.uint8 and lab.array.shape == (4, 4, 3)


def test_sitk_inplane_equals_separable_axis_resampling():
    # prepare_canonical uses SimpleITK, restore_inplane numpy: both must follow the same grid rule
    rng = np.random.default_rng(8)
    arr = rng.normal(size=(2, 9, 7)).astype(np.float32)
    vol = Volume(arr, Geometry((2, 9, 7), (0.8, 1.1, 2.0), (3.0, 4.0, 5.0)))
    for size in ((4, 5), (15, 12)):
        sitk_out = resample_inplane(vol, size, is_label=False).array
        np_out = restore_inplane(arr, (size[1], size[0]))
        np.testing.assert_allclose(sitk_out, np_out, atol=1e-5)
    import torch
    t = restore_inplane(torch.from_numpy(arr)[None], (12, 15))
    np.testing.assert_allclose(t[0].numpy(), restore_inplane(arr, (12, 15)), atol=1e-6)
    lab = rng.integers(0, 4, size=(2, 9, 7)).astype(np.uint8)
    np.testing.assert_array_equal(resample_inplane(vol.with_array(lab), (15, 12), is_label=True).array,
                                  restore_inplane(lab, (12, 15), is_label=True))


def test_view_stack_shapes_and_round_trip():
    n_s, n_p, n_l = 6, 10, 8
    spacing = (1.0, 1.25, 2.5)  # (x=L, y=P, z=S); target spacing min(1, 1.25) = 1
    s_coord = np.arange(n_s, dtype=np.float32)[:, None, None]
    arr = np.broadcast_to(s_coord * 0.1 + np.arange(n_l) * 0.01, (n_s, n_p, n_l)).astype(np.float32)
    assert si_length(n_s, spacing) == 15
    assert view_stack(arr, spacing, "axial", False) is arr
    cor = view_stack(arr, spacing, "coronal", False)
    sag = view_stack(arr, spacing, "sagittal", False)
    assert cor.shape == (n_p, 15, n_l) and sag.shape == (n_l, 15, n_p)
    assert cor.dtype == np.float32
    # coronal slice y is array[:, y] with S resampled; sagittal slice x is array[:, :, x]
    np.testing.assert_allclose(cor[3][:, 5], sag[5][:, 3])
    for view in ("axial", "coronal", "sagittal"):
        st = view_stack(arr, spacing, view, False)
        probs = np.stack([st, 1 - st])  # (C, n, H, W)
        back = view_to_canonical(probs, arr.shape, view)
        assert back.shape == (2, n_s, n_p, n_l)
        # linear in S: exact away from the clamped outermost slices
        np.testing.assert_allclose(back[0, 1:-1], arr[1:-1], atol=1e-5)
        np.testing.assert_allclose(back.sum(0), 1.0, atol=1e-5)
        import torch
        back_t = view_to_canonical(torch.from_numpy(probs), arr.shape, view)
        np.testing.assert_allclose(back_t.numpy(), back, atol=1e-6)
    lab = (arr > 0.3).astype(np.uint8)
    lab_cor = view_stack(lab, spacing, "coronal", True)
    assert lab_cor.dtype == np.uint8 and set(np.unique(lab_cor)) <= {0, 1}
    with pytest.raises(ValueError):
        view_to_canonical(np.zeros((2, 3, 4, 5)), arr.shape, "coronal")


# ---------------------------------------------------------------------------------------------
# resample_tree / resample.py


def _write_raw(raw: Path) -> None:
    # 12 x 10 voxels of 0.9 mm: the aspect of the tests' 6 x 5 grid (nothing padded)
    geo = Geometry((3, 10, 12), (0.9, 0.9, 2.5), (10.0, 20.0, 30.0))
    rng = np.random.default_rng(0)
    write_volume(Volume(rng.integers(-1000, 1000, (3, 10, 12)).astype(np.int16), geo),
                 raw / "Spleen" / "labeled" / "a.nii.gz")
    write_volume(Volume(rng.choice(np.array([0, 1, 2], np.uint8), (3, 10, 12)), geo),
                 raw / "Spleen" / "label" / "a.nii.gz")
    (raw / "Spleen" / "dataset.json").write_text(json.dumps({"name": "x"}))


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "resample.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end_and_skip(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write_raw(raw)
    res = _run_cli("-p1", str(raw), "-p2", str(out), "-s1", "6", "-s2", "5")
    assert res.returncode == 0, res.stderr
    img = read_volume(out / "Spleen" / "labeled" / "a.nii.gz")
    lab = read_volume(out / "Spleen" / "label" / "a.nii.gz")
    src = read_volume(raw / "Spleen" / "labeled" / "a.nii.gz")
    assert img.array.shape == (3, 5, 6) and img.array.dtype == np.int16
    assert lab.array.dtype == np.uint8 and set(np.unique(lab.array)) <= {0, 1, 2}
    np.testing.assert_allclose(img.geometry.spacing, (1.8, 1.8, 2.5), atol=1e-5)
    np.testing.assert_allclose(img.geometry.origin, (10.45, 20.45, 30.0), atol=1e-4)
    np.testing.assert_allclose(_edges(img.geometry), _edges(src.geometry), atol=1e-4)
    assert json.loads((out / "Spleen" / "dataset.json").read_text()) == {"name": "x"}
    res2 = _run_cli("-p1", str(raw), "-p2", str(out), "-s1", "6", "-s2", "5")
    assert res2.returncode == 0 and "skipped 3" in res2.stdout


def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write_raw(raw)
    bad = raw / "Spleen" / "labeled" / "b.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage")
    res = _run_cli("-p1", str(raw), "-p2", str(out))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0]
    assert "Traceback" not in res.stderr
    # header pre-check: the bad file is found before anything is written
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
    missing = _run_cli("-p1", str(tmp_path / "nope"), "-p2", str(out))
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_nan_and_4d_inputs_raise_naming_the_file(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    nan = np.zeros((2, 3, 4), dtype=np.float32)
    nan[1, 1, 1] = np.nan
    write_volume(Volume(nan, Geometry((2, 3, 4), (1, 1, 1), (0, 0, 0))), raw / "nan.nii.gz")
    with pytest.raises(InputError) as err:
        resample_tree(raw, out, (4, 4), log=lambda line: None)
    assert err.value.path == str(raw / "nan.nii.gz")
    assert not (out / "nan.nii.gz").exists()
    import SimpleITK as sitk  # noqa: N813

    (raw / "nan.nii.gz").unlink()
    sitk.WriteImage(sitk.Image([3, 3, 3, 2], sitk.sitkInt16), str(raw / "four.nii.gz"))
    with pytest.raises(InputError, match="4D") as err:
        resample_tree(raw, out, (4, 4), log=lambda line: None)
    assert err.value.path == str(raw / "four.nii.gz")
    (raw / "four.nii.gz").unlink()
    with pytest.raises(InputError, match="no volumes"):
        resample_tree(raw, out, (4, 4), log=lambda line: None)


def test_tree_dicom_and_pool(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    geo = Geometry((3, 6, 8), (0.7, 0.7, 2.0), (0.0, 0.0, 0.0))
    arr = np.arange(144, dtype=np.int16).reshape(3, 6, 8)
    write_dicom_series(raw / "ds" / "unlabeled" / "ct1", Volume(arr, geo))
    write_volume(Volume(arr, geo), raw / "ds" / "unlabeled" / "ct2.nii.gz")
    write_volume(Volume((arr % 2).astype(np.uint8), geo), raw / "ds" / "labelsTr" / "ct2.nii.gz")
    counts = resample_tree(raw, out, (4, 3), workers=2, log=lambda line: None)
    assert counts == {"resampled": 3, "copied": 0, "skipped": 0}
    a = read_volume(out / "ds" / "unlabeled" / "ct1.nii.gz")
    b = read_volume(out / "ds" / "unlabeled" / "ct2.nii.gz")
    np.testing.assert_array_equal(a.array, b.array)
    assert a.array.shape == (3, 3, 4)
    lab = read_volume(out / "ds" / "labelsTr" / "ct2.nii.gz")
    assert set(np.unique(lab.array)) <= {0, 1}


def test_plan_jobs_refuses_two_inputs_for_one_output(tmp_path):
    """A DICOM series folder case1/ and a file case1.nii.gz both become case1.nii.gz; so do a.mhd and
    a.mha: refused before any work instead of the second replacing the first."""
    from data.resample_tree import plan_jobs
    from data.volume import Geometry, Volume
    from tests.helpers import write_dicom_series
    from utils.errors import InputError

    raw = tmp_path / "raw" / "labeled"
    raw.mkdir(parents=True)
    (raw / "a.mha").write_bytes(b"x")
    (raw / "a.mhd").write_bytes(b"x")
    with pytest.raises(InputError, match=r"would be written to .*a\.mha"):
        plan_jobs(tmp_path / "raw", tmp_path / "out")
    (raw / "a.mhd").unlink()
    write_dicom_series(raw / "case1", Volume(np.zeros((3, 8, 8), np.int16),
                                             Geometry((3, 8, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))))
    (raw / "case1.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match=r"would be written to .*case1\.nii\.gz"):
        plan_jobs(tmp_path / "raw", tmp_path / "out")
