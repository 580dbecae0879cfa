"""One exception type for bad input, and the CLI wrapper that turns it into one line and exit code 2.

Every script calls its ``main`` through :func:`run_cli`, so a missing file, a corrupt volume or a
foreign checkpoint ends with ``error: <file>: <problem>`` on stderr instead of a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import NoReturn

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input: a file or folder that is missing, unreadable or inconsistent.

    Args:
        path: the offending file or folder (may be None for pure argument errors).
        problem: one sentence saying what is wrong.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str | None = None) -> None:
        if problem is None:
            # Re-raised by torch's DataLoader from a worker, which calls ``type(err)(message)``
            # with its formatted traceback: keep only the original "path: problem" line.
            text = str(path)
            found = [ln.split("InputError: ", 1)[1] for ln in text.splitlines() if "InputError: " in ln]
            path, problem = None, (found[-1] if found else (text.strip().splitlines() or [""])[-1])
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):
        # The default pickling re-calls __init__ with ``self.args`` (one formatted string), which
        # fails for two positional arguments: an InputError raised in a process-pool worker then
        # surfaced as BrokenProcessPool with a traceback instead of the one-line message.
        return (type(self), (self.path, self.problem))


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an :class:`InputError` raised without a file (by code that only sees arrays and
    geometry) the file being worked on."""
    try:
        yield
    except InputError as err:
        if err.path is not None:
            raise
        raise InputError(path, err.problem) from None


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (plus a pointer to --help), exit code 2.

    argparse's default prints the whole usage block before the message; on a cluster log that
    buries the one line that matters.
    """

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring layout and appends ``(default: X)`` once.

    A help text that already states its default (``default ...`` or ``default: ...``) is left
    alone, so no flag shows its default twice; flags without a meaningful default (None, False,
    required) show none.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or re.search(r"\bdefault\b", text, re.IGNORECASE):
            return text
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return text
        if action.option_strings and action.nargs != 0:
            return text + " (default: %(default)s)"
        return text


PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_stopped(err: BaseException) -> bool:
    """Whether ``err`` is a collective (barrier, all-reduce) failing because another process of a
    torchrun job has gone: torch's distributed error types, or gloo's closed connection."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        world = 1
    if world <= 1:
        return False
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"DistError", "DistBackendError", "DistNetworkError"}) or any(
        s in str(err) for s in PEER_GONE)


def _stdout_closed() -> bool:
    """Whether our stdout is a pipe whose reader has gone (poll reports an error on its write end;
    a zero-length write would not)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run a script's ``main`` and exit; bad input becomes one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except MemoryError:
        print("error: out of memory (a volume or grid too large for this machine; check the voxel "
              "spacing in its header and the grid flags)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except RuntimeError as err:
        if peer_stopped(err):
            # under torchrun a rank that finds bad input exits with its one line; the others then
            # fail in their next collective: one line each, not a traceback that hides the cause
            # the collective's own first line too: where the failing rank's error is itself a
            # distributed one (an NCCL fault), no other line names the cause
            cause = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            print(f"error: rank {os.environ.get('RANK', '?')}: another rank stopped (see its error line); "
                  f"stopping too ({cause})", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        if "Failed to allocate memory" not in str(err):  # SimpleITK's MemoryError
            raise
        print("error: out of memory (SimpleITK could not allocate an image; check the voxel spacing in "
              "the header and the grid flags)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # another pipe (a subprocess, a worker): not the reader of our output going away
        # whoever read our output went away (``| head``): stop as other command-line tools do, without
        # a traceback; stdout goes to /dev/null so that the interpreter's final flush cannot fail too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print("error: <stdout>: the output pipe was closed; stopped (every file written so far is "
              "complete, a rerun continues)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except BrokenProcessPool:
        # a pool worker (resampling, cache building, phantoms) was killed or ran out of memory: what
        # it was writing is a temporary file that the next run cleans up
        print("error: a worker process died (killed or out of memory); run the command again",
              file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(int(code or 0))
