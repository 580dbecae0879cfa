"""What machine a benchmark ran on: CPU model, cores, memory, GPUs, torch, load average."""

from __future__ import annotations

import os
import platform
from typing import Any


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


def matmul_gflops(threads: int | None = None, n: int = 1024, repeats: int = 15) -> float:
    """This CPU's fp32 matrix-multiply rate, GFLOP/s (median of ``repeats`` ``n x n`` products).

    The reference a benchmark's achieved rate is divided by: a dense GEMM is about the fastest work
    this CPU does in fp32, so a network whose convolutions reach a large fraction of it cannot get much
    faster by tuning kernels, only by doing less work. Measured in the same run as the numbers it is
    compared with (machines of one kind differ ~3x, and a shared machine's speed changes over minutes).

    Args:
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards); None: as set.
        n: matrix size (1024: ~2 GFLOP per product, past the caches, still fast on a slow CPU).
        repeats: timed products, after three untimed ones.

    Returns:
        GFLOP/s (2 n^3 per product).
    """
    import time

    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.rand(n, n, generator=g), torch.rand(n, n, generator=g)
        out = torch.empty(n, n)
        for _ in range(3):
            torch.mm(a, b, out=out)
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e9
