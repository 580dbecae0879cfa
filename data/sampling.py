"""2.5D training samples from the slice cache, and the named batches the training steps consume.

A sample is ``slices`` adjacent slices of one view (edge-clamped) as channels, randomly cropped to
``block x block`` (padded with -1 / label 255 when the slice is smaller), flipped (and rotated by
multiples of 90 degrees for the unlabeled weak view) identically for image and label.

Determinism: sample ``index`` draws all its randomness from
``np.random.default_rng([seed, index // len, index % len])``. It therefore does not depend on the number of
DataLoader workers, on which worker fetches it, or on the DDP rank, and an interrupted run resumes
with exactly the same samples. Balance: sample ``i`` comes from dataset ``i % n_datasets`` (datasets
in config order), then from a random volume of that dataset.

Epochs travel inside the index (sample ``epoch * len + i`` is sample ``i`` of epoch ``epoch``), so
persistent workers and DDP need nothing else; data/loaders.py hands out these global indices.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from data.cache import CachedVolume
from data.config import IGNORE_INDEX, Config
from data.preprocess import PAD_WINDOWED
from data.slab import slab_indices
from data.volume import VIEWS

PAD_IMAGE = PAD_WINDOWED  # crops beyond a slice: air after windowing
# Unlabeled slices are drawn where the body is: a pixel is body above this windowed value (-1 is the
# window's low end: air and lung; -0.9 is about -180 HU with the default window), and a slice holds
# body when at least BODY_FRACTION of the largest body area of its stack is there.
BODY_LEVEL = -0.9
BODY_FRACTION = 0.25


# ----------------------------------------------------------------------------------------------
# Batches


class _Batch:
    """Moves every tensor field together."""

    def to(self, device: torch.device | str, non_blocking: bool = True):
        """A copy with all tensors on ``device``."""
        return type(self)(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                             for f in fields(self)})  # type: ignore[arg-type]

    def pin_memory(self):
        """A copy with all tensors in pinned memory (DataLoader(pin_memory=True) calls this)."""
        return type(self)(**{f.name: getattr(self, f.name).pin_memory()
                             for f in fields(self)})  # type: ignore[arg-type]

    def __len__(self) -> int:
        return int(self.image.shape[0])  # type: ignore[attr-defined]

    def split(self, first: int):
        """Two batches: samples ``[:first]`` and ``[first:]`` (views, no copies)."""
        head = type(self)(**{f.name: getattr(self, f.name)[:first] for f in fields(self)})
        tail = type(self)(**{f.name: getattr(self, f.name)[first:] for f in fields(self)})
        return head, tail  # type: ignore[return-value]


@dataclass
class LabeledBatch(_Batch):
    """Labeled 2.5D batch.

    Attributes:
        image: ``(B, slices, H, W)`` float32 in [-1, 1].
        label: ``(B, H, W)`` int64 classes; 255 = ignore (padding).
        labeled_mask: ``(B, num_classes)`` bool, classes the sample's dataset labels (column 0 True).
        dataset: ``(B,)`` int64 index into ``config.datasets``.
    """

    image: Tensor
    label: Tensor
    labeled_mask: Tensor
    dataset: Tensor


@dataclass
class UnlabeledBatch(_Batch):
    """Unlabeled 2.5D batch (weak view: crop, flips, rot90).

    Attributes:
        image: ``(B, slices, H, W)`` float32.
        labeled_mask: ``(B, num_classes)`` bool of the source dataset.
        dataset: ``(B,)`` int64 index into ``config.datasets``.
        valid: ``(B, H, W)`` bool, False on padding (slices smaller than the crop).
    """

    image: Tensor
    labeled_mask: Tensor
    dataset: Tensor
    valid: Tensor


def _stack(samples: Sequence[dict[str, Any]], key: str) -> Tensor:
    return torch.from_numpy(np.stack([s[key] for s in samples]))


def collate_labeled(samples: Sequence[dict[str, Any]]) -> LabeledBatch:
    """DataLoader ``collate_fn`` for labeled :class:`SliceDataset` samples."""
    return LabeledBatch(
        image=_stack(samples, "image"),
        label=_stack(samples, "label").long(),
        labeled_mask=_stack(samples, "labeled_mask"),
        dataset=torch.tensor([s["dataset"] for s in samples], dtype=torch.int64),
    )


def collate_unlabeled(samples: Sequence[dict[str, Any]]) -> UnlabeledBatch:
    """DataLoader ``collate_fn`` for unlabeled :class:`SliceDataset` samples."""
    return UnlabeledBatch(
        image=_stack(samples, "image"),
        labeled_mask=_stack(samples, "labeled_mask"),
        dataset=torch.tensor([s["dataset"] for s in samples], dtype=torch.int64),
        valid=_stack(samples, "valid").to(torch.bool),
    )


# ----------------------------------------------------------------------------------------------
# Dataset


def body_slices(stack: np.ndarray) -> np.ndarray:
    """Indices of the slices of a windowed ``(n, H, W)`` stack that hold body (see BODY_LEVEL).

    Every fourth pixel in-plane is looked at: the area estimate needs no more, and it keeps this
    cheap for large unlabeled collections. Returns all slices when none qualifies.
    """
    frac = (np.asarray(stack[:, ::4, ::4]) > BODY_LEVEL).mean(axis=(1, 2))
    if not frac.size or frac.max() <= 0:
        return np.arange(stack.shape[0])
    return np.flatnonzero(frac >= BODY_FRACTION * frac.max())


def organ_slice_ranges(volumes: Sequence[CachedVolume], view: str,
                       margin: float = 0.05) -> dict[str, tuple[float, float]]:
    """Per dataset, the range of relative slice positions that hold a labeled organ, in ``view``.

    Computed on labeled volumes (``[min, max]`` of their foreground slices divided by the stack
    length, widened by ``margin`` on each side, clipped to [0, 1]); the unlabeled scans of the same
    dataset cover a similar field of view, so their slices are drawn in the same range.
    """
    spans: dict[str, list[float]] = {}
    for v in volumes:
        if not v.has_label:
            continue
        fg = v.foreground(view)
        n = int(v.views[view]["shape"][0]) if view in v.views else len(v.image(view))
        if fg.size and n > 1:
            lo, hi = float(fg.min()) / (n - 1), float(fg.max()) / (n - 1)
            cur = spans.setdefault(v.dataset, [lo, hi])
            cur[0], cur[1] = min(cur[0], lo), max(cur[1], hi)
    return {d: (max(0.0, lo - margin), min(1.0, hi + margin)) for d, (lo, hi) in spans.items()}


_READ_ONLY_WARNED = False


def _as_tensor(array: np.ndarray) -> Tensor:
    """``torch.from_numpy`` without its warning about read-only arrays (the cache's maps): torch
    warns once per process, so only the first call needs silencing, and silencing every call would
    reset the once-only registry of every other warning."""
    global _READ_ONLY_WARNED
    if _READ_ONLY_WARNED or array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    _READ_ONLY_WARNED = True
    return tensor


def _owned(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``array`` that is no view into a memory map (a view would pin the map
    and pickle lazily), with the same values."""
    flipped = tuple(ax for ax, stride in enumerate(array.strides) if stride < 0)
    if flipped:
        # numpy copies a reversed row element by element: 40 us for a 3 x 224 x 224 float32 crop
        # flipped left-right against 13 us unflipped, and half the samples are flipped. torch copies
        # it at the unflipped speed, from the same memory viewed with positive strides (read only).
        forward = array[tuple(slice(None, None, -1) if ax in flipped else slice(None)
                              for ax in range(array.ndim))]
        # contiguous(): flip keeps a dense input's strides, so a rot90 (transposed) view stays one
        return _as_tensor(forward).flip(flipped).contiguous().numpy()
    out = np.ascontiguousarray(array)
    return out if out.flags.owndata else out.copy()


class SliceDataset(torch.utils.data.Dataset):
    """Random 2.5D samples from cached volumes (see the module docstring).

    Args:
        volumes: cache entries (all labeled when ``labeled``).
        config: dataset order and labeled-class masks.
        view: ``axial`` | ``coronal`` | ``sagittal``.
        slices: adjacent slices stacked as channels (centre slice is the label).
        block: crop size (square).
        samples_per_epoch: ``len(dataset)``.
        seed: base seed.
        fg_prob: probability of centring on a slice with labeled organs (labeled samples with a
            foreground only).
        slice_ranges: unlabeled samples: per dataset, the relative slice range to draw centres from
            (:func:`organ_slice_ranges` of the labeled volumes); intersected with the slices that
            hold body (:func:`body_slices`). Labeled samples: unused.
        flips: random horizontal / vertical flips.
        rot90: random rotation by a multiple of 90 degrees (unlabeled weak view).
        labeled: return labels (``collate_labeled``) or not (``collate_unlabeled``).
        intensity: ``(scale, shift)``: per-sample ``x * (1 + U(-scale, scale)) + U(-shift, shift)`` on
            the windowed image (``shift`` 0.15 = 30 HU with the default window); ``(0, 0)`` = off.
        alternate_every: 0 mixes datasets within a batch (sample ``i`` from dataset
            ``i % n_datasets``); ``k > 0`` takes runs of ``k`` consecutive samples from one dataset
            (with ``k`` = the global batch size, each optimizer step sees one dataset, in turn).
        pair_halves: ``h > 0``: in every run of ``2h`` samples, the first ``h`` take datasets in
            turn (counting only first halves) and sample ``j + h`` takes sample ``j``'s dataset: the
            second weak batch, the CutMix source, then holds the first one's datasets, so every
            sample finds a partner that labels the same organs; 0 = off (dataset ``i % n``).

    Raises:
        ValueError: no volumes, a labeled dataset given unlabeled volumes, bad sizes, unknown view.
    """

    def __init__(self, volumes: Sequence[CachedVolume], config: Config, view: str = "axial",
                 slices: int = 3, block: int = 224, samples_per_epoch: int = 1000, seed: int = 0,
                 fg_prob: float = 0.8, flips: bool = True, rot90: bool = False, labeled: bool = True,
                 intensity: tuple[float, float] = (0.0, 0.0), alternate_every: int = 0,
                 slice_ranges: dict[str, tuple[float, float]] | None = None, pair_halves: int = 0) -> None:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        if not volumes:
            raise ValueError("SliceDataset needs at least one volume")
        if slices < 1 or block < 1 or samples_per_epoch < 1:
            raise ValueError(f"slices, block and samples_per_epoch must be >= 1 "
                             f"(got {slices}, {block}, {samples_per_epoch})")
        if not 0.0 <= fg_prob <= 1.0:
            raise ValueError(f"fg_prob must be in [0, 1], got {fg_prob}")
        if labeled:
            missing = [v for v in volumes if not v.has_label]
            if missing:
                raise ValueError(f"labeled SliceDataset given volumes without labels: {missing[:3]}")
        self.volumes = list(volumes)
        self.view, self.slices, self.block = view, int(slices), int(block)
        self.samples_per_epoch, self.seed = int(samples_per_epoch), int(seed)
        self.fg_prob, self.flips, self.rot90, self.labeled = float(fg_prob), flips, rot90, labeled
        self.alternate_every = int(alternate_every)
        self.pair_halves = int(pair_halves)
        self.intensity = (float(intensity[0]), float(intensity[1]))
        names = [d.name for d in config.datasets]
        present = sorted({v.dataset for v in self.volumes}, key=names.index)
        # Groups of volume indices per dataset, in config order (the balancing cycle).
        self.groups = [[i for i, v in enumerate(self.volumes) if v.dataset == n] for n in present]
        self.group_dataset = [names.index(n) for n in present]
        self.group_mask = [config.labeled_mask(config.datasets[d]) for d in self.group_dataset]
        # Views are built now, in the main process, so workers never race to create them.
        self.shapes = []
        self.fg = []
        self.centres: list[np.ndarray] = []  # unlabeled: where centre slices are drawn
        for v in self.volumes:
            v.ensure_view(view)
            self.shapes.append(tuple(v.views[view]["shape"]))
            self.fg.append(v.foreground(view) if labeled else np.zeros(0, dtype=np.int64))
            if not labeled:
                self.centres.append(self._unlabeled_centres(v, (slice_ranges or {}).get(v.dataset)))

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _unlabeled_centres(self, vol: CachedVolume, span: tuple[float, float] | None) -> np.ndarray:
        """Body slices of ``vol`` inside the dataset's organ range (the body slices alone when the
        range holds none of them)."""
        body = body_slices(vol.image(self.view))
        n = int(vol.views[self.view]["shape"][0])
        if span is None or n < 2:
            return body
        pos = body / (n - 1)
        inside = body[(pos >= span[0]) & (pos <= span[1])]
        return inside if inside.size else body

    def rng_for(self, index: int) -> np.random.Generator:
        """The generator of sample ``index`` (indices past ``len`` carry the epoch, see module doc)."""
        epoch, i = divmod(int(index), self.samples_per_epoch)
        return np.random.default_rng([self.seed, epoch, i])

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng_for(index)
        i = int(index) % self.samples_per_epoch
        gi = i
        if self.pair_halves > 0:
            # the first halves count on as one stream (so that they cycle through every dataset);
            # the second half repeats the first one's datasets
            h = self.pair_halves
            gi = (i // (2 * h)) * h + i % h
        g = (gi // self.alternate_every if self.alternate_every > 0 else gi) % len(self.groups)
        group = self.groups[g]
        v = group[int(rng.integers(len(group)))] if len(group) > 1 else group[0]
        n, h, w = self.shapes[v]
        fg = self.fg[v]
        if not self.labeled:
            cand = self.centres[v]
            centre = int(cand[rng.integers(cand.size)])
        elif fg.size and rng.random() < self.fg_prob:
            centre = int(fg[rng.integers(fg.size)])
        else:
            centre = int(rng.integers(n))
        first = centre - self.slices // 2
        b = self.block
        ys, py = self._crop(rng, h)
        xs, px = self._crop(rng, w)
        vol = self.volumes[v]
        img_src = vol.image(self.view)
        if first >= 0 and first + self.slices <= n:
            patch = img_src[first:first + self.slices, ys, xs]  # plain slicing: a cheap memmap read
        else:
            patch = img_src[slab_indices(np.array([centre]), n, self.slices)[0], ys, xs]
        if h < b or w < b:
            image = np.full((self.slices, b, b), PAD_IMAGE, dtype=np.float32)
            image[:, py:py + patch.shape[1], px:px + patch.shape[2]] = patch
        else:
            image = patch
        label = None
        valid = None
        if not self.labeled:
            # padding of a small slice is marked so that no pseudo-label, loss or mask ratio uses it
            valid = np.zeros((b, b), dtype=np.uint8) if (h < b or w < b) else np.ones((b, b), dtype=np.uint8)
            if h < b or w < b:
                valid[py:py + patch.shape[1], px:px + patch.shape[2]] = 1
        if self.labeled:
            lab = vol.label(self.view)[centre, ys, xs]
            if h < b or w < b:
                label = np.full((b, b), IGNORE_INDEX, dtype=np.uint8)
                label[py:py + lab.shape[0], px:px + lab.shape[1]] = lab
            else:
                label = lab
        image, label = self._augment(rng, image, label if self.labeled else valid)
        out: dict[str, Any] = {
            "image": _owned(image),
            "labeled_mask": self.group_mask[g],
            "dataset": self.group_dataset[g],
            "volume": v,
            "slice": centre,
        }
        if self.labeled:
            out["label"] = _owned(label)
        else:
            out["valid"] = _owned(label)  # the valid mask, flipped/rotated with the image
        return out

    def _crop(self, rng: np.random.Generator, size: int) -> tuple[slice, int]:
        """Source slice along one axis and the offset where it lands in the block."""
        b = self.block
        if size >= b:
            start = int(rng.integers(size - b + 1))
            return slice(start, start + b), 0
        return slice(0, size), int(rng.integers(b - size + 1))

    def _augment(self, rng: np.random.Generator, image: np.ndarray,
                 label: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        if self.rot90:
            k = int(rng.integers(4))
            if k:
                image = np.rot90(image, k, axes=(-2, -1))
                label = None if label is None else np.rot90(label, k, axes=(-2, -1))
        if self.flips:
            for axis in (-1, -2):
                if rng.random() < 0.5:  # slicing, not np.flip: the same view, without its ~5 us of checks
                    flip = (Ellipsis, slice(None, None, -1)) + (slice(None),) * (-1 - axis)
                    image = image[flip]
                    label = None if label is None else label[flip]
        scale, shift = self.intensity
        if scale > 0 or shift > 0:
            # Scanners and datasets differ by calibration offsets of tens of HU; a per-sample affine
            # jitter keeps an organ from being recognised by its dataset's absolute intensity.
            a = 1.0 + rng.uniform(-scale, scale)
            b = rng.uniform(-shift, shift)
            image = (image * np.float32(a) + np.float32(b)).astype(np.float32, copy=False)
        return image, label


__all__ = ["IGNORE_INDEX", "LabeledBatch", "SliceDataset", "UnlabeledBatch", "collate_labeled",
           "collate_unlabeled"]
