"""Worker processes that judge answers, with a hard deadline per item and a fresh worker after any failure.

One dispatcher thread in the calling process owns the workers: it keeps up to PREFETCH jobs in each
worker's pipe (a worker judges them in order and answers each at once, so it never waits for a round trip),
waits on the workers' pipes, their process sentinels and a wake-up pipe together, and
- records a verdict when a worker answers;
- scores the job at the head of a worker's line 0 (CRASH: the checker died under it) when the worker
  dies, puts the jobs behind it back in the queue, and starts a new worker;
- kills the worker (SIGKILL), scores the head job 0 (TIMEOUT), requeues the rest and starts a new worker when
  no answer came for timeout_s + kill_grace_s (the worker's soft limit, timeout_s, missed: stuck in C code).
So a batch always completes, each item bounded. Workers start with 'spawn' (or 'forkserver'): the
trainer process holds CUDA and torch threads that fork would copy.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from questa_nemo.reward.types import CRASH, TIMEOUT, RewardResult
from questa_nemo.reward.worker import READY, worker_main

logger = logging.getLogger(__name__)

_SHUTDOWN_WAIT_S = 2.0  # how long close() lets a worker exit on its own before killing it
_START_TIMEOUT_S = 300.0  # a worker not READY by then (imports hung) is killed and counts as a failed start
# Jobs queued in one worker's pipe at most: enough that a worker never idles while the dispatcher thread waits
# for a core on a busy machine, few enough that one slow job delays little behind it.
PREFETCH = 16
# Bytes of jobs in one worker's pipe at most (a Linux pipe holds 64 KiB): a send then never blocks the
# dispatcher on a hung worker. A lone job may be larger; an idle worker reads it at once.
_PIPE_BUDGET_BYTES = 32 * 1024


class PoolHandle:
    """The results of one submitted batch, filled in by the dispatcher thread as workers finish."""

    def __init__(self, size: int):
        self._results: list[RewardResult | None] = [None] * size
        self._missing = size
        self._error: str | None = None
        self._finished = threading.Event()
        if size == 0:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout: float | None = None) -> list[RewardResult]:
        """Wait for every item; TimeoutError after `timeout` seconds, RuntimeError if the pool failed."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"reward batch not finished after {timeout} s ({self._missing} items left)")
        if self._error is not None:
            raise RuntimeError(self._error)
        return list(self._results)  # type: ignore[arg-type]  # every slot is filled once finished

    def _set(self, index: int, result: RewardResult) -> None:
        if self._results[index] is None:
            self._results[index] = result
            self._missing -= 1
            if self._missing == 0:
                self._finished.set()

    def _fail(self, message: str) -> None:
        if not self._finished.is_set():
            self._error = message
            self._finished.set()


@dataclass
class Job:
    handle: PoolHandle
    index: int  # position in the handle's batch
    answer: str  # extracted, at most max_answer_chars characters
    form: str  # extract.BOXED | extract.PHRASE
    reference: str  # extracted reference answer


@dataclass
class PoolStats:
    """Counts since the pool started, for the logs."""

    judged: int = 0  # jobs answered by a worker
    crashed: int = 0  # jobs whose worker died under them
    killed: int = 0  # jobs whose worker was killed past the hard deadline
    worker_starts: int = 0  # processes started, the initial ones included


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    ready: bool = False
    in_flight: deque[tuple[int, Job]] = field(default_factory=deque)  # (job id, job) in the order sent
    in_flight_bytes: int = 0  # upper bound of their pickled size
    deadline: float = float("inf")  # time.monotonic() past which the head job (or the start) is declared hung


@dataclass
class _State:
    queue: deque[Job] = field(default_factory=deque)
    closing: bool = False
    wake_pending: bool = False


def _job_bytes(job: Job) -> int:
    """An upper bound of the job's pickled size: 4 bytes per character in UTF-8, plus framing."""
    return 4 * (len(job.answer) + len(job.form) + len(job.reference)) + 128


class JudgePool:
    """`num_workers` processes running check.judge; `enqueue` never blocks. Use `close()` (or `with`)."""

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        kill_grace_s: float,
        memory_limit_mb: int,
        start_method: str,
        test_faults: bool = False,
    ):
        if num_workers < 1:
            raise ValueError(f"reward.num_workers: must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"reward.timeout_s: must be > 0, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.kill_grace_s = kill_grace_s
        self.memory_limit_mb = memory_limit_mb
        self.test_faults = test_faults  # test hook: workers obey worker.TEST_*_ANSWER (crash, segfault, hang)
        self.stats = PoolStats()
        self._ctx = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._ready_changed = threading.Condition(self._lock)  # notified when a worker reports READY
        self._state = _State()
        self._workers: list[_Worker] = []
        self._failed_starts = 0  # workers that died before READY, in a row
        self._last_exit_code: int | None = None
        self._next_job_id = 0
        self._wake_recv, self._wake_send = self._ctx.Pipe(duplex=False)
        # Workers are started from the dispatcher thread: PR_SET_PDEATHSIG ties them to the thread that
        # started them, and this one lives exactly as long as the pool.
        self._thread = threading.Thread(target=self._run, name="reward-pool", daemon=True)
        self._thread.start()
        # A pool never closed still goes before multiprocessing's own exit handler reaps its daemon workers
        # (atexit runs last-registered first), so the dispatcher does not restart workers being terminated.
        atexit.register(self.close)

    # ------------------------------------------------------------------ caller side
    def enqueue(self, jobs: list[Job]) -> None:
        with self._lock:
            if self._state.closing:
                raise RuntimeError("reward pool is closed")
            self._state.queue.extend(jobs)
            self._wake_locked()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker has its imports done (or the pool closed); False after `timeout` s."""
        with self._ready_changed:
            return self._ready_changed.wait_for(
                lambda: (
                    self._state.closing
                    or (len(self._workers) == self.num_workers and all(w.ready for w in self._workers))
                ),
                timeout,
            )

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.pid is not None]

    def close(self) -> None:
        """Stop every worker (killing those that do not exit) and fail unfinished batches; idempotent."""
        with self._lock:
            if not self._state.closing:
                self._state.closing = True
                self._wake_locked()
        self._thread.join()
        atexit.unregister(self.close)

    def __enter__(self) -> JudgePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake_locked(self) -> None:
        if not self._state.wake_pending:
            self._state.wake_pending = True
            self._wake_send.send_bytes(b"w")

    # ------------------------------------------------------------------ dispatcher thread
    def _run(self) -> None:
        try:
            with self._lock:
                for _ in range(self.num_workers):
                    self._workers.append(self._start_worker())
            while self._step():
                pass
        except Exception as e:  # a bug here must not leave callers waiting forever
            logger.exception("reward pool dispatcher failed")
            self._fail_everything(f"reward pool dispatcher failed: {e!r}")
        finally:
            self._shutdown()

    def _step(self) -> bool:
        """One round: assign, wait, react. False once the pool is closing or broken."""
        with self._lock:
            if self._state.closing:
                return False
            self._assign_locked()
            waitables: list = [self._wake_recv]
            for w in self._workers:
                waitables += [w.conn, w.process.sentinel]
            next_deadline = min((w.deadline for w in self._workers), default=float("inf"))
        timeout = None if next_deadline == float("inf") else max(0.0, next_deadline - time.monotonic())
        ready = set(wait(waitables, timeout))
        with self._lock:
            if self._wake_recv in ready:
                while self._wake_recv.poll():
                    self._wake_recv.recv_bytes()
                self._state.wake_pending = False
            for slot, w in enumerate(self._workers):
                if w.conn in ready:
                    self._receive_locked(w)
                if w.process.sentinel in ready and not w.process.is_alive():
                    self._replace_locked(slot, hung=False)
                elif (w.in_flight or not w.ready) and time.monotonic() >= w.deadline:
                    self._replace_locked(slot, hung=True)
            if self._failed_starts > self.num_workers + 2:
                self._fail_everything_locked(
                    f"reward workers die on start-up ({self._failed_starts} in a row, "
                    f"last exit code {self._last_exit_code})"
                )
                return False
        return True

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main,
            args=(child_conn, self.timeout_s, self.memory_limit_mb, self.test_faults),
            name="questa-nemo-reward",
            daemon=True,
        )
        process.start()
        child_conn.close()
        self.stats.worker_starts += 1
        return _Worker(process=process, conn=parent_conn, deadline=time.monotonic() + _START_TIMEOUT_S)

    def _assign_locked(self) -> None:
        """Round-robin, one job per worker per pass, so a small batch spreads over every worker."""
        queue = self._state.queue
        progress = True
        while queue and progress:
            progress = False
            for w in self._workers:
                if queue and self._send_head_locked(w):
                    progress = True

    def _send_head_locked(self, w: _Worker) -> bool:
        """Send the queue's first job to `w` if its pipe has room; True if sent."""
        job = self._state.queue[0]
        size = _job_bytes(job)
        if not w.ready or len(w.in_flight) >= PREFETCH:
            return False
        if w.in_flight and w.in_flight_bytes + size > _PIPE_BUDGET_BYTES:
            return False
        self._next_job_id += 1
        try:
            w.conn.send((self._next_job_id, job.answer, job.form, job.reference))
        except OSError:  # the worker died; its sentinel shows it this round
            w.ready = False
            return False
        self._state.queue.popleft()
        if not w.in_flight:
            w.deadline = time.monotonic() + self.timeout_s + self.kill_grace_s
        w.in_flight.append((self._next_job_id, job))
        w.in_flight_bytes += size
        return True

    def _receive_locked(self, w: _Worker) -> None:
        """Take every message the worker has sent so far."""
        while True:
            try:
                if not w.conn.poll():
                    return
                message = w.conn.recv()
            except (EOFError, OSError):
                return  # died; handled through is_alive()
            if message == READY:
                w.ready, w.deadline = True, float("inf")
                self._failed_starts = 0
                self._ready_changed.notify_all()
                continue
            job_id, reward, reason = message
            head_id, job = w.in_flight.popleft()
            if head_id != job_id:
                raise RuntimeError(f"reward worker {w.process.pid} answered job {job_id}, expected {head_id}")
            w.in_flight_bytes -= _job_bytes(job)
            job.handle._set(job.index, RewardResult(reward, reason))
            self.stats.judged += 1
            w.deadline = (
                time.monotonic() + self.timeout_s + self.kill_grace_s if w.in_flight else float("inf")
            )

    def _replace_locked(self, slot: int, hung: bool) -> None:
        """Kill / reap the worker in `slot` and start a fresh one there; its head job scores 0, the rest
        go back to the front of the queue."""
        w = self._workers[slot]
        if hung:
            w.process.kill()
        w.process.join()
        w.conn.close()
        self._last_exit_code = w.process.exitcode
        if not w.in_flight and not w.ready:
            self._failed_starts += 1
        self._workers[slot] = self._start_worker()  # before the verdict: a caller woken by it sees the stats
        if not w.in_flight:
            return
        _, culprit = w.in_flight.popleft()
        self._state.queue.extendleft(job for _, job in reversed(w.in_flight))
        if hung:
            self.stats.killed += 1
            logger.warning("reward: worker %d killed after %.1f s on one job", w.process.pid, self.timeout_s)
            culprit.handle._set(culprit.index, RewardResult(0.0, TIMEOUT))
        else:
            self.stats.crashed += 1
            logger.warning(
                "reward: worker %d died (exit code %s) on a job", w.process.pid, self._last_exit_code
            )
            culprit.handle._set(culprit.index, RewardResult(0.0, CRASH))

    def _fail_everything_locked(self, message: str) -> None:
        for job in self._state.queue:
            job.handle._fail(message)
        self._state.queue.clear()
        for w in self._workers:
            for _, job in w.in_flight:
                job.handle._fail(message)
            w.in_flight.clear()

    def _fail_everything(self, message: str) -> None:
        with self._lock:
            self._fail_everything_locked(message)

    def _shutdown(self) -> None:
        with self._lock:
            self._state.closing = True
            self._ready_changed.notify_all()
            for w in self._workers:
                if w.in_flight:  # abandoned mid-job: no reason to wait for it
                    w.process.kill()
            self._fail_everything_locked("reward pool closed before this batch finished")
            workers, self._workers = self._workers, []
        for w in workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        give_up_at = time.monotonic() + _SHUTDOWN_WAIT_S
        for w in workers:
            w.process.join(max(0.0, give_up_at - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join()
            w.conn.close()
        self._wake_recv.close()
        self._wake_send.close()
