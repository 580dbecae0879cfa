"""Micro benchmark of one supervised training step: MOSNet + deep-supervised TAL + backward + RMSprop.

    python bench/train_step.py [--width 16] [--size 128] [--batch 8] [--slices 3] [--device cpu]
                               [--amp off|bf16|fp16] [--channels-last] [--compile] [--threads 2]

Prints slices/s, seconds/step, training FLOPs per slice (forward + backward, FlopCounterMode) and, on a
GPU with a known peak, the fraction of dense bf16 peak reached. Data loading is not included: inputs
are random tensors already on the device, with a partially labeled batch (half the samples label
organ 1 only) so the merged TAL path runs. ``run(...)`` returns the same numbers as a dict for
``bench/run.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.runtime import synchronize  # noqa: E402
from utils.errors import InputError, run_cli  # noqa: E402

AMP = ("off", "bf16", "fp16")
NORM_KERNELS = ("groupnorm", "instancenorm2d")


def to_instance_norm2d(model):
    """Swap every ``GroupNorm(C, C)`` of ``model`` for ``InstanceNorm2d(C, affine=True)``, in place.

    The two compute the same thing (per-sample, per-channel statistics, the same eps, parameters
    ``weight`` and ``bias``); only the kernel differs. ``models.blocks.norm_layer`` builds instance
    norm as ``GroupNorm(C, C)`` since the GroupNorm switch; this puts the previous kernel back, for
    old-vs-new measurements in one benchmark run. The swapped model keeps the weights (the same
    Parameter objects), device and dtype.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``model`` (modified in place), for chaining.
    """
    from torch import nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm) and child.num_groups == child.num_channels:
                new = nn.InstanceNorm2d(child.num_channels, eps=child.eps, affine=child.affine,
                                        track_running_stats=False)
                if child.affine:
                    new.weight, new.bias = child.weight, child.bias
                setattr(parent, name, new)
    return model


def set_relu_inplace(model, inplace: bool):
    """Set ``relu_inplace`` on every norm-ReLU module of ``model`` (``models.blocks.NormReLUModule``):
    False runs the out-of-place ReLU of the code before the change (same numbers), for old-vs-new
    measurements. Returns ``model``."""
    from models.blocks import NormReLUModule

    for m in model.modules():
        if isinstance(m, NormReLUModule):
            m.relu_inplace = inplace
    return model


def _loadavg() -> float | None:
    try:
        import os

        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def make_step(width: int, size: int, batch: int, slices: int, num_classes: int, device, amp: str = "off",
              channels_last: bool = False, compile: bool = False, blocks: int | list[int] = 1, seed: int = 0,
              norm: str | None = None, norm_kernel: str = "groupnorm", relu_inplace: bool = True):
    """Model, optimizer and fixed random batch of one supervised training step (see :func:`run`).

    Returns:
        ``(model, step)``: the eager model (for FLOP counting) and a no-argument function that runs
        one training step (forward under autocast, deep-supervised TAL, backward, RMSprop).
    """
    import torch

    from losses.partial import DeepSupervisedLoss
    from models import DEFAULT_NORM, build_model

    if norm_kernel not in NORM_KERNELS:
        raise InputError(None, f"norm kernel must be one of {NORM_KERNELS}, got {norm_kernel!r}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    norm = norm or DEFAULT_NORM
    model = build_model({"in_channels": slices, "num_classes": num_classes, "width": width,
                         "blocks": blocks, "norm": norm})
    if norm_kernel == "instancenorm2d":
        to_instance_norm2d(model)
    set_relu_inplace(model, relu_inplace)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dev).to(memory_format=fmt)

    crit = DeepSupervisedLoss()
    opt = torch.optim.RMSprop(model.parameters(), lr=5e-4, momentum=0.9)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16" and dev.type == "cuda")
    net = torch.compile(model) if compile else model

    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(batch, slices, size, size, generator=g) * 2 - 1).to(dev).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch, size, size), generator=g)
    labeled = torch.ones(batch, num_classes, dtype=torch.bool)
    labeled[: batch // 2, 2:] = False  # half the batch labels organ 1 only
    y[: batch // 2][y[: batch // 2] >= 2] = 0
    y, labeled = y.to(dev), labeled.to(dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = net(x)
        loss = crit(out, y, labeled)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return model, step


def run(width: int = 16, size: int = 128, batch: int = 8, slices: int = 3, num_classes: int = 4,
        device: str = "cpu", amp: str = "off", channels_last: bool = False, compile: bool = False,
        steps: int = 10, warmup: int = 3, threads: int | None = None, blocks: int | list[int] = 1,
        seed: int = 0, norm: str | None = None, norm_kernel: str = "groupnorm",
        relu_inplace: bool = True) -> dict[str, Any]:
    """Time ``steps`` supervised training steps after ``warmup`` untimed ones.

    Args:
        width, blocks: MOSNet width and residual blocks per level.
        size: square crop size (divisible by 16).
        batch, slices, num_classes: batch size, 2.5D input slices, classes incl. background.
        device: torch device string.
        amp: autocast dtype (``off``, ``bf16``, ``fp16``; fp16 uses a GradScaler on CUDA).
        channels_last: model and input in channels_last memory format.
        compile: ``torch.compile`` the model (compile time is reported separately, not timed).
        steps, warmup: timed and untimed steps.
        threads: ``torch.set_num_threads`` (CPU), None leaves it.
        seed: RNG seed for weights and inputs.
        norm: ``batch`` or ``instance`` (None: Final.py's default).
        norm_kernel: ``groupnorm`` (instance norm as ``models`` builds it) or ``instancenorm2d`` (the
            previous kernel, see :func:`to_instance_norm2d`); no effect on batch norm.
        relu_inplace: False runs the previous out-of-place ReLU (:func:`set_relu_inplace`).

    Returns:
        dict with ``slices_per_s``, ``megapixels_per_s`` (slices/s x crop area), ``s_per_step``
        (median), ``s_per_step_min``, ``cpu_s_per_step``
        (process CPU time), ``load_avg_1min``, ``train_flops_per_slice``,
        ``fwd_flops_per_slice``, ``achieved_tflops``, ``peak_tflops``, ``frac_peak`` (None off GPU or
        for unknown GPUs), ``compile_s`` and the settings.

    Raises:
        InputError: invalid settings (size not divisible by 16, unknown amp, unavailable device).
    """
    import torch

    from models import DEFAULT_NORM
    from utils.flops import count_flops, peak_tflops

    if amp not in AMP:
        raise InputError(None, f"--amp must be one of {AMP}, got {amp!r}")
    if size % 16:
        raise InputError(None, f"--size must be divisible by 16, got {size}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(None, "--device cuda asked for but CUDA is not available")
    if threads:
        torch.set_num_threads(threads)
    norm = norm or DEFAULT_NORM
    model, step = make_step(width=width, size=size, batch=batch, slices=slices, num_classes=num_classes,
                            device=dev, amp=amp, channels_last=channels_last, compile=compile,
                            blocks=blocks, seed=seed, norm=norm, norm_kernel=norm_kernel,
                            relu_inplace=relu_inplace)
    # counted on the eager model (before compiling), on a batch of 1 and of ``batch``
    fwd_flops = count_flops(model, (1, slices, size, size))
    train_flops = count_flops(model, (batch, slices, size, size), backward=True) / batch

    t0 = time.perf_counter()
    step()
    synchronize(dev)
    compile_s = time.perf_counter() - t0 if compile else None
    for _ in range(max(warmup - 1, 0)):
        step()
    timed = [_timed(step, dev) for _ in range(steps)]
    # CPU seconds of this process per step: on a shared machine it shows the work done, which wall time
    # (inflated by other processes, and by idle-spinning threads) does not
    cpu_s = sum(cpu for _, cpu in timed) / steps
    times = sorted(wall for wall, _ in timed)
    med = times[len(times) // 2]
    achieved = train_flops * batch / med / 1e12
    peak = peak_tflops(dev)
    threads_now = torch.get_num_threads()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({threads_now} threads)"
    return {
        "device": name,
        "width": width, "blocks": blocks, "size": size, "batch": batch, "slices": slices,
        "norm": norm, "norm_kernel": norm_kernel if norm == "instance" else None, "amp": amp,
        "channels_last": channels_last, "compile": compile,
        "s_per_step": med, "s_per_step_min": times[0], "slices_per_s": batch / med,
        "megapixels_per_s": batch * size * size / med / 1e6,
        "cpu_s_per_step": cpu_s, "load_avg_1min": _loadavg(),
        "fwd_flops_per_slice": int(fwd_flops), "train_flops_per_slice": int(train_flops),
        "achieved_tflops": achieved, "peak_tflops": peak,
        "frac_peak": achieved / peak if peak else None, "compile_s": compile_s,
    }


# The step of a "fresh process" setting (see compare), built in that process by _remote_setup
_REMOTE_STEP: Any = None


def _timed(step, dev) -> tuple[float, float]:
    """Wall and process CPU seconds of one call of ``step``."""
    synchronize(dev)
    t, c = time.perf_counter(), time.process_time()
    step()
    synchronize(dev)
    return time.perf_counter() - t, time.process_time() - c


def _remote_setup(kw: dict[str, Any], device: str, threads: int | None) -> int:
    import os

    import torch

    global _REMOTE_STEP
    if threads:
        torch.set_num_threads(threads)
    _REMOTE_STEP = (make_step(device=torch.device(device), **kw)[1], torch.device(device))
    return os.getpid()


def _remote_steps(n: int) -> list[tuple[float, float]]:
    step, dev = _REMOTE_STEP
    return [_timed(step, dev) for _ in range(n)]


def compare(old: dict[str, Any], new: dict[str, Any], device: str = "cpu", steps: int = 10,
            warmup: int = 3, threads: int | None = None, old_in_fresh_process: bool = True) -> dict[str, Any]:
    """Two training-step settings timed in one run, steps alternating (load changes hit both alike).

    The old setting runs in a fresh process by default: the code it stands for ran with the C
    library's default allocator, which this process may have tuned already
    (:func:`engine.runtime.retain_freed_memory`, what Final.py does now and what bench.run applies
    to the new settings); only one of the two processes computes at a time.

    Args:
        old, new: :func:`make_step` keyword arguments (``width``, ``size``, ``batch``, ``norm_kernel``,
            ...; ``slices`` 3 and ``num_classes`` 4 unless given).
        device: torch device string.
        steps, warmup: timed and untimed steps of each setting.
        threads: ``torch.set_num_threads`` (CPU, in both processes), None leaves it.
        old_in_fresh_process: False runs both settings in this process.

    Returns:
        ``{"old": {...}, "new": {...}, "slices_ratio", "megapixels_ratio", "load_avg_1min"}``: per
        setting its arguments, ``s_per_step`` (median), ``cpu_s_per_step`` (process CPU time, mean),
        ``slices_per_s``, ``megapixels_per_s``, ``fresh_process`` and the ``pid`` that ran it; the
        ratios are new / old (of the medians).
    """
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    settings = {}
    for name, kw in (("old", old), ("new", new)):
        kw = {"slices": 3, "num_classes": 4, **kw}
        if kw["size"] % 16:
            raise InputError(None, f"size must be divisible by 16, got {kw['size']}")
        settings[name] = kw
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) \
        if old_in_fresh_process else None
    try:
        runners, pids = {}, {}
        for name, kw in settings.items():
            pids[name] = os.getpid()
            if name == "old" and pool is not None:
                pids[name] = pool.submit(_remote_setup, kw, device, threads).result()
                runners[name] = lambda n: pool.submit(_remote_steps, n).result()
            else:
                step = make_step(device=dev, **kw)[1]
                runners[name] = lambda n, step=step: [_timed(step, dev) for _ in range(n)]
        for run_steps in runners.values():
            run_steps(warmup)
        timed: dict[str, list[tuple[float, float]]] = {name: [] for name in settings}
        for _ in range(steps):
            for name, run_steps in runners.items():
                timed[name] += run_steps(1)
    finally:
        if pool is not None:
            pool.shutdown()
    out: dict[str, Any] = {}
    for name, kw in settings.items():
        ts = sorted(wall for wall, _ in timed[name])
        med = ts[len(ts) // 2]
        out[name] = {**kw, "s_per_step": med, "s_per_step_min": ts[0],
                     "cpu_s_per_step": sum(cpu for _, cpu in timed[name]) / steps,
                     "fresh_process": name == "old" and old_in_fresh_process, "pid": pids[name],
                     "slices_per_s": kw["batch"] / med,
                     "megapixels_per_s": kw["batch"] * kw["size"] ** 2 / med / 1e6}
    out["slices_ratio"] = out["new"]["slices_per_s"] / out["old"]["slices_per_s"]
    out["megapixels_ratio"] = out["new"]["megapixels_per_s"] / out["old"]["megapixels_per_s"]
    out["load_avg_1min"] = _loadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    from engine.runtime import retain_freed_memory

    retain_freed_memory()  # as Final.py and segment.py run
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--blocks", type=int, nargs="+", default=[1],
                    help="residual blocks per level: one int or four")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=AMP, default="off")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--norm", choices=("batch", "instance"), default=None, help="default: Final.py's")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    blocks = a.blocks[0] if len(a.blocks) == 1 else a.blocks
    r = run(width=a.width, size=a.size, batch=a.batch, slices=a.slices, num_classes=a.classes,
            device=a.device, amp=a.amp, channels_last=a.channels_last, compile=a.compile, steps=a.steps,
            warmup=a.warmup, threads=a.threads, blocks=blocks, norm=a.norm)
    frac = (f", {100 * r['frac_peak']:.1f}% of {r['peak_tflops']:.0f} TFLOP/s bf16 peak"
            if r["frac_peak"] else "")
    print(f"{r['device']}: width {r['width']} blocks {r['blocks']} {r['norm']} norm {r['size']}x{r['size']} "
          f"batch {r['batch']} slices {r['slices']} amp {r['amp']} channels_last {r['channels_last']} "
          f"compile {r['compile']}")
    load = f", load average {r['load_avg_1min']:.2f}" if r["load_avg_1min"] is not None else ""
    print(f"  {r['slices_per_s']:.1f} slices/s, {r['s_per_step']:.3f} s/step "
          f"(min {r['s_per_step_min']:.3f}); process CPU {r['cpu_s_per_step']:.3f} s/step{load}")
    print(f"  FLOPs/slice: forward {r['fwd_flops_per_slice'] / 1e9:.2f} G, training step "
          f"{r['train_flops_per_slice'] / 1e9:.2f} G; achieved {r['achieved_tflops']:.3f} TFLOP/s{frac}")
    if r["compile_s"] is not None:
        print(f"  compile + first step: {r['compile_s']:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
