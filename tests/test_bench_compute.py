"""The benchmarks' FLOP accounting and the CPU matrix-multiply reference they are compared with."""

from __future__ import annotations

import pytest
import torch

from bench import inference as bench_inference
from bench import run as bench_run
from bench.machine import matmul_gflops
from models import build_model
from utils.flops import count_flops


def _model(width: int = 4):
    torch.manual_seed(0)
    return build_model({"in_channels": 3, "num_classes": 4, "width": width, "norm": "instance"}).eval()


@pytest.mark.parametrize("shape", [(256, 256), (96, 160)])
def test_flops_grow_exactly_with_the_pixels(shape):
    """The accounting multiplies FLOPs per pixel (counted on 64 x 64) by the pixels the passes see:
    exact only if every layer's FLOPs scale with the input area, checked here on other sizes."""
    model = _model()
    fpp = bench_inference.flops_per_pixel(model, 3)
    h, w = shape
    with torch.no_grad():
        direct = count_flops(model, (2, 3, h, w))
    assert fpp * 2 * h * w == pytest.approx(direct, rel=1e-12)


def test_axial_call_flops_are_the_passes_pixels_times_the_flops_per_pixel(one_thread):
    """8 slices resampled to the config's 256 x 256 grid, whole slices, three slices per pass on two
    worker threads (the counter is shared between them): 8 x 256 x 256 pixels."""
    r = bench_inference.run(width=4, device="cpu", shape=(8, 64, 64), configs=("axial",), batch=3,
                            io=False, workers=2, threads=2, channels_last=True)
    with torch.no_grad():
        per_slice = count_flops(_model(), (1, 3, 256, 256))
    assert r["axial_gflop"] == pytest.approx(8 * per_slice / 1e9, rel=1e-9)


def test_fused_flops_count_every_view():
    """Three views of a volume of 2.5 mm slices on a 1.5 mm grid: the coronal and sagittal stacks are
    resampled S-I to 1.5 mm, so the fused call computes more than 3x the axial FLOPs."""
    r = bench_inference.run(width=4, device="cpu", shape=(16, 64, 64), configs=("axial", "fused"),
                            batch=4, io=False, workers=1, threads=1, tile=0)
    assert r["fused_gflop"] > 3 * r["axial_gflop"]


def test_matmul_rate_is_positive_and_restores_threads():
    before = torch.get_num_threads()
    rate = matmul_gflops(threads=1, n=128, repeats=3)
    assert torch.get_num_threads() == before
    assert 0.1 < rate < 1e5


def test_against_matmul_divides_by_the_reference(monkeypatch):
    monkeypatch.setattr("bench.machine.matmul_gflops", lambda threads=None: 200.0)
    assert bench_run.against_matmul(50.0) == {"achieved_gflops": 50.0, "matmul_gflops": 200.0,
                                              "frac_matmul": 0.25}


def test_rows_show_the_fraction_of_the_matmul_rate_and_the_fused_flop_ratio():
    results = {
        "train": {"width": 16, "size": 128, "batch": 8, "amp": "off", "slices_per_s": 30.0,
                  "s_per_step": 0.27, "achieved_gflops": 105.4, "matmul_gflops": 219.0,
                  "frac_matmul": 105.4 / 219.0},
        "inference": {"shape": [200, 256, 256], "axial_s": 8.0, "fused_s": 36.0, "axial_gflop": 1117.0,
                      "fused_gflop": 4960.0, "achieved_gflops": 139.6, "matmul_gflops": 220.0,
                      "frac_matmul": 139.6 / 220.0},
    }
    by = {(s, m): v for s, m, v in bench_run.summary_rows(results, gpu=False)}
    assert by[("train", "achieved GFLOP/s (fraction of this run's fp32 matmul rate, same threads)")] == \
        "105.4 (48% of 219)"
    assert by[("inference", "3 views fused / axial: model FLOPs; time")] == "4.44x; 4.50x"
    assert by[("inference", "axial model, model GFLOP/s over the call (fraction of this run's fp32 "
               "matmul rate, same threads)")] == "139.6 (63% of 220)"
