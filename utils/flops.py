"""FLOP counting (``torch.utils.flop_counter``) and peak throughput of known accelerators."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

# Dense bf16 tensor-core peak, TFLOP/s (vendor data sheets, without sparsity). H200 has the H100 SXM's
# compute (only its memory differs). Matched as substrings of the device name, first match wins.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM / HBM3
    ("GH200", 989.0),
    ("A100", 312.0),
)


def _outputs(out) -> list[Tensor]:
    """Every tensor a model returned (a Tensor, a dataclass such as MOSOutput, a tuple/list or a dict)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        items = list(out.values())
    elif dataclasses.is_dataclass(out):
        items = [getattr(out, f.name) for f in dataclasses.fields(out)]
    elif isinstance(out, (list, tuple)):
        items = list(out)
    else:
        return []
    return [t for item in items for t in _outputs(item)]


def count_flops(model: nn.Module, input_shape: Sequence[int], backward: bool = False) -> int:
    """FLOPs of one forward (and optionally backward) pass on a random input of ``input_shape``.

    Counts what ``FlopCounterMode`` counts (convolutions, matmuls; a multiply-add is 2 FLOPs), not
    element-wise ops. Per-slice numbers are the caller's division by the batch size. The model's
    buffers (BatchNorm running statistics) and ``.grad`` fields are left untouched.

    Args:
        model: network; its first parameter gives device and dtype of the input.
        input_shape: (B, C, H, W).
        backward: also count the backward pass (gradients of all parameters).

    Returns:
        Total FLOPs (int).
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.randn(*input_shape, device=p.device, dtype=p.dtype)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    params = [q for q in model.parameters() if q.requires_grad]
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.set_grad_enabled(backward):
            outs = [o for o in _outputs(model(x)) if o.is_floating_point()]
            if backward:
                loss = sum(o.float().sum() for o in outs)
                torch.autograd.grad(loss, params, allow_unused=True)  # leaves .grad alone
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return int(counter.get_total_flops())


def peak_tflops(device: torch.device | str) -> float | None:
    """Dense bf16 peak TFLOP/s of a CUDA device from :data:`PEAK_BF16_TFLOPS`, or None (CPU, unknown)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops
    return None
