"""data.sampling: 2.5D samples, determinism across workers, balance, foreground bias, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.cache import build_cache
from data.config import config_from_dict
from data.layout import discover
from data.sampling import (
    LabeledBatch,
    SliceDataset,
    UnlabeledBatch,
    collate_labeled,
    collate_unlabeled,
)
from tests.helpers import write_seed_dataset

# In-plane size equal to the files' (32 x 32): no resampling, so label == (image > -0.5) exactly.
CONFIG = config_from_dict({
    "organs": ["liver", "kidney", "spleen"],
    "inplane_size": [32, 32],
    "datasets": {"KiTS": {"labels": {1: "kidney"}, "image_token": "scan", "label_token": "label"},
                 "MSDSpleen": {"labels": {1: "spleen"}}},
})


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    write_seed_dataset(root, "KiTS", n_labeled=2, n_unlabeled=1, n_val=0, shape=(9, 32, 32),
                       image_token="scan", label_token="label", seed=1)
    write_seed_dataset(root, "MSDSpleen", n_labeled=1, n_unlabeled=1, n_val=0, shape=(9, 32, 32), seed=2)
    cases = discover(CONFIG, root)
    vols = build_cache(cases, CONFIG, root / "cache", progress=False)
    labeled = [v for v in vols if v.has_label]
    unlabeled = [v for v in vols if not v.has_label]
    return labeled, unlabeled


def _same(a: dict, b: dict) -> bool:
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_shapes_balance_and_masks(volumes):
    labeled, _ = volumes
    ds = SliceDataset(labeled, CONFIG, "axial", slices=3, block=24, samples_per_epoch=12, seed=0)
    samples = [ds[i] for i in range(12)]
    batch = collate_labeled(samples)
    assert isinstance(batch, LabeledBatch)
    assert batch.image.shape == (12, 3, 24, 24) and batch.image.dtype == torch.float32
    assert batch.label.shape == (12, 24, 24) and batch.label.dtype == torch.int64
    # sample i comes from dataset i % 2 (config order: KiTS = 0, MSDSpleen = 1)
    assert batch.dataset.tolist() == [0, 1] * 6
    assert batch.labeled_mask[0].tolist() == [True, False, True, False]
    assert batch.labeled_mask[1].tolist() == [True, False, False, True]
    assert float(batch.image.min()) >= -1.0 and float(batch.image.max()) <= 1.0
    assert set(batch.label.unique().tolist()) <= {0, 2, 3}
    moved = batch.to("cpu")
    assert torch.equal(moved.image, batch.image) and len(moved) == 12


@pytest.mark.parametrize("view", ["axial", "coronal", "sagittal"])
def test_slices_are_the_cached_ones_with_edge_clamp(volumes, view):
    labeled, _ = volumes
    vol0 = labeled[0]
    n, h, w = vol0.image(view).shape
    block = max(h, w)
    ds = SliceDataset([vol0], CONFIG, view, slices=5, block=block, samples_per_epoch=40, seed=3,
                      fg_prob=0.0, flips=False)
    seen_edge = False
    for i in range(40):
        s = ds[i]
        c = s["slice"]
        idx = np.clip(np.arange(c - 2, c + 3), 0, n - 1)
        ref = np.full((5, block, block), -1.0, dtype=np.float32)
        ref_lab = np.full((block, block), 255, dtype=np.uint8)
        # the padded offset is random; find it from where the valid label lies
        ys, xs = np.nonzero(s["label"] != 255)
        y0, x0 = ys.min(), xs.min()
        ref[:, y0:y0 + h, x0:x0 + w] = vol0.image(view)[idx]
        ref_lab[y0:y0 + h, x0:x0 + w] = vol0.label(view)[c]
        np.testing.assert_array_equal(s["image"], ref)
        np.testing.assert_array_equal(s["label"], ref_lab)
        seen_edge |= c in (0, 1, n - 2, n - 1)
    assert seen_edge


def test_padding_values(volumes):
    labeled, _ = volumes
    ds = SliceDataset(labeled, CONFIG, "axial", block=40, samples_per_epoch=4, seed=0)
    s = ds[0]
    assert s["image"].shape == (3, 40, 40)
    assert int((s["label"] == 255).sum()) == 40 * 40 - 32 * 32
    assert np.all(s["image"][:, s["label"] == 255] == -1.0)


@pytest.mark.parametrize("rot90", [False, True])
def test_augmentation_moves_image_and_label_together(volumes, rot90):
    labeled, _ = volumes
    ds = SliceDataset(labeled, CONFIG, "axial", block=20, samples_per_epoch=64, seed=5, rot90=rot90)
    for i in range(64):
        s = ds[i]
        # organ voxels are ~60 HU (windowed 0.3), background ~ -800 HU (windowed -1)
        np.testing.assert_array_equal(s["label"] > 0, s["image"][1] > -0.5)


@pytest.mark.parametrize("rot90", [False, True])
def test_samples_are_owned_copies_of_the_flipped_crops(volumes, rot90):
    """Flipped crops are copied through torch (numpy's reversed-row copy is 3x slower): the same
    values as numpy's copy, C-contiguous, writable and sharing no memory with the cache's map."""
    from data.sampling import _owned

    labeled, unlabeled = volumes
    source = labeled[0].image("axial")
    crop = source[2:5, 3:27, 1:25]
    for view in (crop, crop[..., ::-1], crop[:, ::-1], crop[::-1, ::-1, ::-1], np.rot90(crop, 1, (1, 2)),
                 np.rot90(crop, 3, (1, 2))[..., ::-1], np.ascontiguousarray(crop)[:, ::-1]):
        out = _owned(view)
        np.testing.assert_array_equal(out, np.ascontiguousarray(view))
        assert out.dtype == view.dtype and out.flags.c_contiguous and out.flags.writeable
        assert not np.shares_memory(out, source)
    vols = unlabeled if rot90 else labeled
    ds = SliceDataset(vols, CONFIG, "axial", block=24, samples_per_epoch=32, seed=9, rot90=rot90,
                      labeled=not rot90)
    for i in range(32):
        s = ds[i]
        for key in ("image", "label" if not rot90 else "valid"):
            assert s[key].flags.c_contiguous and s[key].flags.writeable
            assert not any(np.shares_memory(s[key], v.image("axial")) for v in vols)


def test_owned_copies_do_not_repeat_once_only_warnings(volumes):
    """Silencing torch's read-only warning must not reset Python's once-only warning registry (a
    catch_warnings per sample did, and a warning of the training loop printed at every step)."""
    import warnings

    from data.sampling import _owned

    labeled, _ = volumes
    flipped = labeled[0].image("axial")[1:4, ::-1]
    assert not flipped.flags.writeable
    _owned(flipped)  # torch's own warning, silenced once

    def warn_once():
        warnings.warn("shown once per location", UserWarning, stacklevel=1)

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        for _ in range(3):
            warn_once()
            _owned(flipped)
    assert len(shown) == 1, [str(w.message) for w in shown]


def test_determinism_seed_epoch(volumes):
    labeled, _ = volumes
    a = SliceDataset(labeled, CONFIG, "axial", block=16, samples_per_epoch=20, seed=7)
    b = SliceDataset(labeled, CONFIG, "axial", block=16, samples_per_epoch=20, seed=7)
    assert all(_same(a[i], b[i]) for i in range(20))
    # an index past len carries the epoch: samples 20..39 are another epoch's, not a repeat
    assert not all(_same(a[20 + i], b[i]) for i in range(20))
    assert all(_same(a[20 + i], b[20 + i]) for i in range(20))


def test_same_batches_with_0_and_2_workers(volumes):
    labeled, _ = volumes
    ds = SliceDataset(labeled, CONFIG, "axial", block=16, samples_per_epoch=24, seed=11)

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers,
                                             collate_fn=collate_labeled)
        return list(loader)

    b0, b2 = batches(0), batches(2)
    assert len(b0) == len(b2) == 6
    for x, y in zip(b0, b2):
        assert torch.equal(x.image, y.image) and torch.equal(x.label, y.label)
        assert torch.equal(x.dataset, y.dataset)


def test_foreground_bias(volumes):
    labeled, _ = volumes
    fg_sets = [set(v.foreground("axial").tolist()) for v in labeled]
    assert all(0 < len(f) < 9 for f in fg_sets)
    biased = SliceDataset(labeled, CONFIG, "axial", block=16, samples_per_epoch=200, seed=1, fg_prob=1.0)
    assert all(s["slice"] in fg_sets[s["volume"]] for s in (biased[i] for i in range(200)))
    uniform = SliceDataset(labeled, CONFIG, "axial", block=16, samples_per_epoch=200, seed=1, fg_prob=0.0)
    outside = sum(s["slice"] not in fg_sets[s["volume"]] for s in (uniform[i] for i in range(200)))
    assert outside > 50  # 6 of 9 slices lie outside the organ


def test_unlabeled_batches(volumes):
    labeled, unlabeled = volumes
    ds = SliceDataset(unlabeled, CONFIG, "axial", block=16, samples_per_epoch=8, seed=0,
                      rot90=True, labeled=False)
    batch = collate_unlabeled([ds[i] for i in range(8)])
    assert isinstance(batch, UnlabeledBatch)
    assert batch.image.shape == (8, 3, 16, 16)
    assert batch.dataset.tolist() == [0, 1] * 4
    with pytest.raises(ValueError, match="without labels"):
        SliceDataset(unlabeled, CONFIG, "axial")


def test_pair_halves_gives_the_second_weak_batch_the_first_ones_datasets(volumes):
    """--cutmix-pairs dataset: with 2 datasets and 1 + 1 slices per step, by index the first batch
    always holds dataset 0 and the second dataset 1 (no CutMix partner labeling the same organs, ever);
    paired, slice j + h takes slice j's dataset and the first batch still cycles through all."""
    _, unlabeled = volumes
    by_index = SliceDataset(unlabeled, CONFIG, "axial", block=16, samples_per_epoch=8, seed=0, labeled=False)
    assert [int(by_index[i]["dataset"]) for i in range(8)] == [0, 1] * 4
    paired = SliceDataset(unlabeled, CONFIG, "axial", block=16, samples_per_epoch=8, seed=0, labeled=False,
                          pair_halves=1)
    assert [int(paired[i]["dataset"]) for i in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]
    two = SliceDataset(unlabeled, CONFIG, "axial", block=16, samples_per_epoch=8, seed=0, labeled=False,
                       pair_halves=2)  # 2 + 2 per step: (a0, a1 | b0, b1)
    assert [int(two[i]["dataset"]) for i in range(8)] == [0, 1, 0, 1] * 2
    # the first half of each step is drawn exactly as without pairing
    assert all(_same(two[i], by_index[i]) for i in (0, 1, 4, 5))


def test_unlabeled_valid_mask_marks_padding_and_moves_with_the_image(volumes):
    _, unlabeled = volumes
    ds = SliceDataset(unlabeled, CONFIG, "axial", block=48, samples_per_epoch=8, seed=0,
                      rot90=True, flips=True, labeled=False)
    batch = collate_unlabeled([ds[i] for i in range(8)])
    assert batch.valid.shape == (8, 48, 48) and batch.valid.dtype == torch.bool
    assert (batch.valid.sum(dim=(1, 2)) == 32 * 32).all()
    # padding is exactly where the image holds the pad value and valid is False
    assert bool((batch.image[:, 1][~batch.valid] == -1.0).all())
    full = SliceDataset(unlabeled, CONFIG, "axial", block=16, samples_per_epoch=4, seed=0, labeled=False)
    assert bool(collate_unlabeled([full[i] for i in range(4)]).valid.all())


def test_unlabeled_centres_where_the_body_is_and_in_the_organ_range():
    from data.sampling import body_slices

    stack = np.full((20, 16, 16), -1.0, dtype=np.float32)
    stack[5:15, 4:12, 4:12] = 0.2          # body in slices 5..14
    stack[2, 1:4, 1:4] = 0.2               # a small patch: too little to be body
    assert body_slices(stack).tolist() == list(range(5, 15))
    assert body_slices(np.full((3, 8, 8), -1.0)).tolist() == [0, 1, 2]  # no body: everything


def test_unlabeled_sampling_uses_slice_ranges(volumes):
    from data.sampling import organ_slice_ranges

    labeled, unlabeled = volumes
    ranges = organ_slice_ranges(labeled, "axial", margin=0.0)
    assert set(ranges) <= {"KiTS", "MSDSpleen"} and all(0 <= lo <= hi <= 1 for lo, hi in ranges.values())
    span = {d: (0.5, 0.5) for d in ("KiTS", "MSDSpleen")}  # only the middle slice (index 4 of 9)
    ds = SliceDataset(unlabeled, CONFIG, "axial", block=16, samples_per_epoch=16, seed=0, labeled=False,
                      slice_ranges=span)
    centres = {ds[i]["slice"] for i in range(16)}
    # the synthetic volumes hold body in every slice, so the range alone decides
    assert centres == {4}


@pytest.mark.cuda  # pinned memory needs CUDA (skipped without it: conftest.pytest_runtest_setup)
def test_pin_memory(volumes):
    labeled, _ = volumes
    ds = SliceDataset(labeled, CONFIG, "axial", block=16, samples_per_epoch=2)
    batch = collate_labeled([ds[0], ds[1]]).pin_memory()
    assert batch.image.is_pinned() and batch.label.is_pinned()


def test_intensity_jitter_is_a_per_sample_affine_map(volumes):
    labeled, _ = volumes
    plain = SliceDataset(labeled, CONFIG, "axial", block=24, samples_per_epoch=32, seed=4, flips=False)
    jit = SliceDataset(labeled, CONFIG, "axial", block=24, samples_per_epoch=32, seed=4, flips=False,
                       intensity=(0.1, 0.15))
    scales = []
    for i in range(32):
        a, b = plain[i], jit[i]
        np.testing.assert_array_equal(a["label"], b["label"])
        x, y = a["image"].ravel().astype(np.float64), b["image"].ravel().astype(np.float64)
        if np.ptp(x) < 0.5:
            continue  # a flat crop pins down only s * x + t, not s and t
        # y = s * x + t exactly (up to float32 rounding), with s and t inside the asked ranges
        s, t = np.polyfit(x, y, 1)
        np.testing.assert_allclose(y, s * x + t, atol=1e-5)
        assert 0.9 - 1e-6 <= s <= 1.1 + 1e-6 and abs(t) <= 0.15 + 1e-6
        scales.append(s)
    assert len(scales) >= 8
    assert np.std(scales) > 0.01  # drawn per sample, not once


def test_slab_indices_centre_in_the_middle_and_clamped():
    from data.slab import slab_indices

    idx = slab_indices(np.array([0, 1, 4]), n=5, slices=3)
    assert idx.tolist() == [[0, 0, 1], [0, 1, 2], [3, 4, 4]]
    assert slab_indices(np.array([2]), n=5, slices=5).tolist() == [[0, 1, 2, 3, 4]]
    assert slab_indices(np.array([0]), n=1, slices=3).tolist() == [[0, 0, 0]]
