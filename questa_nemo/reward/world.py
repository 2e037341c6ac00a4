"""Reward of the small world (questa_nemo/data/world.py): 1 when the completion has exactly one number line per
step followed by one `\\boxed{<number>}` line, and the boxed number is the reference result.
Intermediate results are not checked (as in the prototypes, docs/world.md): the final answer decides, the line count
keeps the format honest.
"""

from __future__ import annotations

import re

from questa_nemo.reward.types import BAD_FORMAT, CORRECT, NO_ANSWER, PARSE_ERROR, WRONG, Done, RewardResult

_BOXED = re.compile(r"\\boxed\{([0-9]+)\}")
_STEP = re.compile(r"[0-9]+")
_END_OF_TEXT = "<|endoftext|>"
_PROBLEM = re.compile(r"^(\d+)((?: [+\-*]\d)*)")  # start, then " <op><digit>" per operation (data/world.py)
_OPERATION = re.compile(r" [+\-*]\d")


def count_ops(text: str) -> int:
    """n of a world problem or prompt: the number of operations, which is the number of lines a solution has
    before its boxed answer."""
    m = _PROBLEM.match(text)
    if m is None:
        raise ValueError(f"not a world problem: {text[:40]!r}")
    return len(_OPERATION.findall(m.group(2)))


def _number(reference_answer: str) -> int | None:
    text = reference_answer.strip()
    m = _BOXED.fullmatch(text)
    text = m.group(1) if m else text
    return int(text) if _STEP.fullmatch(text) else None


def world_reward(completion: str, reference_answer: str, n_steps: int) -> RewardResult:
    """Score one completion. `reference_answer` is the result ("05") or the boxed form ("\\boxed{05}");
    `n_steps` the problem's number of operations (count_ops of its prompt)."""
    reference = _number(reference_answer)
    if reference is None:
        return RewardResult(0.0, PARSE_ERROR)
    text = completion.split(_END_OF_TEXT)[0].strip()
    answers = _BOXED.findall(text)
    if not answers:
        return RewardResult(0.0, NO_ANSWER)
    lines = text.split("\n")
    well_formed = (
        len(lines) == n_steps + 1
        and all(_STEP.fullmatch(line) for line in lines[:-1])
        and _BOXED.fullmatch(lines[-1]) is not None
    )
    if not well_formed:
        return RewardResult(0.0, BAD_FORMAT)
    if int(answers[-1]) != reference:
        return RewardResult(0.0, WRONG)
    return RewardResult(1.0, CORRECT)


def world_rewards(completions: list[str], references: list[str], n_steps: list[int]) -> list[RewardResult]:
    """world_reward over a batch.  # [B] each"""
    if not len(completions) == len(references) == len(n_steps):
        raise ValueError(
            f"{len(completions)} completions, {len(references)} references, {len(n_steps)} n_steps"
        )
    return [world_reward(c, r, n) for c, r, n in zip(completions, references, n_steps)]


class WorldReward:
    """The small world's reward behind the Reward protocol: exact and cheap, so scored on the spot."""

    def submit(self, completions: list[str], references: list[str], problems: list[str]) -> Done:
        return Done(world_rewards(completions, references, [count_ops(p) for p in problems]))
