"""data.cache: cached slices equal the shared preprocessing, reuse, keys, views on demand, errors."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest

from data.cache import CACHE_VERSION, CachedVolume, _valid_entry, build_cache, cache_key, foreground_slices
from data.config import config_from_dict
from data.layout import Case
from data.preprocess import prepare_canonical, view_stack, window_hu
from data.volume import Geometry, Volume, read_volume, write_volume
from tests.helpers import phantom_pair, write_dicom_series
from utils.errors import InputError

CONFIG = config_from_dict({
    "organs": ["liver", "kidney", "spleen"],
    "hu_window": [-200, 200],
    "inplane_size": [12, 10],
    "datasets": {"KiTS": {"labels": {1: "kidney", 2: "kidney"}},
                 "MSDSpleen": {"labels": {1: "spleen"}}},
})
# slices-first storage with flips: exercises to_canonical inside the cache
DIRECTION = (0.0, -1.0, 0.0,
             0.0, 0.0, 1.0,
             -1.0, 0.0, 0.0)


def _case(tmp_path, name="c1", label_value=2, direction=DIRECTION, label_geo=None, seed=0,
          suffix=".nii.gz") -> Case:
    shape = (14, 16, 9)  # numpy (nk, nj, ni); index axis i is S-I here
    image, _ = phantom_pair(shape, label_value, seed=seed)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:12, 3:13, 5:9] = label_value  # organ on S-I index i = 5..8 only
    geo = Geometry(shape, (3.0, 0.9, 0.8), (5.0, -7.0, 11.0), direction)
    img_p, lab_p = tmp_path / "data" / f"{name}{suffix}", tmp_path / "data" / "label" / f"{name}{suffix}"
    write_volume(Volume(image, geo), img_p)
    write_volume(Volume(label, label_geo or geo), lab_p)
    return Case("KiTS", name, img_p, lab_p, "labeled")


def _direct(case: Case, view: str):
    """What inference computes from the files (no cache)."""
    canon, _ = prepare_canonical(read_volume(case.image), CONFIG.inplane_size, is_label=False)
    image = view_stack(window_hu(canon.array, CONFIG.hu_window), canon.geometry.spacing, view, False)
    spec = CONFIG.dataset(case.dataset)
    lab = read_volume(case.label)
    classes = CONFIG.map_labels(spec, lab.array, case.label)
    lcanon, _ = prepare_canonical(lab.with_array(classes), CONFIG.inplane_size, is_label=True)
    return image, view_stack(lcanon.array, lcanon.geometry.spacing, view, True)


def _memory_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of an np.memmap (the cache hands out plain ndarray views)."""
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base if isinstance(array.base, np.ndarray) else None
    return False


def test_cached_views_equal_direct_preprocessing(tmp_path):
    case = _case(tmp_path)
    (vol,) = build_cache([case], CONFIG, tmp_path / "cache", views=("axial",), progress=False)
    for view in ("axial", "coronal", "sagittal"):  # coronal/sagittal added on demand
        image, label = _direct(case, view)
        assert _memory_mapped(vol.image(view)) and vol.image(view).dtype == np.float32
        assert not vol.image(view).flags.writeable
        np.testing.assert_array_equal(vol.image(view), image)
        np.testing.assert_array_equal(vol.label(view), label)
        assert vol.label(view).dtype == np.uint8
        np.testing.assert_array_equal(vol.foreground(view), foreground_slices(label))
    # axial: canonical (S, P, L) with S = the file's index axis i (9 slices), in-plane 10 x 12
    assert vol.image("axial").shape == (9, 10, 12)
    # file label value 2 -> kidney = class 2; organ only on S-I slices 5..8 (flipped: 0..3)
    assert set(np.unique(vol.label("axial"))) == {0, 2}
    np.testing.assert_array_equal(vol.foreground("axial"), [0, 1, 2, 3])
    assert vol.case == case and vol.dataset == "KiTS"
    assert sorted(vol.views) == ["axial", "coronal", "sagittal"]


def test_reuse_key_and_rebuild(tmp_path):
    case = _case(tmp_path)
    cache = tmp_path / "cache"
    (v1,) = build_cache([case], CONFIG, cache, progress=False)
    stamp = (v1.folder / "image_axial.npy").stat().st_mtime_ns
    (v2,) = build_cache([case], CONFIG, cache, progress=False)
    assert v2.folder == v1.folder
    assert (v2.folder / "image_axial.npy").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # preprocessing settings and file changes give a new key
    other = dataclasses.replace(CONFIG, hu_window=(-100.0, 300.0))
    assert cache_key(case, other) != cache_key(case, CONFIG)
    st = case.image.stat()
    os.utime(case.image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    (v3,) = build_cache([case], CONFIG, cache, progress=False)
    assert v3.folder != v1.folder
    assert not list(cache.rglob("*.part"))  # no temporary folders left


def test_pickle_drops_memory_maps(tmp_path):
    (vol,) = build_cache([_case(tmp_path)], CONFIG, tmp_path / "cache", progress=False)
    vol.image("axial")
    clone = pickle.loads(pickle.dumps(vol))
    assert clone._arrays == {}
    np.testing.assert_array_equal(clone.image("axial"), vol.image("axial"))


def test_unlabeled_case(tmp_path):
    case = dataclasses.replace(_case(tmp_path), label=None, split="unlabeled")
    (vol,) = build_cache([case], CONFIG, tmp_path / "cache", views=("coronal",), progress=False)
    assert vol.label("coronal") is None
    assert vol.foreground("coronal").size == 0
    assert vol.image("coronal").shape[0] == 10  # coronal slices along P


def test_undeclared_label_value_names_label_file(tmp_path):
    case = _case(tmp_path, label_value=3)  # KiTS declares 1 and 2 only
    with pytest.raises(InputError, match="not declared") as err:
        build_cache([case], CONFIG, tmp_path / "cache", progress=False)
    assert err.value.path == str(case.label)
    assert not any(p.name == "meta.json" for p in (tmp_path / "cache").rglob("*"))


def test_geometry_mismatch_names_both_files(tmp_path):
    shifted = Geometry((14, 16, 9), (3.0, 0.9, 0.8), (6.0, -7.0, 11.0), DIRECTION)
    case = _case(tmp_path, label_geo=shifted)
    with pytest.raises(InputError) as err:
        build_cache([case], CONFIG, tmp_path / "cache", progress=False)
    assert err.value.path == str(case.label) and str(case.image) in str(err.value)


def test_foreground_threshold():
    lab = np.zeros((3, 8, 8), dtype=np.uint8)
    lab[0, :2, :7] = 1   # 14 voxels: below the threshold of 16
    lab[1, :4, :4] = 2   # 16 voxels
    lab[2, :8, :8] = 255  # ignore value never counts
    np.testing.assert_array_equal(foreground_slices(lab), [1])


def test_missing_entry_is_input_error(tmp_path):
    with pytest.raises(InputError):
        CachedVolume(tmp_path / "nope")


def _damage_truncate(f):
    os.truncate(f, f.stat().st_size - 1000)


def _damage_append(f):
    with open(f, "ab") as fh:
        fh.write(b"\0" * 64)


def _damage_header(f):
    data = bytearray(f.read_bytes())
    data[:6] = b"XXXXXX"  # the magic string
    f.write_bytes(bytes(data))


def _damage_shape(f):
    # a whole, readable .npy of another shape (the size matches its own header, not meta.json)
    np.save(f, np.zeros((2, 3), dtype=np.load(f, mmap_mode="r").dtype))


@pytest.mark.parametrize(("name", "damage"), [
    ("image_axial.npy", _damage_truncate),
    ("label_axial.npy", _damage_truncate),
    ("label_coronal.npy", _damage_truncate),  # a view added later is checked too
    ("image_axial.npy", _damage_append),
    ("image_axial.npy", _damage_header),
    ("label_axial.npy", _damage_shape),
    ("image_coronal.npy", os.unlink),
])
def test_damaged_entry_is_stale_and_rebuilt(tmp_path, name, damage):
    """An entry whose arrays do not match their headers / meta.json is rebuilt, not reused (a
    truncated array failed later: 'mmap length is greater than file size', in a loader worker)."""
    case = _case(tmp_path)
    cache = tmp_path / "cache"
    (vol,) = build_cache([case], CONFIG, cache, views=("axial", "coronal"), progress=False)
    assert _valid_entry(vol.folder)
    clean = {f.name: f.read_bytes() for f in vol.folder.glob("*.npy")}
    damage(vol.folder / name)
    assert not _valid_entry(vol.folder)
    (again,) = build_cache([case], CONFIG, cache, views=("axial", "coronal"), progress=False)
    assert again.folder == vol.folder and _valid_entry(again.folder)
    assert {f.name: f.read_bytes() for f in again.folder.glob("*.npy")} == clean
    assert not list(cache.rglob("*.part"))


def test_valid_entry_refuses_a_damaged_meta(tmp_path):
    (vol,) = build_cache([_case(tmp_path)], CONFIG, tmp_path / "cache", progress=False)
    meta = vol.folder / "meta.json"
    meta.write_text(meta.read_text()[:50])
    assert not _valid_entry(vol.folder)
    meta.write_text(json.dumps({"version": CACHE_VERSION}))  # parses, but lists no arrays
    assert not _valid_entry(vol.folder)


def test_array_damaged_after_the_check_is_one_input_error(tmp_path):
    """Found only when mapped (e.g. in a loader worker): an InputError naming the file."""
    (vol,) = build_cache([_case(tmp_path)], CONFIG, tmp_path / "cache", progress=False)
    f = vol.folder / "image_axial.npy"
    _damage_truncate(f)
    with pytest.raises(InputError, match="truncated or damaged") as err:
        CachedVolume(vol.folder).image("axial")
    assert err.value.path == str(f)


def _rewrite_in_place(path, data: bytes) -> None:
    """Overwrite ``path`` with ``data`` (the same size), then put its atime/mtime back, as
    ``cp -p``, ``rsync -a`` or ``touch -r`` from a backup do: size and mtime are unchanged."""
    before = path.stat()
    assert len(data) == before.st_size
    with open(path, "r+b") as fh:  # same inode
        fh.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    same = ("st_size", "st_mtime_ns", "st_ino")
    assert [getattr(after, k) for k in same] == [getattr(before, k) for k in same]


def test_same_size_rewrite_with_restored_mtime_is_rebuilt(tmp_path):
    """A label rewritten with other values at the same size, its mtime put back: the entry is
    rebuilt from the new file (size + mtime alone reused the old labels, silently)."""
    case = _case(tmp_path, suffix=".nii")  # uncompressed: other values, same byte size
    cache = tmp_path / "cache"
    (old,) = build_cache([case], CONFIG, cache, progress=False)
    old_label = np.array(old.label("axial"))
    lab = read_volume(case.label)
    moved = np.zeros_like(lab.array)
    moved[2:12, 3:13, 1:5] = 2  # the organ on other slices
    write_volume(lab.with_array(moved), tmp_path / "new.nii")
    _rewrite_in_place(case.label, (tmp_path / "new.nii").read_bytes())
    (new,) = build_cache([case], CONFIG, cache, progress=False)
    assert new.folder != old.folder
    _, label = _direct(case, "axial")
    np.testing.assert_array_equal(new.label("axial"), label)
    assert not np.array_equal(new.label("axial"), old_label)


def test_dicom_folder_identity_covers_each_file(tmp_path):
    """A DICOM series is one input of many files: one slice rewritten at the same size with its mtime
    put back changes the key; an untouched folder keeps it."""
    image, _ = phantom_pair((4, 8, 8))
    geo = Geometry((4, 8, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    folder = write_dicom_series(tmp_path / "dicom" / "c1", Volume(image, geo))
    case = Case("KiTS", "c1", folder, None, "unlabeled")
    key = cache_key(case, CONFIG)
    assert cache_key(case, CONFIG) == key
    one = sorted(folder.iterdir())[1]
    data = bytearray(one.read_bytes())
    data[-1] ^= 0xFF  # a pixel of the last row
    _rewrite_in_place(one, bytes(data))
    assert cache_key(case, CONFIG) != key


def test_organ_kept_is_the_share_of_each_organs_volume_the_grid_keeps(caplog):
    """Hand-computed: liver 8 voxels of 1 mm³ in the source, 1 voxel of 4 mm³ cached (half kept);
    spleen 2 voxels kept as 1 of 4 mm³ (all of it, in mm³); kidney not labeled in the source."""
    import logging

    from data.cache import organ_kept
    from engine.build import _note_cropped_organs

    src = np.zeros((2, 4, 4), np.uint8)
    src[0, :2, :] = 1  # liver: 8 voxels
    src[1, 0, :2] = 3  # spleen: 2 voxels
    dst = np.zeros((2, 2, 2), np.uint8)
    dst[0, 0, 0] = 1
    dst[1, 1, 1] = 3
    kept = organ_kept(src, (1.0, 1.0, 1.0), dst, (2.0, 2.0, 1.0), ["liver", "kidney", "spleen"])
    assert kept == {"liver": 0.5, "spleen": 2.0}

    class Vol:  # what _note_cropped_organs reads of a cache entry
        def __init__(self, kept):
            self.meta = {"organ_kept": kept}

    from data.config import load_config

    config = load_config()
    with caplog.at_level(logging.INFO, logger="unimos"):
        _note_cropped_organs([Vol({"liver": 0.2, "spleen": 1.0}), Vol({"liver": 0.95}), Vol(None)], config)
    assert "keeps less than 50 % of labeled organs' volume: liver in 1 case(s), down to 20 %" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="unimos"):
        _note_cropped_organs([Vol({"liver": 0.95})], config)
    assert "keeps less than" not in caplog.text
