"""Memory over a longer training run: resident memory of Final.py and its loader workers per epoch.

    python bench/memory.py [--data DIR] [--epochs 30] [--steps-per-epoch 5] [--workers 2] [--semi]
                           [--json out.json] [-- extra Final.py arguments]

Runs a tiny CPU training (width 4, 32x32 crops, batch 2) as a subprocess and, each time it logs an
epoch, reads from /proc (no psutil needed) the VmRSS of the trainer and of each of its children (the
DataLoader workers), and the PSS of all of them together (RSS counts pages the forked workers share
with the trainer once per process; PSS splits them). Prints one line per epoch and the least-squares
slope (MB/epoch) over the epochs after the first third (start-up, first validation and the cache's
memory maps being paged in are excluded) up to the last but one (the last races with the exit). A
slope near 0 means no growth per epoch.

Without --data, tiny phantoms (LiTS, KiTS, MSDSpleen; 2 labeled, 1 validation, 2 unlabeled each) are
written to a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from utils.errors import InputError, run_cli  # noqa: E402


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(set(out))


def sample(pid: int) -> dict[str, float]:
    """Memory of ``pid`` and its children in MB: main/worker RSS, total PSS, worker count."""
    kids = children(pid)
    mb = 1024.0
    return {"main_rss": _status_kb(pid, "VmRSS") / mb,
            "workers_rss": sum(_status_kb(c, "VmRSS") for c in kids) / mb,
            "total_pss": (_pss_kb(pid) + sum(_pss_kb(c) for c in kids)) / mb,
            "workers": len(kids)}


def slope(ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against 0, 1, 2, ... (0 for fewer than two points)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2
    my = sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in enumerate(ys)) / sum((x - mx) ** 2 for x in range(n))


def run(data: Path, out: Path, epochs: int, steps: int, workers: int, semi: bool,
        extra: list[str]) -> list[dict[str, Any]]:
    """Train and sample memory at every logged epoch. Returns one dict per epoch."""
    argv = [sys.executable, str(REPO / "Final.py"), "--data", str(data), "--out", str(out),
            "--width", "4", "--blocksize", "32", "--inplane", "32", "32", "-b", "2", "--epochs", str(epochs),
            "--steps-per-epoch", str(steps), "--workers", str(workers), "--device", "cpu",
            "--semi" if semi else "--no-semi", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    rows: list[dict[str, Any]] = []
    try:
        for line in proc.stdout:
            if line.startswith("epoch "):
                epoch = int(line.split()[1].split("/")[0])
                rows.append({"epoch": epoch, **sample(proc.pid)})
                r = rows[-1]
                print(f"epoch {epoch:3d}  main RSS {r['main_rss']:7.1f} MB  workers RSS "
                      f"{r['workers_rss']:7.1f} MB ({r['workers']})  total PSS {r['total_pss']:7.1f} MB",
                      flush=True)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"Final.py exited with {proc.returncode}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="data root (default: tiny phantoms in a temp folder)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps-per-epoch", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--semi", action="store_true", help="semi-supervised (EMA teacher)")
    p.add_argument("--json", default=None, help="write the curve and slopes here")
    p.add_argument("extra", nargs="*", help="more Final.py arguments (after --)")
    args = p.parse_args(argv)
    if args.epochs < 3:
        raise InputError(None, "--epochs must be >= 3 to fit a slope")
    with tempfile.TemporaryDirectory(prefix="unimos_mem_") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            from data.phantom import synthesize

            synthesize(data, cases=2, unlabeled=2, val=1, seed=0,
                       datasets=["LiTS", "KiTS", "MSDSpleen"], scale=0.125)
        extra = list(args.extra) + (["--teacher", "ema"] if args.semi else [])
        rows = run(data, Path(tmp) / "out", args.epochs, args.steps_per_epoch, args.workers, args.semi,
                   extra)
    # The last sample races with the trainer's exit (workers shutting down): left out of the fit.
    tail = rows[len(rows) // 3:-1]
    result = {"epochs": rows,
              "slope_mb_per_epoch": {k: slope([r[k] for r in tail])
                                     for k in ("main_rss", "workers_rss", "total_pss")},
              "growth_mb": {k: tail[-1][k] - tail[0][k] for k in ("main_rss", "workers_rss", "total_pss")},
              "fit_from_epoch": tail[0]["epoch"]}
    s, g = result["slope_mb_per_epoch"], result["growth_mb"]
    print(f"slope from epoch {tail[0]['epoch']}: main RSS {s['main_rss']:+.3f} MB/epoch, workers RSS "
          f"{s['workers_rss']:+.3f} MB/epoch, total PSS {s['total_pss']:+.3f} MB/epoch "
          f"(growth {g['main_rss']:+.1f} / {g['workers_rss']:+.1f} / {g['total_pss']:+.1f} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
