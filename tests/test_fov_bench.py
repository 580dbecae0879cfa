"""bench/fov.py helpers: the body-tight crop keeps the very voxels of the full field of view."""

from __future__ import annotations

import numpy as np

from bench.fov import body_crop, crop_volume
from data.volume import Geometry, Volume


def test_body_crop_keeps_voxels_and_world_positions():
    tissue = np.zeros((3, 40, 50), np.uint8)
    tissue[:, 10:25, 12:40] = 2
    rows, cols = body_crop(tissue, (2.0, 2.0), margin_mm=4.0)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (8, 27, 10, 42)
    vol = Volume(np.arange(tissue.size, dtype=np.int16).reshape(tissue.shape),
                 Geometry(tissue.shape, (2.0, 2.0, 5.0), (-50.0, -40.0, 7.0)))
    crop = crop_volume(vol, rows, cols)
    np.testing.assert_array_equal(crop.array, vol.array[:, rows, cols])
    np.testing.assert_allclose(crop.geometry.index_to_world(np.array([0, 0, 1])),
                               vol.geometry.index_to_world(np.array([cols.start, rows.start, 1])))
