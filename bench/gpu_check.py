"""The GPU check of issue #13: everything that needs a CUDA device, in one run of <= 8 minutes.

    python -m bench.gpu_check --out gpu_check_out [--budget-s 450] [--sections a,b,...]
    python -m bench.gpu_check --out DIR --cpu-smoke      # tiny sizes on the CPU: the plumbing only

(``bash bench/gpu_check.sh`` finds or makes a Python with torch and runs the first line.)

Sections, in this order, each in its own subprocess with its own time cap (a section that fails, runs
out of memory or over its cap is recorded with its error and the next one runs; the caps also shrink
to what is left of ``--budget-s``):

* ``pytest_cuda``: ``pytest -m cuda`` (the tests marked ``@pytest.mark.cuda``);
* ``train_bf16``: the paper preset (width 64, 224x224, batch 8), bf16 autocast, channels_last,
  ``torch.compile``: slices/s, model FLOPs utilisation (training FLOPs from
  ``utils.flops.count_flops`` over the dense bf16 peak of ``utils.flops.peak_tflops``);
* ``inference``: ``bench.inference`` of a 256x256x200 CT (axial) and of a 512x512x300 one (axial
  model, three fused views), width 64, bf16, channels_last, without I/O (--cpu-smoke: axial only);
* ``max_batch``: the largest batch of that preset that fits (doubling from 8 until CUDA runs out of
  memory, then bisecting back), one eager bf16 step per try; slices/s and MFU, eager, at 90 % of it;
* ``max_batch_compile``: the same batch with ``torch.compile`` (a section of its own, so that a slow
  compile cannot cost the search's result);
* ``train_fp16``: the paper preset with fp16 autocast and a GradScaler;
* ``ddp``: ``torchrun --nproc_per_node 2 Final.py`` on tiny synthetic phantoms (skipped below 2 GPUs).

Training steps exclude data loading (random batches already on the GPU; ``bench/train_step.py``).
Targets printed next to the numbers: >= 700 slices/s at the paper preset with bf16 + compile, >= 25 %
MFU, axial inference of 256x256x200 <= 0.5 s. Writes ``OUT/gpu_check.json`` (machine, every section's
status, seconds, cap, numbers or error) and ``OUT/gpu_check.md``; exit code 1 when a section failed.

``--cpu-smoke`` runs the same sections in-process on the CPU with tiny sizes (width 4, 32x32, bf16
autocast, channels_last, no compile, no subprocesses, pytest and DDP skipped): a default-suite test
proves that the JSON and Markdown come out with every section recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.errors import InputError, run_cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("pytest_cuda", "train_bf16", "inference", "max_batch", "max_batch_compile", "train_fp16", "ddp")
# Seconds per section on one H100/H200 (compiling MOSNet takes most of a training section); the sum is
# above the default budget on purpose: a section that finishes early leaves its time to the next ones.
CAPS = {"pytest_cuda": 60, "train_bf16": 120, "inference": 90, "max_batch": 90, "max_batch_compile": 90,
        "train_fp16": 90, "ddp": 90}
DEFAULT_BUDGET_S = 450.0  # + interpreter start-up and writing: under 8 minutes
TARGETS = {"slices_per_s": 700.0, "mfu": 0.25, "axial_256_s": 0.5}


def presets(smoke: bool) -> dict[str, Any]:
    """Sizes of every section: the paper preset on a GPU, tiny ones for ``--cpu-smoke``."""
    if smoke:
        return {"device": "cpu", "width": 4, "size": 32, "batch": 2, "steps": 2, "warmup": 1,
                "compile": False, "max_batch_limit": 8, "big_shape": (8, 32, 32), "small_shape": (8, 32, 32),
                "inference_width": 4, "inference_batch": 4, "threads": 1, "fused": False}
    return {"device": "cuda", "width": 64, "size": 224, "batch": 8, "steps": 20, "warmup": 3,
            "compile": True, "max_batch_limit": 4096, "big_shape": (300, 512, 512),
            "small_shape": (200, 256, 256), "inference_width": 64, "inference_batch": 32, "threads": None,
            "fused": True}


# ----------------------------------------------------------------------------------------------
# Sections (each returns a JSON-able dict; raising marks the section failed)


def _train(p: dict[str, Any], amp: str, batch: int | None = None,
           compile: bool | None = None) -> dict[str, Any]:
    from bench.train_step import run

    r = run(width=p["width"], size=p["size"], batch=batch or p["batch"], device=p["device"], amp=amp,
            channels_last=True, compile=p["compile"] if compile is None else compile, steps=p["steps"],
            warmup=p["warmup"], threads=p["threads"])
    r["mfu"] = r.get("frac_peak")
    return r


def section_pytest_cuda(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    if p["device"] == "cpu":
        return {"skipped": "--cpu-smoke (pytest -m cuda needs a GPU; on a CPU it skips every test)"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    res = {"returncode": proc.returncode, "summary": tail[0], "output_tail": proc.stdout[-2000:]}
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m cuda exit code {proc.returncode}: {tail[0]}")
    return res


def section_train_bf16(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    return _train(p, "bf16")


def section_train_fp16(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    return _train(p, "fp16")


def _fits(p: dict[str, Any], batch: int) -> bool:
    """One eager bf16 channels_last training step at ``batch``; False on CUDA out-of-memory."""
    import torch

    from bench.train_step import make_step

    def one_step() -> None:  # everything it allocates is freed when it returns or raises
        _, step = make_step(width=p["width"], size=p["size"], batch=batch, slices=3, num_classes=4,
                            device=p["device"], amp="bf16", channels_last=True)
        step()
        if p["device"] == "cuda":
            torch.cuda.synchronize()

    try:
        one_step()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        if p["device"] == "cuda":
            torch.cuda.empty_cache()


def largest_batch(fits: Callable[[int], bool], start: int, limit: int,
                  bisect_steps: int = 3) -> dict[str, Any]:
    """Double from ``start`` while ``fits``, then bisect between the last fit and the first failure.

    Args:
        fits: batch size -> whether a training step at that batch fits in memory.
        start: first batch tried (must fit).
        limit: largest batch tried (no failure seen up to it: ``limit`` is returned).
        bisect_steps: bisection steps after the first failure.

    Returns:
        ``{"max_batch", "tried": [[batch, fits], ...], "first_oom"}`` (``first_oom`` None when none).

    Raises:
        RuntimeError: ``start`` itself does not fit.
    """
    tried = []
    ok, bad, b = None, None, start
    while b <= limit:
        f = fits(b)
        tried.append([b, f])
        if not f:
            bad = b
            break
        ok, b = b, b * 2
    if ok is None:
        raise RuntimeError(f"batch {start} does not fit")
    if bad is not None:
        lo, hi = ok, bad
        for _ in range(bisect_steps):
            mid = (lo + hi) // 2
            if mid in (lo, hi):
                break
            f = fits(mid)
            tried.append([mid, f])
            lo, hi = (mid, hi) if f else (lo, mid)
        ok = lo
    return {"max_batch": ok, "tried": tried, "first_oom": bad}


def section_max_batch(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    search = largest_batch(lambda b: _fits(p, b), p["batch"], p["max_batch_limit"])
    # timed a little below the edge: a compiled graph needs some headroom
    batch = max(p["batch"], int(search["max_batch"] * 0.9) // 8 * 8 or search["max_batch"])
    timed = _train({**p, "steps": min(p["steps"], 10)}, "bf16", batch=batch, compile=False)
    return {**search, "timed_batch": batch, **timed}


def section_max_batch_compile(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    prev = ctx.get("max_batch", {})
    if prev.get("status") != "ok":
        return {"skipped": "max_batch did not finish"}
    batch = prev["result"]["timed_batch"]
    r = _train({**p, "steps": min(p["steps"], 10)}, "bf16", batch=batch)
    return {**r, "timed_batch": batch}


def section_inference(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    from bench.inference import run

    common = {"device": p["device"], "width": p["inference_width"], "batch": p["inference_batch"],
              "io": False, "threads": p["threads"], "channels_last": True}
    small = run(shape=p["small_shape"], configs=("axial",), **common)
    # --cpu-smoke: no fused views (each view is resampled to the config's in-plane grid: minutes on a CPU)
    big = run(shape=p["big_shape"], configs=("axial", "fused") if p["fused"] else ("axial",), **common)
    return {"axial_256_s": small["axial_s"], "small_shape": list(p["small_shape"]),
            "big_shape": list(p["big_shape"]), "axial_512_s": big["axial_s"],
            "fused_512_s": big.get("fused_s"),
            "fused_512_peak_rss_mb": big.get("fused_peak_rss_mb"), "small": small, "big": big}


def section_ddp(p: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if p["device"] == "cpu" or n < 2:
        return {"skipped": f"{n} GPU(s): the DDP run needs 2"}
    from dataclasses import replace

    from data.cache import build_cache
    from data.config import load_config
    from data.layout import discover
    from data.phantom import synthesize

    with tempfile.TemporaryDirectory(prefix="unimos-ddp-") as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        datasets = ["LiTS", "KiTS", "MSDSpleen"]
        synthesize(data, cases=2, unlabeled=1, val=1, seed=0, datasets=datasets, scale=0.125)
        # the slice cache built once here, as tests/conftest.py does (not by two ranks at once)
        config = replace(load_config(), inplane_size=(64, 64))
        build_cache(discover(config, data, datasets), config, data / ".unimos_cache", views=("axial",),
                    workers=0, progress=False)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "Final.py", "--data", str(data), "--out", str(out), "--datasets", ",".join(datasets),
               "--width", "8", "--inplane", "64", "64", "--blocksize", "64", "-b", "4", "--epochs", "2",
               "--steps-per-epoch", "5", "--workers", "0", "--device", "cuda", "--amp", "--semi"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        res = {"returncode": proc.returncode, "seconds": time.perf_counter() - t0, "command": " ".join(cmd),
               "stdout_tail": proc.stdout[-1500:], "stderr_tail": proc.stderr[-1500:]}
        summary = out / "train_summary_axial.json"
        if summary.is_file():
            res["summary"] = json.loads(summary.read_text())
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun Final.py exit code {proc.returncode}: "
                           f"{(proc.stderr.strip().splitlines() or [''])[-1][:300]}")
    return res


FUNCS: dict[str, Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]] = {
    "pytest_cuda": section_pytest_cuda, "train_bf16": section_train_bf16, "train_fp16": section_train_fp16,
    "max_batch": section_max_batch, "max_batch_compile": section_max_batch_compile,
    "inference": section_inference, "ddp": section_ddp}


# ----------------------------------------------------------------------------------------------
# Running


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:400]


def run_in_process(name: str, p: dict[str, Any], ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    """One section in this process: ``{"status": ok|skipped|error, "result" | "error"}``.

    ``ctx`` holds the records of the sections run before (``max_batch_compile`` reads ``max_batch``'s).
    """
    try:
        res = FUNCS[name](p, ctx or {})
    except Exception as err:
        traceback.print_exc()
        return {"status": "error", "error": _error(err)}
    if "skipped" in res:
        return {"status": "skipped", "reason": res["skipped"]}
    return {"status": "ok", "result": res}


def run_isolated(name: str, smoke: bool, cap_s: float, ctx: dict[str, Any] | None = None) -> dict[str, Any]:
    """One section in a subprocess (its own process group), killed after ``cap_s`` seconds.

    Returns:
        As :func:`run_in_process`, or ``{"status": "timeout", "error": ...}``, or ``error`` with the
        last lines of stderr when the process died (a CUDA error, a segfault).
    """
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        res_path, ctx_path = Path(tmp) / "section.json", Path(tmp) / "context.json"
        ctx_path.write_text(json.dumps(ctx or {}))
        cmd = [sys.executable, "-m", "bench.gpu_check", "--section", name, "--result", str(res_path),
               "--context", str(ctx_path)]
        if smoke:
            cmd.append("--cpu-smoke")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=cap_s)
        except subprocess.TimeoutExpired:
            with_suppress_kill(proc)
            out, _ = proc.communicate()
            return {"status": "timeout", "error": f"over its cap of {cap_s:.0f} s",
                    "output_tail": out[-1500:]}
        if res_path.is_file():
            res = json.loads(res_path.read_text())
            if res.get("status") == "error":
                res["output_tail"] = out[-1500:]
            return res
        return {"status": "error", "error": f"section process exit code {proc.returncode}, no result",
                "output_tail": out[-1500:]}


def with_suppress_kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (it and compile workers / torchrun ranks it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def run_check(out: str | Path, smoke: bool = False, budget_s: float = DEFAULT_BUDGET_S,
              sections: tuple[str, ...] = SECTIONS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sections and write ``out/gpu_check.json`` and ``out/gpu_check.md``.

    Args:
        out: output folder (created).
        smoke: ``--cpu-smoke``: tiny sizes, CPU, in-process.
        budget_s: total seconds for all sections; each gets ``min(its cap, what is left)``.
        sections: subset of :data:`SECTIONS` (run in that order).
        log: progress lines.

    Returns:
        The report (``machine``, ``presets``, ``targets``, ``sections``, ``seconds``).

    Raises:
        InputError: unknown section; no CUDA device without ``smoke``.
    """
    import torch

    from bench.run import _loadavg, machine_info
    from utils.fileio import write_json_atomic, write_text_atomic

    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise InputError(None, f"--sections takes names from {', '.join(SECTIONS)}, got {list(sections)}")
    if not smoke and not torch.cuda.is_available():
        raise InputError(None, "no CUDA device: run on a GPU machine, or --cpu-smoke to test the plumbing")
    p = presets(smoke)
    report: dict[str, Any] = {"machine": machine_info(), "smoke": smoke, "budget_s": budget_s,
                              "presets": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
                              "targets": TARGETS, "sections": {}}
    t_all = time.perf_counter()
    for name in SECTIONS:
        if name not in sections:
            continue
        left = budget_s - (time.perf_counter() - t_all)
        cap = min(CAPS[name], left)
        log(f"== {name} (cap {cap:.0f} s)")
        t0 = time.perf_counter()
        if cap < 5:
            res = {"status": "timeout", "error": f"no time left of the {budget_s:.0f} s budget"}
        elif smoke:
            res = run_in_process(name, p, report["sections"])
        else:
            res = run_isolated(name, smoke, cap, report["sections"])
        res.update({"seconds": round(time.perf_counter() - t0, 1), "cap_s": round(cap, 1)})
        report["sections"][name] = res
        for measure, value, target in section_rows(name, res):
            log(f"   {measure}: {value}" + (f"  (target {target})" if target else ""))
    report["seconds"] = round(time.perf_counter() - t_all, 1)
    report["load_avg_end"] = _loadavg()
    out = Path(out)
    write_json_atomic(out / "gpu_check.json", report)
    write_text_atomic(out / "gpu_check.md", format_markdown(report))
    return report


# ----------------------------------------------------------------------------------------------
# Formatting


def _f(v: Any, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _verdict(value: float | None, target: float, higher: bool) -> str:
    if value is None:
        return ""
    return " (met)" if (value >= target if higher else value <= target) else " (MISSED)"


def _train_rows(r: dict[str, Any], label: str) -> list[tuple[str, str, str]]:
    sps, mfu = r.get("slices_per_s"), r.get("mfu")
    return [
        (f"{label}: slices/s", _f(sps, ".0f") + _verdict(sps, TARGETS["slices_per_s"], True),
         f">= {TARGETS['slices_per_s']:.0f}"),
        (f"{label}: MFU (fraction of dense bf16 peak {_f(r.get('peak_tflops'), '.0f')} TFLOP/s)",
         _f(None if mfu is None else 100 * mfu, ".1f") + ("%" if mfu is not None else "")
         + _verdict(mfu, TARGETS["mfu"], True), f">= {100 * TARGETS['mfu']:.0f}%"),
        (f"{label}: s/step (median); compile + first step, s",
         f"{_f(r.get('s_per_step'), '.4f')}; {_f(r.get('compile_s'), '.1f')}", ""),
    ]


def section_rows(name: str, sec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(measure, value, target)`` rows of one section's record."""
    status = sec.get("status")
    if status != "ok":
        why = sec.get("error") or sec.get("reason") or ""
        return [("status", f"{status}: {why}".rstrip(": "), "")]
    r = sec["result"]
    if name == "pytest_cuda":
        return [("pytest -m cuda", r.get("summary", ""), "all pass")]
    if name in ("train_bf16", "train_fp16"):
        amp = "bf16" if name == "train_bf16" else "fp16"
        label = (f"width {r.get('width')}, {r.get('size')}x{r.get('size')}, batch {r.get('batch')}, {amp}, "
                 f"channels_last{', compile' if r.get('compile') else ''}")
        return _train_rows(r, label)
    if name == "max_batch_compile":
        return _train_rows(r, f"batch {r.get('timed_batch')}, bf16, channels_last, compile")
    if name == "max_batch":
        rows = [("largest batch that fits (one eager bf16 step)", str(r.get("max_batch")), ""),
                ("tried [batch, fits]",
                 " ".join(f"{b}:{'ok' if f else 'OOM'}" for b, f in r.get("tried", [])), "")]
        return rows + _train_rows(r, f"batch {r.get('timed_batch')}, bf16, channels_last, eager")
    if name == "inference":
        small, big = r.get("small_shape") or [0, 0, 0], r.get("big_shape") or [0, 0, 0]
        s = r.get("axial_256_s")
        return [
            (f"axial, {small[2]}x{small[1]}x{small[0]}, s (no I/O)",
             _f(s, ".3f") + _verdict(s, TARGETS["axial_256_s"], False), f"<= {TARGETS['axial_256_s']}"),
            (f"axial, {big[2]}x{big[1]}x{big[0]}, s (no I/O)", _f(r.get("axial_512_s"), ".2f"), ""),
            (f"3 views fused, {big[2]}x{big[1]}x{big[0]}, s (no I/O)", _f(r.get("fused_512_s"), ".2f"), ""),
        ]
    if name == "ddp":
        return [("torchrun 2 ranks, Final.py tiny run", f"exit {r.get('returncode')}, "
                 f"{_f(r.get('seconds'), '.0f')} s", "exit 0")]
    return []


def format_markdown(report: dict[str, Any]) -> str:
    """``gpu_check.md``: machine, then one table of every section's numbers against the targets."""
    m = report.get("machine", {})
    lines = ["# UniMOS GPU check" + (" (--cpu-smoke: tiny sizes on the CPU, numbers meaningless)"
                                     if report.get("smoke") else ""), "",
             f"GPU: {', '.join(m.get('gpus') or []) or 'none'}; torch {m.get('torch')} / "
             f"CUDA {m.get('cuda')}; "
             f"CPU {m.get('cpu_model')} ({m.get('cores')} cores); load average at start "
             f"{m.get('load_avg')}; total {report.get('seconds')} s of a {report.get('budget_s')} s budget.",
             "", "Training steps exclude data loading (random batches on the device).", "",
             "| section | status, time (cap) | measure | value | target |", "|---|---|---|---|---|"]
    for name, sec in report.get("sections", {}).items():
        head = f"{sec.get('status')}, {sec.get('seconds')} s ({sec.get('cap_s')} s)"
        for measure, value, target in section_rows(name, sec):
            lines.append(f"| {name} | {head} | {measure} | {value.replace('|', '/')} | {target} |")
            head = ""
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check_out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, in-process")
    ap.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for all sections")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section, write --result
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--context", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.section:
        from utils.fileio import write_json_atomic

        ctx = json.loads(Path(a.context).read_text()) if a.context else {}
        res = run_in_process(a.section, presets(a.cpu_smoke), ctx)
        write_json_atomic(a.result, res)
        return 0 if res["status"] != "error" else 1
    sections = tuple(s.strip() for s in a.sections.split(",") if s.strip())
    report = run_check(a.out, smoke=a.cpu_smoke, budget_s=a.budget_s, sections=sections)
    print()
    print(format_markdown(report))
    print(f"wrote {Path(a.out) / 'gpu_check.json'} and {Path(a.out) / 'gpu_check.md'}")
    return 1 if any(s.get("status") in ("error", "timeout") for s in report["sections"].values()) else 0


if __name__ == "__main__":
    run_cli(main)
