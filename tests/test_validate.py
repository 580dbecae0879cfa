"""Table-driven bad flags and bad config values: every flag of every script, every config key.

Each bad value ends in one line naming the flag (or the config file and key) and exit code 2, before
any data is touched. Flags are checked in-process (argparse + utils.validate); a few subprocess runs
check the whole path (one line on stderr, no usage block, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest

from tests.conftest import run_script
from utils.errors import InputError
from utils.validate import (
    DEMO_RANGES,
    FINAL_RANGES,
    RESAMPLE_RANGES,
    SEGMENT_RANGES,
    SYNTH_RANGES,
    Range,
    preflight_final,
    validate_demo_args,
    validate_final_args,
    validate_resample_args,
    validate_segment_args,
    validate_synth_args,
)

DEFAULT_WORD = re.compile(r"(?<![/.])\bdefault\b(?![./])", re.IGNORECASE)  # not configs/default.yaml
SCRIPTS = ("Final", "resample", "segment", "evaluate", "synth", "demo")


def _base(script: str, tmp: Path) -> list[str]:
    return {
        "Final": ["--data", str(tmp), "--out", str(tmp / "out")],
        "resample": ["-p1", str(tmp / "raw"), "-p2", str(tmp / "out")],
        "segment": [str(tmp / "ct.nii.gz"), str(tmp / "seg.nii.gz"), "--network-path", str(tmp / "c.pth")],
        "evaluate": ["--pred", str(tmp / "p"), "--gt", str(tmp / "g"), "--out", str(tmp / "r.csv")],
        "synth": ["--out", str(tmp / "phantoms")],
        "demo": ["--out", str(tmp / "demo")],
    }[script]


VALIDATORS = {"Final": validate_final_args, "resample": validate_resample_args,
              "segment": validate_segment_args, "synth": validate_synth_args, "demo": validate_demo_args}
RANGES = {"Final": FINAL_RANGES, "resample": RESAMPLE_RANGES, "segment": SEGMENT_RANGES,
          "synth": SYNTH_RANGES, "demo": DEMO_RANGES}
# Numeric flags with no range of their own, and why: any finite LOW < HIGH is a valid window.
UNRANGED = {("Final", "hu_window")}


def _parser(script: str) -> argparse.ArgumentParser:
    return importlib.import_module(script).build_parser()


def _options(script: str) -> list[argparse.Action]:
    return [a for a in _parser(script)._actions if a.option_strings and a.dest != "help"]


def _out_of_range(rng: Range) -> float:
    if rng.low is not None:
        return rng.low if rng.low_open else rng.low - 1
    return rng.high if rng.high_open else rng.high + 1  # type: ignore[operator]


def _flag_cases() -> list:
    cases = []
    for script in SCRIPTS:
        for action in _options(script):
            longs = [o for o in action.option_strings if o.startswith("--")]
            flag = longs[0] if longs else action.option_strings[0]
            n = action.nargs if isinstance(action.nargs, int) else 1
            if action.type in (int, float):
                cases.append(pytest.param(script, [flag, *["abc"] * n], "parse", flag,
                                          id=f"{script}{flag}=abc"))
            if action.choices:
                cases.append(pytest.param(script, [flag, "bogus"], "parse", flag, id=f"{script}{flag}=bogus"))
            rng = RANGES.get(script, {}).get(action.dest)
            if rng is not None:
                bad = _out_of_range(rng)
                value = str(int(bad)) if action.type is int else repr(float(bad))
                cases.append(pytest.param(script, [flag, *[value] * n], "validate", action.dest,
                                          id=f"{script}{flag}={value}"))
            if action.type is float:
                cases.append(pytest.param(script, [flag, *["nan"] * n], "validate", action.dest,
                                          id=f"{script}{flag}=nan"))
    return cases


SPECIAL = [
    ("Final", ["--hu-window", "200", "-200"], "--hu-window"),
    # the schedule's warm-up never ends; the semi-supervised phase would start after the last step
    ("Final", ["--epochs", "2", "--steps-per-epoch", "3", "--warmup-steps", "6"], "--warmup-steps"),
    ("Final", ["--epochs", "2", "--semi", "--semi-warmup", "2"], "--semi-warmup"),
    ("Final", ["--blocks", "1,1,1,1,1"], "--blocks"),
    ("Final", ["--blocks", "x"], "--blocks"),
    ("Final", ["--blocks", "0"], "--blocks"),
    ("Final", ["-s", "4"], "--slices"),
    ("Final", ["--threshold", "2"], "--threshold"),
    ("Final", ["--threshold", "high"], "--threshold"),
    ("Final", ["--device", "gpu"], "--device"),
    ("Final", ["--datasets", "LiTS,LiTS"], "--datasets"),
    ("Final", ["--datasets", "LiTS,,KiTS"], "--datasets"),
    ("Final", ["--class-weights", "0.2", "0"], "--class-weights"),
    ("Final", ["--unsup-class-weights", "1", "0"], "--unsup-class-weights"),
    ("Final", ["--semi-weights", "0", "0", "0", "0"], "--semi-weights"),
    ("Final", ["--blocksize", "40"], "--blocksize"),
    ("Final", ["--resume", "/nonexistent/ckpt.pth.tar"], "/nonexistent/ckpt.pth.tar"),
    ("segment", ["--tile", "20"], "--tile"),
    ("segment", ["--tile", "16"], "--tile"),  # the 1/16 scale would be one pixel
    ("segment", ["--device", "tpu"], "--device"),
    ("segment", ["--evaluating"], "--evaluating"),
    ("synth", ["--datasets", "LiTS,LiTS"], "--datasets"),
    ("demo", ["--block", "256", "--size", "128"], "--block"),
    ("demo", ["--blocks", "1,2"], "--blocks"),
    ("demo", ["--unlabeled", "0"], "--semi"),
    ("demo", ["--device", "gpu"], "--device"),
]


@pytest.mark.parametrize(("script", "extra", "stage", "names"), _flag_cases())
def test_every_numeric_and_choice_flag_rejects_bad_values(script, extra, stage, names, tmp_path, capsys):
    parser = _parser(script)
    argv = _base(script, tmp_path) + extra
    if stage == "parse":
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert names in err[0] and "--help" in err[0], err
        return
    args = parser.parse_args(argv)
    if script == "resample" and args.size is not None:
        args.s1, args.s2 = args.size
    with pytest.raises(InputError) as exc:
        VALIDATORS[script](args)
    flag = "--" + names.replace("_", "-")
    assert flag in str(exc.value) or names in str(exc.value), str(exc.value)


@pytest.mark.parametrize(("script", "extra", "names"), SPECIAL, ids=[" ".join(s[1]) for s in SPECIAL])
def test_special_flag_values(script, extra, names, tmp_path):
    args = _parser(script).parse_args(_base(script, tmp_path) + extra)
    with pytest.raises(InputError) as exc:
        VALIDATORS[script](args)
    assert names in str(exc.value)


def test_every_numeric_flag_has_a_range():
    """A new numeric flag must get a range (or be listed as deliberately unranged)."""
    for script, ranges in RANGES.items():
        for action in _options(script):
            if action.type in (int, float):
                assert action.dest in ranges or (script, action.dest) in UNRANGED, (script, action.dest)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help_and_shows_its_default_once(script):
    parser = _parser(script)
    formatter = parser._get_formatter()
    for action in _options(script):
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), (script, action.option_strings)
        assert len(DEFAULT_WORD.findall(text)) <= 1, (script, text)
        if action.default not in (None, False) and not action.required and action.nargs != 0:
            assert DEFAULT_WORD.search(text), (script, action.option_strings, text)


@pytest.mark.parametrize(("script", "old", "new"), [
    ("segment", "--network_path", "--network-path"), ("segment", "--label_filename", "--label-filename"),
    ("resample", "-s1", "--size1"), ("resample", "-p1", "--raw"), ("resample", "-p2", "--output"),
])
def test_seed_spellings_stay_aliases(script, old, new):
    parser = _parser(script)
    flags = {s for a in parser._actions for s in a.option_strings}
    assert {old, new} <= flags


def test_valid_defaults_pass_and_blocks_are_normalised(tmp_path):
    args = _parser("Final").parse_args(_base("Final", tmp_path) + ["--blocks", "2", "--amp"])
    validate_final_args(args)
    assert args.blocks == "2,2,2,2" and args.amp == "auto"
    for script in ("resample", "segment", "synth", "demo"):
        VALIDATORS[script](_parser(script).parse_args(_base(script, tmp_path)))


def test_preflight_paths(tmp_path):
    (tmp_path / "data").mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    parse = _parser("Final").parse_args
    cases = [(["--data", str(a_file)], "is not a folder"),
             (["--data", str(tmp_path / "nope")], "does not exist"),
             (["--data", str(tmp_path / "data"), "--out", "/proc/unimos_x"], "/proc/unimos_x"),
             (["--data", str(tmp_path / "data"), "--out", str(a_file / "o")], str(a_file)),
             (["--data", str(tmp_path / "data"), "--datasets", "Nope"], "unknown datasets")]
    for argv, message in cases:
        with pytest.raises(InputError) as exc:
            preflight_final(parse(["--out", str(tmp_path / "out"), *argv]))
        assert message in str(exc.value)
    assert not (tmp_path / "out").exists()  # the writability test leaves nothing behind


@pytest.mark.parametrize(("script", "argv", "names"), [
    ("Final.py", ["--lr", "-1"], "--lr"),
    ("Final.py", ["--val-every", "0"], "--val-every"),
    ("Final.py", ["--amp", "fp8"], "--amp"),
    ("resample.py", ["-p1", "x"], "-p2"),
    ("segment.py", ["a", "b"], "--network-path"),
    ("evaluate.py", ["--pred", "p", "--gt", "g", "--out", "r.txt"], "r.txt"),
    ("synth.py", ["--out", "x", "--scale", "0"], "--scale"),
])
def test_scripts_answer_bad_flags_in_one_line(script, argv, names, tmp_path):
    proc = run_script(script, *argv, cwd=Path(__file__).resolve().parent.parent)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and names in lines[0], proc.stderr
    assert "usage:" not in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# Config keys

GOOD = "organs: [liver, kidney]\ndatasets:\n  A:\n    labels: {1: liver, 2: kidney}\n"
CONFIG_CASES = [
    ("hu_window: [abc, 200]\n", "hu_window"),
    ("hu_window: [200, -200]\n", "hu_window"),
    ("hu_window: [.nan, 200]\n", "hu_window"),
    ("hu_window: 5\n", "hu_window"),
    ("inplane_size: [0, 256]\n", "inplane_size"),
    ("inplane_size: [256.5, 256]\n", "inplane_size"),
    ("inplane_size: [text, 256]\n", "inplane_size"),
    ("class_weights: [-1, 1]\n", "class_weights"),
    ("class_weights: [0.2, 0]\n", "class_weights"),
    ("class_weights: [0.2, high]\n", "class_weights"),
    ("components: {kidney: 0}\n", "components"),
    ("components: {kidney: two}\n", "components"),
    ("components: {kidney: 1.5}\n", "components"),
    ("components: {lung: 2}\n", "components"),
    ("unknown_key: 1\n", "unknown keys"),
    ("organs: [liver]\n", "given twice"),
]
DATASET_CASES = [
    ("    labels: {1.5: liver}\n", "not an integer"),
    ("    labels: {true: liver}\n", "not an integer"),
    ("    labels: {0: liver}\n", "1..255"),
    ("    labels: {256: liver}\n", "1..255"),
    ("    labels: {1: lung}\n", "unknown organ"),
    ("    labels: {1: [liver]}\n", "organ name"),
    ("    labels: {1: liver}\n    val_fraction: abc\n", "val_fraction"),
    ("    labels: {1: liver}\n    val_fraction: 1.5\n", "val_fraction"),
    ("    labels: {1: liver}\n    layout: weird\n", "layout"),
    ("    labels: {1: liver}\n    optional: maybe\n", "optional"),
    ("    labels: {1: liver}\n    image_token: x\n", "image_token"),
    ("    labels: {1: liver}\n    path: 5\n", "path"),
    ("    labels: {1: liver}\n    colour: red\n", "unknown keys"),
]


@pytest.mark.parametrize(("extra", "message"), CONFIG_CASES, ids=[c[0].strip() for c in CONFIG_CASES])
def test_bad_config_values(extra, message, tmp_path):
    from data.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(GOOD + extra)
    with pytest.raises(InputError) as exc:
        load_config(path)
    assert exc.value.path == str(path) and message in exc.value.problem, exc.value.problem


@pytest.mark.parametrize(("body", "message"), DATASET_CASES, ids=[c[0].strip() for c in DATASET_CASES])
def test_bad_dataset_values(body, message, tmp_path):
    from data.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("organs: [liver, kidney]\ndatasets:\n  A:\n" + body)
    with pytest.raises(InputError) as exc:
        load_config(path)
    assert message in exc.value.problem, exc.value.problem


def test_duplicate_dataset_key_and_non_utf8_config(tmp_path):
    from data.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(GOOD + "  A:\n    labels: {1: kidney}\n")
    with pytest.raises(InputError, match="'A' is given twice"):
        load_config(path)
    path.write_bytes(b"organs: [\xe9]\n")
    with pytest.raises(InputError, match="not UTF-8"):
        load_config(path)
    with pytest.raises(InputError, match="not a file"):
        load_config(tmp_path)


def test_default_config_still_loads():
    from data.config import load_config

    assert load_config().components == {"kidney": 2}


def test_preflight_refuses_a_foreign_resume_checkpoint_before_any_data(tmp_path):
    import torch

    (tmp_path / "data").mkdir()
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": {}}, foreign)
    args = _parser("Final").parse_args(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                                        "--resume", str(foreign)])
    with pytest.raises(InputError, match="not a UniMOS checkpoint"):
        preflight_final(args)
    assert not (tmp_path / "data" / ".unimos_cache").exists() and not (tmp_path / "out").exists()


def test_preflight_refuses_a_block_larger_than_the_grid(tmp_path):
    from utils.validate import preflight_final

    parser = _parser("Final")
    args = parser.parse_args(_base("Final", tmp_path) + ["--blocksize", "64", "--inplane", "32", "32"])
    with pytest.raises(InputError, match=r"--blocksize: 64 is larger than the in-plane grid 32 x 32"):
        preflight_final(args)
    config = tmp_path / "tiny.yaml"  # a config grid the --inplane flag would refuse
    config.write_text("organs: [liver]\ndatasets:\n  A:\n    labels: {1: liver}\ninplane_size: [1, 300]\n")
    args = parser.parse_args(_base("Final", tmp_path) + ["--config", str(config), "--blocksize", "32"])
    with pytest.raises(InputError, match=r"tiny.yaml: in-plane grid 1 x 300 is below 16"):
        preflight_final(args)
    assert not (tmp_path / "out").exists()


def test_device_mps_without_mps_is_one_line():
    import torch

    from engine.runtime import resolve_device

    if torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    with pytest.raises(InputError, match="--device mps was asked for"):
        resolve_device("mps")
