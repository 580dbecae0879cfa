"""One benchmark run of UniMOS: data loading, training steps, inference; JSON + Markdown.

    python -m bench.run --out DIR [--quick] [--device auto|cpu|cuda] [--threads 2]
                        [--only loader,train,semi,inference]

Calls the ``run(...)`` function of each benchmark in ``bench/`` once, in this order:

* ``loader``: 2.5D samples/s from the slice cache vs the original's per-sample NIfTI decode (one core);
* ``train``: supervised training step (forward, deep-supervised TAL, backward, RMSprop), slices/s and
  FLOPs per slice; on a GPU also the fraction of the dense bf16 peak (``utils.flops.peak_tflops``), on
  the CPU the fraction of the fp32 matrix-multiply rate measured in the same run
  (:func:`against_matmul`: how far kernel tuning could still go);
* ``semi``: the UniMatch step against the supervised step on the same model: time and FLOP ratios;
* ``inference``: seconds per 256x256x200 volume, one axial model and three fused views, without and
  with NIfTI read/write (on the CPU the fused views are timed on 57 slices and scaled to 200, see
  :func:`run_inference`: the full measurement alone would take 5-10 minutes of two cores); the model
  FLOPs of each (three views over one axial is the least their time ratio can be at equal
  efficiency) and, on the CPU, the axial call's rate against the matrix-multiply rate.

Presets: on the CPU width 16, 128x128 training crops, batch 8 (+ 4 + 4 unlabeled), fp32; on CUDA width
64, 224x224, bf16, channels_last (batch 32). ``--quick`` shrinks everything to a smoke test of a few
seconds. Peak memory is the resident set size above the level at the start of each section (and
``torch.cuda.max_memory_allocated`` on a GPU). The machine description (CPU model, cores, torch, GPU,
load average at start and end: the machine may be shared) goes with the numbers into ``DIR/bench.json``
and ``DIR/bench.md``. A section that fails is recorded with its error and the others still run (exit 1).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import _loadavg, machine_info  # noqa: E402,F401 -- re-exported
from bench.run_report import (  # noqa: E402,F401 -- re-exported
    INFERENCE_CONFIGS,
    SECTIONS,
    _describe_preset,
    format_markdown,
    summary_rows,
)
from utils.errors import InputError, run_cli  # noqa: E402


def presets(gpu: bool, quick: bool = False, threads: int | None = 2) -> dict[str, dict[str, Any]]:
    """Keyword arguments of each benchmark's ``run(...)``.

    Args:
        gpu: CUDA presets (width 64, 224x224, bf16, channels_last) instead of the CPU ones
            (width 16, 128x128, batch 8, fp32).
        quick: tiny sizes for a smoke test (seconds).
        threads: CPU threads of the train/semi/inference sections (the loader is one core by design).

    Returns:
        ``{section: kwargs}`` for ``loader``, ``train``, ``semi`` and ``inference``, plus
        ``train_compare`` (:func:`bench.train_step.compare` arguments) and ``inference_compare``
        (:func:`compare_inference` arguments) for the old-vs-new settings on the CPU (None on CUDA).
    """
    if quick:
        return {
            "loader": {"n_volumes": 2, "shape": (24, 96, 96), "samples": 100, "baseline_samples": 4,
                       "block": 64},
            "train": {"width": 8, "size": 64, "batch": 2, "steps": 2, "warmup": 1, "threads": threads,
                      "amp": "bf16" if gpu else "off", "channels_last": gpu},
            "semi": {"width": 8, "size": 64, "batch": 2, "unlabeled_batch": 2, "steps": 2, "warmup": 1,
                     "threads": threads},
            # bench.inference warms up on 8 slices: no smaller volume
            "inference": {"width": 4, "shape": (16, 64, 64), "block": 224, "tile": 0, "batch": 16,
                          "threads": threads, "fused_slices": 8},
            "train_compare": None if gpu else {
                "old": {"width": 8, "size": 64, "batch": 2, "norm_kernel": "instancenorm2d"},
                "new": {"width": 8, "size": 48, "batch": 2, "norm_kernel": "groupnorm"},
                "steps": 2, "warmup": 1, "threads": threads},
            "inference_compare": None if gpu else {"width": 4, "shape": (16, 64, 64), "block": 224,
                                                   "batch": 16, "threads": threads},
        }
    if gpu:
        return {
            "loader": {"n_volumes": 3, "shape": (150, 256, 256), "samples": 2000, "baseline_samples": 16,
                       "block": 224},
            "train": {"width": 64, "size": 224, "batch": 32, "amp": "bf16", "channels_last": True,
                      "steps": 20, "warmup": 5, "threads": threads},
            "semi": {"width": 64, "size": 224, "batch": 16, "unlabeled_batch": 16, "amp": "bf16",
                     "steps": 10, "warmup": 3, "threads": threads},
            "inference": {"width": 64, "shape": (200, 256, 256), "block": 224, "batch": 32,
                          "threads": threads},
            "train_compare": None, "inference_compare": None,  # the old/new comparison is a CPU one
        }
    return {
        "loader": {"n_volumes": 3, "shape": (150, 256, 256), "samples": 2000, "baseline_samples": 16,
                   "block": 128},
        "train": {"width": 16, "size": 128, "batch": 8, "amp": "off", "channels_last": False,
                  "steps": 10, "warmup": 3, "threads": threads},
        "semi": {"width": 16, "size": 128, "batch": 8, "unlabeled_batch": 4, "amp": "off",
                 "steps": 8, "warmup": 2, "threads": threads},
        # Three fused views of 200 slices take 5-10 min of a 2-core CPU: the fused number is measured on
        # 57 slices (whole-slice inference) and scaled to 200 (see fused_sub_slices).
        # segment.py's CPU settings: channels_last models, its default batch and passes side by side
        "inference": {"width": 16, "shape": (200, 256, 256), "block": 224, "batch": None, "threads": threads,
                      "fused_slices": 40, "channels_last": True},
        # Old vs new settings, measured side by side in the same run (train: steps alternate):
        # old = InstanceNorm2d kernel, out-of-place ReLU, 128x128 crops (the demo preset before the
        # change); new = GroupNorm(C, C) kernel, ReLU in place (the network as built now), 96x96 crops
        # (demo.py's --block).
        "train_compare": {
            "old": {"width": 16, "size": 128, "batch": 8, "norm_kernel": "instancenorm2d",
                    "relu_inplace": False},
            "new": {"width": 16, "size": 96, "batch": 8, "norm_kernel": "groupnorm"},
            "steps": 8, "warmup": 2, "threads": threads},
        # axial, no I/O: old = InstanceNorm2d, out-of-place ReLU, contiguous, 16 slices per pass; new =
        # segment.py's CPU default; one_pass = the previous CPU default (compare_inference)
        "inference_compare": {"width": 16, "shape": (200, 256, 256), "block": 224, "batch": 16,
                              "threads": threads},
    }


# ----------------------------------------------------------------------------------------------
# Running the sections


def _run_section(name: str, fn: Callable[[], dict[str, Any]], device) -> dict[str, Any]:
    """Run one benchmark; add wall time, peak RSS (and CUDA peak), load averages; record errors."""
    import torch

    from bench.inference import PeakRss

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    extra: dict[str, Any] = {"load_avg_start": _loadavg()}
    t0 = time.perf_counter()
    with PeakRss() as mem:
        try:
            result = dict(fn())
        except InputError:
            raise
        except Exception as err:  # a broken section should not cost the other sections' numbers
            traceback.print_exc()
            result = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    extra["section_s"] = round(time.perf_counter() - t0, 2)
    extra["section_peak_rss_mb"] = round(mem.peak_mb, 1)
    if cuda:
        extra["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    extra["load_avg_end"] = _loadavg()
    result.update(extra)
    return result


def run_all(out: str | Path, quick: bool = False, device: str = "auto", threads: int | None = 2,
            only: tuple[str, ...] = SECTIONS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the selected benchmarks and write ``out/bench.json`` and ``out/bench.md``.

    Args:
        out: output folder (created).
        quick: smoke-test sizes.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        threads: ``torch.set_num_threads`` for everything but the (one-core) loader; None leaves it.
        only: sections to run, from :data:`SECTIONS`.
        log: receives progress lines.

    Returns:
        The report: ``machine``, ``device``, ``quick``, ``presets``, ``results`` (section -> dict),
        ``seconds``, ``load_avg_end``.

    Raises:
        InputError: unknown section, unavailable device, output folder not writable.
    """
    import SimpleITK as sitk  # noqa: N813
    import torch

    from engine.runtime import resolve_device, retain_freed_memory
    from utils.fileio import write_json_atomic, write_text_atomic

    bad = [s for s in only if s not in SECTIONS]
    if bad or not only:
        raise InputError(None, f"--only takes sections from {', '.join(SECTIONS)}, got {list(only)}")
    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise InputError(None, str(err)) from None
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "output folder is a file")
    gpu = dev.type == "cuda"
    if threads:
        torch.set_num_threads(threads)
    cfg = presets(gpu, quick, threads)
    # the current settings run as Final.py and segment.py do; the old ones in fresh processes
    retained = retain_freed_memory()
    report: dict[str, Any] = {"machine": machine_info(), "device": str(dev),
                              "device_name": torch.cuda.get_device_name(dev) if gpu else "cpu",
                              "quick": quick, "threads": threads, "allocator_retains_freed": retained,
                              "presets": {s: _jsonable(cfg[s]) for s in only}, "results": {}}
    for s, extra in (("train", "train_compare"), ("inference", "inference_compare")):
        if s in only and cfg[extra] is not None:
            report["presets"][extra] = _jsonable(cfg[extra])
    t_all = time.perf_counter()

    def loader() -> dict[str, Any]:
        from bench.loader import run

        try:
            return run(**cfg["loader"])
        finally:
            # the loader pins torch and SimpleITK to one thread; give the others theirs back
            if threads:
                torch.set_num_threads(threads)
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)

    def train() -> dict[str, Any]:
        from bench.train_step import compare, run

        res = run(device=str(dev), **cfg["train"])
        if not gpu:
            res.update(against_matmul(res["achieved_tflops"] * 1e3))
        if cfg["train_compare"] is not None:
            res["old_vs_new"] = compare(device=str(dev), **cfg["train_compare"])
        return res

    def semi() -> dict[str, Any]:
        from bench.semi_step import run

        return run(device=str(dev), **cfg["semi"])

    def inference() -> dict[str, Any]:
        res = run_inference(str(dev), **cfg["inference"])
        if not gpu:
            res.update(against_matmul(res["axial_gflop"] / res["axial_s"]))
        if cfg["inference_compare"] is not None:
            res["old_vs_new"] = compare_inference(str(dev), **cfg["inference_compare"])
        return res

    fns = {"loader": loader, "train": train, "semi": semi, "inference": inference}
    for name in SECTIONS:
        if name not in only:
            continue
        log(f"== {name} ({_describe_preset(cfg[name])})")
        res = _run_section(name, fns[name], dev)
        report["results"][name] = res
        for _, measure, value in summary_rows({name: res}, gpu):
            log(f"   {measure}: {value}")
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    report["load_avg_end"] = _loadavg()
    report["ru_maxrss_mb"] = _ru_maxrss_mb()
    write_json_atomic(out / "bench.json", report)
    write_text_atomic(out / "bench.md", format_markdown(report))
    return report


def against_matmul(achieved_gflops: float, threads: int | None = None) -> dict[str, float]:
    """An achieved CPU rate next to this machine's fp32 matrix-multiply rate, measured now.

    Args:
        achieved_gflops: model GFLOP/s a section reached.
        threads: threads of the matmul; None: torch's current count (the section's).

    Returns:
        ``matmul_gflops`` (:func:`bench.machine.matmul_gflops`) and ``frac_matmul`` (achieved / it).
    """
    from bench.machine import matmul_gflops

    ref = matmul_gflops(threads)
    return {"achieved_gflops": achieved_gflops, "matmul_gflops": ref, "frac_matmul": achieved_gflops / ref}


def fused_sub_slices(shape: tuple[int, int, int], at_least: int) -> int:
    """The slice count (``>= at_least``) to time the fused views on, for scaling to ``shape[0]``.

    Coronal and sagittal slices are ``si_length(n)`` rows tall, padded to a multiple of 16: at 40 of
    the benchmark's 2.5 mm slices they are 67 rows padded to 80 (19 % padding), at 200 slices 333
    padded to 336 (1 %), so a scale by the slice count overstated the fused time by ~15 %. This picks
    the count (within 32 above ``at_least``) whose padded rows per slice come closest to the full
    volume's, e.g. 57 (95 rows padded to 96) for 200 slices.
    """
    from bench.inference import FOV_MM, SLICE_MM
    from data.config import load_config
    from data.preprocess import si_length
    from inference.window import tile_size

    # segment_volume resamples each slice to the config's in-plane grid first (same field of view)
    rows, cols = load_config().inplane_size
    spacing = (FOV_MM / cols, FOV_MM / rows, SLICE_MM)

    def rows_per_slice(n: int) -> float:
        return tile_size(si_length(n, spacing), 10**9) / n

    target = rows_per_slice(shape[0])
    candidates = range(at_least, max(at_least, min(at_least + 32, shape[0] - 1)) + 1)
    return min(candidates, key=lambda n: (abs(rows_per_slice(n) - target), n))


def run_inference(device: str, shape: tuple[int, int, int], fused_slices: int | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """``bench.inference.run`` for one axial model and three fused views, with and without I/O.

    Args:
        device: torch device string.
        shape: numpy shape (slices, rows, columns) of the volume the numbers are quoted for.
        fused_slices: None measures the fused views on ``shape`` too. Otherwise they are timed without
            I/O on the first :func:`fused_sub_slices` ``(shape, fused_slices)`` slices with whole-slice
            inference (``tile=0``: per-slice work then grows linearly with the slice count in every
            view), scaled by ``shape[0]`` over that count, and the I/O time measured with the axial
            model is added for ``fused_io_s``. ``fused_measured_shape`` and ``fused_scale`` record
            this.
        kwargs: other ``bench.inference.run`` arguments (width, block, batch, threads...).

    Returns:
        ``bench.inference.run``'s dict (``axial_*`` and ``fused_*`` keys).
    """
    from bench.inference import run

    if fused_slices is None or fused_slices >= shape[0]:
        return run(device=device, shape=shape, configs=INFERENCE_CONFIGS, io=True, **kwargs)
    res = run(device=device, shape=shape, configs=("axial",), io=True, **kwargs)
    n_sub = fused_sub_slices(shape, fused_slices)
    sub = (n_sub, *shape[1:])
    fused = run(device=device, shape=sub, configs=("fused",), io=False, **{**kwargs, "tile": 0})
    scale = shape[0] / n_sub
    io_overhead = max(0.0, res["axial_io_s"] - res["axial_s"])  # timing noise can make it negative
    res.update({
        "fused_measured_shape": list(sub), "fused_scale": scale, "fused_tile": 0,
        "fused_measured_s": fused["fused_s"], "fused_s": fused["fused_s"] * scale,
        "fused_cpu_s": fused["fused_cpu_s"] * scale, "fused_io_s": fused["fused_s"] * scale + io_overhead,
        "fused_measured_gflop": fused["fused_gflop"], "fused_gflop": fused["fused_gflop"] * scale,
        "fused_peak_rss_mb": fused["fused_peak_rss_mb"],  # of the smaller volume (not scaled)
        "ru_maxrss_mb": max(res["ru_maxrss_mb"], fused["ru_maxrss_mb"]),
    })
    return res


def compare_inference(device: str, shape: tuple[int, int, int], batch: int = 16,
                      one_pass_batch: int | None = 2, **kwargs: Any) -> dict[str, Any]:
    """Axial inference without I/O, old settings then new, in the same run.

    old: instance norm with the InstanceNorm2d kernel, out-of-place ReLU, contiguous tensors,
    ``batch`` slices per pass, one pass at a time; new: what segment.py does on this device now
    (GroupNorm(C, C) kernel, ReLU in place, channels_last, its default batch and forward passes side
    by side on a CPU, the allocator that keeps freed pages); one_pass: the previous CPU default,
    GroupNorm(C, C), out-of-place ReLU, channels_last, one pass of ``one_pass_batch`` slices at a
    time on all threads. old, then one_pass, run in a spawned process with the default allocator. All
    run ``inference.segment.segment_volume`` (under ``torch.inference_mode``) on the same volume with
    the same weights.

    Args:
        device: torch device string.
        shape: numpy shape (slices, rows, columns).
        batch: slices per forward pass of old.
        one_pass_batch: slices per forward pass of ``one_pass`` (None: not measured).
        kwargs: other ``bench.inference.run`` arguments (width, block, threads...).

    Returns:
        ``{"old": {"axial_s", "axial_cpu_s", "batch", "workers", ...}, "new": {...}, "one_pass": {...},
        "ratio", "ratio_one_pass"}`` (ratios = old time / that time: above 1 means faster than old),
        ``shape``, ``load_avg_1min``.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from bench.inference import run

    out: dict[str, Any] = {"shape": list(shape)}
    runs = [("old", "instancenorm2d", False, False, batch, 1), ("new", "groupnorm", True, True, None, None)]
    if one_pass_batch:
        runs.append(("one_pass", "groupnorm", False, True, one_pass_batch, 1))
    # The earlier settings run in a fresh process, with the C library's default allocator, as their
    # code did; the new ones here, where main() tuned it as segment.py does (retain_freed_memory).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
        for name, kernel, inplace, cl, b, workers in runs:
            kw = dict(device=device, shape=shape, configs=("axial",), io=False, norm_kernel=kernel,
                      relu_inplace=inplace, channels_last=cl, batch=b, workers=workers, **kwargs)
            r = run(**kw) if name == "new" else fresh.submit(run, **kw).result()
            out[name] = {"norm_kernel": kernel, "relu_inplace": inplace, "channels_last": cl,
                         "batch": r["batch"], "fresh_process": name != "new", "workers": r["workers"],
                         "axial_s": r["axial_s"], "axial_cpu_s": r["axial_cpu_s"],
                         "axial_peak_rss_mb": r["axial_peak_rss_mb"]}
    out["ratio"] = out["old"]["axial_s"] / out["new"]["axial_s"]
    if one_pass_batch:
        out["ratio_one_pass"] = out["old"]["axial_s"] / out["one_pass"]["axial_s"]
    out["load_avg_1min"] = (_loadavg() or [None])[0]
    return out


def _ru_maxrss_mb() -> float | None:
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    except (ImportError, OSError):
        return None


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for bench.json and bench.md")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of a few seconds)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (default 2; 0 leaves torch's default)")
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    a = ap.parse_args(argv)
    only = tuple(s.strip() for s in a.only.split(",") if s.strip())
    report = run_all(a.out, quick=a.quick, device=a.device, threads=a.threads or None, only=only)
    print()
    print(format_markdown(report))
    print(f"wrote {Path(a.out) / 'bench.json'} and {Path(a.out) / 'bench.md'}")
    return 1 if any("error" in r for r in report["results"].values()) else 0


if __name__ == "__main__":
    run_cli(main)
