"""Benchmark of whole-volume inference: seconds per CT volume and peak memory.

    python bench/inference.py [--width W] [--device auto|cpu|cuda] [--shape 200,256,256]
                              [--configs axial,fused] [--block 224] [--tile N] [--batch N]
                              [--workers N] [--no-io] [--threads 2]

A random-init MOSNet (width 16 on the CPU, 64 on a GPU by default) segments a synthetic int16 CT of
``--shape`` (numpy order: slices, rows, columns; a 384 mm field of view in-plane, as an abdominal CT,
and 2.5 mm slices; 1.5 mm pixels at 256 x 256): ``axial`` = one axial
model, ``fused`` = axial + coronal + sagittal models fused. Each configuration is timed without I/O
(``segment_volume`` on an in-memory volume) and with I/O (read the .nii.gz, segment, write the
.nii.gz). Peak RSS above the pre-call level is sampled from /proc during each call; ru_maxrss is the
process's high-water mark. ``--block`` is the training crop of the fake checkpoint (224 as Final.py's
default: segment.py then processes slices up to 448 x 448 whole, larger ones in 224 tiles);
``--tile N`` forces tiles of N, ``--tile 0`` whole slices. The model FLOPs of each call are counted
from the pixels its forward passes see (every forward of MOSNet costs the same FLOPs per pixel), so
counting costs nothing in the timed call. ``run(...)`` returns the numbers as a dict for
``bench/run.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.errors import InputError, run_cli  # noqa: E402

VIEWS3 = ("axial", "coronal", "sagittal")
FOV_MM, SLICE_MM = 384.0, 2.5  # the synthetic CT's in-plane field of view and slice spacing


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


class PeakRss(contextlib.AbstractContextManager):
    """Sample the resident set size every few ms; ``peak_mb`` is the maximum above the start level."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.start_mb = self.peak_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRss:
        from engine.runtime import release_freed_memory

        release_freed_memory()  # memory kept from before would otherwise hide this call's peak
        self.start_mb = _rss_mb()
        self._max = self.start_mb
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, _rss_mb())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, _rss_mb())
        self.peak_mb = self._max - self.start_mb


def _phantom(shape: tuple[int, int, int], seed: int):
    """A CT-like int16 volume: air, a soft-tissue ellipse with noise, two brighter 'organs'."""
    import numpy as np

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx]
    body = ((x - nx / 2) / (0.45 * nx)) ** 2 + ((y - ny / 2) / (0.35 * ny)) ** 2 < 1
    organ = ((x - 0.35 * nx) / (0.12 * nx)) ** 2 + ((y - 0.45 * ny) / (0.1 * ny)) ** 2 < 1
    vol = np.full(shape, -1000, dtype=np.int16)
    vol[:, body] = 40
    vol[nz // 4: 3 * nz // 4, organ] = 120
    vol += rng.normal(0, 20, size=shape).astype(np.int16)
    return vol


def run(width: int | None = None, device: str = "auto", shape: tuple[int, int, int] = (200, 256, 256),
        configs: tuple[str, ...] = ("axial", "fused"), block: int = 224, tile: int | None = None,
        batch: int | None = None, slices: int = 3, io: bool = True, threads: int | None = None,
        amp: bool | None = None, seed: int = 0, norm: str | None = None, norm_kernel: str = "groupnorm",
        channels_last: bool = False, workers: int | None = None, relu_inplace: bool = True) -> dict[str, Any]:
    """Time inference of one synthetic volume per configuration, with and without NIfTI I/O.

    Args:
        width: MOSNet width; default 16 on the CPU, 64 on CUDA.
        device: ``auto`` | ``cpu`` | ``cuda``.
        shape: numpy shape (slices, rows, columns).
        configs: ``axial`` (one model) and/or ``fused`` (three views).
        block, tile: the fake checkpoint's training block and the tile override (0 = whole slices).
        batch, slices: slices per forward pass (None: ``segment.py``'s default for the device), 2.5D
            input slices.
        io: also time read + segment + write of a .nii.gz.
        threads: ``torch.set_num_threads`` (CPU); None leaves it.
        amp: bf16 autocast on CUDA (default on there).
        seed: weights and phantom seed.
        norm: ``batch`` or ``instance`` (None: Final.py's default).
        norm_kernel: ``groupnorm`` (instance norm as ``models`` builds it) or ``instancenorm2d`` (the
            previous kernel, ``bench.train_step.to_instance_norm2d``).
        channels_last: models in channels_last memory format (activations follow the weights: every
            conv then runs NHWC; GroupNorm has an NHWC CPU kernel, InstanceNorm2d does not).
            ``segment.py`` loads models so.
        relu_inplace: False runs the previous out-of-place ReLU (``bench.train_step.set_relu_inplace``).
        workers: forward passes side by side (``inference.window.predict_stack``); None: segment.py's
            default for the device (one per CPU thread, at most 4).

    Returns:
        dict with the settings and, per configuration, ``{config}_s`` (no I/O), ``{config}_cpu_s``
        (process CPU time of that call: on a shared machine, CPU time / threads bounds what an idle
        machine would take), ``{config}_gflop`` (model FLOPs of the call without I/O, /1e9),
        ``{config}_io_s``, ``{config}_peak_rss_mb`` (above the pre-call level),
        ``{config}_io_peak_rss_mb``, plus ``ru_maxrss_mb`` and ``device``.

    Raises:
        InputError: unknown configuration or unavailable device.
    """
    import resource

    import numpy as np
    import torch

    from bench.train_step import NORM_KERNELS
    from data.config import load_config
    from data.volume import Geometry, Volume
    from inference.segment import default_batch, resolve_device, segment_volume
    from inference.window import cpu_workers
    from models import DEFAULT_NORM

    bad = [c for c in configs if c not in ("axial", "fused")]
    if bad:
        raise InputError(None, f"--configs must be axial and/or fused, got {bad}")
    if norm_kernel not in NORM_KERNELS:
        raise InputError(None, f"norm kernel must be one of {NORM_KERNELS}, got {norm_kernel!r}")
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    if width is None:
        width = 64 if dev.type == "cuda" else 16
    config = load_config()
    torch.manual_seed(seed)
    norm = norm or DEFAULT_NORM
    model_args = {"in_channels": slices, "num_classes": config.num_classes, "width": width, "norm": norm}

    models = _random_models(model_args, config, block, dev, norm_kernel, channels_last, relu_inplace)
    # The coronal and sagittal stacks resample S-I to the in-plane spacing: with the 0.8 mm pixels of a
    # 205 mm field of view (this benchmark before) their slices were 625 x 256 instead of ~333 x 256.
    geo = Geometry(shape, (FOV_MM / shape[2], FOV_MM / shape[1], SLICE_MM), (0.0, 0.0, 0.0))
    volume = Volume(_phantom(shape, seed), geo)
    batch = default_batch(dev) if batch is None else batch
    workers = cpu_workers(dev) if workers is None else workers
    kwargs = dict(batch=batch, device=dev, amp=amp, tile=tile, workers=workers)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # warm-up: kernels, allocator, lazy imports (a few slices of every view that will be timed)
    small = Volume(volume.array[:8], Geometry((8, *shape[1:]), geo.spacing, geo.origin))
    segment_volume([models[v] for v in (VIEWS3 if "fused" in configs else ("axial",))], small, **kwargs)
    sync()

    result: dict[str, Any] = {"width": width, "norm": norm, "norm_kernel": norm_kernel,
                              "relu_inplace": relu_inplace,
                              "channels_last": channels_last, "shape": list(shape), "block": block,
                              "tile": tile, "batch": batch, "workers": workers, "slices": slices,
                              "amp": amp}
    result.update(_time_configs(configs, models, volume, io, sync, kwargs))
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["device"] = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                        else f"cpu ({torch.get_num_threads()} threads)")
    result["voxels"] = int(np.prod(shape))
    return result



def _random_models(model_args: dict[str, Any], config: Any, block: int, dev: Any, norm_kernel: str,
                   channels_last: bool, relu_inplace: bool = True) -> dict[str, Any]:
    """One randomly initialised network per view, as inference would load it."""
    import torch

    from bench.train_step import set_relu_inplace, to_instance_norm2d
    from inference.segment import LoadedModel
    from models import build_model

    def make(view: str) -> LoadedModel:
        model = build_model(model_args).eval()
        if norm_kernel == "instancenorm2d":
            to_instance_norm2d(model)
        set_relu_inplace(model, relu_inplace)
        model = model.to(dev)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return LoadedModel(model=model, config=config, view=view, slices=model_args["in_channels"],
                           block=block, organs=config.organs, path=Path(f"<random {view}>"),
                           model_args=model_args)

    return {v: make(v) for v in VIEWS3}


def flops_per_pixel(model: Any, slices: int, side: int = 64) -> float:
    """Model FLOPs of one forward pass per input pixel (counted on a ``side x side`` input).

    Every layer of MOSNet is a convolution, a pooling or an upsampling by a fixed factor, and the
    fusion's pooling is adaptive: for sides divisible by 16 the FLOPs grow exactly with the pixel
    count (``tests/test_bench_compute.py`` checks 64 x 64 against 256 x 256 and 96 x 160).
    """
    import torch

    from utils.flops import count_flops

    with torch.no_grad():
        return count_flops(model, (1, slices, side, side)) / side**2


@contextlib.contextmanager
def _pixel_counter(models: list[Any]):
    """Count the input pixels (batch x height x width) of every forward pass of ``models``.

    Yields a one-element list holding the running count. The forward pre-hooks cost a few
    microseconds per pass; a lock keeps the count right when worker threads run passes side by side
    (``inference.window.predict_stack``). They are removed on exit.
    """
    count = [0]
    lock = threading.Lock()

    def hook(_module: Any, args: tuple[Any, ...]) -> None:
        x = args[0]
        with lock:
            count[0] += int(x.shape[0]) * int(x.shape[-2]) * int(x.shape[-1])

    handles = [m.register_forward_pre_hook(hook) for m in {id(m): m for m in models}.values()]
    try:
        yield count
    finally:
        for h in handles:
            h.remove()


def _time_configs(configs: tuple[str, ...], models: dict[str, Any], volume: Any, io: bool,
                  sync: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Seconds, CPU seconds, model FLOPs and peak RSS of each configuration, without and with NIfTI
    I/O."""
    from data.volume import read_volume, write_volume
    from inference.segment import segment_volume

    # the three views' networks are the same architecture: one count of FLOPs per pixel
    fpp = flops_per_pixel(models["axial"].model, models["axial"].slices)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "ct.nii.gz", Path(tmp) / "seg.nii.gz"
        if io:
            write_volume(volume, src)
        for name in configs:
            members = [models["axial"]] if name == "axial" else [models[v] for v in VIEWS3]
            with PeakRss() as mem, _pixel_counter([m.model for m in members]) as pixels:
                t0, c0 = time.perf_counter(), time.process_time()
                seg = segment_volume(members, volume, **kwargs)
                sync()
                result[f"{name}_s"] = time.perf_counter() - t0
                result[f"{name}_cpu_s"] = time.process_time() - c0
            result[f"{name}_peak_rss_mb"] = mem.peak_mb
            result[f"{name}_gflop"] = fpp * pixels[0] / 1e9
            del seg
            if io:
                with PeakRss() as mem:
                    t0 = time.perf_counter()
                    write_volume(segment_volume(members, read_volume(src), **kwargs), dst)
                    sync()
                    result[f"{name}_io_s"] = time.perf_counter() - t0
                result[f"{name}_io_peak_rss_mb"] = mem.peak_mb
    return result


def main(argv: list[str] | None = None) -> int:
    from engine.runtime import retain_freed_memory

    retain_freed_memory()  # as Final.py and segment.py run
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=None, help="default 16 on the CPU, 64 on a GPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shape", default="200,256,256", help="slices,rows,columns")
    ap.add_argument("--configs", default="axial,fused")
    ap.add_argument("--block", type=int, default=224)
    ap.add_argument("--tile", type=int, default=None, help="0 = whole slices")
    ap.add_argument("--batch", type=int, default=None, help="default: segment.py's (1 on a CPU, 16 on a GPU)")
    ap.add_argument("--workers", type=int, default=None,
                    help="forward passes side by side; default: segment.py's (one per CPU thread, at most 4)")
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--no-io", action="store_true")
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--norm", choices=("batch", "instance"), default=None, help="default: Final.py's")
    ap.add_argument("--norm-kernel", choices=("groupnorm", "instancenorm2d"), default="groupnorm",
                    help="instance norm as GroupNorm(C, C) (default) or the previous InstanceNorm2d")
    ap.add_argument("--channels-last", action="store_true", help="models in channels_last")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    try:
        shape = tuple(int(s) for s in a.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(None, f"--shape must be three positive integers, got {a.shape!r}")
    r = run(width=a.width, device=a.device, shape=shape, configs=tuple(a.configs.split(",")),  # type: ignore[arg-type]
            block=a.block, tile=a.tile, batch=a.batch, slices=a.slices, io=not a.no_io,
            threads=a.threads, amp=False if a.no_amp else None, norm=a.norm, norm_kernel=a.norm_kernel,
            channels_last=a.channels_last, workers=a.workers)
    print(f"{r['device']}: width {r['width']} ({r['norm']} norm, {r['norm_kernel']} kernel"
          f"{', channels_last' if r['channels_last'] else ''}), volume {tuple(r['shape'])}, "
          f"block {r['block']}, "
          f"tile {r['tile']}, batch {r['batch']}, {r['workers']} pass(es) side by side")
    for name in a.configs.split(","):
        line = (f"  {name:6s} {r[f'{name}_s']:7.2f} s/volume (CPU time {r[f'{name}_cpu_s']:.1f} s, "
                f"peak +{r[f'{name}_peak_rss_mb']:.0f} MB RSS)")
        if f"{name}_io_s" in r:
            line += (f"; with NIfTI read/write {r[f'{name}_io_s']:7.2f} s "
                     f"(+{r[f'{name}_io_peak_rss_mb']:.0f} MB)")
        print(line)
    print(f"  process ru_maxrss {r['ru_maxrss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    run_cli(main)
