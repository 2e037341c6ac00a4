"""The body of one reward worker process: receive (job id, answer, form, reference), send back a verdict.

Each worker judges in its own main thread, so math-verify's signal-based machinery and our SIGALRM soft limit
work. Whatever a job does to the worker (a segfault in a C parser, an endless loop in C, memory blow-up), the
parent (pool.py) sees it through the process sentinel or the hard deadline and starts a fresh worker.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import time
from multiprocessing.connection import Connection

from questa_nemo.reward.check import install_alarm_handler, judge, warm_up

READY = "ready"  # first message of a worker: imports done, it takes jobs now

# Test hooks, obeyed only by workers started with test_faults=True (the test switch of MathReward and
# JudgePool): an answer equal to one of these makes the worker fail the way a real checker bug would.
TEST_CRASH_ANSWER = "__questa_nemo_test_crash__"  # the process exits at once (os._exit)
TEST_SEGFAULT_ANSWER = "__questa_nemo_test_segfault__"  # the process dies of SIGSEGV
TEST_HANG_ANSWER = "__questa_nemo_test_hang__"  # the process hangs and ignores SIGALRM, like a loop in C


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the thread that started it exits (the trainer crashed)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _limit_memory(memory_limit_mb: int) -> None:
    """Cap the heap (RLIMIT_DATA) so a huge number raises MemoryError here instead of starving the trainer."""
    if memory_limit_mb > 0:
        limit = memory_limit_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _obey_test_fault(answer: str) -> None:
    if answer == TEST_CRASH_ANSWER:
        os._exit(3)
    if answer == TEST_SEGFAULT_ANSWER:
        ctypes.string_at(0)
    if answer == TEST_HANG_ANSWER:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        while True:
            time.sleep(3600)


def worker_main(conn: Connection, timeout_s: float, memory_limit_mb: int, test_faults: bool) -> None:
    """Serve jobs until the parent sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it closes the pool
    _die_with_parent()
    install_alarm_handler()
    warm_up()
    _limit_memory(memory_limit_mb)
    conn.send(READY)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        job_id, answer, form, reference = job
        if test_faults:
            _obey_test_fault(answer)
        result = judge(answer, form, reference, timeout_s)
        conn.send((job_id, result.reward, result.reason))
