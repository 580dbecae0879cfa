"""Run logging and run records.

Training logs through the ``unimos`` logger (``logging.getLogger("unimos")``). :class:`RunLog`
gives it rank-aware handlers: rank 0 logs INFO and above to stdout, the other ranks WARNING and
above only; rank 0 also writes every line to ``OUT/train.log`` once the output folder exists
(lines from before are kept and written then). :func:`write_run_record` writes
``OUT/args_{view}.json``: all options, the git commit and the versions of the main packages.
"""

from __future__ import annotations

import logging
import logging.handlers
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from utils.fileio import write_json_atomic

LOGGER = "unimos"
REPO = Path(__file__).resolve().parent.parent


class _Stdout(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stdout`` is when a record is emitted (pytest swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stdout)
        super().emit(record)


class RunLog:
    """The ``unimos`` logger's handlers for one run; :meth:`close` removes them again.

    Args:
        rank: this process's rank (0 logs INFO, the others WARNING and above).
    """

    def __init__(self, rank: int = 0) -> None:
        self.logger = logging.getLogger(LOGGER)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        self.rank = rank
        console = _Stdout()
        console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
        self.handlers: list[logging.Handler] = [console]
        # Rank 0 keeps the lines until the output folder exists (a failed start writes nothing).
        self.pending = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)
        if rank == 0:
            self.handlers.append(self.pending)
        for h in self.handlers:
            self.logger.addHandler(h)

    def open_file(self, path: Path) -> None:
        """Append this and the earlier lines to ``path`` (rank 0; its folder must exist)."""
        if self.rank != 0:
            return
        fh = logging.FileHandler(path, mode="a", encoding="utf-8")
        fh.setLevel(logging.INFO)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.pending.setTarget(fh)
        self.pending.flush()
        self.logger.removeHandler(self.pending)
        self.handlers.remove(self.pending)
        self.handlers.append(fh)
        self.logger.addHandler(fh)

    def close(self) -> None:
        for h in self.handlers:
            self.logger.removeHandler(h)
            h.close()
        self.handlers = []


def git_commit(repo: Path = REPO) -> str | None:
    """``git describe --always --dirty`` of the code (None outside a git checkout)."""
    try:
        proc = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=40"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def package_versions() -> dict[str, str | None]:
    """Versions of python, torch, numpy and SimpleITK (None: not importable)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "numpy", "SimpleITK"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", None) or module.Version_VersionString())
        except Exception:  # noqa: BLE001 -- a record, not a requirement
            versions[name] = None
    return versions


def write_run_record(path: Path, options: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write ``{"options", "git_commit", "versions", "command", ...extra}`` as JSON to ``path``."""
    record = {"options": options, "git_commit": git_commit(), "versions": package_versions(),
              "command": list(sys.argv), **(extra or {})}
    write_json_atomic(path, record)
