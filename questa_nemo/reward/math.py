"""The rule-based math reward: 1 when a completion's final answer equals the reference under math-verify.

    with MathReward(RewardConfig(num_workers=8)) as reward:
        handle = reward.submit(completions, references)   # returns at once; workers start judging
        ...                                                # e.g. generate the next batch meanwhile
        results = handle.result()                          # list[RewardResult], one per completion

Per completion: extract the final answer in this process (extract.py, bounded scans, capped length); settle
"no answer", malformed answers and plain-integer pairs here; send the rest to the worker pool (pool.py), where
math-verify runs in each worker's main thread under a soft time limit and a hard kill. Every 0 carries its
reason (types.REASONS); `count_reasons` tallies a batch for the logs.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

from questa_nemo.config import RewardConfig
from questa_nemo.reward.check import fast_judge, install_alarm_handler, judge, warm_up
from questa_nemo.reward.extract import extract_answer, reference_answer
from questa_nemo.reward.pool import Job, JudgePool, PoolHandle, PoolStats
from questa_nemo.reward.types import PARSE_ERROR, REASONS, RewardResult

_REWARD = RewardConfig()  # the schema's defaults: the only place they are written (config.py)


def _check_lengths(completions: list[str], references: list[str]) -> None:
    if len(completions) != len(references):
        raise ValueError(f"reward: {len(completions)} completions but {len(references)} references")


class _Pending(NamedTuple):
    """An item math-verify has to judge."""

    answer: str  # the completion's extracted answer
    form: str  # extract.BOXED | extract.PHRASE
    reference: str  # the reference's extracted answer


def _settle_locally(completion: str, reference: str, max_answer_chars: int) -> RewardResult | _Pending:
    """The verdict when no math-verify is needed, else what a worker has to judge."""
    ref = reference_answer(reference, max_answer_chars)
    if ref.problem:  # a data error, not the policy's: logged through the reason counts
        return RewardResult(0.0, PARSE_ERROR)
    got = extract_answer(completion, max_answer_chars)
    if got.problem:
        return RewardResult(0.0, got.problem)
    fast = fast_judge(got.answer, ref.answer)
    if fast is not None:
        return fast
    return _Pending(got.answer, got.form, ref.answer)


class MathReward:
    """Scores completions against "\\boxed{...}" references in a pool of worker processes; close() when done.

    Its settings are the `reward` config section's math keys (num_workers, timeout_s, kill_grace_s,
    max_answer_chars, memory_limit_mb, start_method); None: the schema's defaults.
    test_faults is a test hook: workers then obey worker.TEST_CRASH_ANSWER / TEST_SEGFAULT_ANSWER /
    TEST_HANG_ANSWER by failing on purpose. Never set it outside tests.
    """

    def __init__(self, cfg: RewardConfig | None = None, *, test_faults: bool = False):
        cfg = cfg or _REWARD
        if cfg.max_answer_chars < 1:
            raise ValueError(f"reward.max_answer_chars: must be >= 1, got {cfg.max_answer_chars}")
        self.max_answer_chars = cfg.max_answer_chars
        self._pool = JudgePool(
            cfg.num_workers,
            cfg.timeout_s,
            kill_grace_s=cfg.kill_grace_s,
            memory_limit_mb=cfg.memory_limit_mb,
            start_method=cfg.start_method,
            test_faults=test_faults,
        )

    def submit(
        self, completions: list[str], references: list[str], problems: list[str] | None = None
    ) -> PoolHandle:
        """Start scoring and return at once; `handle.result()` waits for the list of RewardResult.
        `problems` (the Reward protocol's) is not read: the math reward needs only the references."""
        _check_lengths(completions, references)
        handle = PoolHandle(len(completions))
        jobs = []
        for index, (completion, reference) in enumerate(zip(completions, references)):
            settled = _settle_locally(completion, reference, self.max_answer_chars)
            if isinstance(settled, RewardResult):
                handle._set(index, settled)
            else:
                jobs.append(Job(handle, index, settled.answer, settled.form, settled.reference))
        if jobs:
            self._pool.enqueue(jobs)
        return handle

    def score(self, completions: list[str], references: list[str]) -> list[RewardResult]:
        """Blocking form of submit(...).result()."""
        return self.submit(completions, references).result()

    @property
    def stats(self) -> PoolStats:
        return self._pool.stats

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every worker has imported math-verify (a few seconds after start); optional."""
        return self._pool.wait_ready(timeout)

    def worker_pids(self) -> list[int]:
        return self._pool.worker_pids()

    def close(self) -> None:
        """Stop and reap every worker; unfinished handles raise RuntimeError. Idempotent."""
        self._pool.close()

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_in_process(
    completions: list[str],
    references: list[str],
    timeout_s: float = _REWARD.timeout_s,
    max_answer_chars: int = _REWARD.max_answer_chars,
) -> list[RewardResult]:
    """The same verdicts without worker processes, for the main thread of a script (benchmarks, debugging).

    No protection from a checker stuck in C code or a crash: the trainer uses MathReward.
    """
    _check_lengths(completions, references)
    install_alarm_handler()
    warm_up()
    results = []
    for completion, reference in zip(completions, references):
        settled = _settle_locally(completion, reference, max_answer_chars)
        if isinstance(settled, _Pending):
            settled = judge(settled.answer, settled.form, settled.reference, timeout_s)
        results.append(settled)
    return results


def count_reasons(results: list[RewardResult]) -> dict[str, int]:
    """How many results carry each reason (every reason listed, zeros included), for the step's log line."""
    counts = Counter(r.reason for r in results)
    return {reason: counts.get(reason, 0) for reason in REASONS}
