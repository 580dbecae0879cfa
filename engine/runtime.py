"""Device, precision and process-group plumbing shared by training, inference and benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass

import torch

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20
_retained = False


def _glibc():
    """glibc's ``ctypes`` handle, or None elsewhere (musl, macOS, Windows) and where another
    allocator is preloaded (jemalloc/tcmalloc: glibc's mallopt would succeed and change nothing)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "confstr"):
        return None
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    except (OSError, ValueError, AttributeError):
        return None
    if "malloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    return libc


def retain_freed_memory() -> bool:
    """Keep freed tensor memory in the process, for the next forward pass to reuse (glibc only).

    glibc gives large freed blocks of the main thread back to the kernel (an mmap per block above its
    threshold, and the top of the heap above its trim threshold), so the activations of every pass
    arrive as fresh pages that fault and are zero-filled on first touch. Serving blocks up to 32 MiB
    from the heap and trimming it only beyond 2 GiB of free memory at its top keeps them. Measured
    (2 cores, AVX2 kernels): a width-16 256 x 256 forward on one thread faulted ~10,000 pages per
    pass by default and ~2,800 with this, and took 67 instead of 76 ms (fastest of 30); a demo-preset
    training step (batch 8, 96 x 96, 2 threads) 0-200 faults instead of 3,700-6,400, 1-2 % faster
    (medians of 30 steps 176-179 vs 175-183 ms: within run-to-run noise). Passes that run in worker
    threads (segment.py's CPU default) already keep their memory in the threads' arenas: unchanged.
    No computed value changes. The
    process keeps its peak memory until it exits, as a training or segmentation process does anyway
    (a benchmark that measures memory calls :func:`release_freed_memory` first).

    Called once by the command-line entry points (Final.py, segment.py, the benchmarks' new settings)
    before tensors are made; a no-op without glibc and on repeated calls.

    Returns:
        True when the allocator was tuned (now or by an earlier call).
    """
    global _retained
    if _retained:
        return True
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; 32 MiB is the largest mmap threshold glibc takes on 64-bit (on
    # 32-bit it refuses it and nothing is changed); the trim threshold is an int
    _retained = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _retained


def release_freed_memory() -> None:
    """Give the freed memory :func:`retain_freed_memory` keeps back to the kernel (glibc's
    ``malloc_trim``), e.g. before measuring a peak above the current resident size."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None -> CUDA when present, else CPU. A CUDA device without an index is this
    process's local rank under torchrun (``LOCAL_RANK``), so ``--device cuda`` puts each rank on
    its own GPU.

    Raises:
        InputError: an unknown device name, or CUDA asked for but not available.
    """
    from utils.errors import InputError

    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(None, f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {name} was asked for but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(None, f"--device {name} was asked for but this PyTorch has no usable MPS device")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work (timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """Map ``--amp`` (none/bf16/fp16/auto) to an autocast dtype, or None for fp32.

    ``auto`` picks bf16 where the device supports it (Ampere+ GPUs, CPUs) and fp16 on older GPUs.
    """
    if amp in (None, "none", "off", "fp32"):
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"unknown --amp value {amp!r} (none, bf16, fp16, auto)")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """An autocast context for ``dtype``, or a no-op context for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun (or srun + torchrun) set up; single process otherwise.

    The backend is NCCL on CUDA and gloo on CPU, so the same code path is testable on a laptop.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def shutdown_distributed(synchronize: bool = False) -> None:
    """Leave the process group. ``synchronize`` (a run that ended normally on every rank): wait at a
    barrier first, so that no rank tears its gloo connections down while another still uses them
    (seen once in CI: rank 1 aborted with "terminate called without an active exception" as rank 0
    left). After an error there is no barrier: the other ranks may never reach it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
