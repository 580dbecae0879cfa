"""Preemption: Slurm warns with SIGUSR1 (``#SBATCH --signal=B:USR1@180`` in Final.sh, forwarded by the
script) before the time limit, and sends SIGTERM on scancel or preemption.

The handler only sets a flag; the training loop checks it at every step boundary (all ranks agree),
writes a resumable checkpoint and exits with :data:`EXIT_REQUEUE`, which ``Final.sh`` turns into
``scontrol requeue``. Repeated signals are absorbed on purpose: under Slurm one process may get
SIGTERM directly and SIGUSR1 through the launcher at the same moment, and escalating on the second
would kill it mid-checkpoint. DataLoader workers ignore both signals (data/loaders.py), so a signal
sent to every process of the job does not take the data pipeline down before the checkpoint.
"""

from __future__ import annotations

import signal
import threading

# 3 is free in Slurm's and the shell's conventions (2 is bad input, 1 a crash, 128+n a signal).
EXIT_REQUEUE = 3


class PreemptionFlag:
    """Catches SIGTERM/SIGUSR1 while installed; ``requested`` tells the loop to checkpoint and stop."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 -- signal handler signature
        self.received = signum

    def install(self) -> PreemptionFlag:
        # Signal handlers can only be set from the main thread (pytest-xdist, notebooks).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
