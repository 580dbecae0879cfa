"""Atomic, verified writes: a crash, a full disk or a bad input never leaves a half-written output.

Writers produce a temporary sibling file (``.<name>.<host>-<pid>.<random>.part<suffix>``), flush
and fsync it, optionally verify it (size, or a read-back of its header), then ``os.replace`` it
over the target, which is atomic on POSIX file systems. On any failure the temporary file is
removed and the previous target (if any) is left as it was.

Output files get the permissions an ordinary ``open()`` would give (``0666 & ~umask``, so 0644
under the usual 022), not mkstemp's private 0600: predictions and checkpoints are shared on
clusters.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from utils.errors import InputError

PART_MARK = ".part"
# A .part file of another host cannot be checked for a live writer: it is only removed this old.
FOREIGN_PART_AGE_S = 24 * 3600
_HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()``/``mkdir()`` would have (mkstemp/mkdtemp use 0600/0700)."""
    base = 0o777 if folder else 0o666
    with contextlib.suppress(OSError):
        os.chmod(path, base & ~current_umask())


def write_failure(target: str | os.PathLike, err: BaseException) -> InputError:
    """One-line InputError for a failed write (full disk, quota, read-only file system, ...)."""
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        text = str(err).strip().splitlines()
        reason = text[-1][:200] if text else type(err).__name__
    return InputError(target, f"cannot write output ({reason}); the previous file, if any, is unchanged")


def _is_write_error(err: BaseException) -> bool:
    # The body of an atomic write is one writer call. torch.save reports a full disk as RuntimeError
    # with varying texts ("iostream error", "enforce fail at inline_container.cc ... unexpected
    # pos", "failed writing file"), SimpleITK as RuntimeError, PIL and numpy as OSError. Other
    # exception types are bugs and keep their traceback.
    return isinstance(err, (OSError, RuntimeError))


def part_name(target: Path, suffix: str) -> str:
    """Prefix of the temporary file of ``target``: names the host and pid, so cleanup can tell a
    live writer's file from a killed run's."""
    return f".{target.name}.{_HOST}-{os.getpid()}."


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None,
                verify: Callable[[Path], None] | None = None, allow_empty: bool = False,
                stage: list[tuple[Path, Path]] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it is fsynced, verified and renamed onto it.

    The temporary name keeps ``target``'s suffixes (``.nii.gz``) so writers that choose a format
    by extension still work. On any exception the temporary file is removed and ``target`` is
    left untouched.

    Args:
        target: the final file.
        suffix: suffix of the temporary file (default: the target's).
        verify: called with the temporary path after the write; raises (InputError) when the file
            is not what was meant to be written.
        allow_empty: accept an empty file (otherwise taken for a write that a full disk cut short).
        stage: instead of renaming, append ``(temporary, target)`` here once the file is written,
            fsynced and verified; the caller renames (and, on failure, removes) it, so that several
            files can be renamed only when all of them are whole.

    Raises:
        InputError: the target's folder cannot be created or written, the disk is full, or the
            written file fails verification.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(target.parent, f"cannot create output folder ({err.strerror})") from None
    if suffix is None:
        suffix = "".join(target.suffixes) or ".tmp"
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=part_name(target, suffix), suffix=PART_MARK + suffix,
                                        dir=target.parent)
    except OSError as err:
        raise InputError(target.parent, f"output folder is not writable ({err.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        except InputError:
            raise
        except Exception as err:
            if _is_write_error(err):
                raise write_failure(target, err) from None
            raise
        if tmp.stat().st_size == 0 and not allow_empty:
            raise InputError(target, "cannot write output (the written file is empty: disk full?); "
                             "the previous file, if any, is unchanged")
        if verify is not None:
            verify(tmp)
        apply_umask(tmp)
        if stage is not None:
            stage.append((tmp, target))
            return
        try:
            os.replace(tmp, target)
        except OSError as err:
            raise write_failure(target, err) from None
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync_dir(folder: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically; the size is checked before the rename."""
    write_texts_atomic({target: text})


def write_texts_atomic(texts: dict[str | os.PathLike, str]) -> None:
    """Write several UTF-8 text files that belong together (a report's CSV and JSON).

    Every file is written, fsynced and size-checked before any is renamed into place, so a full disk
    (also one that only shows at fsync, as on NFS) or a file-size limit leaves all of the previous
    files as they were (before, a failed JSON left a new CSV beside the old JSON). Only a failing
    rename between two others could still split them; renames within a folder do not fail for space.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for target, text in texts.items():
            data = text.encode("utf-8")
            with atomic_path(target, verify=_size_check(target, len(data)), allow_empty=not data,
                             stage=staged) as tmp:
                tmp.write_bytes(data)
        while staged:
            tmp, target = staged[0]
            try:
                os.replace(tmp, target)
            except OSError as err:
                raise write_failure(target, err) from None
            staged.pop(0)
            _fsync_dir(target.parent)
    finally:
        for tmp, _ in staged:  # not renamed: an earlier file failed
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _size_check(target: str | os.PathLike, n: int) -> Callable[[Path], None]:
    def same_size(tmp: Path) -> None:
        if tmp.stat().st_size != n:
            raise InputError(target, f"cannot write output (short write: {tmp.stat().st_size} of {n} "
                             "bytes); the previous file, if any, is unchanged")
    return same_size


def json_dumps(obj: Any) -> str:
    """``obj`` as the indented JSON text every JSON file of UniMOS holds.

    Non-finite floats become ``null``: Python writes them as ``NaN``/``-Infinity``, which strict JSON
    readers (jq, JavaScript, most other languages) refuse (a summary with no validation score had
    ``"best_score": -Infinity``).
    """
    return json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``target`` atomically (the one JSON writer of UniMOS)."""
    write_text_atomic(target, json_dumps(obj))


# ----------------------------------------------------------------------------------------------
# Stale temporary files and writability


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed worker whose parent died too may stay a zombie (no init reaps it in a container).
    state = _proc_stat(pid, 0)
    return state is None or state not in ("Z", "X")


def _proc_stat(pid: int, index: int) -> str | None:
    """Field ``index`` of /proc/PID/stat after the command name (0: state, 19: start time), or None
    where it cannot be read (no /proc, the process gone, hidepid)."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[index]
    return None


def _proc_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid, it
    names one process, where a pid alone may have been reused since."""
    return _proc_stat(pid, 19)


def _lock_is_stale(holder: dict[str, Any]) -> bool:
    if holder.get("host") != _HOST:
        # another machine's process cannot be checked from here; only this very Slurm job, requeued
        # onto another node, may take it (two runs of one allocation on one node are checked below)
        job = holder.get("slurm_job")
        return bool(job) and job == os.environ.get("SLURM_JOB_ID")
    pid = holder.get("pid")
    if pid == os.getpid():
        return True
    if not isinstance(pid, int) or not _pid_alive(pid):
        return True
    start, now = holder.get("start"), _proc_start(pid)
    # the pid now belongs to another process; an unreadable /proc (hidepid) proves nothing
    return start is not None and now is not None and now != start


def acquire_run_lock(path: str | os.PathLike, what: str) -> Path:
    """Take the lock file ``path`` for this process, or refuse because a live run holds it.

    Two runs started in one output folder wrote over each other's checkpoints and history, both
    exiting 0. The lock names host, pid (with the process's start time, so a reused pid is not taken
    for the holder) and Slurm job. A lock left by a killed process on this machine, or by this Slurm
    job before its requeue, is taken over; one from another machine is not, as it cannot be checked.

    Returns:
        The lock path (give it to :func:`release_run_lock`).

    Raises:
        InputError: naming the lock file and its holder.
    """
    path = Path(path)
    me = {"host": _HOST, "pid": os.getpid(), "start": _proc_start(os.getpid()),
          "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = None
            if not isinstance(holder, dict):
                # being written by a run starting this very moment, or left half-written by one
                # killed then: the latter once it is a minute old
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime > 60:
                        path.unlink()
                        continue
                holder = {"host": "?", "pid": "?", "since": "just now"}
            if _lock_is_stale(holder):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise InputError(path, f"{what} is in use by another run (host {holder.get('host')}, pid "
                             f"{holder.get('pid')}, since {holder.get('since')}): wait for it to end, or "
                             "delete this file if that run is gone") from None
        except OSError as err:
            raise InputError(path, f"cannot create the run lock ({err.strerror})") from None
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me) + "\n")
        except OSError as err:  # a full disk: no empty lock left to block the next minute's runs
            with contextlib.suppress(OSError):
                path.unlink()
            raise write_failure(path, err) from None
        return path
    raise InputError(path, "cannot take the run lock (other runs keep starting here)")


def release_run_lock(path: str | os.PathLike) -> None:
    """Remove the lock file at ``path`` if this process (host, pid and start time) holds it."""
    path = Path(path)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        holder = json.loads(path.read_text())
        if (holder.get("host"), holder.get("pid"), holder.get("start")) == (
                _HOST, os.getpid(), _proc_start(os.getpid())):
            path.unlink()


def clean_stale_parts(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove temporary ``.part`` files and folders left by killed runs under ``folder``.

    A part whose name carries this host and a pid that is not running is stale; parts of other
    hosts (shared file systems) only after :data:`FOREIGN_PART_AGE_S`; parts without a pid (older
    versions) after the same age. Parts of live writers are never touched.

    Returns:
        The removed paths.
    """
    import re
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.part")
    removed: list[Path] = []
    now = time.time()
    if recursive:
        walker = list(os.walk(folder))
    else:
        try:
            names = [p.name for p in folder.iterdir()]
        except FileNotFoundError:  # removed meanwhile (another process's write test): nothing stale
            return removed
        walker = [(str(folder), [], names)]
    for root, dirs, files in walker:
        for name in [*files, *dirs]:
            if not name.startswith(".") or PART_MARK not in name:
                continue
            p = Path(root) / name
            m = pattern.match(name)
            try:
                age = now - p.lstat().st_mtime
            except OSError:
                continue
            if m and m["host"] == _HOST:
                stale = not _pid_alive(int(m["pid"]))
            else:
                stale = age > FOREIGN_PART_AGE_S
            if not stale:
                continue
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
    return removed


def check_distinct_outputs(jobs: Iterable[tuple[Path, Path]]) -> None:
    """Refuse two inputs that would be written to one output file.

    ``a.mhd`` and ``a.mha`` both become ``a.mha``, a DICOM series folder ``case1/`` and a file
    ``case1.nii.gz`` both become ``case1.nii.gz``: the second output silently replaced the first,
    and the survivor sat beside an input it does not belong to. Checked before any work.

    Args:
        jobs: ``(input, output)`` pairs.

    Raises:
        InputError: naming the second input, the output and the first input.
    """
    seen: dict[Path, Path] = {}
    for src, dst in jobs:
        key = Path(os.path.abspath(dst))
        if key in seen:
            raise InputError(src, f"would be written to {dst}, as {seen[key]} is: rename one of them")
        seen[key] = src


def check_writable(folder: str | os.PathLike, what: str = "output folder", keep: bool = False) -> Path:
    """Really create (and remove) a file in ``folder``, creating the folder if needed.

    Permission bits say little (root passes ``os.access`` on read-only mounts; /proc-like paths
    accept a mkdir check), so the only honest test is a write. Folders created for the test are
    removed again unless ``keep`` (a run that then fails on bad input leaves nothing behind).

    Raises:
        InputError: naming the folder, when it cannot be created or written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, f"is a file, not a folder ({what})")
    created: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(folder, f"cannot create {what} ({err.strerror})") from None
        try:
            fd, name = tempfile.mkstemp(prefix=f".unimos-write-test.{_HOST}-{os.getpid()}.", dir=folder)
            try:
                os.write(fd, b"x")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError as err:
            raise InputError(folder, f"{what} is not writable ({err.strerror})") from None
    finally:
        if not keep:
            for d in created:  # deepest first
                with contextlib.suppress(OSError):
                    d.rmdir()
    return folder


# ----------------------------------------------------------------------------------------------
# Content stamps: "is this output up to date?" by identity, not modification time alone


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Size and mtime (ns) of a file, or of a folder's (DICOM series') files taken together."""
    p = Path(path)
    if p.is_dir():
        stats = [f.stat() for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
        return {"size": sum(s.st_size for s in stats), "files": len(stats),
                "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def stamp_path(output: str | os.PathLike) -> Path:
    """The hidden sidecar recording that ``output`` was written completely and verified."""
    p = Path(output)
    return p.with_name(f".{p.name}.stamp.json")


def write_stamp(output: str | os.PathLike, source: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Record, after a verified write, what ``output`` was made from and its own size and hash."""
    out = Path(output)
    write_json_atomic(stamp_path(out), {
        "source": {"path": str(Path(source).resolve()), **file_identity(source)},
        "output": {**file_identity(out), "sha256": sha256_file(out)},
        "settings": settings,
    })


def stamp_matches(output: str | os.PathLike, source: str | os.PathLike, settings: dict[str, Any]) -> bool:
    """True when ``output`` is exactly what a verified write made from ``source`` with ``settings``.

    An output without a stamp (written by an older version, or whose write was killed), with a
    changed size/mtime/hash, a changed source or other settings is not up to date.
    """
    out = Path(output)
    try:
        stamp = json.loads(stamp_path(out).read_text())
        if not out.is_file() or stamp.get("settings") != json.loads(json.dumps(settings)):
            return False
        src = {"path": str(Path(source).resolve()), **file_identity(source)}
        if stamp.get("source") != src:
            return False
        recorded = stamp.get("output", {})
        now = file_identity(out)
        if recorded.get("size") != now["size"] or recorded.get("mtime_ns") != now["mtime_ns"]:
            return False
        return recorded.get("sha256") == sha256_file(out)
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def is_disk_full(err: BaseException) -> bool:
    """True for the errno values of a full disk or quota."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
