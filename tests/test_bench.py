"""Smoke tests of the benchmark entry point and the ablation script (cheap paths only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import ablation
from bench import run as bench_run


def test_quick_loader_writes_json_and_markdown(tmp_path, one_thread):
    out = tmp_path / "bench"
    rc = bench_run.main(["--out", str(out), "--quick", "--only", "loader", "--device", "cpu",
                         "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert list(report["results"]) == ["loader"]
    loader = report["results"]["loader"]
    assert "error" not in loader
    assert loader["cache_samples"] == 100 and loader["original_samples"] == 4
    assert loader["cache_samples_per_s"] > 0 and loader["speedup"] > 0
    assert loader["section_s"] >= 0 and report["machine"]["cores"] >= 1
    md = (out / "bench.md").read_text()
    assert "| loader | cache / per-sample decode |" in md
    assert f"| cores (usable) | {report['machine']['cores']}" in md


def test_unknown_section_is_an_input_error(tmp_path):
    from utils.errors import InputError

    with pytest.raises(InputError, match="--only"):
        bench_run.run_all(tmp_path, only=("loader", "gpu-magic"))


def test_summary_rows_on_fake_results():
    results = {
        "semi": {"batch": 8, "unlabeled_batch": 4, "sup_slices_per_s": 32.0, "semi_slices_per_s": 24.6,
                 "time_ratio": 2.6, "flop_ratio": 4.31, "section_peak_rss_mb": 512.0},
        "train": {"error": "RuntimeError: boom"},
        "inference": {"shape": [200, 256, 256], "axial_s": 40.0, "axial_io_s": 43.5, "axial_peak_rss_mb": 900,
                      "fused_s": 200.0, "fused_io_s": 203.5, "fused_peak_rss_mb": 700, "fused_scale": 5.0,
                      "fused_measured_shape": [40, 256, 256], "section_peak_rss_mb": 1000.0,
                      "cuda_peak_mb": 2048.0},
    }
    rows = bench_run.summary_rows(results, gpu=False)
    by = {(s, m): v for s, m, v in rows}
    # sections come out in SECTIONS order whatever the dict order
    assert [s for s, _, _ in rows][0] == "train"
    assert by[("train", "error")] == "RuntimeError: boom"
    assert by[("semi", "semi / supervised step time")] == "2.60x"
    assert by[("semi", "semi / supervised training FLOPs")] == "4.31x"
    fused = [(m, v) for s, m, v in rows if s == "inference" and m.startswith("3 views fused, s per")]
    assert fused[0] == ("3 views fused, s per 256x256x200 volume (no I/O; whole slices, measured on "
                        "256x256x40 x 5)", "200.00")
    assert by[("inference", "section peak memory")] == "1000 MB RSS, 2048 MB CUDA"


def test_summary_rows_gpu_fraction_of_peak():
    train = {"width": 64, "size": 224, "batch": 32, "amp": "bf16", "channels_last": True,
             "slices_per_s": 2000.0, "s_per_step": 0.016, "train_flops_per_slice": 30e9,
             "fwd_flops_per_slice": 10e9,
             "achieved_tflops": 60.0, "peak_tflops": 989.0, "frac_peak": 60.0 / 989.0}
    by = {m: v for _, m, v in bench_run.summary_rows({"train": train})}
    assert by["training FLOPs per slice (fwd + bwd)"] == "30.00 G"
    assert by["achieved TFLOP/s (fraction of dense bf16 peak)"] == "60.0 (6.1% of 989)"
    assert not any("fraction" in m for _, m, _ in bench_run.summary_rows({"train": train}, gpu=False))


@pytest.mark.parametrize("gpu,quick", [(False, False), (True, False), (False, True)])
def test_presets_fit_their_benchmarks(gpu, quick):
    """Every preset is a valid set of arguments of the benchmark it configures (not its values)."""
    import inspect

    from bench.loader import run as loader
    from bench.semi_step import run as semi
    from bench.train_step import compare
    from bench.train_step import run as train

    fns = {"loader": loader, "train": train, "semi": semi, "inference": bench_run.run_inference,
           "train_compare": compare, "inference_compare": bench_run.compare_inference}
    cfg = bench_run.presets(gpu=gpu, quick=quick)
    assert set(cfg) == set(fns)
    assert (cfg["train_compare"] is None) == gpu and (cfg["inference_compare"] is None) == gpu
    for name, kwargs in cfg.items():
        if kwargs is None:  # the old-vs-new comparisons are CPU-only
            continue
        if name == "train_compare":  # its old / new settings are make_step arguments
            from bench.train_step import make_step

            for which in ("old", "new"):
                inspect.signature(make_step).bind_partial(**kwargs[which], device="cpu")
        extra = {"device": "cpu"} if name in ("train", "semi", "train_compare", "inference_compare") else {}
        inspect.signature(fns[name]).bind_partial(**kwargs, **extra)  # TypeError on a wrong name


def test_old_settings_run_in_a_fresh_process_beside_the_new_ones(one_thread):
    """The old-vs-new comparisons at the quick preset's sizes: the old settings run in a spawned
    process (the default allocator their code ran with), steps alternating with the new ones here."""
    import os

    from bench.train_step import compare

    cfg = bench_run.presets(gpu=False, quick=True, threads=1)
    res = compare(device="cpu", **cfg["train_compare"])
    assert res["old"]["fresh_process"] and not res["new"]["fresh_process"]
    assert res["new"]["pid"] == os.getpid() != res["old"]["pid"]
    for which in ("old", "new"):
        assert res[which]["s_per_step"] > 0 and res[which]["cpu_s_per_step"] > 0
        assert res[which]["size"] == cfg["train_compare"][which]["size"]
    assert res["slices_ratio"] == pytest.approx(res["new"]["slices_per_s"] / res["old"]["slices_per_s"])

    inf = bench_run.compare_inference(device="cpu", **cfg["inference_compare"])
    assert {"old", "new", "one_pass"} <= set(inf) and inf["ratio"] > 0
    assert inf["old"]["norm_kernel"] == "instancenorm2d" and inf["new"]["channels_last"]


def _options(**kw) -> ablation.Options:
    return ablation.Options(out="/x", **kw)


def test_ablation_commands_share_steps_and_seed():
    o = _options(steps=600, epochs=12)
    assert o.steps_per_epoch == 50
    cmds = {v: ablation.train_command(o, Path("/d"), Path("/c"), Path("/o"), v)
            for v in [*ablation.VARIANTS, *ablation.SEMI_VARIANTS]}
    for v, cmd in cmds.items():
        assert cmd[1].endswith("Final.py")
        i = cmd.index("--steps-per-epoch")
        assert cmd[i + 1] == "50" and cmd[cmd.index("--epochs") + 1] == "12"
        assert cmd[cmd.index("--seed") + 1] == "0"
        assert "--channels-last" not in cmd  # Final.py's default: on CUDA only
        assert cmd[cmd.index("--datasets") + 1] == "LiTS,KiTS,MSDSpleen"
        semi = "--semi" in cmd
        assert semi == v.startswith("tal+semi") and ("--no-semi" in cmd) == (not semi)
        # the ablation measures Final.py's defaults: no warm-up/ramp-up flag only the benchmark passes
        assert "--semi-warmup" not in cmd and "--semi-rampup" not in cmd
    assert cmds["naive"][cmds["naive"].index("--loss") + 1] == "naive"
    assert cmds["tal+semi"] == cmds["tal"][:-1] + ["--semi"]
    assert cmds["tal+semi/head"][cmds["tal+semi/head"].index("--fp") + 1] == "head"
    assert cmds["tal+semi/full"][cmds["tal+semi/full"].index("--pseudo") + 1] == "full"
    assert cmds["tal+semi/self"][cmds["tal+semi/self"].index("--teacher") + 1] == "self"


def test_ablation_plan_and_option_checks():
    from utils.errors import InputError

    o = _options(labeled=[1, 2], train_seeds=[0, 1], variants=["naive", "tal", "tal+semi"],
                 extra=["2:tal+semi/head"])
    ablation.check_options(o)
    plan = ablation.plan_runs(o)
    # seed by seed; naive (single_seed) only with the first seed; the extra run with every seed
    assert plan == [(1, "naive", 0), (1, "tal", 0), (1, "tal+semi", 0), (2, "naive", 0), (2, "tal", 0),
                    (2, "tal+semi", 0), (2, "tal+semi/head", 0),
                    (1, "tal", 1), (1, "tal+semi", 1), (2, "tal", 1), (2, "tal+semi", 1),
                    (2, "tal+semi/head", 1)]
    plan = ablation.plan_runs(_options(labeled=[2], variants=["tal"], extra=[], train_seeds=[0],
                                       semi_variants=True))
    assert plan == [(2, "tal", 0), (2, "tal+semi/head", 0), (2, "tal+semi/full", 0), (2, "tal+semi/self", 0),
                    (2, "tal+semi/full+self", 0)]
    o = _options(labeled=[2], variants=["tal"], train_seeds=[0, 3], extra=[])
    assert ablation.run_name(o, 2, "tal+semi/self", 0) == "2lab_tal_semi_self"
    assert ablation.run_name(o, 2, "tal+semi/self", 3) == "2lab_tal_semi_self_seed3"
    cmd = ablation.train_command(o, Path("d"), Path("c"), Path("r"), "tal", seed=3)
    assert cmd[cmd.index("--seed") + 1] == "3" and cmd.count("--seed") == 1
    for bad in (dict(labeled=[]), dict(labeled=[0, 1]), dict(labeled=[2, 2]), dict(variants=["magic"]),
                dict(extra=["3:tal"]), dict(extra=["x:tal"]), dict(inplane=100), dict(unlabeled=0),
                dict(checkpoint="first"), dict(train_seeds=[1, 1])):
        with pytest.raises(InputError):
            ablation.check_options(_options(**bad))


def test_ablation_table_on_fake_results():
    runs = [{"setting": "2lab", "variant": "tal", "labeled_per_dataset": 2, "checkpoint_step": 550,
             "dice": {"liver": 0.91, "kidney": 0.8, "spleen": 0.705}, "mean": 0.805, "train_s": 150.0},
            {"setting": "6lab", "variant": "naive", "labeled_per_dataset": 6, "train_s": None,
             "error": "Final.py exit code 1: boom | bad"}]
    lines = ablation.format_table(runs, ["liver", "kidney", "spleen"]).splitlines()
    assert lines[0] == "| labels | variant | liver | kidney | spleen | mean | checkpoint step | train time |"
    assert lines[2] == "| 2 labeled/dataset | tal | 0.910 | 0.800 | 0.705 | 0.805 | 550 | 2.5 min |"
    assert lines[3].startswith("| 6 labeled/dataset | naive | failed: Final.py exit code 1: boom / bad")
    assert lines[3].count("|") == lines[0].count("|")
    # with the other checkpoint scored, one more column
    runs[0]["other"] = {"checkpoint": "last", "mean": 0.8123, "checkpoint_step": 600, "dice": {}}
    lines = ablation.format_table(runs, ["liver", "kidney", "spleen"]).splitlines()
    assert lines[0].endswith("| mean | checkpoint step | mean, last checkpoint (step) | train time |")
    assert lines[2].endswith("| 0.805 | 550 | 0.812 (600) | 2.5 min |")
    assert lines[3].count("|") == lines[0].count("|")


def _run(variant, seed, mean, last, labeled=2, dice=None):
    return {"setting": f"{labeled}lab", "variant": variant, "labeled_per_dataset": labeled, "seed": seed,
            "checkpoint_step": 100 * seed, "dice": dice or {"liver": mean, "kidney": mean, "spleen": mean},
            "mean": mean, "other": {"checkpoint": "last", "mean": last, "checkpoint_step": 540},
            "train_s": 60.0}


def test_ablation_table_groups_seeds():
    lines = ablation.format_table([_run("tal", 1, 0.8, 0.7), _run("tal", 2, 0.9, 0.7)],
                                  ["liver", "kidney", "spleen"]).splitlines()
    assert lines[0].endswith("| mean, last checkpoint (step) | seeds | train time |")
    # mean 0.85, sample sd sqrt(0.005) = 0.0707; train time summed
    assert lines[2] == ("| 2 labeled/dataset | tal | 0.850 ± 0.071 | 0.850 ± 0.071 | 0.850 ± 0.071 "
                        "| 0.850 ± 0.071 | 100, 200 | 0.700 ± 0.000 (540, 540) | 1, 2 | 2.0 min |")
    assert len(lines) == 3


def test_ablation_pairs_losses_and_figure(tmp_path):
    from bench import ablation_report as rep

    runs = [_run("tal", 0, 0.80, 0.75), _run("tal+semi", 0, 0.85, 0.80),
            _run("tal", 1, 0.82, 0.70), _run("tal+semi", 1, 0.81, 0.78),
            _run("tal", 0, 0.90, 0.90, labeled=4),
            _run("tal+semi", 0, 0.70, 0.70, labeled=4, dice={"liver": 0.9, "kidney": 0.4, "spleen": 0.8}),
            {"setting": "4lab", "variant": "tal+semi", "labeled_per_dataset": 4, "seed": 1, "error": "x"}]
    pairs = rep.paired_differences(runs)
    assert sorted(pairs) == [2, 4] and pairs[2]["seeds"] == [0, 1]
    assert pairs[2]["best"] == pytest.approx([0.05, -0.01])
    assert pairs[2]["last"] == pytest.approx([0.05, 0.08])
    # kidney 0.9 -> 0.4 on seed 0 at 4 labeled is a lost organ
    assert rep.lost_organs(runs) == ["4 labeled, seed 0: kidney 0.900 -> 0.400"]
    assert rep.curve_points(runs, "tal")[0] == pytest.approx((2, 0.81, math.sqrt(0.0002)))
    png = rep.draw_figure(runs, tmp_path / "f.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (640, 400)
        # both curves are drawn in their palette colours
        colours = {c for _, c in im.getcolors(1 << 16)}
        assert (31, 119, 180) in colours and (214, 39, 40) in colours
    report = {"options": {**ablation.asdict(_options()), "steps_per_epoch": 30}, "runs": runs}
    md = rep.format_markdown(report)
    assert "| 2 labeled/dataset | best | +0.050, -0.010 | +0.020 ± 0.042 | 1 of 2 |" in md
    assert "kidney 0.900 -> 0.400" in md


def test_ablation_merge(tmp_path):
    from bench import ablation_report as rep
    from utils.errors import InputError

    opts = {**ablation.asdict(_options()), "steps_per_epoch": 30}
    for i, name in enumerate(("a", "b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ablation.json").write_text(json.dumps(
            {"options": {**opts, "train_seeds": [i]}, "runs": [_run("tal", i, 0.8, 0.7)], "seconds": 5}))
    merged = rep.merge_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert [r["seed"] for r in merged["runs"]] == [0, 1] and merged["options"]["train_seeds"] == [0, 1]
    assert (tmp_path / "m" / "ablation.md").is_file() and (tmp_path / "m" / "ablation.png").is_file()
    # a folder of baselines and one of semi runs: rows come out by labeled count, not by folder
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ablation.json").write_text(json.dumps(
        {"options": {**opts, "train_seeds": [0]}, "runs": [_run("tal+semi", 0, 0.7, 0.7, labeled=1),
                                                           _run("tal+semi", 0, 0.9, 0.9, labeled=2)]}))
    (tmp_path / "a" / "ablation.json").write_text(json.dumps(
        {"options": {**opts, "train_seeds": [0]}, "runs": [_run("tal", 0, 0.6, 0.6, labeled=1),
                                                           _run("tal", 0, 0.8, 0.8, labeled=2)]}))
    merged = rep.merge_reports([tmp_path / "a", tmp_path / "c"], tmp_path / "m")
    assert [(r["labeled_per_dataset"], r["variant"]) for r in merged["runs"]] == \
        [(1, "tal"), (1, "tal+semi"), (2, "tal"), (2, "tal+semi")]
    (tmp_path / "b" / "ablation.json").write_text(json.dumps({"options": {**opts, "steps": 1}, "runs": []}))
    with pytest.raises(InputError, match="steps"):
        rep.merge_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    (tmp_path / "b" / "ablation.json").write_text(json.dumps(
        {"options": {**opts, "final_args": "--semi-weights 2 0.5 0.25 0.25"}, "runs": []}))
    with pytest.raises(InputError, match="final_args"):
        rep.merge_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "m")


def test_ablation_merge_of_separate_labeled_counts(tmp_path):
    """Studies of one labeled count each (their own phantom draws) join into one table, said so;
    two draws holding the same count would pair runs of different phantoms and are refused."""
    from bench import ablation_report as rep
    from utils.errors import InputError

    opts = {**ablation.asdict(_options()), "steps_per_epoch": 30,
            "final_args": "--semi-weights 2 0.5 0.25 0.25"}
    for name, n, secs in (("one", 1, 60), ("four", 4, 120), ("four_head", 4, 30)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "ablation.json").write_text(json.dumps(
            {"options": {**opts, "labeled": [n], "train_seeds": [0]}, "seconds": secs,
             "runs": [_run("tal", 0, 0.6, 0.6, labeled=n), _run("tal+semi", 0, 0.7, 0.7, labeled=n)]}))
    merged = rep.merge_reports([tmp_path / "four", tmp_path / "one", tmp_path / "four_head"], tmp_path / "m")
    assert merged["options"]["labeled"] == [1, 4] and merged["phantom_draws"] == [[1], [4]]
    md = (tmp_path / "m" / "ablation.md").read_text()
    assert "(1, 4 labeled phantoms per dataset" in md
    assert "Phantoms drawn separately for the labeled counts 1, 4" in md
    assert "every run also got `--semi-weights 2 0.5 0.25 0.25`" in md
    assert "the joined ablations took 2.0, 1.0, 0.5 min" in md
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "ablation.json").write_text(json.dumps(
        {"options": {**opts, "labeled": [1, 2], "train_seeds": [0]}, "runs": []}))
    with pytest.raises(InputError, match="overlap"):
        rep.merge_reports([tmp_path / "one", tmp_path / "mixed"], tmp_path / "m2")


def test_training_root_keeps_first_labeled_cases(tmp_path):
    from data.phantom import synthesize

    res = tmp_path / "data"
    synthesize(res, cases=2, unlabeled=1, val=1, seed=0, datasets=list(ablation.PARTIAL), scale=0.0625)
    counts = ablation.make_training_root(res, tmp_path / "root", labeled=1)
    assert counts == {ds: {"labeled": 1, "validation": 1, "unlabeled": 1} for ds in ablation.PARTIAL}
    lits = tmp_path / "root" / "LiTS"
    assert [p.name for p in (lits / "labeled").iterdir()] == ["volume-0.nii"]
    assert all(p.is_symlink() for p in (lits / "label").iterdir())
    assert sorted(p.name for p in (lits / "label").iterdir()) == ["segmentation-0.nii", "segmentation-2.nii"]
    # a second call rebuilds the root; a file it did not make stops it
    assert ablation.make_training_root(res, tmp_path / "root", labeled=2)["KiTS"]["labeled"] == 2
    (lits / "notes.txt").write_text("mine")
    from utils.errors import InputError

    with pytest.raises(InputError, match="notes.txt"):
        ablation.make_training_root(res, tmp_path / "root", labeled=1)
    assert (lits / "notes.txt").read_text() == "mine"


def test_quick_ablation_end_to_end(tmp_path):
    """--quick: phantoms, resample, Final.py runs and held-out scoring of both checkpoints, tables."""
    out = tmp_path / "abl"
    rc = ablation.main(["--out", str(out), "--quick", "--labeled", "1", "--variants", "tal",
                        "--device", "cpu", "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "ablation.json").read_text())
    (run,) = report["runs"]
    assert "error" not in run, run.get("error")
    assert set(run["dice"]) == {"liver", "kidney", "spleen"}
    assert all(0.0 <= d <= 1.0 for d in run["dice"].values())
    assert run["mean"] == pytest.approx(sum(run["dice"].values()) / 3)
    # the last checkpoint is the final step; the best one is no later
    assert run["other"]["checkpoint"] == "last" and run["other"]["checkpoint_step"] == run["steps"]
    assert run["checkpoint_step"] <= run["steps"]
    assert len(run["per_case"]) == report["options"]["held_out"]
    assert "| 1 labeled/dataset | tal |" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").is_file()


def test_instance_norm2d_swap_keeps_the_outputs():
    import torch

    from bench.train_step import to_instance_norm2d
    from models import build_model

    torch.manual_seed(0)
    model = build_model({"in_channels": 3, "num_classes": 4, "width": 4, "norm": "instance"})
    with torch.no_grad():  # non-trivial affine parameters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).logits
        n_params = sum(p.numel() for p in model.parameters())
        to_instance_norm2d(model)
        after = model(x).logits
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert norms and all(m.affine and not m.track_running_stats for m in norms)
    # no GroupNorm(C, C) left (GroupNorm(1, C) of the fusion block is not instance norm and stays)
    assert not any(isinstance(m, torch.nn.GroupNorm) and m.num_groups == m.num_channels
                   for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) == n_params
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_old_vs_new_rows_on_fake_results():
    train = {"width": 16, "size": 128, "batch": 8, "amp": "off", "slices_per_s": 30.0,
             "old_vs_new": {"old": {"size": 128, "batch": 8, "norm_kernel": "instancenorm2d",
                                    "relu_inplace": False, "fresh_process": True,
                                    "slices_per_s": 20.0, "megapixels_per_s": 0.328},
                            "new": {"size": 96, "batch": 8, "norm_kernel": "groupnorm",
                                    "slices_per_s": 40.0, "megapixels_per_s": 0.369},
                            "slices_ratio": 2.0, "megapixels_ratio": 1.125}}
    inference = {"shape": [200, 256, 256], "axial_s": 20.0,
                 "old_vs_new": {"shape": [200, 256, 256], "old": {"axial_s": 30.0, "batch": 16, "workers": 1,
                                                                   "fresh_process": True},
                                "new": {"axial_s": 20.0, "axial_cpu_s": 35.0, "batch": 1, "workers": 2},
                                "one_pass": {"axial_s": 15.0, "batch": 2, "workers": 1},
                                "ratio": 1.5, "ratio_one_pass": 2.0}}
    by = {m: v for _, m, v in bench_run.summary_rows({"train": train, "inference": inference}, gpu=False)}
    assert by["old: InstanceNorm2d, out-of-place ReLU, 128x128, batch 8, fresh process (default allocator), "
              "slices/s; megapixels/s"] == "20.0; 0.328"
    assert by["new: GroupNorm(C, C), ReLU in place, 96x96, batch 8, slices/s; megapixels/s"] == "40.0; 0.369"
    assert by["new / old, slices/s; megapixels/s (same run, steps alternating)"] == "2.00x; 1.12x"
    assert by["old / new time (same run, one after the other)"] == "1.50x"
    assert by["new: axial, GroupNorm(C, C), ReLU in place, channels_last, batch 1, 2 passes side by side, "
              "s per 256x256x200 (no I/O)"] == "20.00 (CPU 35.0 s)"
    assert ("old: axial, InstanceNorm2d, out-of-place ReLU, contiguous, batch 16, one pass at a time, "
            "fresh process (default allocator), s per 256x256x200 (no I/O)") in by
    assert ("previous CPU default: GroupNorm(C, C), out-of-place ReLU, channels_last, batch 2, one pass at "
            "a time, s per 256x256x200 (no I/O)") in by  # no fresh_process in its record
    assert by["old / that time"] == "2.00x"
    assert all("|" not in m and "|" not in v for m, v in by.items())  # Markdown table cells


def test_old_vs_new_presets():
    cpu, gpu = bench_run.presets(gpu=False), bench_run.presets(gpu=True)
    old, new = cpu["train_compare"]["old"], cpu["train_compare"]["new"]
    assert (old["size"], old["norm_kernel"], new["size"], new["norm_kernel"]) == (
        128, "instancenorm2d", 96, "groupnorm")
    assert cpu["inference_compare"]["shape"] == (200, 256, 256)
    assert gpu["train_compare"] is None and gpu["inference_compare"] is None


def test_gpu_check_cpu_smoke_writes_json_and_markdown(tmp_path, one_thread):
    """--cpu-smoke: every section of the GPU check runs (tiny, CPU) or is recorded as skipped."""
    from bench import gpu_check

    out = tmp_path / "gc"
    assert gpu_check.main(["--out", str(out), "--cpu-smoke"]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert {n for n, s in sections.items() if s["status"] == "skipped"} == {"pytest_cuda", "ddp"}
    assert all(s["status"] == "ok" for n, s in sections.items() if n not in ("pytest_cuda", "ddp"))
    train = sections["train_bf16"]["result"]
    assert train["amp"] == "bf16" and train["channels_last"] and train["slices_per_s"] > 0
    assert sections["train_fp16"]["result"]["amp"] == "fp16"
    assert sections["max_batch"]["result"]["max_batch"] == 8  # the smoke limit: no OOM on a CPU
    timed = sections["max_batch"]["result"]["timed_batch"]
    assert sections["max_batch_compile"]["result"]["timed_batch"] == timed
    assert sections["inference"]["result"]["axial_256_s"] > 0
    assert all(s["cap_s"] > 0 and s["seconds"] >= 0 for s in sections.values())
    md = (out / "gpu_check.md").read_text()
    assert "--cpu-smoke" in md and "| ddp | skipped" in md and ">= 700" in md and "<= 0.5" in md


def test_gpu_check_largest_batch_doubles_then_bisects():
    from bench.gpu_check import largest_batch

    r = largest_batch(lambda b: b <= 100, start=8, limit=4096)
    # 8..64 fit, 128 does not; bisect 96 (ok), 112 (no), 104 (no)
    assert r["tried"] == [[8, True], [16, True], [32, True], [64, True], [128, False], [96, True],
                          [112, False], [104, False]]
    assert r["max_batch"] == 96 and r["first_oom"] == 128
    assert largest_batch(lambda b: True, 8, 32)["max_batch"] == 32
    with pytest.raises(RuntimeError):
        largest_batch(lambda b: False, 8, 32)


def test_gpu_check_section_over_its_cap_is_recorded_and_killed():
    from bench.gpu_check import run_isolated

    res = run_isolated("train_bf16", smoke=True, cap_s=0.3)  # python + torch import alone take longer
    assert res["status"] == "timeout" and "cap" in res["error"]


def test_fused_sub_slices_keep_the_padding_of_the_full_volume():
    """The fused views are timed on fewer slices and scaled: the coronal/sagittal slices' padded
    rows per axial slice must be those of the full volume, or the scale overstates the time."""
    from bench.run import fused_sub_slices

    # 384 mm field of view on the default 256 x 256 grid (1.5 mm), 2.5 mm slices: 200 slices make
    # coronal slices 333 rows tall, padded to 336 (1.680 per axial slice); 40 slices 67 rows padded
    # to 80 (2.0: the old scale's +19 %); 57 slices 95 rows padded to 96 (1.684)
    assert fused_sub_slices((200, 256, 256), 40) == 57
    # the grid is the config's, whatever the file's: a 512 x 512 CT is resampled to 256 x 256 first
    assert fused_sub_slices((200, 512, 512), 40) == 57
    assert fused_sub_slices((16, 64, 64), 8) == 8  # 8 slices: 13 rows padded to 16, as 16: 27 -> 32
    assert fused_sub_slices((45, 256, 256), 40) < 45  # never the whole volume


def test_reuse_needs_the_same_command_and_the_same_final_py_defaults(tmp_path):
    """--reuse keeps a finished run only if its command ran under today's Final.py defaults: the same
    command from before --cutmix-pairs became dataset trained with index pairing."""
    import json

    from bench.ablation import RUN_STAMP, VIEW, _final_defaults, _finished

    cmd = ["Final.py", "--data", "d", "--semi"]
    run = tmp_path / "run"
    run.mkdir()
    (run / f"train_summary_{VIEW}.json").write_text(json.dumps({"stop": "done"}))
    (run / f"resu_best_{VIEW}.pth.tar").write_bytes(b"x")

    def stamp(**fields):
        (run / RUN_STAMP).write_text(json.dumps({"command": cmd[1:], **fields}))

    stamp(final_defaults=_final_defaults())
    assert _finished(run, cmd)
    assert not _finished(run, [*cmd, "--fp", "head"])
    stamp(final_defaults={**_final_defaults(), "cutmix_pairs": "index"})
    assert not _finished(run, cmd)
    stamp()  # written before the defaults were recorded
    assert not _finished(run, cmd)
    # an option added since that does not change training (--overwrite) keeps the run reusable;
    # so does one that a stamp lacks but whose default is the old behaviour
    stamp(final_defaults={k: v for k, v in _final_defaults().items() if k not in ("overwrite", "fp")})
    assert _finished(run, cmd)
    stamp(final_defaults={k: v for k, v in _final_defaults().items() if k != "cutmix_pairs"})
    assert not _finished(run, cmd)  # no record means index pairing (engine.resume.LEGACY_ARGS)
