"""Tables of a bench.run report: the summary rows and ``bench.md`` (nothing here measures)."""

from __future__ import annotations

from typing import Any

SECTIONS = ("loader", "train", "semi", "inference")
INFERENCE_CONFIGS = ("axial", "fused")

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
            if r.get("matmul_gflops"):
                rows.append((name, "achieved GFLOP/s (fraction of this run's fp32 matmul rate, same threads)",
                             _against_matmul(r)))
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
            if r.get("axial_gflop") and r.get("fused_gflop"):
                rows.append((name, "3 views fused / axial: model FLOPs; time",
                             f"{_f(r['fused_gflop'] / r['axial_gflop'], '.2f', 'x')}; "
                             f"{_f(r['fused_s'] / r['axial_s'], '.2f', 'x')}"))
            if r.get("matmul_gflops"):
                rows.append((name, "axial model, model GFLOP/s over the call (fraction of this run's fp32 "
                             "matmul rate, same threads)", _against_matmul(r)))
            rows += _old_new_inference_rows(r.get("old_vs_new"))
        mem = f"{_f(r.get('section_peak_rss_mb'), '.0f')} MB RSS"
        if r.get("cuda_peak_mb") is not None:
            mem += f", {_f(r.get('cuda_peak_mb'), '.0f')} MB CUDA"
        rows.append((name, "section peak memory", mem))
    return rows


def _against_matmul(r: dict[str, Any]) -> str:
    frac = r.get("frac_matmul")
    return (f"{_f(r.get('achieved_gflops'), '.1f')} ({_f(None if frac is None else 100 * frac, '.0f', '%')}"
            f" of {_f(r.get('matmul_gflops'), '.0f')})")


def _old_new_train_rows(c: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not c:
        return []
    rows = []
    for name in ("old", "new"):
        o = c[name]
        kernel = "InstanceNorm2d" if o.get("norm_kernel") == "instancenorm2d" else "GroupNorm(C, C)"
        relu = "ReLU in place" if o.get("relu_inplace", True) else "out-of-place ReLU"
        where = ", fresh process (default allocator)" if o.get("fresh_process") else ""
        rows.append(("train", f"{name}: {kernel}, {relu}, {o['size']}x{o['size']}, "
                     f"batch {o['batch']}{where}, slices/s; megapixels/s",
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

    def fresh(r: dict[str, Any]) -> str:
        return ", fresh process (default allocator)" if r.get("fresh_process") else ""

    def passes(r: dict[str, Any]) -> str:
        w = r.get("workers", 1)
        side = "one pass at a time" if w == 1 else f"{w} passes side by side"
        return f"batch {r.get('batch', 16)}, {side}"

    rows = [
        ("inference", f"old: axial, InstanceNorm2d, out-of-place ReLU, contiguous, {passes(c['old'])}"
         f"{fresh(c['old'])}, s per {vol} (no I/O)",
         cell(c["old"])),
        ("inference", f"new: axial, GroupNorm(C, C), ReLU in place, channels_last, {passes(c['new'])}, "
         f"s per {vol} (no I/O)",
         cell(c["new"])),
        ("inference", "old / new time (same run, one after the other)", _f(c.get("ratio"), ".2f", "x")),
    ]
    if "one_pass" in c:
        rows += [
            ("inference", f"previous CPU default: GroupNorm(C, C), out-of-place ReLU, channels_last, "
             f"{passes(c['one_pass'])}{fresh(c['one_pass'])}, s per {vol} (no I/O)", cell(c["one_pass"])),
            ("inference", "old / that time", _f(c.get("ratio_one_pass"), ".2f", "x")),
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
