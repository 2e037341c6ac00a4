"""Preemption: Slurm sends SIGUSR1 (`--signal=B:USR1@secs`, forwarded by the batch script) or SIGTERM before it
kills a job. The handler only sets a flag; the loop finishes its step, writes a full checkpoint and exits with
EXIT_PREEMPTED, which the batch script turns into `scontrol requeue`. One flag lives for the whole run
(train/recipe.py), so a signal during model building, warm-up or evaluation is seen at the next stage boundary."""

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

    def agreed(self, world=None) -> bool:
        """Whether any rank was signalled: ranks see the signal at different steps, and all of them must
        checkpoint at the same step (the save is collective). `world`: model/parallel.py's Reduce over every
        process (default: `world_reduce()`); every process must call this together."""
        if world is None:
            from questa_nemo.model.parallel import world_reduce

            world = world_reduce()
        self.requested = world.any(self.requested)
        return self.requested

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
