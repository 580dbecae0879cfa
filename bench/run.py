"""One benchmark run of UniMOS: data loading, training steps, inference; JSON + Markdown.

    python -m bench.run --out DIR [--quick] [--device auto|cpu|cuda] [--threads 2]
                        [--only loader,train,semi,inference]

Calls the ``run(...)`` function of each benchmark in ``bench/`` once, in this order:

* ``loader``: 2.5D samples/s from the slice cache vs the original's per-sample NIfTI decode (one core);
* ``train``: supervised training step (forward, deep-supervised TAL, backward, RMSprop), slices/s and
  FLOPs per slice; on a GPU also the fraction of the dense bf16 peak (``utils.flops.peak_tflops``);
* ``semi``: the UniMatch step against the supervised step on the same model: time and FLOP ratios;
* ``inference``: seconds per 256x256x200 volume, one axial model and three fused views, without and
  with NIfTI read/write (on the CPU the fused views are timed on 40 slices and scaled to 200, see
  :func:`run_inference`: the full measurement alone would take 5-10 minutes of two cores).

Presets: on the CPU width 16, 128x128 training crops, batch 8 (+ 4 + 4 unlabeled), fp32; on CUDA width
64, 224x224, bf16, channels_last (batch 32). ``--quick`` shrinks everything to a smoke test of a few
seconds. Peak memory is the resident set size above the level at the start of each section (and
``torch.cuda.max_memory_allocated`` on a GPU). The machine description (CPU model, cores, torch, GPU,
load average at start and end: the machine may be shared) goes with the numbers into ``DIR/bench.json``
and ``DIR/bench.md``. A section that fails is recorded with its error and the others still run (exit 1).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.errors import InputError, run_cli  # noqa: E402

SECTIONS = ("loader", "train", "semi", "inference")
INFERENCE_CONFIGS = ("axial", "fused")


# ----------------------------------------------------------------------------------------------
# Machine description


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on.

    Returns:
        ``cpu_model``, ``cores`` (logical CPUs), ``usable_cores`` (this process's affinity),
        ``mem_total_gb``, ``python``, ``platform``, ``torch``, ``cuda`` (torch's CUDA version or None),
        ``gpus`` (device names), ``load_avg`` (1, 5, 15 min).
    """
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {
        "cpu_model": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
        "mem_total_gb": _mem_total_gb(), "python": platform.python_version(),
        "platform": platform.platform(terse=True), "torch": torch.__version__,
        "cuda": torch.version.cuda, "gpus": gpus, "load_avg": _loadavg(),
    }


# ----------------------------------------------------------------------------------------------
# Presets


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
        # 40 slices (whole-slice inference) and scaled to 200 (the cost is linear in the slice count).
        "inference": {"width": 16, "shape": (200, 256, 256), "block": 224, "batch": 16, "threads": threads,
                      "fused_slices": 40},
        # Old vs new settings, measured side by side in the same run (train: steps alternate):
        # old = InstanceNorm2d kernel, 128x128 crops (the demo preset before the change);
        # new = GroupNorm(C, C) kernel (the network as built now), 96x96 crops (demo.py's --block).
        "train_compare": {
            "old": {"width": 16, "size": 128, "batch": 8, "norm_kernel": "instancenorm2d"},
            "new": {"width": 16, "size": 96, "batch": 8, "norm_kernel": "groupnorm"},
            "steps": 8, "warmup": 2, "threads": threads},
        # axial, no I/O: old = InstanceNorm2d, contiguous; new = GroupNorm, channels_last
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

    from engine.runtime import resolve_device
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
    report: dict[str, Any] = {"machine": machine_info(), "device": str(dev),
                              "device_name": torch.cuda.get_device_name(dev) if gpu else "cpu",
                              "quick": quick, "threads": threads,
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
        if cfg["train_compare"] is not None:
            res["old_vs_new"] = compare(device=str(dev), **cfg["train_compare"])
        return res

    def semi() -> dict[str, Any]:
        from bench.semi_step import run

        return run(device=str(dev), **cfg["semi"])

    def inference() -> dict[str, Any]:
        res = run_inference(str(dev), **cfg["inference"])
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


def run_inference(device: str, shape: tuple[int, int, int], fused_slices: int | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """``bench.inference.run`` for one axial model and three fused views, with and without I/O.

    Args:
        device: torch device string.
        shape: numpy shape (slices, rows, columns) of the volume the numbers are quoted for.
        fused_slices: None measures the fused views on ``shape`` too. Otherwise they are timed without
            I/O on the first ``fused_slices`` slices with whole-slice inference (``tile=0``: per-slice
            work then grows linearly with the slice count in every view), scaled by
            ``shape[0] / fused_slices``, and the I/O time measured with the axial model is added for
            ``fused_io_s``. ``fused_measured_shape`` and ``fused_scale`` record this.
        kwargs: other ``bench.inference.run`` arguments (width, block, batch, threads...).

    Returns:
        ``bench.inference.run``'s dict (``axial_*`` and ``fused_*`` keys).
    """
    from bench.inference import run

    if fused_slices is None or fused_slices >= shape[0]:
        return run(device=device, shape=shape, configs=INFERENCE_CONFIGS, io=True, **kwargs)
    res = run(device=device, shape=shape, configs=("axial",), io=True, **kwargs)
    sub = (fused_slices, *shape[1:])
    fused = run(device=device, shape=sub, configs=("fused",), io=False, **{**kwargs, "tile": 0})
    scale = shape[0] / fused_slices
    io_overhead = max(0.0, res["axial_io_s"] - res["axial_s"])  # timing noise can make it negative
    res.update({
        "fused_measured_shape": list(sub), "fused_scale": scale, "fused_tile": 0,
        "fused_measured_s": fused["fused_s"], "fused_s": fused["fused_s"] * scale,
        "fused_cpu_s": fused["fused_cpu_s"] * scale, "fused_io_s": fused["fused_s"] * scale + io_overhead,
        "fused_peak_rss_mb": fused["fused_peak_rss_mb"],  # of the smaller volume (not scaled)
        "ru_maxrss_mb": max(res["ru_maxrss_mb"], fused["ru_maxrss_mb"]),
    })
    return res


def compare_inference(device: str, shape: tuple[int, int, int], batch: int = 16,
                      small_batch: int | None = 2, **kwargs: Any) -> dict[str, Any]:
    """Axial inference without I/O, old settings then new, in the same run.

    old: instance norm with the InstanceNorm2d kernel, contiguous tensors; new: the GroupNorm(C, C)
    kernel in channels_last; new_small_batch: new with ``small_batch`` slices per forward pass (on a
    CPU the activations of a few slices stay in the caches: on one thread, 256x256x200 took 0.59x the
    CPU time of 16 slices per forward; with two threads on a loaded machine the gain was small). All
    run ``inference.segment.segment_volume`` (under
    ``torch.inference_mode``) on the same volume with the same weights.

    Args:
        device: torch device string.
        shape: numpy shape (slices, rows, columns).
        batch: slices per forward pass of old and new.
        small_batch: slices per forward pass of ``new_small_batch`` (None: not measured).
        kwargs: other ``bench.inference.run`` arguments (width, block, threads...).

    Returns:
        ``{"old": {"axial_s", "axial_cpu_s", ...}, "new": {...}, "new_small_batch": {...}, "ratio",
        "ratio_small_batch"}`` (ratios = old time / new time: above 1 means faster than old),
        ``shape``, ``load_avg_1min``.
    """
    from bench.inference import run

    out: dict[str, Any] = {"shape": list(shape)}
    runs = [("old", "instancenorm2d", False, batch), ("new", "groupnorm", True, batch)]
    if small_batch:
        runs.append(("new_small_batch", "groupnorm", True, small_batch))
    for name, kernel, cl, b in runs:
        r = run(device=device, shape=shape, configs=("axial",), io=False, norm_kernel=kernel,
                channels_last=cl, batch=b, **kwargs)
        out[name] = {"norm_kernel": kernel, "channels_last": cl, "batch": b, "axial_s": r["axial_s"],
                     "axial_cpu_s": r["axial_cpu_s"], "axial_peak_rss_mb": r["axial_peak_rss_mb"]}
    out["ratio"] = out["old"]["axial_s"] / out["new"]["axial_s"]
    if small_batch:
        out["ratio_small_batch"] = out["old"]["axial_s"] / out["new_small_batch"]["axial_s"]
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


def _describe_preset(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={'x'.join(map(str, v)) if isinstance(v, (tuple, list)) else v}"
                     for k, v in kwargs.items())


# ----------------------------------------------------------------------------------------------
# Formatting


def _f(v: Any, fmt: str = ".2f", unit: str = "") -> str:
    if v is None:
        return "n/a"
    try:
        return f"{v:{fmt}}{unit}"
    except (TypeError, ValueError):
        return str(v)


def _volume_name(shape: Any) -> str:
    """numpy (slices, rows, columns) -> 'columns x rows x slices', the way CT sizes are quoted."""
    if not shape or len(shape) != 3:
        return "volume"
    return f"{shape[2]}x{shape[1]}x{shape[0]}"


def summary_rows(results: dict[str, dict[str, Any]], gpu: bool | None = None) -> list[tuple[str, str, str]]:
    """The headline numbers as ``(section, measure, value)`` rows (missing values are skipped).

    Args:
        results: section -> result dict (as in ``bench.json``'s ``results``).
        gpu: show GPU-only rows (fraction of peak); None: when the train result has a peak.

    Returns:
        Rows in section order; a failed section gives one ``error`` row.
    """
    rows: list[tuple[str, str, str]] = []
    for name in SECTIONS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            rows.append((name, "error", str(r["error"])))
            continue
        if name == "loader":
            rows += [
                (name, "slice cache, samples/s (1 core)", _f(r.get("cache_samples_per_s"), ".1f")),
                (name, "per-sample NIfTI decode (original), samples/s", _f(r.get("original_samples_per_s"))),
                (name, "cache / per-sample decode", _f(r.get("speedup"), ".1f", "x")),
                (name, f"cache build, s ({r.get('volumes')} volumes, once)", _f(r.get("cache_build_s"))),
            ]
        elif name == "train":
            setting = (f"width {r.get('width')}, {r.get('norm')} norm, {r.get('size')}x{r.get('size')}, "
                       f"batch {r.get('batch')}, "
                       f"{'fp32' if r.get('amp') == 'off' else r.get('amp')}"
                       f"{', channels_last' if r.get('channels_last') else ''}")
            rows += [
                (name, f"supervised step, slices/s ({setting})", _f(r.get("slices_per_s"), ".1f")),
                (name, "supervised step, s (median)", _f(r.get("s_per_step"), ".3f")),
                (name, "training FLOPs per slice (fwd + bwd)",
                 _f((r.get("train_flops_per_slice") or 0) / 1e9, ".2f", " G")),
                (name, "forward FLOPs per slice", _f((r.get("fwd_flops_per_slice") or 0) / 1e9, ".2f", " G")),
            ]
            rows += _old_new_train_rows(r.get("old_vs_new"))
            show_peak = r.get("peak_tflops") is not None if gpu is None else gpu
            if show_peak:
                frac = r.get("frac_peak")
                rows.append((name, "achieved TFLOP/s (fraction of dense bf16 peak)",
                             f"{_f(r.get('achieved_tflops'), '.1f')} "
                             f"({_f(None if frac is None else 100 * frac, '.1f', '%')} of "
                             f"{_f(r.get('peak_tflops'), '.0f')})"))
        elif name == "semi":
            u = r.get("unlabeled_batch")
            rows += [
                (name, f"supervised step, slices/s (batch {r.get('batch')})",
                 _f(r.get("sup_slices_per_s"), ".1f")),
                (name, f"semi step, slices/s (batch {r.get('batch')} + {u} + {u} unlabeled)",
                 _f(r.get("semi_slices_per_s"), ".1f")),
                (name, "semi / supervised step time", _f(r.get("time_ratio"), ".2f", "x")),
                (name, "semi / supervised training FLOPs", _f(r.get("flop_ratio"), ".2f", "x")),
            ]
        elif name == "inference":
            vol = _volume_name(r.get("shape"))
            for cfg in INFERENCE_CONFIGS:
                label = "axial model" if cfg == "axial" else "3 views fused"
                if f"{cfg}_s" not in r:
                    continue
                est = ""
                if cfg == "fused" and r.get("fused_scale"):
                    est = (f"; whole slices, measured on {_volume_name(r.get('fused_measured_shape'))}"
                           f" x {r['fused_scale']:g}")
                rows.append((name, f"{label}, s per {vol} volume (no I/O{est})",
                             _f(r.get(f"{cfg}_s"), ".2f")))
                if f"{cfg}_io_s" in r:
                    rows.append((name, f"{label}, s per volume with NIfTI read + write"
                                 + (" (axial I/O time added)" if est else ""),
                                 _f(r.get(f"{cfg}_io_s"), ".2f")))
                on = f" (on {_volume_name(r.get('fused_measured_shape'))})" if est else ""
                rows.append((name, f"{label}, peak RSS above start, MB{on}",
                             _f(r.get(f"{cfg}_peak_rss_mb"), ".0f")))
        if name == "inference":
            rows += _old_new_inference_rows(r.get("old_vs_new"))
        mem = f"{_f(r.get('section_peak_rss_mb'), '.0f')} MB RSS"
        if r.get("cuda_peak_mb") is not None:
            mem += f", {_f(r.get('cuda_peak_mb'), '.0f')} MB CUDA"
        rows.append((name, "section peak memory", mem))
    return rows


def _old_new_train_rows(c: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not c:
        return []
    rows = []
    for name in ("old", "new"):
        o = c[name]
        kernel = "InstanceNorm2d" if o.get("norm_kernel") == "instancenorm2d" else "GroupNorm(C, C)"
        rows.append(("train", f"{name}: {kernel}, {o['size']}x{o['size']}, batch {o['batch']}, "
                     "slices/s; megapixels/s",
                     f"{_f(o.get('slices_per_s'), '.1f')}; {_f(o.get('megapixels_per_s'), '.3f')}"))
    rows.append(("train", "new / old, slices/s; megapixels/s (same run, steps alternating)",
                 f"{_f(c.get('slices_ratio'), '.2f', 'x')}; {_f(c.get('megapixels_ratio'), '.2f', 'x')}"))
    return rows


def _old_new_inference_rows(c: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not c:
        return []
    vol = _volume_name(c.get("shape"))

    def cell(r: dict[str, Any]) -> str:
        return f"{_f(r.get('axial_s'), '.2f')} (CPU {_f(r.get('axial_cpu_s'), '.1f')} s)"

    rows = [
        ("inference", f"old: axial, InstanceNorm2d, contiguous, batch {c['old'].get('batch', 16)}, "
         f"s per {vol} (no I/O)", cell(c["old"])),
        ("inference", f"new: axial, GroupNorm(C, C), channels_last, batch {c['new'].get('batch', 16)}, "
         f"s per {vol} (no I/O)", cell(c["new"])),
        ("inference", "old / new time (same run, one after the other)", _f(c.get("ratio"), ".2f", "x")),
    ]
    if "new_small_batch" in c:
        rows += [
            ("inference", f"new, batch {c['new_small_batch'].get('batch')}: s per {vol} (no I/O)",
             cell(c["new_small_batch"])),
            ("inference", f"old / new at batch {c['new_small_batch'].get('batch')} time",
             _f(c.get("ratio_small_batch"), ".2f", "x")),
        ]
    return rows


def _load(v: Any) -> str:
    return "n/a" if not v else " / ".join(f"{x:.2f}" for x in v)


def format_markdown(report: dict[str, Any]) -> str:
    """``bench.md``: machine table, headline numbers, per-section settings and timings.

    Args:
        report: the dict :func:`run_all` returns (``machine``, ``results``, ``presets``...).

    Returns:
        Markdown text.
    """
    m = report.get("machine", {})
    results = report.get("results", {})
    gpu = str(report.get("device", "cpu")).startswith("cuda")
    lines = ["# UniMOS benchmarks" + (" (--quick)" if report.get("quick") else ""), "",
             "| machine | |", "|---|---|",
             f"| CPU | {m.get('cpu_model', 'n/a')} |",
             f"| cores (usable) | {m.get('cores', 'n/a')} ({m.get('usable_cores', 'n/a')}) |",
             f"| memory | {_f(m.get('mem_total_gb'), '.1f', ' GB')} |",
             f"| GPU | {', '.join(m.get('gpus') or []) or 'none'} |",
             f"| torch / CUDA | {m.get('torch', 'n/a')} / {m.get('cuda') or 'none'} |",
             f"| python / OS | {m.get('python', 'n/a')} / {m.get('platform', 'n/a')} |",
             f"| device used, torch threads | {report.get('device_name', report.get('device', 'n/a'))}, "
             f"{report.get('threads')} |",
             f"| load average 1/5/15 min, start | {_load(m.get('load_avg'))} |",
             f"| load average 1/5/15 min, end | {_load(report.get('load_avg_end'))} |",
             f"| total time | {_f(report.get('seconds'), '.0f', ' s')} |", "",
             "The machine may be shared: compare the load averages with the core count before trusting "
             "a number.", "",
             "| section | measure | value |", "|---|---|---|"]
    lines += [f"| {s} | {measure} | {value} |" for s, measure, value in summary_rows(results, gpu)]
    lines += ["", "| section | settings | time | load average at start / end (1 min) |", "|---|---|---|---|"]
    for name in SECTIONS:
        if name not in results:
            continue
        r = results[name]
        la0, la1 = r.get("load_avg_start") or [None], r.get("load_avg_end") or [None]
        lines.append(f"| {name} | {_describe_preset(report.get('presets', {}).get(name, {}))} | "
                     f"{_f(r.get('section_s'), '.1f', ' s')} | {_f(la0[0])} / {_f(la1[0])} |")
    return "\n".join(lines) + "\n"


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
