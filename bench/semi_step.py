"""Benchmark of the semi-supervised (UniMatch) step against the supervised step, in the same run.

    python bench/semi_step.py [--device auto|cpu|cuda] [--width W] [--size S] [--batch 4]
                              [--unlabeled-batch N] [--teacher self|ema] [--pseudo merged|full]
                              [--amp off|bf16|fp16] [--steps 10] [--warmup 3] [--threads 1]

Both steps include backward and an RMSprop step (and the EMA update for ``--teacher ema``); data
loading is not included (random inputs already on the device). The two kinds of step alternate, so a
change of machine load affects both alike; medians are reported. Defaults: on CPU width 16, 128x128,
batch 4 labeled + 4 + 4 unlabeled; on CUDA width 64, 224x224, batch 8 + 8 + 8, bf16.

Prints seconds/step of each, their ratio, slices/s (the semi step counts labeled + both unlabeled
batches) and the ratio of training FLOPs (forward + backward, ``torch.utils.flop_counter``): the
design estimate is about 4.3 (2B + 2B forward/backward passes and a no-grad pass of B, against one
forward/backward pass of B). ``run(...)`` returns the numbers as a dict.
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


def _timed(fn, device) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def _interleaved_times(fns, device, steps: int, warmup: int) -> list[list[float]]:
    """Sorted step times of each function, run alternately so that load changes hit all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(steps):
        for i, fn in enumerate(fns):
            times[i].append(_timed(fn, device))
    return [sorted(t) for t in times]


def run(device: str = "auto", width: int | None = None, size: int | None = None, batch: int | None = None,
        unlabeled_batch: int | None = None, slices: int = 3, num_classes: int = 4, teacher: str = "ema",
        pseudo: str = "merged", amp: str | None = None, steps: int = 10, warmup: int = 3,
        threads: int | None = None, seed: int = 0, norm: str | None = None,
        fp: str = "encoder") -> dict[str, Any]:
    """Time the supervised and the semi-supervised training step on the same model and inputs.

    Args:
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        width, size, batch: MOSNet width, square crop, labeled batch (None: CPU 16/128/4, CUDA 64/224/8).
        unlabeled_batch: size of each of the two unlabeled batches (None: ``batch``).
        slices, num_classes: 2.5D input slices and classes incl. background.
        teacher, pseudo, fp: semi-supervised settings (see ``engine.semi.SemiConfig``).
        amp: ``off``/``bf16``/``fp16`` (None: bf16 on CUDA, off on CPU).
        steps, warmup: timed and untimed steps of each kind.
        threads: ``torch.set_num_threads`` (CPU); None leaves it.
        seed: RNG seed for weights and inputs.
        norm: ``batch`` or ``instance`` (None: Final.py's default).

    Returns:
        dict with ``sup_s_per_step``, ``semi_s_per_step``, ``time_ratio``, ``sup_slices_per_s``,
        ``semi_slices_per_s``, ``reference_s_per_step`` (two supervised steps at batch + unlabeled batch
        and one no-grad forward: the semi step's network work), ``overhead_ratio`` (semi / reference),
        ``sup_flops``, ``semi_flops``, ``flop_ratio`` and the settings.

    Raises:
        InputError: invalid settings (size not divisible by 16, unknown amp, unavailable device).
    """
    import torch

    from engine.semi import EMATeacher, SemiConfig
    from losses.partial import DeepSupervisedLoss
    from models import DEFAULT_NORM, build_model

    dev, width, size, batch, ub, amp = _settings(device, width, size, batch, unlabeled_batch, amp)
    gpu = dev.type == "cuda"
    if threads:
        torch.set_num_threads(threads)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    torch.manual_seed(seed)
    norm = norm or DEFAULT_NORM
    model = build_model({"in_channels": slices, "num_classes": num_classes, "width": width,
                         "norm": norm}).to(dev)
    model.train()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-5, momentum=0.9)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16" and gpu)
    ema = EMATeacher(model) if teacher == "ema" else None
    cfg = SemiConfig(pseudo=pseudo, teacher=teacher, fp=fp)
    batches = _batches(dev, seed, batch, ub, slices, size, num_classes)
    sup, semi, sup_double, forward_b = _step_fns(model, ema, cfg, DeepSupervisedLoss(), opt, scaler,
                                                 batches, torch.Generator(device=dev).manual_seed(seed),
                                                 amp_dtype, dev)
    sup_flops, semi_flops = _flops(sup), _flops(semi)
    sup_times, semi_times, double_times, fwd_times = _interleaved_times(
        [sup, semi, sup_double, forward_b], dev, steps, warmup)
    sup_t, semi_t = sup_times[len(sup_times) // 2], semi_times[len(semi_times) // 2]
    sup_min, semi_min = sup_times[0], semi_times[0]
    reference_t = 2 * double_times[len(double_times) // 2] + fwd_times[len(fwd_times) // 2]
    name = torch.cuda.get_device_name(dev) if gpu else f"cpu ({torch.get_num_threads()} threads)"
    return {
        "device": name, "width": width, "size": size, "batch": batch, "unlabeled_batch": ub,
        "slices": slices, "norm": norm, "amp": amp, "teacher": teacher, "pseudo": pseudo, "fp": fp,
        "sup_s_per_step": sup_t, "sup_s_per_step_min": sup_min,
        "semi_s_per_step": semi_t, "semi_s_per_step_min": semi_min,
        "time_ratio": semi_t / sup_t,
        "sup_slices_per_s": batch / sup_t,
        "semi_slices_per_s": (batch + 2 * ub) / semi_t,
        "reference_s_per_step": reference_t, "overhead_ratio": semi_t / reference_t,
        "sup_flops": sup_flops, "semi_flops": semi_flops, "flop_ratio": semi_flops / max(sup_flops, 1),
    }


def _settings(device: str, width: int | None, size: int | None, batch: int | None,
              unlabeled_batch: int | None, amp: str | None) -> tuple[Any, int, int, int, int, str]:
    """The device and the defaults of :func:`run` filled in: ``(device, width, size, batch,
    unlabeled_batch, amp)``.

    Raises:
        InputError: unavailable device, unknown amp, size not divisible by 16.
    """
    from engine.runtime import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as err:
        raise InputError(None, str(err)) from None
    gpu = dev.type == "cuda"
    width = width or (64 if gpu else 16)
    size = size or (224 if gpu else 128)
    batch = batch or (8 if gpu else 4)
    ub = unlabeled_batch or batch
    amp = amp or ("bf16" if gpu else "off")
    if amp not in AMP:
        raise InputError(None, f"--amp must be one of {AMP}, got {amp!r}")
    if size % 16:
        raise InputError(None, f"--size must be divisible by 16, got {size}")
    return dev, width, size, batch, ub, amp


def _batches(dev, seed: int, batch: int, ub: int, slices: int, size: int, num_classes: int) -> dict[str, Any]:
    """Random inputs on the device: ``labeled``, ``unl_a``, ``unl_b`` and ``double`` (a labeled batch of
    ``batch + ub`` samples: the student's batch of the semi step, for the reference timing)."""
    import torch

    from data.sampling import LabeledBatch, UnlabeledBatch

    g = torch.Generator().manual_seed(seed)

    def images(n: int):
        return (torch.rand(n, slices, size, size, generator=g) * 2 - 1).to(dev)

    # a partially labeled mix: sample i comes from "dataset" i % 3, labeling organ (i % 3) + 1 only
    def masks(n: int):
        m = torch.zeros(n, num_classes, dtype=torch.bool)
        m[:, 0] = True
        m[torch.arange(n), 1 + torch.arange(n) % (num_classes - 1)] = True
        return m.to(dev)

    lab_mask = masks(batch)
    label = torch.randint(0, num_classes, (batch, size, size), generator=g).to(dev)
    label = torch.where(lab_mask.gather(1, label.flatten(1)).view_as(label), label, 0)
    ds_l, ds_u = torch.arange(batch, device=dev) % 3, torch.arange(ub, device=dev) % 3
    labeled = LabeledBatch(images(batch), label, lab_mask, ds_l)
    valid = torch.ones(ub, size, size, dtype=torch.bool, device=dev)
    unl_a = UnlabeledBatch(images(ub), masks(ub), ds_u, valid)
    unl_b = UnlabeledBatch(images(ub), masks(ub), ds_u, valid)
    double = LabeledBatch(images(batch + ub), torch.cat([label, label[:1].expand(ub, -1, -1)]),
                          torch.cat([lab_mask, lab_mask[:1].expand(ub, -1)]), torch.cat([ds_l, ds_u]))
    return {"labeled": labeled, "unl_a": unl_a, "unl_b": unl_b, "double": double}


def _step_fns(model, ema, cfg, loss_fn, opt, scaler, batches: dict[str, Any], gen, amp_dtype,
              dev) -> list:
    """The timed steps: supervised, semi-supervised, and the semi step's network work alone.

    The reference = two supervised steps at the student's batch (labeled + unlabeled) and one no-grad
    forward of an unlabeled batch. On a CPU the cost per sample grows with the batch (caches), so
    time_ratio there exceeds the FLOP ratio; overhead_ratio isolates what the step adds: the
    feature-perturbed branch (heads, upsampling and fusion run twice: few FLOPs but memory-bound),
    augmentation, CutMix, pseudo-labels and the unsupervised losses.

    Returns:
        ``[sup, semi, sup_double, forward_b]``, functions of no argument.
    """
    import torch

    from engine.runtime import autocast
    from engine.semi import semi_step
    from engine.steps import supervised_step

    labeled, unl_a, unl_b, double = (batches[k] for k in ("labeled", "unl_a", "unl_b", "double"))

    def backward_step(loss) -> None:
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    def sup() -> None:
        backward_step(supervised_step(model, labeled, loss_fn, amp_dtype)["loss"])

    def semi() -> None:
        out = semi_step(model, ema, labeled, unl_a, unl_b, loss_fn, 0.7, cfg, gen, amp_dtype=amp_dtype)
        backward_step(out["loss"])
        if ema is not None:
            ema.update(model)

    def sup_double() -> None:
        backward_step(supervised_step(model, double, loss_fn, amp_dtype)["loss"])

    def forward_b() -> None:
        with torch.no_grad(), autocast(dev, amp_dtype):
            model(unl_b.image)

    return [sup, semi, sup_double, forward_b]


def _flops(fn) -> int:
    """Training FLOPs of one call of ``fn`` (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    from engine.runtime import retain_freed_memory

    retain_freed_memory()  # as Final.py and segment.py run
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--unlabeled-batch", type=int, default=None)
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--teacher", choices=("self", "ema"), default="ema")
    ap.add_argument("--pseudo", choices=("merged", "full"), default="merged")
    ap.add_argument("--norm", choices=("batch", "instance"), default=None, help="default: Final.py's")
    ap.add_argument("--amp", choices=AMP, default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--fp", choices=("encoder", "head"), default="encoder", help="feature perturbation")
    a = ap.parse_args(argv)
    r = run(device=a.device, width=a.width, size=a.size, batch=a.batch, unlabeled_batch=a.unlabeled_batch,
            slices=a.slices, num_classes=a.classes, teacher=a.teacher, pseudo=a.pseudo, amp=a.amp,
            steps=a.steps, warmup=a.warmup, threads=a.threads, norm=a.norm, fp=a.fp)
    u = r["unlabeled_batch"]
    print(f"{r['device']}: width {r['width']} {r['size']}x{r['size']} batch {r['batch']}+{u}+{u} "
          f"slices {r['slices']} {r['norm']} norm amp {r['amp']} teacher {r['teacher']} "
          f"pseudo {r['pseudo']}")
    print(f"  supervised: {r['sup_s_per_step']:.3f} s/step, {r['sup_slices_per_s']:.1f} slices/s")
    print(f"  semi:       {r['semi_s_per_step']:.3f} s/step, {r['semi_slices_per_s']:.1f} slices/s "
          "(labeled + unlabeled)")
    print(f"  ratio semi/supervised: time {r['time_ratio']:.2f}x, training FLOPs {r['flop_ratio']:.2f}x")
    print(f"  semi / its network work alone ({r['reference_s_per_step']:.3f} s): {r['overhead_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    run_cli(main)
