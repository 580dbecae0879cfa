"""data.volume: exact I/O round trips, nibabel cross-check, DICOM series, canonical orientation."""

from __future__ import annotations

import numpy as np
import pytest

from data.volume import (
    Geometry,
    Orientation,
    Volume,
    read_geometry,
    read_volume,
    slice_axis_index,
    to_canonical,
    write_volume,
)
from tests.helpers import random_direction, random_volume, write_dicom_series
from utils.errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def _affine_lps(geo: Geometry) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = geo.direction_matrix @ np.diag(geo.spacing)
    a[:3, 3] = geo.origin
    return a


def _assert_geometry(a: Geometry, b: Geometry, tol: float = 1e-5) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=tol, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=tol, atol=tol * 100)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
@pytest.mark.parametrize("kind", ["ras", "permuted", "oblique"])
def test_nifti_round_trip_exact(tmp_path, dtype, kind):
    rng = np.random.default_rng(3)
    direction = {"ras": (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0),
                 "permuted": random_direction(rng),
                 "oblique": random_direction(rng, oblique=True)}[kind]
    spacing = (0.7, 1.3, 4.0)  # anisotropic
    path = random_volume(tmp_path, f"v_{kind}.nii.gz", shape=(5, 7, 9), spacing=spacing,
                         direction=direction, dtype=dtype, seed=11, origin=(-12.5, 30.25, 101.0))
    vol = read_volume(path)
    assert vol.array.dtype == np.dtype(dtype)
    assert vol.array.shape == (5, 7, 9)
    expected = Geometry((5, 7, 9), spacing, (-12.5, 30.25, 101.0), direction)
    _assert_geometry(vol.geometry, expected)
    _assert_geometry(read_geometry(path), expected)
    # write again: values exact, geometry exact to float32 header precision
    write_volume(vol, tmp_path / "again.nii.gz")
    again = read_volume(tmp_path / "again.nii.gz")
    np.testing.assert_array_equal(again.array, vol.array)
    _assert_geometry(again.geometry, vol.geometry)


@pytest.mark.parametrize("oblique", [False, True])
def test_nifti_affine_matches_nibabel(tmp_path, oblique):
    import nibabel as nib
    rng = np.random.default_rng(5)
    direction = random_direction(rng, oblique=oblique)
    path = random_volume(tmp_path, "v.nii.gz", shape=(4, 6, 8), spacing=(0.9, 1.1, 3.0),
                         direction=direction, dtype=np.int16, seed=2, origin=(10.0, -20.0, 5.0))
    vol = read_volume(path)
    img = nib.load(str(path))
    # nibabel: RAS world, array indexed (i, j, k) -- the reverse of ours
    ras = np.eye(4)
    ras[:3, :3] = LPS_TO_RAS
    np.testing.assert_allclose(img.affine, ras @ _affine_lps(vol.geometry), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), vol.array)


def test_mha_round_trip(tmp_path):
    path = random_volume(tmp_path, "v.mha", shape=(3, 4, 5), dtype=np.float32, seed=1)
    vol = read_volume(path)
    write_volume(vol, tmp_path / "w.mha")
    again = read_volume(tmp_path / "w.mha")
    np.testing.assert_array_equal(again.array, vol.array)
    _assert_geometry(again.geometry, vol.geometry, tol=1e-9)


def test_dicom_series_folder(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, size=(4, 6, 5)).astype(np.int16)
    geo = Geometry((4, 6, 5), (0.75, 0.8, 2.5), (-50.0, 20.0, 100.0))
    folder = write_dicom_series(tmp_path / "series", Volume(array, geo))
    vol = read_volume(folder)
    np.testing.assert_array_equal(vol.array, array)
    _assert_geometry(vol.geometry, geo, tol=1e-4)


def test_read_errors_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not a nifti at all" * 10)
    with pytest.raises(InputError) as err:
        read_volume(bad)
    assert err.value.path == str(bad)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        read_volume(empty)
    with pytest.raises(InputError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("seed", range(6))
def test_to_canonical_round_trip_and_world_positions(seed):
    rng = np.random.default_rng(seed)
    direction = random_direction(rng, oblique=seed % 2 == 1)
    shape = (3, 4, 5)
    geo = Geometry(shape, tuple(rng.uniform(0.5, 3, 3)), tuple(rng.uniform(-50, 50, 3)), direction)
    vol = Volume(np.arange(60, dtype=np.int16).reshape(shape), geo)
    canon, ori = to_canonical(vol)
    # canonical: index axes run L, P, S (positive diagonal), array [S, P, L]
    assert np.all(np.diag(canon.geometry.direction_matrix) > 0.9)
    np.testing.assert_array_equal(ori.invert(canon.array), vol.array)
    # every voxel keeps its world position
    for value in (0, 17, 59):
        k, j, i = np.argwhere(vol.array == value)[0]
        kc, jc, ic = np.argwhere(canon.array == value)[0]
        np.testing.assert_allclose(canon.geometry.index_to_world([ic, jc, kc]),
                                   geo.index_to_world([i, j, k]), atol=1e-9)
    # leading channel axes
    stack = np.stack([canon.array, canon.array * 2])
    np.testing.assert_array_equal(ori.invert(stack)[1], vol.array * 2)
    np.testing.assert_array_equal(ori.apply(np.stack([vol.array])[None])[0, 0], canon.array)


def test_slice_axis_from_direction():
    # slices-first storage: index axis i points superior
    d = (0.0, 1.0, 0.0,
         0.0, 0.0, 1.0,
         1.0, 0.0, 0.0)
    assert slice_axis_index(Geometry((5, 6, 7), (1, 1, 1), (0, 0, 0), d)) == 0
    assert slice_axis_index(Geometry((5, 6, 7), (1, 1, 1), (0, 0, 0))) == 2
    assert Orientation((0, 1, 2), (False, False, False)).is_identity


def test_same_grid_tolerates_header_rounding_not_shifts_far_from_the_world_origin():
    """Origins match within a hundredth of a voxel (plus float32 header rounding), wherever the grid
    lies: a tolerance relative to the position let grids 1e6 mm out match 50 mm apart."""
    def geo(origin_z: float) -> Geometry:
        return Geometry((4, 8, 8), (1.5, 1.5, 3.0), (0.0, 0.0, origin_z))

    assert geo(-1500.0).same_grid(geo(-1500.0 + 1e-3))
    assert geo(-1500.123456).same_grid(geo(float(np.float32(-1500.123456))))  # a float32 header
    assert not geo(-1500.0).same_grid(geo(-1500.14))
    assert not geo(1e6).same_grid(geo(1e6 + 50.0))
    assert not geo(0.0).same_grid(geo(0.05))
    # per axis: 5 mm slices allow 0.01 mm along them, 0.7 mm pixels do not allow it across
    thick = Geometry((4, 8, 8), (0.7, 0.7, 5.0), (0.0, 0.0, -300.0))
    assert thick.same_grid(Geometry((4, 8, 8), (0.7, 0.7, 5.0), (0.0, 0.0, -300.01)))
    assert not thick.same_grid(Geometry((4, 8, 8), (0.7, 0.7, 5.0), (0.01, 0.0, -300.0)))


def test_read_error_names_a_gzip_file_without_gz_and_hides_object_addresses(tmp_path):
    import gzip

    vol = read_volume(random_volume(tmp_path, "ok.nii.gz"))
    write_volume(vol, tmp_path / "ok.nii")
    wrong = tmp_path / "gz_named_plain.nii"
    wrong.write_bytes(gzip.compress((tmp_path / "ok.nii").read_bytes()))
    with pytest.raises(InputError, match=r"the file is gzip-compressed: name it gz_named_plain\.nii\.gz"):
        read_volume(wrong)
    bad = tmp_path / "cut.mha"
    write_volume(vol, bad)
    bad.write_bytes(bad.read_bytes()[:-50])
    with pytest.raises(InputError) as err:
        read_volume(bad)
    assert "0x" not in str(err.value) and "ITK ERROR" not in str(err.value)
