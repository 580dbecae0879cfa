"""demo.py's in-process commands: printed as typed, failures as the scripts' own."""

from __future__ import annotations

from pathlib import Path

import pytest

import demo
from utils.errors import InputError


def test_call_prints_the_command_and_returns_its_time(capsys: pytest.CaptureFixture[str]) -> None:
    seen = []

    def main(argv: list[str] | None) -> int:
        seen.append(argv)
        return 0

    t = demo._call(main, Path("/x/segment.py"), ["in dir", "out"])
    assert seen == [["in dir", "out"]] and t >= 0.0
    assert capsys.readouterr().out.splitlines()[0].endswith("/x/segment.py 'in dir' out")


def test_call_passes_bad_input_on_and_stops_on_a_failing_exit_code() -> None:
    def bad(argv: list[str] | None) -> int:
        raise InputError("a.nii", "truncated")

    with pytest.raises(InputError, match="truncated"):
        demo._call(bad, Path("evaluate.py"), [])
    with pytest.raises(SystemExit, match="evaluate.py failed with exit code 3"):
        demo._call(lambda argv: 3, Path("evaluate.py"), [])


def test_portable_settings_reach_this_process(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import os

    import torch  # noqa: F401 -- loaded, as in any test process after the first torch test

    # a copy of the environment: the real one (and later tests' subprocesses) stays as it was
    env_now = {k: v for k, v in os.environ.items() if k not in demo.PORTABLE_CPU_ENV}
    monkeypatch.setattr(os, "environ", env_now)
    demo._use_env_here({**demo.PORTABLE_CPU_ENV, "UNRELATED": "1"})
    assert all(env_now[k] == v for k, v in demo.PORTABLE_CPU_ENV.items())
    assert "UNRELATED" not in env_now
    # torch is loaded in the test process: the settings cannot take effect, and the demo says so
    assert "torch was loaded" in capsys.readouterr().out


def test_training_line_reads_the_summary_and_a_null_best_score() -> None:
    """The summary JSON writes a non-finite best score (no validation yet) as null: the report line
    must still be written (it raised TypeError on format)."""
    from utils.report import training_line

    done = {"steps": 640, "total_steps": 640, "stop": "done", "served": "ema", "best_score": 0.78714}
    assert training_line(done) == ("Trained 640 of 640 steps (stop: done); best checkpoint serves the ema "
                                   "weights (validation score 0.7871).")
    early = {**done, "steps": 3, "stop": "preempted", "best_score": None}
    line = training_line(early)
    assert line.startswith("**WARNING: training stopped early (preempted)")
    assert "validation score none yet" in line
