"""Run logging (rank-aware handlers, train.log with the lines from before it existed) and run records."""

from __future__ import annotations

import json
import logging

from engine.logs import LOGGER, RunLog, package_versions, write_run_record


def test_rank_0_logs_info_to_stdout_and_file(tmp_path, capsys):
    run_log = RunLog(rank=0)
    try:
        log = logging.getLogger(LOGGER)
        log.info("before the folder")
        run_log.open_file(tmp_path / "train.log")
        log.info("after")
        log.debug("not shown")
        ours = list(run_log.handlers)
    finally:
        run_log.close()
    assert capsys.readouterr().out.splitlines() == ["before the folder", "after"]
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [ln.split(" INFO ")[1] for ln in lines] == ["before the folder", "after"]
    assert not set(ours) & set(logging.getLogger(LOGGER).handlers)  # closed: the next run starts clean


def test_other_ranks_log_warnings_only_and_write_no_file(tmp_path, capsys):
    run_log = RunLog(rank=2)
    try:
        log = logging.getLogger(LOGGER)
        log.info("epoch line")
        log.warning("disk almost full")
        run_log.open_file(tmp_path / "train.log")
    finally:
        run_log.close()
    assert capsys.readouterr().out.splitlines() == ["[rank 2] disk almost full"]
    assert not (tmp_path / "train.log").exists()


def test_run_record(tmp_path):
    write_run_record(tmp_path / "args_axial.json", {"lr": 0.1, "inplane": [32, 32]}, {"world": 2})
    record = json.loads((tmp_path / "args_axial.json").read_text())
    assert record["options"] == {"lr": 0.1, "inplane": [32, 32]} and record["world"] == 2
    assert set(record) >= {"git_commit", "versions", "command"}
    assert all(package_versions()[k] for k in ("python", "torch", "numpy", "SimpleITK"))
