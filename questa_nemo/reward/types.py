"""The result every reward function returns: the reward and why, so logs can count each outcome."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

CORRECT = "correct"  # the final answer matches the reference
WRONG = "wrong"  # an answer was found and it does not match
NO_ANSWER = "no_answer"  # no final answer could be found in the completion
TIMEOUT = "timeout"  # the checker ran past its time limit
PARSE_ERROR = "parse_error"  # the answer or the reference could not be parsed / the checker raised
BAD_FORMAT = "bad_format"  # the completion breaks the required format (small world: wrong number of steps)
CRASH = "crash"  # the checker's worker process died while scoring this completion

REASONS: tuple[str, ...] = (CORRECT, WRONG, NO_ANSWER, TIMEOUT, PARSE_ERROR, BAD_FORMAT, CRASH)


@dataclass(frozen=True)
class RewardResult:
    reward: float  # 1.0 correct, else 0.0 (scaling and bias are applied by the trainer)
    reason: str  # one of REASONS

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"RewardResult.reason: {self.reason!r} is not one of {', '.join(REASONS)}")


class RewardHandle(Protocol):
    """Scores on their way: `result()` waits for one RewardResult per completion, in order."""

    def result(self, timeout: float | None = None) -> list[RewardResult]: ...


class Reward(Protocol):
    """A reward function (reward.math.MathReward, reward.world.WorldReward): `submit` returns at once."""

    def submit(self, completions: list[str], references: list[str], problems: list[str]) -> RewardHandle:
        """Start scoring each completion against its reference; `problems` are the prompts' texts (the small
        world's reward reads each problem's number of steps from it; the math reward does not read it)."""
        ...


class Done:
    """A RewardHandle of results computed on the spot."""

    def __init__(self, results: list[RewardResult]):
        self._results = results

    def result(self, timeout: float | None = None) -> list[RewardResult]:
        return self._results
