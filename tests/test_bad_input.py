"""Bad-input sweep: every script, run as a subprocess, answers bad input with exactly one line on stderr
naming the offending file, exit code 2, no traceback, and no new or changed file in its output folder.

Each case builds a small valid setting in ``tmp_path``, breaks one thing, runs the script and compares
the output folder before and after. A representative subset runs by default; the full table is
``-m slow`` (each Final.py / segment.py start costs ~2 s of importing torch).
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import TINY, run_script
from tests.helpers import phantom_pair

SHAPE = (8, 32, 32)  # numpy [k, j, i]; the NIfTI files below are (i, j, k) = (32, 32, 8)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


# ----------------------------------------------------------------------------------------------
# Files. Every volume is written with nibabel on one grid (AFFINE), so that a broken file differs
# from its partners (image/label, prediction/ground truth) only in what is broken.


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _valid_bytes(path: Path, label: bool = False) -> bytes:
    image, lab = phantom_pair(SHAPE, seed=3)
    _nifti(path, (lab if label else image).transpose(2, 1, 0))
    return path.read_bytes()


def _seed_data(root: Path) -> Path:
    """A one-dataset seed tree: MSDSpleen with 1 labeled and 1 validation case."""
    ds = root / "MSDSpleen"
    for split, case in (("labeled", "case_000"), ("validation", "case_001")):
        for sub, label in ((split, False), ("label", True)):
            (ds / sub).mkdir(parents=True, exist_ok=True)
            _valid_bytes(ds / sub / f"{case}.nii.gz", label)
    return ds


def corrupt_gzip(path: Path, label: bool = False) -> Path:
    data = bytearray(_valid_bytes(path, label))
    for i in range(40, len(data) - 8, 7):  # keep the gzip header, scramble the deflate stream
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def truncated(path: Path, label: bool = False) -> Path:
    data = _valid_bytes(path, label)
    path.write_bytes(data[: len(data) // 2])
    return path


def plain_truncated(path: Path, label: bool = False) -> Path:
    """Uncompressed NIfTI bytes under a ``.nii.gz`` name, cut to two thirds: readers go by the bytes,
    so this reads as a plain file (ITK filled the missing slices with zeros, unnoticed)."""
    data = gzip.decompress(_valid_bytes(path, label))
    path.write_bytes(data[: 2 * len(data) // 3])
    return path


def qform_sform(path: Path, label: bool = False) -> Path:
    """A NIfTI whose sform (what nibabel, FSL and most viewers use) lies 30 mm from its qform (what
    ITK uses): a label map written from it would be 30 mm off in one of the two."""
    image, lab = phantom_pair(SHAPE, seed=3)
    img = nib.Nifti1Image((lab if label else image).transpose(2, 1, 0), None)
    shifted = AFFINE.copy()
    shifted[0, 3] += 30.0
    img.set_qform(AFFINE, 1)
    img.set_sform(shifted, 2)
    nib.save(img, str(path))
    return path


def zero_dim(path: Path, label: bool = False) -> Path:  # noqa: ARG001 -- same signature as the others
    """A MetaImage whose header declares 0 slices (written as ``<name>.mha``)."""
    out = path.with_name(path.name.split(".")[0] + ".mha")
    out.write_text("ObjectType = Image\nNDims = 3\nDimSize = 32 32 0\nElementSpacing = 1.5 1.5 3\n"
                   "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    return out


def zero_dim_nifti(path: Path, label: bool = False) -> Path:  # noqa: ARG001
    """A NIfTI whose header declares 0 slices (dim[3] = 0) over one slice of data."""
    raw = path.with_name("tmp_zero.nii")
    _nifti(raw, np.zeros((32, 32, 1), dtype=np.int16))
    data = bytearray(raw.read_bytes())
    raw.unlink()
    data[46:48] = (0).to_bytes(2, "little")
    path.write_bytes(gzip.compress(bytes(data)) if path.name.endswith(".gz") else bytes(data))
    return path


def four_d(path: Path, label: bool = False) -> Path:  # noqa: ARG001
    _nifti(path, np.zeros((32, 32, 8, 2), dtype=np.int16))
    return path


def nan_voxels(path: Path, label: bool = False) -> Path:  # noqa: ARG001
    arr = np.full((32, 32, 8), -500.0, dtype=np.float32)
    arr[10:12, 10:12, 3] = np.nan
    _nifti(path, arr)
    return path


def complex_dtype(path: Path, label: bool = False) -> Path:  # noqa: ARG001
    _nifti(path, np.zeros((32, 32, 8), dtype=np.complex64))
    return path


def rgb_vector(path: Path, label: bool = False) -> Path:  # noqa: ARG001
    import SimpleITK as sitk  # noqa: N813

    img = sitk.GetImageFromArray(np.zeros((*SHAPE, 3), dtype=np.uint8), isVector=True)
    tmp = path.with_name("tmp_rgb.nii.gz")
    sitk.WriteImage(img, str(tmp))
    tmp.replace(path)
    return path


def other_shape(path: Path, label: bool = False) -> Path:
    image, lab = phantom_pair((8, 32, 30), seed=4)
    return _nifti(path, (lab if label else image).transpose(2, 1, 0))


def other_origin(path: Path, label: bool = False) -> Path:
    image, lab = phantom_pair(SHAPE, seed=4)
    shifted = AFFINE.copy()
    shifted[2, 3] = 40.0
    return _nifti(path, (lab if label else image).transpose(2, 1, 0), shifted)


def undeclared_label(path: Path, label: bool = True) -> Path:  # noqa: ARG001
    _, lab = phantom_pair(SHAPE, seed=4)
    lab[0, 0, :4] = 7  # MSDSpleen declares only value 1
    return _nifti(path, lab.transpose(2, 1, 0))


BREAKERS: dict[str, Callable[..., Path]] = {
    "corrupt_gzip": corrupt_gzip, "truncated": truncated, "plain_truncated": plain_truncated,
    "qform_sform": qform_sform, "zero_dim": zero_dim,
    "zero_dim_nifti": zero_dim_nifti, "4d": four_d, "nan": nan_voxels, "complex": complex_dtype,
    "rgb": rgb_vector,
}


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass
class Setting:
    """A script invocation: its arguments, the file the error must name, the folder that must not change."""

    argv: list[str]
    names: Path
    out: Path


def _snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def _final(tmp: Path, *extra: str, out: Path | None = None) -> list[str]:
    out = out or tmp / "out"
    return ["Final.py", "--data", str(tmp / "data"), "--datasets", "MSDSpleen", "--out", str(out),
            "--cache", str(tmp / "cache"), "--no-semi", *TINY, *extra]


def final_broken(kind: str, which: str) -> Callable[[Path, dict], Setting]:
    def build(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
        ds = _seed_data(tmp / "data")
        target = ds / ("label" if which == "label" else "labeled") / "case_000.nii.gz"
        target.unlink()
        target = BREAKERS.get(kind, globals().get(kind))(target, label=which == "label")
        return Setting(_final(tmp), target, tmp / "out")
    return build


def final_empty_dataset(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
    ds = tmp / "data" / "MSDSpleen"
    for sub in ("labeled", "label", "validation"):
        (ds / sub).mkdir(parents=True)
    return Setting(_final(tmp), ds, tmp / "out")


def final_unwritable_out(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
    _seed_data(tmp / "data")
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    return Setting(_final(tmp, out=blocker / "out"), blocker / "out", tmp / "data")


def final_resume(which: str) -> Callable[[Path, dict], Setting]:
    def build(tmp: Path, fx: dict) -> Setting:
        _seed_data(tmp / "data")
        ckpt = tmp / "missing.pth.tar" if which == "missing" else fx["foreign"]
        return Setting(_final(tmp, "--resume", str(ckpt)), ckpt, tmp / "out")
    return build


def _segment(tmp: Path, src: Path, ckpt: Path, out: Path | None = None, *extra: str) -> list[str]:
    out = out if out is not None else tmp / "out" / "seg.nii.gz"
    (tmp / "out").mkdir(exist_ok=True)
    return ["segment.py", str(src), str(out), "--network_path", str(ckpt), "--device", "cpu", *extra]


def segment_broken(kind: str) -> Callable[[Path, dict], Setting]:
    def build(tmp: Path, fx: dict) -> Setting:
        src = BREAKERS[kind](tmp / "ct.nii.gz")
        return Setting(_segment(tmp, src, fx["ckpt"]), src, tmp / "out")
    return build


def _good_ct(tmp: Path) -> Path:
    src = tmp / "ct.nii.gz"
    _valid_bytes(src)
    return src


def segment_checkpoint(which: str) -> Callable[[Path, dict], Setting]:
    def build(tmp: Path, fx: dict) -> Setting:
        ckpt = tmp / "missing.pth.tar" if which == "missing" else fx["foreign"]
        return Setting(_segment(tmp, _good_ct(tmp), ckpt), ckpt, tmp / "out")
    return build


def segment_unwritable_out(tmp: Path, fx: dict) -> Setting:
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    (tmp / "out").mkdir()
    return Setting(_segment(tmp, _good_ct(tmp), fx["ckpt"], blocker / "seg.nii.gz"), blocker, tmp / "out")


def segment_gt_mismatch(tmp: Path, fx: dict) -> Setting:
    gt = tmp / "gt.nii.gz"
    other_shape(gt, label=True)
    argv = _segment(tmp, _good_ct(tmp), fx["ckpt"], None, "--evaluating", "--label_filename", str(gt))
    return Setting(argv, gt, tmp / "out")


def segment_gt_undeclared(tmp: Path, fx: dict) -> Setting:
    """A ground truth with a value no organ has: refused before segmenting (it was found while
    scoring, after the segmentation had been written)."""
    gt = tmp / "gt.nii.gz"
    undeclared_label(gt, label=True)
    argv = _segment(tmp, _good_ct(tmp), fx["ckpt"], None, "--evaluating", "--label_filename", str(gt))
    return Setting(argv, gt, tmp / "out")


def _evaluate_pair(tmp: Path) -> tuple[Path, Path]:
    pred, gt = tmp / "pred", tmp / "gt"
    pred.mkdir()
    gt.mkdir()
    _valid_bytes(pred / "case_000.nii.gz", label=True)
    _valid_bytes(gt / "case_000.nii.gz", label=True)
    return pred, gt


def _evaluate(tmp: Path, pred: Path, gt: Path, out: Path | None = None) -> list[str]:
    (tmp / "out").mkdir(exist_ok=True)
    return ["evaluate.py", "--pred", str(pred), "--gt", str(gt), "--out", str(out or tmp / "out" / "r.csv")]


def evaluate_broken(kind: str, which: str) -> Callable[[Path, dict], Setting]:
    def build(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
        pred, gt = _evaluate_pair(tmp)
        target = (pred if which == "pred" else gt) / "case_000.nii.gz"
        target.unlink()
        target = BREAKERS.get(kind, globals().get(kind))(target, label=True)
        return Setting(_evaluate(tmp, pred, gt), target, tmp / "out")
    return build


def evaluate_empty_pred(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
    pred, gt = _evaluate_pair(tmp)
    (pred / "case_000.nii.gz").unlink()
    return Setting(_evaluate(tmp, pred, gt), pred, tmp / "out")


def evaluate_unwritable_out(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
    pred, gt = _evaluate_pair(tmp)
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    return Setting(_evaluate(tmp, pred, gt, blocker / "r.csv"), blocker, tmp / "out")


def resample_broken(kind: str) -> Callable[[Path, dict], Setting]:
    def build(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
        raw = tmp / "raw" / "MSDSpleen" / "labeled"
        raw.mkdir(parents=True)
        # Only the bad volume: resample.py writes each good volume (atomically) as it goes, so a good
        # file before a bad one keeps its (complete) output.
        target = BREAKERS[kind](raw / "case_001.nii.gz")
        return Setting(["resample.py", "-p1", str(tmp / "raw"), "-p2", str(tmp / "out"), "-s1", "16",
                        "-s2", "16"], target, tmp / "out")
    return build


def resample_empty(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
    (tmp / "raw").mkdir()
    return Setting(["resample.py", "-p1", str(tmp / "raw"), "-p2", str(tmp / "out")], tmp / "raw",
                   tmp / "out")


def resample_unwritable_out(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
    raw = tmp / "raw"
    raw.mkdir()
    _valid_bytes(raw / "case_000.nii.gz")
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    return Setting(["resample.py", "-p1", str(raw), "-p2", str(blocker / "out")], blocker, raw)


def synth_unwritable_out(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    (tmp / "out").mkdir()
    return Setting(["synth.py", "--out", str(blocker / "phantoms"), "--cases", "1", "--unlabeled", "0",
                    "--val", "0", "--scale", "0.125"], blocker, tmp / "out")


def synth_foreign_folder(tmp: Path, fx: dict) -> Setting:  # noqa: ARG001
    own = tmp / "out" / "LiTS"
    own.mkdir(parents=True)
    (own / "my_notes.txt").write_text("not a phantom")
    return Setting(["synth.py", "--out", str(tmp / "out"), "--datasets", "LiTS", "--cases", "1",
                    "--unlabeled", "0", "--val", "0", "--scale", "0.125"], own, tmp / "out")


# Known gaps of data/volume.py's reader (reported to its owner); strict, so a fix makes them fail
# until the marker goes.
_EVAL_FAST = ("corrupt_gzip", "nan", "undeclared_label")

# (id, builder, in the default run)
CASES: list[tuple[str, Callable[[Path, dict], Setting], bool]] = [
    *[(f"resample-{k}", resample_broken(k), True) for k in BREAKERS],
    ("resample-empty-folder", resample_empty, True),
    ("resample-unwritable-out", resample_unwritable_out, True),
    ("synth-unwritable-out", synth_unwritable_out, True),
    ("synth-foreign-folder", synth_foreign_folder, True),
    *[(f"evaluate-pred-{k}", evaluate_broken(k, "pred"), k in _EVAL_FAST)
      for k in (*BREAKERS, "undeclared_label")],
    ("evaluate-gt-corrupt_gzip", evaluate_broken("corrupt_gzip", "gt"), False),
    ("evaluate-gt-shape", evaluate_broken("other_shape", "gt"), True),
    ("evaluate-gt-origin", evaluate_broken("other_origin", "gt"), False),
    ("evaluate-empty-folder", evaluate_empty_pred, True),
    ("evaluate-unwritable-out", evaluate_unwritable_out, True),
    *[(f"segment-{k}", segment_broken(k), False) for k in BREAKERS],
    ("segment-missing-checkpoint", segment_checkpoint("missing"), False),
    ("segment-foreign-checkpoint", segment_checkpoint("foreign"), True),
    ("segment-unwritable-out", segment_unwritable_out, False),
    ("segment-gt-shape", segment_gt_mismatch, False),
    ("segment-gt-undeclared", segment_gt_undeclared, True),
    *[(f"final-image-{k}", final_broken(k, "image"), False) for k in BREAKERS],
    ("final-label-truncated", final_broken("truncated", "label"), False),
    ("final-label-shape", final_broken("other_shape", "label"), False),
    ("final-label-origin", final_broken("other_origin", "label"), False),
    ("final-label-undeclared", final_broken("undeclared_label", "label"), True),
    ("final-empty-dataset", final_empty_dataset, False),
    ("final-unwritable-out", final_unwritable_out, True),
    ("final-missing-checkpoint", final_resume("missing"), False),
    ("final-foreign-checkpoint", final_resume("foreign"), False),
]
# Where the bad file is alone (no partner file whose grid it fails to match first).
def _marks(case_id: str, fast: bool) -> list:
    return [] if fast else [pytest.mark.slow]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict[str, Path]:
    """A valid (untrained, width 4) UniMOS checkpoint and a foreign PyTorch file."""
    import torch

    from data.config import config_to_dict, load_config
    from engine.checkpoint import TrainingCheckpoint
    from models import DEFAULT_NORM, build_model

    root = tmp_path_factory.mktemp("bad_input_fixtures")
    config = load_config()
    model_args = {"in_channels": 3, "num_classes": 4, "width": 4, "norm": DEFAULT_NORM}
    ckpt = root / "resu_best_axial.pth.tar"
    TrainingCheckpoint(model=build_model(model_args).state_dict(), model_args=model_args,
                       organs=list(config.organs), view="axial", slices=3, block=32,
                       config=config_to_dict(config), epoch=0, step=0, best_score=0.0, args={}).save(ckpt)
    foreign = root / "foreign.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, foreign)
    return {"ckpt": ckpt, "foreign": foreign}


@pytest.mark.parametrize("build", [pytest.param(b, id=i, marks=_marks(i, fast)) for i, b, fast in CASES])
def test_bad_input_is_one_line_exit_2_and_no_output(build, fixtures, tmp_path):
    setting = build(tmp_path, fixtures)
    before = _snapshot(setting.out)
    proc = run_script(*setting.argv, timeout=300)
    lines = proc.stderr.strip().splitlines()
    report = f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}\nstdout:\n{proc.stdout[-1000:]}"
    assert proc.returncode == 2, report
    assert "Traceback" not in proc.stderr, report
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    assert str(setting.names) in lines[0], report
    assert _snapshot(setting.out) == before, report
