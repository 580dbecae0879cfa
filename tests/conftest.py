"""Shared fixtures: a tiny phantom data root (cache prebuilt) and tiny Final.py runs.

TINY settings (the machine has two shared cores): width 4, 32x32 slices and crops, batch 2, two epochs
of two steps, no loader workers, CPU, one BLAS/OpenMP thread per process (with several threads per
process a busy two-core machine spends most of its time spinning).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_DATASETS = ("LiTS", "KiTS", "MSDSpleen")
TINY = ["--width", "4", "--blocksize", "32", "--inplane", "32", "32", "-b", "2", "--epochs", "2",
        "--steps-per-epoch", "2", "--workers", "0", "--device", "cpu"]
# The same settings as TrainOptions fields (tests/test_options.py checks they agree).
TINY_OPTIONS = {"width": 4, "blocksize": 32, "inplane": (32, 32), "batchsize": 2, "epochs": 2,
                "steps_per_epoch": 2, "workers": 0, "device": "cpu"}


@pytest.fixture(autouse=True)
def _not_a_slurm_job(monkeypatch):
    """Tests that want a Slurm job set SLURM_JOB_ID themselves; one inherited from a CI job run under
    Slurm would make every checkpoint "this job's" (engine.build.find_resume)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def script_env(**extra: str) -> dict[str, str]:
    """Environment for running the repository's scripts as subprocesses (one thread each)."""
    # a CI job run under Slurm must not look like a requeued training job (engine.build.find_resume)
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    # UTF-8 both ways whatever the CI locale is: reports print "±" and "→"
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"})
    env.update(extra)
    return env


def run_script(*argv: str | Path, timeout: float = 300, env: dict[str, str] | None = None,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python <script> args...`` from the repository root; returns the completed process."""
    return subprocess.run([sys.executable, *map(str, argv)], cwd=cwd, env=env or script_env(),
                          capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout)


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """Final.py arguments of a TINY run on ``data`` writing to ``out``."""
    return ["--data", str(data), "--out", str(out), *TINY, *extra]


def train_options(data: Path, out: Path, **fields):
    """TrainOptions of a TINY run on ``data`` writing to ``out`` (for ``engine.trainer.fit`` in-process).

    ``fields`` override TrainOptions fields, e.g. ``semi=False, resume="auto"``.
    """
    from engine.options import TrainOptions

    return TrainOptions(data=str(data), out=str(out), **{**TINY_OPTIONS, **fields})


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip ``@pytest.mark.cuda`` tests where torch sees no CUDA device.

    They are still collected, so ``pytest -m cuda`` on a CPU-only machine reports them as skipped and
    exits 0 (pytest exits 5 when nothing is collected).
    """
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Phantoms of LiTS, KiTS and MSDSpleen (2 labeled, 1 validation, 2 unlabeled cases each, 64x64
    in-plane) with their 32x32 axial slice cache already built under ``<root>/.unimos_cache``."""
    from dataclasses import replace

    from data.cache import build_cache
    from data.config import load_config
    from data.layout import discover
    from data.phantom import synthesize

    root = tmp_path_factory.mktemp("tiny_data")
    synthesize(root, cases=2, unlabeled=2, val=1, seed=0, datasets=list(TINY_DATASETS), scale=0.125)
    config = replace(load_config(), inplane_size=(32, 32))
    build_cache(discover(config, root, list(TINY_DATASETS)), config, root / ".unimos_cache",
                views=("axial",), workers=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted TINY runs of ``Final.py`` as subprocesses: ``{"sup": out, "semi": out}``.

    ``semi`` uses the EMA teacher. Shared by the end-to-end and the resume tests (the reference
    every stopped-and-resumed run must reproduce).
    """
    runs = {"sup": ["--no-semi"], "semi": ["--semi", "--teacher", "ema"]}
    outs = {}
    for name, extra in runs.items():
        out = tmp_path_factory.mktemp(f"run_{name}")
        proc = run_script("Final.py", *train_argv(tiny_data, out, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[name] = out
    return outs

