"""Checkpoints: atomic save, safe load, clear errors for foreign, corrupt or mismatching files."""

from __future__ import annotations

import pickle

import pytest
import torch

from engine.checkpoint import (
    VERSION,
    TrainingCheckpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from utils.errors import InputError


def _payload():
    return {"model": {"w": torch.ones(2)}, "organs": ["liver", "kidney"], "view": "axial", "slices": 3}


def test_round_trip_and_expectations(tmp_path):
    path = tmp_path / "resu_best_axial.pth.tar"
    save_checkpoint(_payload(), path)
    ckpt = load_checkpoint(path, expect={"organs": ("liver", "kidney"), "view": "axial", "slices": None})
    assert torch.equal(ckpt["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    assert resolve_checkpoint(tmp_path, "axial") == path
    with pytest.raises(InputError, match="slices is 3 but 5"):
        load_checkpoint(path, expect={"slices": 5})
    with pytest.raises(InputError, match="no checkpoint for view 'coronal'"):
        resolve_checkpoint(tmp_path, "coronal")


def test_foreign_corrupt_and_truncated_files(tmp_path):
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(InputError, match="not a UniMOS checkpoint"):
        load_checkpoint(foreign)
    good = tmp_path / "good.pth"
    save_checkpoint(_payload(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="truncated.pth: not a loadable checkpoint"):
        load_checkpoint(truncated)
    text = tmp_path / "text.pth"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a loadable checkpoint"):
        load_checkpoint(text)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


# torch's weights-only unpickler warns about the protocol before it refuses the code: expected here
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"format": "unimos-checkpoint", "x": _Evil()}, fh)
    with pytest.raises(InputError, match="not a loadable checkpoint"):
        load_checkpoint(evil)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "resu_last_axial.pth.tar"
    save_checkpoint(_payload(), path)
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    # A writer's failure (torch reports a full disk as RuntimeError) is one line naming the file.
    with pytest.raises(InputError, match="disk full") as exc:
        save_checkpoint({"bad": Unsaveable()}, path)
    assert exc.value.path == str(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def _training(**kw) -> TrainingCheckpoint:
    fields = {"model": {"w": torch.ones(2)}, "model_args": {"in_channels": 3, "num_classes": 3, "width": 4},
              "organs": ["liver", "kidney"], "view": "axial", "slices": 3, "block": 32, "config": {},
              "epoch": 1, "step": 10, "best_score": 0.5, "args": {"lr": 0.1},
              "optimizer": {"state": {}, "param_groups": []}}
    return TrainingCheckpoint(**{**fields, **kw})


def test_training_checkpoint_schema_round_trip(tmp_path):
    path = tmp_path / "resu_last_axial.pth.tar"
    ckpt = _training(loop={"meter": {"sums": {}, "counts": {}}, "pending_end": False, "elapsed_s": 1.0})
    ckpt.save(path)
    raw = load_checkpoint(path)
    assert raw["format"] == "unimos-checkpoint" and raw["version"] == VERSION
    assert raw["width"] == 4  # top-level copy of model_args["width"]
    assert "ema" not in raw and "scaler" not in raw  # absent optional parts are left out
    back = TrainingCheckpoint.load(path, expect={"view": "axial", "width": 4})
    assert back.step == 10 and back.loop["elapsed_s"] == 1.0 and back.ema is None
    assert torch.equal(back.model["w"], ckpt.model["w"])


def test_training_checkpoint_needs_what_resume_needs(tmp_path):
    path = tmp_path / "inference_only.pth.tar"
    save_checkpoint({k: v for k, v in _training().to_dict().items() if k != "optimizer"}, path)
    with pytest.raises(InputError, match="has no optimizer; cannot resume"):
        TrainingCheckpoint.load(path)
