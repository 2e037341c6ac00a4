"""The math reward's worker pool: adversarial completions within bounded time, a crashed or hung worker
replaced without losing the batch, non-blocking submit, and a shutdown that leaves no process behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from questa_nemo.config import RewardConfig
from questa_nemo.reward.math import MathReward
from questa_nemo.reward.types import RewardResult
from questa_nemo.reward.worker import TEST_CRASH_ANSWER, TEST_HANG_ANSWER, TEST_SEGFAULT_ANSWER

pytestmark = pytest.mark.slow  # starts worker processes

TIMEOUT_S = 1.5
GRACE_S = 0.5
# One item's worst case: soft timeout + kill grace, plus scheduling slack on a loaded 2-core CI machine.
ITEM_BOUND_S = TIMEOUT_S + GRACE_S + 2.5


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def reward():
    """One pool for the module (workers take seconds to start); leaving `with` must reap every worker."""
    cfg = RewardConfig(num_workers=2, timeout_s=TIMEOUT_S, kill_grace_s=GRACE_S)
    with MathReward(cfg, test_faults=True) as pool:
        yield pool
        pids = pool.worker_pids()
    assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids), "a reward worker outlived the pool"


def _timed_score(
    reward: MathReward, completion: str, reference: str = "\\boxed{1}"
) -> tuple[RewardResult, float]:
    start = time.perf_counter()
    [result] = reward.score([completion], [reference])
    return result, time.perf_counter() - start


def test_pool_scores_a_mixed_batch_in_order(reward):
    completions = [
        "\\boxed{0.5}",
        "\\boxed{3}",
        "no answer",
        "\\boxed{\\sqrt{12}}",
        "\\boxed{(0,1]}",
        "\\boxed{7}",
    ]
    references = [
        "\\boxed{\\frac{1}{2}}",
        "\\boxed{3}",
        "\\boxed{1}",
        "\\boxed{2\\sqrt{3}}",
        "\\boxed{[0,1]}",
        "\\boxed{8}",
    ]
    reasons = [r.reason for r in reward.score(completions, references)]
    assert reasons == ["correct", "correct", "no_answer", "correct", "wrong", "wrong"]


ADVERSARIAL = {
    "10 MB without answer": "x" * 10_000_000,
    "10 MB answer": "\\boxed{" + "9" * 10_000_000 + "}",
    "10 MB of open braces": "\\boxed{" + "{" * 10_000_000,
    "3000 nested braces": "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
    "400 nested braces (under the cap)": "\\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",
    "power tower": "\\boxed{10^{10^{10^{10}}}}",
    "factorial tower": "\\boxed{(10^{10})!!}",
    "python code": "\\boxed{__import__('os').system('touch {marker}')}",
    "python via text": "\\boxed{\\text{__import__('os').system('touch {marker}')}}",
    "invalid utf-8": b"\\boxed{1\xff\xfe}".decode("utf-8", "surrogateescape"),
    "lone surrogate": "\\boxed{1\ud800}",
    "nul bytes": "\\boxed{1\x00\x00}",
    "nul everywhere": "\x00" * 1_000_000,
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_completion_scores_zero_within_bound_and_runs_nothing(reward, tmp_path, name):
    marker = tmp_path / "pwned"
    completion = ADVERSARIAL[name].replace("{marker}", str(marker))
    result, elapsed = _timed_score(reward, completion)
    assert result.reward == 0.0
    assert result.reason in ("no_answer", "parse_error", "timeout", "wrong")
    assert elapsed < ITEM_BOUND_S, f"{name}: {elapsed:.1f} s"
    assert not marker.exists()


@pytest.mark.parametrize("fault", [TEST_CRASH_ANSWER, TEST_SEGFAULT_ANSWER])
def test_crashed_worker_scores_zero_and_is_replaced(reward, fault):
    crashed_before, starts_before = reward.stats.crashed, reward.stats.worker_starts
    completions = ["\\boxed{1/2}", f"\\boxed{{{fault}}}", "\\boxed{0.5}", "\\boxed{2}"]
    results = reward.score(completions, ["\\boxed{\\frac12}"] * 3 + ["\\boxed{2}"])
    assert [r.reason for r in results] == ["correct", "crash", "correct", "correct"]
    assert reward.stats.crashed == crashed_before + 1
    assert reward.stats.worker_starts == starts_before + 1
    assert reward.score(["\\boxed{\\pi}"], ["\\boxed{\\pi}"])[0].reason == "correct"  # the pool still works


def test_hung_worker_is_killed_within_the_deadline_and_replaced(reward):
    killed_before = reward.stats.killed
    # Round-robin with prefetch puts the hang and two more jobs in one worker's pipe: they must be requeued.
    completions = [f"\\boxed{{{TEST_HANG_ANSWER}}}", "\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{3/4}"]
    completions += ["\\boxed{\\pi}", "\\boxed{e}"]
    references = [
        "\\boxed{1}",
        "\\boxed{1/2}",
        "\\boxed{0.5}",
        "\\boxed{0.75}",
        "\\boxed{\\pi}",
        "\\boxed{e}",
    ]
    start = time.perf_counter()
    results = reward.score(completions, references)
    elapsed = time.perf_counter() - start
    assert [r.reason for r in results] == ["timeout"] + ["correct"] * 5
    assert reward.stats.killed == killed_before + 1
    assert TIMEOUT_S + GRACE_S <= elapsed < ITEM_BOUND_S + 1.0


def test_submit_returns_before_the_batch_is_scored(reward):
    start = time.perf_counter()
    handle = reward.submit([f"\\boxed{{{TEST_HANG_ANSWER}}}", "\\boxed{0.5}"], ["\\boxed{1}", "\\boxed{1/2}"])
    assert time.perf_counter() - start < 0.5
    assert not handle.done()
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.01)
    assert [r.reason for r in handle.result()] == ["timeout", "correct"]


def test_batches_interleave_and_each_gets_its_own_results(reward):
    first = reward.submit(["\\boxed{1}", "\\boxed{x^2}"], ["\\boxed{1}", "\\boxed{x^{2}}"])
    second = reward.submit(["\\boxed{2x}", "\\boxed{5}"], ["\\boxed{x+x}", "\\boxed{6}"])
    assert [r.reason for r in second.result()] == ["correct", "wrong"]
    assert [r.reason for r in first.result()] == ["correct", "correct"]


def test_close_leaves_no_process_and_fails_unfinished_batches():
    reward = MathReward(RewardConfig(num_workers=1, timeout_s=30.0), test_faults=True)
    assert [r.reason for r in reward.score(["\\boxed{1/2}"], ["\\boxed{0.5}"])] == ["correct"]
    pids = reward.worker_pids()
    assert len(pids) == 1 and all(_alive(pid) for pid in pids)
    handle = reward.submit([f"\\boxed{{{TEST_HANG_ANSWER}}}"], ["\\boxed{1}"])
    time.sleep(0.2)
    start = time.perf_counter()
    reward.close()
    assert time.perf_counter() - start < 5.0
    with pytest.raises(RuntimeError, match="closed"):
        handle.result(timeout=1.0)
    assert not any(_alive(pid) for pid in pids)
    assert not {p.pid for p in multiprocessing.active_children()} & set(pids)
    reward.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        reward.submit(["\\boxed{2}"], ["\\boxed{2x}"])


def _die_at_start(*args: object) -> None:
    os._exit(7)


def test_workers_that_cannot_start_fail_the_batch_loudly(monkeypatch):
    monkeypatch.setattr("questa_nemo.reward.pool.worker_main", _die_at_start)
    with MathReward(RewardConfig(num_workers=1, timeout_s=TIMEOUT_S)) as broken:
        handle = broken.submit(["\\boxed{1/2}"], ["\\boxed{0.5}"])
        with pytest.raises(RuntimeError, match="die on start-up .* exit code 7"):
            handle.result(timeout=60)


def test_wait_ready_returns_once_workers_have_imported(reward):
    assert reward.wait_ready(timeout=60)


def test_bench_smoke_writes_its_json(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_reward.py"
    args = [
        "--prompts",
        "3",
        "--samples",
        "2",
        "--workers",
        "1",
        "--repeats",
        "1",
        "--out-dir",
        str(tmp_path),
    ]
    subprocess.run([sys.executable, str(bench), *args], check=True, capture_output=True, timeout=120)
    [out] = tmp_path.glob("reward_*.json")
    result = json.loads(out.read_text())
    assert result["completions_per_repeat"] == 6 and result["cores"] >= 1
    assert set(result["rates_per_s"]) == {"plain_math_verify", "serial", "pool"}
    assert all(rate > 0 for rate in result["rates_per_s"].values())
    assert sum(result["reasons"].values()) == 6


def test_forkserver_start_method_works_too():
    with MathReward(RewardConfig(num_workers=1, start_method="forkserver")) as pool:
        assert [r.reason for r in pool.score(["\\boxed{\\dfrac{1}{2}}"], ["\\boxed{0.5}"])] == ["correct"]
        pids = pool.worker_pids()
    assert not any(_alive(pid) for pid in pids)
