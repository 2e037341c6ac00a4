"""The result every reward function returns: the reward and why, so logs can count each outcome."""

from __future__ import annotations

from dataclasses import dataclass

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
