"""End to end: Final.py on tiny phantoms (two epochs of two steps, CPU), supervised and semi-supervised."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from engine.checkpoint import load_checkpoint
from models import build_model

BASE_COLUMNS = ["epoch", "step", "lr", "time_s", "slices_per_s", "loss", "loss_x"]
SEMI_COLUMNS = ["loss_fp", "loss_s1", "loss_s2", "mask_ratio", "conf_mean", "threshold"]
VAL_COLUMNS = ["val/KiTS/kidney", "val/LiTS/liver", "val/MSDSpleen/spleen", "val/score"]
EMA_COLUMNS = [c.replace("val/", "val_ema/") for c in VAL_COLUMNS]


def _rows(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("kind", ["sup", "semi"])
def test_final_py_writes_checkpoints_history_and_summary(tiny_runs, kind):
    out = tiny_runs[kind]
    assert sorted(p.name for p in out.iterdir()) == [
        "args_axial.json", "history_axial.csv", "resu_best_axial.pth.tar", "resu_last_axial.pth.tar",
        "train.log", "train_summary_axial.json"]  # nothing else: no temporary files left behind

    record = json.loads((out / "args_axial.json").read_text())
    assert record["options"]["width"] == 4 and record["options"]["semi"] is (kind == "semi")
    assert set(record["versions"]) >= {"torch", "numpy", "SimpleITK"} and "git_commit" in record
    log_lines = (out / "train.log").read_text().splitlines()
    assert "INFO data: " in log_lines[0]  # lines from before the output folder existed are kept
    assert sum("epoch " in line for line in log_lines) == 2

    expect = {"organs": ["liver", "kidney", "spleen"], "view": "axial", "slices": 3, "width": 4}
    last = load_checkpoint(out / "resu_last_axial.pth.tar", expect=expect)
    best = load_checkpoint(out / "resu_best_axial.pth.tar", expect=expect)
    assert last["step"] == 4 and last["epoch"] == 2
    assert last["model_args"] == {"in_channels": 3, "num_classes": 4, "width": 4, "norm": "instance"}
    assert {"optimizer", "loop", "best_score", "config", "args"} <= set(last)
    assert last["loop"]["pending_end"] is False and last["loop"]["meter"] == {"sums": {}, "counts": {}}
    assert ("ema" in last) == (kind == "semi")
    assert best["step"] in (2, 4) and best["best_score"] == last["best_score"]
    net = build_model(last["model_args"])
    net.load_state_dict(last["model"])  # the stored weights rebuild the network
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())

    columns, rows = _rows(out / "history_axial.csv")
    want = BASE_COLUMNS + (SEMI_COLUMNS + VAL_COLUMNS + EMA_COLUMNS if kind == "semi" else VAL_COLUMNS)
    assert columns == want
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "2"), ("2", "4")]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    scores = [float(r["val/score"]) for r in rows]
    # the EMA teacher is validated beside the student; the best checkpoint serves the better of the two
    both = scores + ([float(r["val_ema/score"]) for r in rows] if kind == "semi" else [])
    assert last["best_score"] == pytest.approx(max(both), abs=1e-6)  # CSV keeps 6 digits
    assert last["served"] == "student"
    if best["served"] == "ema":
        assert kind == "semi"
        for k, v in best["ema"]["model"].items():
            assert torch.equal(best["model"][k], v)
        assert set(best["student_model"]) == set(best["model"])
    else:
        assert best["served"] == "student" and "student_model" not in best

    summary = json.loads((out / "train_summary_axial.json").read_text())
    assert summary["stop"] == "done" and summary["steps"] == summary["total_steps"] == 4
    assert summary["semi"] is (kind == "semi") and summary["world"] == 1
    assert summary["validation"]["score"] == pytest.approx(scores[-1], abs=1e-6)


def test_semi_loss_weights_are_flags_and_checked(tiny_data, tmp_path):
    from engine.trainer import fit
    from tests.conftest import train_options
    from utils.errors import InputError

    bad = train_options(tiny_data, tmp_path / "out", semi=True, semi_weights=(1, -0.5, 0.25, 0.25))
    with pytest.raises(InputError, match="weights must be finite and >= 0"):
        fit(bad)
    assert not any((tmp_path / "out").glob("*.pth.tar"))


def test_dataset_names_with_spaces_mean_the_datasets(tiny_data, tmp_path, capsys):
    """--datasets " MSDSpleen" passed the flag check (which strips) and then failed as an unknown
    dataset of the config."""
    from engine.trainer import fit
    from tests.conftest import train_options

    summary = fit(train_options(tiny_data, tmp_path / "out", semi=False, datasets=" MSDSpleen ", epochs=1,
                                steps_per_epoch=1))
    assert summary["steps"] == 1
    out = capsys.readouterr().out
    assert "['MSDSpleen']" in out
    # and what a spleen-only run leaves without supervision is said
    assert "note: organ(s) ['liver', 'kidney'] are labeled by none of the datasets trained on " \
           "(['MSDSpleen'])" in out, out


def test_batch_norm_run_and_resume_of_a_checkpoint_without_norm_key(tiny_data, tmp_path):
    """--norm batch trains PIPO-FAN's network; a checkpoint written before the option (no "norm" in
    its model_args) holds one, resumes with --norm batch and is refused, with the hint, without it."""
    from engine.checkpoint import save_checkpoint
    from engine.trainer import fit
    from inference.segment import load_model
    from tests.conftest import train_options
    from utils.errors import InputError

    out = tmp_path / "out"
    fit(train_options(tiny_data, out, semi=False, norm="batch", epochs=1))
    path = out / "resu_last_axial.pth.tar"
    ckpt = load_checkpoint(path)
    assert ckpt["model_args"]["norm"] == "batch"
    assert load_model(path, view="axial").model.norm == "batch"
    del ckpt["model_args"]["norm"]
    save_checkpoint(ckpt, path)
    assert load_model(path, view="axial").model.norm == "batch"
    with pytest.raises(InputError, match="resume with --norm batch"):
        fit(train_options(tiny_data, out, semi=False, resume="auto"))
    fit(train_options(tiny_data, out, semi=False, norm="batch", resume="auto"))
    assert load_checkpoint(path)["step"] == 4  # the second epoch ran


def test_tensorboard_run_writes_event_files(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")  # an optional extra: requirements.txt installs it
    from engine.trainer import fit
    from tests.conftest import train_options

    fit(train_options(tiny_data, tmp_path, semi=False, epochs=1, tensorboard=True))
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


def test_tensorboard_missing_is_one_input_error(tiny_data, tmp_path, monkeypatch):
    import sys

    from engine.trainer import fit
    from tests.conftest import train_options
    from utils.errors import InputError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(InputError, match="needs the tensorboard package") as err:
        fit(train_options(tiny_data, tmp_path / "out", semi=False, tensorboard=True))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything is cached or written
