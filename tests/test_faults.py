"""Fault injection: errors from worker processes, full disks, killed runs, corrupt DICOM series,
degenerate headers, file modes and stale temporary files.

Every script answers a fault with one line ``error: <file>: <problem>``, exit code 2, no traceback,
and leaves the previous good output intact. A full disk is a small tmpfs where mounting is
permitted (root in a container), else a file-size limit (RLIMIT_FSIZE, which cuts writes short the
same way). The default run keeps one representative case per kind; ``-m slow`` runs the rest.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data.volume import Geometry, Volume, read_volume, write_volume
from tests.conftest import REPO, TINY, run_script, script_env, train_argv
from tests.helpers import phantom_pair, write_dicom_series, write_seed_dataset
from tests.test_bad_input import BREAKERS, _evaluate_pair, _seed_data, _snapshot, _valid_bytes
from utils.errors import InputError
from utils.fileio import clean_stale_parts, stamp_path, write_json_atomic

# ----------------------------------------------------------------------------------------------
# Helpers


def _one_line(proc: subprocess.CompletedProcess, names: str | Path | None = None) -> str:
    report = f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}\nstdout:\n{proc.stdout[-1000:]}"
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, report
    assert "Traceback" not in proc.stderr, report
    assert len(lines) == 1 and lines[0].startswith("error: "), report
    if names is not None:
        assert str(names) in lines[0], report
    return lines[0]


def _parts(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".part" in p.name]


def _no_workers_flag(argv: list[str]) -> list[str]:
    """TINY without ``--workers 0``: the default loader/cache workers (2) run."""
    out = list(argv)
    i = out.index("--workers")
    del out[i:i + 2]
    return out


def _final(tmp: Path, *extra: str, workers_default: bool = False) -> list[str]:
    tiny = _no_workers_flag(TINY) if workers_default else TINY
    return ["Final.py", "--data", str(tmp / "data"), "--datasets", "MSDSpleen", "--out", str(tmp / "out"),
            "--cache", str(tmp / "cache"), "--no-semi", *tiny, *extra]


@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int):
    """Mount a tmpfs of ``size_kb`` at ``folder``; yields False (nothing mounted) where not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                        capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def run_limited(argv: list[str], limit_bytes: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a script with every file write capped at ``limit_bytes`` (a full disk for the writer:
    writes past the cap fail or come up short, like ENOSPC)."""
    code = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); "
            "sys.argv = sys.argv[1:]; sys.path.insert(0, '.'); "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def _volume(shape=(8, 32, 32), spacing=(1.5, 1.5, 3.0), direction=None, seed=0, label=False) -> Volume:
    image, lab = phantom_pair(shape, seed=seed)
    geo = Geometry(shape, spacing, (0.0, 0.0, 0.0), *(() if direction is None else (direction,)))
    return Volume(lab if label else image, geo)


def _raw_tree(root: Path, n: int = 2) -> Path:
    raw = root / "raw" / "MSDSpleen"
    for i in range(n):
        write_volume(_volume(seed=i), raw / "labeled" / f"case_{i:03d}.nii.gz")
        write_volume(_volume(seed=i, label=True), raw / "label" / f"case_{i:03d}.nii.gz")
    return root / "raw"


# ----------------------------------------------------------------------------------------------
# 1. Errors cross process boundaries intact


def test_input_error_pickles_and_survives_the_dataloader_reraise():
    err = pickle.loads(pickle.dumps(InputError("/x/a.nii.gz", "is 4D")))
    assert (type(err), err.path, err.problem) == (InputError, "/x/a.nii.gz", "is 4D")
    assert str(err) == "/x/a.nii.gz: is 4D"
    # torch's DataLoader re-raises a worker's exception as type(err)(formatted traceback)
    wrapped = InputError("Caught InputError in DataLoader worker process 0.\nOriginal Traceback (most "
                         "recent call last):\n  File \"x.py\", line 1\n"
                         "utils.errors.InputError: /x/a.nii.gz: is 4D\n")
    assert str(wrapped) == "/x/a.nii.gz: is 4D"


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError(
    "Exception thrown in SimpleITK Image_Allocate: Failed to allocate memory for image.")])
def test_out_of_memory_is_one_line_exit_2(exc, capsys):
    from utils.errors import run_cli

    def main(argv):
        raise exc

    with pytest.raises(SystemExit) as code:
        run_cli(main, [])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and err[0].startswith("error: out of memory"), err


def test_a_rank_whose_peer_stopped_says_so_in_one_line(monkeypatch, capsys):
    """Under torchrun, rank 0 stops on bad input with its one line; rank 1's next barrier fails with
    gloo's "Connection closed by peer" (a traceback, exit 1, before): one line and exit 2 too."""
    from utils.errors import run_cli

    class DistBackendError(RuntimeError):  # torch.distributed's type, by name
        pass

    for exc in (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:4242"),
                DistBackendError("NCCL communicator was aborted")):
        def main(argv, exc=exc):
            raise exc

        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        with pytest.raises(SystemExit) as code:
            run_cli(main, [])
        err = capsys.readouterr().err.strip().splitlines()
        first = str(exc).splitlines()[0]
        assert code.value.code == 2 and err == [
            f"error: rank 1: another rank stopped (see its error line); stopping too ({first})"], err
        monkeypatch.setenv("WORLD_SIZE", "1")  # a single process: a real error, not a peer's
        with pytest.raises(RuntimeError):
            run_cli(main, [])


def test_a_broken_pipe_that_is_not_stdout_keeps_its_traceback():
    """Only the reader of our stdout going away is the "| head" case; a broken pipe to a subprocess
    or a worker is a fault of its own and must not be reported as that."""
    from utils.errors import run_cli

    def main(argv):
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(BrokenPipeError):
        run_cli(main, [])


def test_other_runtime_errors_are_not_taken_for_memory(capsys):
    from utils.errors import run_cli

    def main(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(main, [])


def test_resample_worker_error_is_one_line(tmp_path):
    raw = _raw_tree(tmp_path)
    bad = BREAKERS["4d"](raw / "MSDSpleen" / "labeled" / "case_009.nii.gz")
    proc = run_script("resample.py", "-p1", raw, "-p2", tmp_path / "out", "--size", "16", "16",
                      "--workers", "2")
    _one_line(proc, bad)
    assert not (tmp_path / "out").exists() or not _parts(tmp_path / "out")


_POOL_SLOW = ("nan", "truncated", "corrupt_gzip", "zero_dim_nifti", "other_shape")


@pytest.mark.parametrize("kind", ["4d", *[pytest.param(k, marks=pytest.mark.slow) for k in _POOL_SLOW]])
def test_final_default_workers_error_is_one_line(kind, tmp_path):
    """Default --workers (2): the cache is built in a process pool; its InputError reaches the user."""
    from tests.test_bad_input import other_shape

    ds = _seed_data(tmp_path / "data")
    # The second case is broken, so the pool has good work beside the bad one.
    target = ds / ("label" if kind == "other_shape" else "validation") / "case_001.nii.gz"
    target.unlink()
    breaker = other_shape if kind == "other_shape" else BREAKERS[kind]
    target = breaker(target, label=kind == "other_shape")
    before = _snapshot(tmp_path / "out")
    _one_line(run_script(*_final(tmp_path, workers_default=True)), target)
    assert _snapshot(tmp_path / "out") == before


# ----------------------------------------------------------------------------------------------
# 2. Full disk and verified writes


def test_full_disk_resample_keeps_the_previous_output(tmp_path):
    """A short NIfTI write (ITK reports it on stderr only) is caught by the read-back, exit 2, and the
    output of the previous run stays as it was; the rerun redoes it (no stamp is trusted)."""
    raw = _raw_tree(tmp_path, n=1)
    out = tmp_path / "out"
    assert run_script("resample.py", "-p1", raw, "-p2", out, "--size", "64", "64").returncode == 0
    before = _snapshot(out)
    proc = run_limited(["resample.py", "-p1", raw, "-p2", out, "--size", "64", "64", "--overwrite"], 9000)
    _one_line(proc, out)
    # the label output fits under the limit and is rewritten (same content, new stamp)
    assert _snapshot(out).keys() == before.keys()
    assert {k: v for k, v in _snapshot(out).items() if "stamp" not in k} == \
        {k: v for k, v in before.items() if "stamp" not in k}
    assert not _parts(out)


def test_full_disk_on_tmpfs_resample(tmp_path):
    """The same on a really full disk (a 1 MiB tmpfs filled up), where mounting is permitted."""
    raw = _raw_tree(tmp_path, n=1)
    mnt = tmp_path / "disk"
    with small_disk(mnt, 1024) as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not permitted here")
        out = mnt / "out"
        assert run_script("resample.py", "-p1", raw, "-p2", out, "--size", "64", "64").returncode == 0
        before = _snapshot(out)
        with contextlib.suppress(OSError), open(mnt / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 65536)
        proc = run_script("resample.py", "-p1", raw, "-p2", out, "--size", "64", "64", "--overwrite")
        line = _one_line(proc, mnt)
        assert "No space left" in line or "not writable" in line or "verification" in line, line
        assert {k: v for k, v in _snapshot(out).items() if "stamp" not in k} == \
            {k: v for k, v in before.items() if "stamp" not in k}
        assert not _parts(out)


def test_full_disk_report_keeps_the_previous_report(tmp_path):
    pred, gt = _evaluate_pair(tmp_path)
    report = tmp_path / "out" / "r.csv"
    argv = ["evaluate.py", "--pred", pred, "--gt", gt, "--out", report]
    assert run_script(*argv).returncode == 0
    before = _snapshot(tmp_path / "out")
    _one_line(run_limited(argv, 200), tmp_path / "out")
    assert _snapshot(tmp_path / "out") == before


def test_full_disk_between_the_csv_and_the_json_keeps_both_previous_files(tmp_path):
    """The report's CSV fits under the limit, its JSON does not: neither may be replaced (a new CSV
    beside the previous JSON disagreed with it)."""
    pred, gt = _evaluate_pair(tmp_path)
    _valid_bytes(pred / "case_001.nii.gz", label=True)
    _valid_bytes(gt / "case_001.nii.gz", label=True)
    report = tmp_path / "out" / "r.csv"
    assert run_script("evaluate.py", "--pred", pred, "--gt", gt, "--out", report).returncode == 0
    one = ["evaluate.py", "--pred", pred / "case_000.nii.gz", "--gt", gt / "case_000.nii.gz"]
    probe = tmp_path / "probe" / "r.csv"
    assert run_script(*one, "--out", probe).returncode == 0
    csv_size, json_size = probe.stat().st_size, probe.with_suffix(".json").stat().st_size
    assert csv_size < json_size
    before = _snapshot(tmp_path / "out")
    _one_line(run_limited([*one, "--out", report], (csv_size + json_size) // 2), tmp_path / "out")
    assert _snapshot(tmp_path / "out") == before


@pytest.mark.slow
def test_full_disk_png_keeps_the_previous_overlay(tmp_path):
    pred, gt = _evaluate_pair(tmp_path)
    img = tmp_path / "img"
    img.mkdir()
    _valid_bytes(img / "case_000.nii.gz")
    argv = ["evaluate.py", "--pred", pred, "--gt", gt, "--out", tmp_path / "r.csv", "--png", tmp_path / "png",
            "--image", img]
    assert run_script(*argv).returncode == 0
    before = _snapshot(tmp_path / "png")
    # CSV/JSON are small and fit; the PNG does not
    png_size = next((tmp_path / "png").iterdir()).stat().st_size
    _one_line(run_limited(argv, max(png_size // 3, 3000)), tmp_path / "png")
    assert _snapshot(tmp_path / "png") == before


@pytest.mark.slow
def test_full_disk_checkpoint_keeps_the_previous_checkpoints(tmp_path):
    from engine.checkpoint import load_checkpoint

    _seed_data(tmp_path / "data")
    assert run_script(*_final(tmp_path)).returncode == 0
    last = tmp_path / "out" / "resu_last_axial.pth.tar"
    step = load_checkpoint(last)["step"]
    before = _snapshot(tmp_path / "out")
    proc = run_limited(_final(tmp_path, "--epochs", "4", "--resume"), last.stat().st_size // 2)
    _one_line(proc, tmp_path / "out")
    assert load_checkpoint(last)["step"] == step
    after = _snapshot(tmp_path / "out")
    assert {k: v for k, v in after.items() if k.endswith(".pth.tar")} == \
        {k: v for k, v in before.items() if k.endswith(".pth.tar")}
    assert not _parts(tmp_path / "out")


@pytest.mark.slow
def test_full_disk_cache_is_one_line_and_leaves_no_entry(tmp_path):
    _seed_data(tmp_path / "data")
    proc = run_limited(_final(tmp_path), 20000)
    _one_line(proc, tmp_path / "cache")
    entries = [p for p in (tmp_path / "cache").rglob("meta.json")]
    for meta in entries:  # whatever was published is complete
        assert (meta.parent / "image_axial.npy").stat().st_size > 0
    assert not _parts(tmp_path / "cache")


def test_write_volume_refuses_a_sheared_grid(tmp_path):
    d = (1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(InputError, match="not orthonormal"):
        write_volume(_volume(direction=d), tmp_path / "x.nii.gz")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# 3. Up to date by content, stale .part files, umask


def test_rerun_redoes_a_corrupted_output_with_a_newer_mtime(tmp_path):
    from data.resample_tree import resample_tree

    raw = _raw_tree(tmp_path, n=1)
    out = tmp_path / "out"
    assert resample_tree(raw, out, (16, 16), log=lambda _: None)["resampled"] == 2
    assert resample_tree(raw, out, (16, 16), log=lambda _: None)["skipped"] == 2
    victim = out / "MSDSpleen" / "labeled" / "case_000.nii.gz"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated, and newer than its input
    counts = resample_tree(raw, out, (16, 16), log=lambda _: None)
    assert counts == {"resampled": 1, "copied": 0, "skipped": 1}
    read_volume(victim)
    stamp_path(victim).unlink()  # an output without a stamp (older version, killed run) is redone
    assert resample_tree(raw, out, (16, 16), log=lambda _: None)["resampled"] == 1
    assert resample_tree(raw, out, (32, 32), log=lambda _: None)["resampled"] == 2  # other settings


def test_stale_part_files_are_removed_and_live_ones_kept(tmp_path):
    from utils.fileio import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a.nii.gz.{_HOST}-{dead.pid}.abc123.part.nii.gz"
    live = tmp_path / f".b.nii.gz.{_HOST}-{os.getpid()}.abc123.part.nii.gz"
    old_foreign = tmp_path / "sub" / ".c.npy.otherhost-1.x.part.npy"
    new_foreign = tmp_path / ".d.npy.otherhost-1.x.part.npy"
    stale_dir = tmp_path / f".entry.{_HOST}-{dead.pid}.q1.part"
    for p in (stale, live, old_foreign, new_foreign):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "image_axial.npy").write_bytes(b"x")
    os.utime(old_foreign, (time.time() - 2 * 86400,) * 2)
    removed = set(clean_stale_parts(tmp_path))
    assert removed == {stale, old_foreign, stale_dir}
    assert live.exists() and new_foreign.exists()


def test_outputs_honour_the_umask(tmp_path):
    import torch

    from engine.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        write_volume(_volume(), tmp_path / "v.nii.gz")
        write_json_atomic(tmp_path / "r.json", {"a": 1})
        save_checkpoint({"model": {"w": torch.ones(1)}}, tmp_path / "c.pth.tar")
        for name in ("v.nii.gz", "r.json", "c.pth.tar"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
        os.umask(0o077)
        write_json_atomic(tmp_path / "private.json", {})
        assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_cache_entries_honour_the_umask(tmp_path):
    from data.cache import build_cache
    from data.config import load_config
    from data.layout import discover

    write_seed_dataset(tmp_path / "data", "MSDSpleen", n_labeled=1, n_unlabeled=0, n_val=1)
    config = load_config()
    old = os.umask(0o022)
    try:
        vols = build_cache(discover(config, tmp_path / "data", ["MSDSpleen"]), config, tmp_path / "cache",
                           progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(vols[0].folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((vols[0].folder / "image_axial.npy").stat().st_mode) == 0o644


def _copied_cache(tiny_data: Path, tmp: Path) -> Path:
    """A copy of tiny_data's prebuilt cache (its keys name tiny_data's files, so runs reuse it)."""
    import shutil

    return Path(shutil.copytree(tiny_data / ".unimos_cache", tmp / "cache"))


def test_truncated_cache_array_is_rebuilt_and_the_run_is_unchanged(tiny_data, tiny_runs, tmp_path):
    """A truncated image_axial.npy made Final.py fail with 'mmap length is greater than file size'
    (exit 1; with loader workers it then hung). The check before training rebuilds the entry, and
    the run equals the one on a clean cache."""
    from tests.test_resume import _assert_same_run

    cache = _copied_cache(tiny_data, tmp_path)
    damaged = next((cache / "KiTS").glob("scan_00000-*/image_axial.npy"))
    clean = damaged.read_bytes()
    os.truncate(damaged, len(clean) - 1000)
    others = {p: p.stat().st_mtime_ns for p in cache.rglob("*.npy") if p.parent != damaged.parent}
    out = tmp_path / "out"
    proc = run_script("Final.py", *train_argv(tiny_data, out, "--no-semi", "--cache", str(cache)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert damaged.read_bytes() == clean
    # The other entries (the damaged one is rebuilt whole), built by the fixture in another
    # process, are reused: an untouched dataset keeps its cache key across runs.
    assert {p: p.stat().st_mtime_ns for p in others} == others
    _assert_same_run(out, tiny_runs["sup"])


# Truncates every image_axial.npy under argv[1] after the check before training, just before the
# loaders start, then runs the script argv[2:]: the damage is found in a loader worker.
_TRUNCATE_BEFORE_LOADERS = """
import os, runpy, sys
from pathlib import Path
sys.path.insert(0, ".")
import data.loaders
real, cache = data.loaders.step_loader, Path(sys.argv[1])
def truncating(*args, **kwargs):
    for f in cache.rglob("image_axial.npy"):
        os.truncate(f, f.stat().st_size - 1000)
    return real(*args, **kwargs)
data.loaders.step_loader = truncating
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_cache_array_damaged_in_a_loader_worker_is_one_line_not_a_hang(tiny_data, tmp_path):
    """Damage found only in a loader worker (--workers 2): one line naming the file, exit 2. The
    workers ignore SIGTERM, so before the trainer stopped them on errors the process hung at exit."""
    cache = _copied_cache(tiny_data, tmp_path)
    argv = ["Final.py", *_no_workers_flag(train_argv(tiny_data, tmp_path / "out", "--no-semi",
                                                     "--datasets", "KiTS", "--cache", str(cache)))]
    proc = subprocess.run([sys.executable, "-c", _TRUNCATE_BEFORE_LOADERS, str(cache), *argv], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=120)
    line = _one_line(proc, cache / "KiTS")
    assert "image_axial.npy: cache file is truncated or damaged" in line


# ----------------------------------------------------------------------------------------------
# 4. Geometry at read: DICOM series, degenerate headers


@pytest.fixture
def dicom_series(tmp_path) -> Path:
    vol = _volume(shape=(6, 16, 16))
    return write_dicom_series(tmp_path / "series", vol.with_array(vol.array.astype(np.int16)))


def test_complete_dicom_series_reads(dicom_series):
    assert read_volume(dicom_series).geometry.shape == (6, 16, 16)


def test_dicom_series_with_a_missing_slice_names_the_folder_and_gap(dicom_series):
    (dicom_series / "slice_0003.dcm").unlink()
    with pytest.raises(InputError, match="gap of 6 mm") as exc:
        read_volume(dicom_series)
    assert exc.value.path == str(dicom_series)


def test_dicom_series_with_a_corrupt_slice_is_refused(dicom_series):
    f = dicom_series / "slice_0002.dcm"
    f.write_bytes(b"\0" * 200)
    with pytest.raises(InputError) as exc:
        read_volume(dicom_series)
    assert exc.value.path in (str(dicom_series), str(f))


@pytest.mark.parametrize("index", [0, 5])
@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_dicom_series_with_a_corrupt_end_slice_is_refused_not_shortened(dicom_series, index, damage):
    # GDCM leaves an unparsable file out of the series; at either end that leaves no gap, so without
    # the check the volume would silently be one slice shorter (5 of 6).
    f = dicom_series / f"slice_{index:04d}.dcm"
    data = f.read_bytes()
    f.write_bytes(b"\0" * 200 if damage == "zeroed" else data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or unreadable") as exc:
        read_volume(dicom_series)
    assert exc.value.path == str(f)


def test_dicomdir_beside_a_series_is_not_a_slice(dicom_series):
    (dicom_series / "DICOMDIR").write_bytes(b"\0" * 200)
    assert read_volume(dicom_series).geometry.shape == (6, 16, 16)


def test_resample_dicom_gap_is_one_line(tmp_path, dicom_series):
    (dicom_series / "slice_0001.dcm").unlink()
    raw = tmp_path / "raw"
    raw.mkdir()
    dicom_series.rename(raw / "series")
    _one_line(run_script("resample.py", "-p1", raw, "-p2", tmp_path / "out", "--size", "16", "16"),
              raw / "series")
    assert not (tmp_path / "out" / "series.nii.gz").exists()


def _zero_spacing_nifti(path: Path) -> Path:
    """pixdim[2] = 0 in the header bytes (nibabel would recompute it from the affine); ITK reads 1 mm."""
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), dtype=np.int16), np.eye(4)), str(path))
    data = bytearray(path.read_bytes())
    data[76 + 2 * 4:76 + 3 * 4] = np.float32(0.0).tobytes()  # pixdim[2]
    path.write_bytes(bytes(data))
    return path


def _sheared_mha(path: Path) -> Path:
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementSpacing = 1 1 2\n"
                    "TransformMatrix = 1 0 0 0.3 1 0 0 0 1\nOffset = 0 0 0\n"
                    "ElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    with open(path, "ab") as fh:
        fh.write(bytes(8 * 8 * 4 * 2))
    return path


@pytest.mark.parametrize(("make", "message"), [(_zero_spacing_nifti, "invalid voxel spacing"),
                                               (_sheared_mha, "not orthonormal")])
def test_degenerate_headers_are_refused_at_read(tmp_path, make, message):
    path = make(tmp_path / ("v.nii" if make is _zero_spacing_nifti else "v.mha"))
    with pytest.raises(InputError, match=message):
        read_volume(path)
    from data.volume import read_geometry

    with pytest.raises(InputError, match=message):
        read_geometry(path)


def test_resample_degenerate_header_is_one_line(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    bad = _sheared_mha(raw / "v.mha")
    _one_line(run_script("resample.py", "-p1", raw, "-p2", tmp_path / "out"), bad)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.mha"))


# ----------------------------------------------------------------------------------------------
# 5. Paths


def test_dangling_symlink_and_folder_among_images_are_named(tmp_path):
    from data.config import load_config
    from data.layout import discover

    ds = write_seed_dataset(tmp_path, "MSDSpleen", n_labeled=2, n_unlabeled=0, n_val=0)
    link = ds / "labeled" / "case_009.nii.gz"
    link.symlink_to(tmp_path / "nowhere.nii.gz")
    with pytest.raises(InputError, match="dangling") as exc:
        discover(load_config(), tmp_path, ["MSDSpleen"])
    assert exc.value.path == str(link)
    link.unlink()
    (ds / "labeled" / "case_008.nii.gz").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        discover(load_config(), tmp_path, ["MSDSpleen"])


def test_empty_labeled_folder_of_a_requested_dataset_is_an_error(tmp_path):
    from data.config import load_config
    from data.layout import discover

    ds = write_seed_dataset(tmp_path, "MSDSpleen", n_labeled=0, n_unlabeled=2, n_val=0)
    with pytest.raises(InputError, match="no labeled cases") as exc:
        discover(load_config(), tmp_path, ["MSDSpleen"])
    assert exc.value.path == str(ds / "labeled")


def test_unwritable_output_is_found_before_training(tmp_path):
    _seed_data(tmp_path / "data")
    argv = _final(tmp_path)
    argv[argv.index("--out") + 1] = "/proc/unimos_out"
    _one_line(run_script(*argv), "/proc/unimos_out")
    assert not (tmp_path / "cache").exists()  # no volume was read


# ----------------------------------------------------------------------------------------------
# 6. kill -9 at random points, then a rerun


def _kill_after(argv: list[str], delay: float) -> None:
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # the group's other processes (pool workers) die asynchronously: wait until none is running
    from utils.fileio import _pid_alive

    deadline = time.time() + 10
    while time.time() < deadline:
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
        group = []
        for pid in pids:
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == proc.pid and _pid_alive(pid):
                    group.append(pid)
        if not group:
            break
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_during_resample_then_rerun(tmp_path, seed):
    raw = _raw_tree(tmp_path, n=4)
    out, ref = tmp_path / "out", tmp_path / "ref"
    argv = ["resample.py", "-p1", raw, "-p2", out, "--size", "48", "48", "--workers", "2"]
    _kill_after(argv, random.Random(seed).uniform(1.0, 4.0))
    proc = run_script(*argv)
    assert proc.returncode == 0, proc.stderr
    assert run_script("resample.py", "-p1", raw, "-p2", ref, "--size", "48", "48").returncode == 0
    assert not _parts(out)
    for f in ref.rglob("*.nii.gz"):
        got = read_volume(out / f.relative_to(ref))
        np.testing.assert_array_equal(got.array, read_volume(f).array)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_during_cache_build_then_rerun(tmp_path, seed):
    from data.cache import _valid_entry

    write_seed_dataset(tmp_path / "data", "MSDSpleen", n_labeled=4, n_unlabeled=0, n_val=2,
                       shape=(16, 64, 64))
    argv = _final(tmp_path, workers_default=True)
    _kill_after(argv, random.Random(seed).uniform(2.0, 6.0))
    # the kill may come after the first checkpoint: the rerun continues it, as Final.sh's does
    proc = run_script(*argv, "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not _parts(tmp_path / "cache")
    entries = [p.parent for p in (tmp_path / "cache").rglob("meta.json")]
    assert len(entries) == 6 and all(_valid_entry(e) for e in entries)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_during_training_then_resume_is_exact(tiny_data, tiny_runs, tmp_path, seed):
    from tests.conftest import train_argv
    from tests.test_resume import _assert_same_run

    out = tmp_path / "out"
    argv = ["Final.py", *train_argv(tiny_data, out, "--no-semi")]
    _kill_after(argv, random.Random(seed).uniform(3.0, 9.0))
    proc = run_script(*argv, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not _parts(out)
    _assert_same_run(out, tiny_runs["sup"])


def test_diverging_training_is_one_line_and_keeps_the_checkpoints(tiny_data, tmp_path):
    """A loss that becomes NaN (here an absurd learning rate) stops the run with one line naming the
    run folder and the step, exit 2; the last checkpoint of the epoch before is kept."""
    out = tmp_path / "run"
    proc = run_script("Final.py", *train_argv(tiny_data, out, "--no-semi", "--lr", "1e30",
                                               "--steps-per-epoch", "1", "--epochs", "4"))
    line = _one_line(proc, out)
    assert "training stopped: loss became nan at step" in line and "--lr" in line
    step = int(line.split("at step ")[1].split(";")[0])
    assert step >= 1
    from engine.checkpoint import load_checkpoint

    # saved at the end of the epoch before the NaN step
    assert load_checkpoint(out / "resu_last_axial.pth.tar")["step"] == step


def test_resample_refuses_a_grid_from_a_spacing_in_the_wrong_unit(tmp_path):
    """1e6 mm voxels resampled to 3 mm: a 2e7 x 2e7 slice; one line naming the file, exit 2."""
    raw = tmp_path / "raw"
    vol = _volume()
    huge = Volume(vol.array, Geometry(vol.geometry.shape, (1e6, 1e6, 1e6), (0.0, 0.0, 0.0)))
    write_volume(huge, raw / "x.nii.gz")
    proc = run_script("resample.py", "-p1", raw, "-p2", tmp_path / "out", "-s1", "32", "-s2", "32",
                      "--spacing", "3")
    _one_line(proc, raw / "x.nii.gz")
    assert f"{raw / 'x.nii.gz'}: in-plane resampled slices would be" in proc.stderr
    assert not [f for f in (tmp_path / "out").rglob("*") if f.is_file()]


def test_closed_stdout_pipe_is_one_line_not_a_traceback(tmp_path):
    """`resample.py ... | head -1`: the reader goes away; no BrokenPipeError traceback, exit 2, and
    what was written is complete (a rerun continues)."""
    raw = _raw_tree(tmp_path, n=3)
    code = (f"cd {REPO} && {sys.executable} resample.py -p1 {raw} -p2 {tmp_path / 'out'} -s1 16 -s2 16 "
            "--workers 1 | true; exit ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", code], env=script_env(), capture_output=True, text=True, timeout=300)
    # the reader is gone before the first line (`true` exits at once; Python takes a second to start):
    # with `head -c 1`, lines of small volumes could all reach the pipe before head had exited
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: <stdout>: the output pipe was closed; stopped (every file written so far is complete, "
        "a rerun continues)"], proc.stderr
    assert not _parts(tmp_path / "out")
    rerun = run_script("resample.py", "-p1", raw, "-p2", tmp_path / "out", "-s1", "16", "-s2", "16")
    assert rerun.returncode == 0, rerun.stderr


def test_json_files_are_strict_json(tmp_path):
    """A summary without a validation score held ``-Infinity``, which strict readers refuse."""
    import json
    import math

    write_json_atomic(tmp_path / "s.json", {"best": -math.inf, "x": [1.0, math.nan], "ok": 0.5})
    text = (tmp_path / "s.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"best": None, "x": [1.0, None],
                                                                       "ok": 0.5}


def test_report_pair_survives_a_full_disk_found_only_at_fsync(tmp_path, monkeypatch):
    """NFS and delayed allocation report ENOSPC at fsync: the first file failing there must not
    leave the second renamed into place (both previous files stay, no temporary file is left)."""
    import errno

    from utils.fileio import write_texts_atomic

    a, b = tmp_path / "r.csv", tmp_path / "r.json"  # the order evaluate.py writes them in
    write_texts_atomic({a: "old csv\n", b: "old json\n"})
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".csv"):  # the temporary of the first file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(InputError, match="r.csv: cannot write output"):
        write_texts_atomic({a: "new csv\n", b: "new json\n"})
    monkeypatch.undo()
    assert (a.read_text(), b.read_text()) == ("old csv\n", "old json\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]
