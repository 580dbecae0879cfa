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
