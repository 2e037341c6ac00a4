"""Preemption: Slurm sends SIGUSR1 (`--signal=B:USR1@secs`, forwarded by the batch script) or SIGTERM before it
kills a job. The handler only sets a flag; the loop finishes its step, writes a full checkpoint and exits with
EXIT_PREEMPTED, which the batch script turns into `scontrol requeue`."""

from __future__ import annotations

import signal

EXIT_PREEMPTED = 3


class PreemptionFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)):
        self.requested = False
        self.signal_name: str | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
