"""Data-loading benchmark: 2.5D samples/s from the slice cache vs the original's per-sample decode.

    python bench/loader.py [--data DIR] [--samples 3000] [--baseline-samples 24] [--json out.json]

Both paths produce the same kind of sample from the same files, on one core: ``slices`` adjacent
slices near the labeled organ, a random ``block`` crop, HU window, random flips.

* cache: :class:`data.sampling.SliceDataset` over memory-mapped ``.npy`` arrays (built once; the
  build time is reported separately).
* original: every sample decodes the whole ``.nii.gz`` image and label with SimpleITK, finds the
  foreground slices, then takes the slices and crops (the original's defect 2).

Without ``--data`` it writes a few synthetic 256x256x150 int16 CT-like ``.nii.gz`` volumes (smooth
body + organ, so gzip behaves as on real CT). ``--data DIR`` takes the ``.nii``/``.nii.gz`` images
directly in DIR, with labels of the same name in ``DIR/label/`` when present.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.errors import InputError, run_cli  # noqa: E402


def _bench_config():
    from data.config import config_from_dict

    # Accept any label value: the benchmark measures loading, not label semantics.
    return config_from_dict({"organs": ["organ"], "hu_window": [-200, 200], "inplane_size": [256, 256],
                             "components": {},
                             "datasets": {"bench": {"labels": {v: "organ" for v in range(1, 256)}}}},
                            source="<bench>")


def write_synthetic(folder: Path, n: int = 3, shape: tuple[int, int, int] = (150, 256, 256),
                    seed: int = 0) -> list[tuple[Path, Path]]:
    """Write ``n`` CT-like int16 images (numpy shape ``(nk, nj, ni)``) and uint8 labels.

    Returns:
        ``[(image, label), ...]``.
    """
    import numpy as np

    from data.volume import Geometry, Volume, write_volume

    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij", sparse=True)
    out = []
    for c in range(n):
        body = ((j - nj / 2) / (0.42 * nj)) ** 2 + ((i - ni / 2) / (0.46 * ni)) ** 2 < 1
        organ = (((k - nk * 0.5) / (0.25 * nk)) ** 2 + ((j - nj * 0.45) / (0.15 * nj)) ** 2
                 + ((i - ni * 0.35) / (0.14 * ni)) ** 2) < 1
        image = np.where(body, 40, -1000) + rng.normal(0, 15, size=shape)
        image = np.where(organ, 110 + rng.normal(0, 15, size=shape), image).astype(np.int16)
        label = organ.astype(np.uint8)
        geo = Geometry(shape, (0.8, 0.8, 2.5), (0.0, 0.0, 0.0))
        img_p, lab_p = folder / f"img_{c:03d}.nii.gz", folder / "label" / f"img_{c:03d}.nii.gz"
        write_volume(Volume(image, geo), img_p)
        write_volume(Volume(label, geo), lab_p)
        out.append((img_p, lab_p))
    return out


def _pairs_from(data: Path) -> list[tuple[Path, Path | None]]:
    if not data.is_dir():
        raise InputError(data, "benchmark data folder does not exist")
    images = sorted(p for p in data.iterdir() if p.name.endswith((".nii", ".nii.gz"))
                    and not p.name.startswith("."))
    if not images:
        raise InputError(data, "no .nii/.nii.gz images directly in this folder")
    return [(p, (data / "label" / p.name) if (data / "label" / p.name).is_file() else None)
            for p in images]


def _original_sample(rng, image_path: Path, label_path: Path | None, slices: int, block: int,
                     hu_window: tuple[float, float]):
    """The original's way: decode the whole volume(s) for every sample, then slice and crop."""
    import numpy as np
    import SimpleITK as sitk  # noqa: N813

    image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))
    n, h, w = image.shape
    if label_path is not None:
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
        fg = np.flatnonzero(label.reshape(n, -1).sum(axis=1) > 16)
        centre = int(fg[rng.integers(fg.size)]) if fg.size else n // 2
    else:
        label, centre = None, int(rng.integers(n))
    idx = np.clip(np.arange(centre - slices // 2, centre - slices // 2 + slices), 0, n - 1)
    y, x = int(rng.integers(max(h - block, 0) + 1)), int(rng.integers(max(w - block, 0) + 1))
    patch = image[idx, y:y + block, x:x + block].astype(np.float32)
    lo, hi = hu_window
    patch = (np.clip(patch, lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0
    lab = None if label is None else label[centre, y:y + block, x:x + block]
    if rng.random() < 0.5:
        patch, lab = patch[..., ::-1], None if lab is None else lab[..., ::-1]
    if rng.random() < 0.5:
        patch, lab = patch[..., ::-1, :], None if lab is None else lab[..., ::-1, :]
    return np.ascontiguousarray(patch), None if lab is None else np.ascontiguousarray(lab)


def run(data: str | Path | None = None, n_volumes: int = 3, shape: tuple[int, int, int] = (150, 256, 256),
        samples: int = 3000, baseline_samples: int = 24, slices: int = 3, block: int = 224,
        seed: int = 0, workdir: str | Path | None = None) -> dict[str, Any]:
    """Measure samples/s of the cache path and of the original per-sample decode on one core.

    Args:
        data: folder of ``.nii(.gz)`` images (labels in ``data/label/``); None writes synthetic ones.
        n_volumes / shape: synthetic volumes to write (numpy shape ``(nk, nj, ni)``).
        samples: cache-path samples timed.
        baseline_samples: original-path samples timed (each decodes whole volumes).
        slices / block: 2.5D channels and crop size.
        seed: random seed.
        workdir: where volumes and cache go (default: a temporary folder, removed afterwards).

    Returns:
        Dict with ``cache_samples_per_s``, ``original_samples_per_s``, ``speedup``,
        ``cache_build_s`` and the settings.
    """
    import numpy as np
    import SimpleITK as sitk  # noqa: N813
    import torch

    from data.cache import build_cache
    from data.layout import Case
    from data.sampling import SliceDataset

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    tmp = tempfile.TemporaryDirectory(prefix="unimos-bench-") if workdir is None else None
    root = Path(tmp.name if tmp is not None else workdir)
    try:
        if data is None:
            t0 = time.perf_counter()
            pairs = write_synthetic(root / "volumes", n_volumes, shape, seed)
            write_s = time.perf_counter() - t0
        else:
            pairs, write_s = _pairs_from(Path(data)), 0.0
        labeled = all(lab is not None for _, lab in pairs)
        config = _bench_config()
        cases = [Case("bench", img.name.split(".")[0], img, lab, "labeled" if lab else "unlabeled")
                 for img, lab in pairs]

        t0 = time.perf_counter()
        vols = build_cache(cases, config, root / "cache", views=("axial",), progress=False)
        build_s = time.perf_counter() - t0

        ds = SliceDataset(vols, config, "axial", slices=slices, block=block, samples_per_epoch=samples,
                          seed=seed, labeled=labeled)
        # Steady state, as after the first epoch: every page of the memory maps read once (50 samples
        # alone leave most pages unmapped, and first-touch page faults are slow on some VMs).
        for v in vols:
            for arr in (v.image("axial"), v.label("axial")):
                if arr is not None:
                    arr.max()
        for i in range(min(50, samples)):
            ds[i]
        t0 = time.perf_counter()
        for i in range(samples):
            ds[i]
        cache_s = time.perf_counter() - t0

        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        for i in range(baseline_samples):
            img, lab = pairs[i % len(pairs)]
            _original_sample(rng, img, lab, slices, block, config.hu_window)
        orig_s = time.perf_counter() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()
    cache_rate = samples / cache_s
    orig_rate = baseline_samples / orig_s
    return {
        "benchmark": "loader",
        "volumes": len(pairs),
        "shape": list(shape) if data is None else None,
        "data": str(data) if data is not None else "synthetic int16 .nii.gz",
        "slices": slices,
        "block": block,
        "labeled": labeled,
        "threads": 1,
        "cache_samples": samples,
        "original_samples": baseline_samples,
        "cache_samples_per_s": round(cache_rate, 1),
        "original_samples_per_s": round(orig_rate, 2),
        "speedup": round(cache_rate / orig_rate, 1),
        "cache_build_s": round(build_s, 2),
        "synthetic_write_s": round(write_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="2.5D samples/s: slice cache vs per-sample .nii.gz decode")
    p.add_argument("--data", help="folder of .nii(.gz) images (labels in DIR/label/); default synthetic")
    p.add_argument("--volumes", type=int, default=3, help="synthetic volumes to write (default 3)")
    p.add_argument("--samples", type=int, default=3000, help="cache samples timed (default 3000)")
    p.add_argument("--baseline-samples", type=int, default=24,
                   help="original-path samples timed (default 24)")
    p.add_argument("--block", type=int, default=224)
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result as JSON here")
    args = p.parse_args(argv)
    res = run(data=args.data, n_volumes=args.volumes, samples=args.samples,
              baseline_samples=args.baseline_samples, slices=args.slices, block=args.block, seed=args.seed)
    print(f"cache:    {res['cache_samples_per_s']:9.1f} samples/s  (build once: {res['cache_build_s']} s "
          f"for {res['volumes']} volumes)")
    print(f"original: {res['original_samples_per_s']:9.2f} samples/s  (whole .nii.gz decoded per sample)")
    print(f"speedup:  {res['speedup']:9.1f}x  (one core, {res['slices']}x{res['block']}x{res['block']} "
          "crop + flips)")
    if args.json:
        from utils.fileio import write_json_atomic

        write_json_atomic(args.json, res)
    return 0


if __name__ == "__main__":
    run_cli(main)
