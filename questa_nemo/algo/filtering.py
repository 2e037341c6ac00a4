"""Dynamic filtering of groups by success rate, refilling a step's batch, and overlong completions.

A group whose samples all succeed or all fail has zero advantage under any group baseline and carries almost no
signal under the reference's batch normalisation either; the recipe keeps a group only when its success rate is
within [0.05, 0.95] and draws more prompts until the step is full (DAPO's dynamic sampling, bounded here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import torch


@dataclass
class FilterCounts:
    """Why groups were kept or dropped; add counts of several prompt batches with `+`."""

    kept: int = 0
    all_correct: int = 0  # success rate 1
    all_wrong: int = 0  # success rate 0
    too_easy: int = 0  # above the upper bound but not all correct
    too_hard: int = 0  # below the lower bound but not all wrong

    @property
    def dropped(self) -> int:
        return self.all_correct + self.all_wrong + self.too_easy + self.too_hard

    def metrics(self) -> dict[str, int]:
        """For the step log, summed over DP ranks (the trainer adds the `filter/` prefix). `passed_groups`: groups
        within the bounds, the step's surplus included (the trainer logs the ones it trains on as `kept_groups`)."""
        return {
            "passed_groups": self.kept,
            "dropped_all_correct": self.all_correct,
            "dropped_all_wrong": self.all_wrong,
            "dropped_too_easy": self.too_easy,
            "dropped_too_hard": self.too_hard,
        }

    def __add__(self, other: FilterCounts) -> FilterCounts:
        return FilterCounts(
            self.kept + other.kept,
            self.all_correct + other.all_correct,
            self.all_wrong + other.all_wrong,
            self.too_easy + other.too_easy,
            self.too_hard + other.too_hard,
        )


class GroupFilter(NamedTuple):
    keep: torch.Tensor  # [num_groups] bool
    success_rate: torch.Tensor  # [num_groups] float32
    counts: FilterCounts


def filter_groups(correct: torch.Tensor, lower: float, upper: float) -> GroupFilter:
    """Keep groups whose success rate lies in [lower, upper] (both inclusive, as the reference).

    correct: [num_groups, G] with 1 for a correct sample (the raw correctness, before reward shaping).
    """
    rate = (correct > 0).float().mean(dim=-1)
    keep = (rate >= lower) & (rate <= upper)
    all_correct = rate == 1.0
    all_wrong = rate == 0.0
    counts = FilterCounts(
        kept=int(keep.sum()),
        all_correct=int((all_correct & ~keep).sum()),
        all_wrong=int((all_wrong & ~keep).sum()),
        too_easy=int(((rate > upper) & ~all_correct).sum()),
        too_hard=int(((rate < lower) & ~all_wrong).sum()),
    )
    return GroupFilter(keep=keep, success_rate=rate, counts=counts)


GroupT = TypeVar("GroupT")


@dataclass(frozen=True)
class Share:
    """This rank's share of every prompt batch under data parallelism: of a batch of `batch` prompts it holds
    the groups at global positions rank, rank + size, rank + 2 size, ...; `sum` all-reduces a tensor over the
    data-parallel group (model/parallel.py's Reduce.sum)."""

    rank: int = 0
    size: int = 1
    batch: int = 0
    sum: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class FilledStep(Generic[GroupT]):
    """The groups of one training step after filtering, and how they were found."""

    groups: list[GroupT]  # this rank's groups among the step's first `target_groups` kept, in drawn order
    counts: FilterCounts  # over every group this rank drew
    prompt_batches: int  # prompt batches drawn (generated and scored)
    surplus: int  # kept groups beyond the target, discarded (over all ranks)
    full: bool  # False when the bound on prompt batches was hit first


def fill_step(
    draw: Callable[[], Sequence[GroupT]],
    correctness: Callable[[GroupT], Sequence[float]],
    target_groups: int,
    max_prompt_batches: int,
    lower: float,
    upper: float,
    enabled: bool = True,
    share: Share | None = None,
) -> FilledStep[GroupT]:
    """Draw prompt batches (each one generated and scored by `draw`) until `target_groups` groups pass the filter.

    Draws at most 1 + max_prompt_batches batches (config `algo.max_prompt_batches` bounds the extra ones); a
    step that is still short runs with fewer groups, and `full` says so. With `enabled` False the first batch
    is taken as it is. `correctness(group)` gives its G samples' correctness.

    Data parallel (`share`): every rank draws its share of the same prompt batches. The step takes the first
    `target_groups` kept groups of all ranks in the batches' global order (one small all-reduce of keep flags
    per batch), and each rank trains on those it holds - so the step's groups are the ones a single rank
    would have kept, whatever the DP layout (ranks may hold unequal numbers of them), and all ranks draw
    the same batches: one shared prompt cursor.
    """
    share = share or Share()
    if not enabled:
        groups = list(draw())
        return FilledStep(groups, FilterCounts(kept=len(groups)), 1, 0, True)
    kept: list[GroupT] = []
    counts = FilterCounts()
    batches = taken = surplus = 0
    while batches < 1 + max_prompt_batches and taken < target_groups:
        batches += 1
        groups = list(draw())
        keep = torch.zeros(len(groups), dtype=torch.bool)
        if groups:
            correct = torch.tensor([list(correctness(g)) for g in groups], dtype=torch.float32)
            result = filter_groups(correct, lower, upper)
            counts = counts + result.counts
            keep = result.keep
        mine = {j: j for j in range(len(groups))}  # global position -> this rank's index
        if share.size > 1:
            codes = torch.zeros(share.batch, dtype=torch.int64)  # 0 another rank's, 1 dropped, 2 kept
            positions = [share.rank + share.size * j for j in range(len(groups))]
            codes[positions] = 1 + keep.long()
            keep = share.sum(codes) == 2
            mine = {p: j for j, p in enumerate(positions)}
        order = keep.nonzero()[:, 0].tolist()  # kept groups of the batch, in global order
        need = target_groups - taken
        kept.extend(groups[mine[p]] for p in order[:need] if p in mine)
        taken += min(len(order), need)
        surplus += max(len(order) - need, 0)
    return FilledStep(groups=kept, counts=counts, prompt_batches=batches, surplus=surplus,
                      full=taken >= target_groups)


class Overlong(NamedTuple):
    rewards: torch.Tensor  # [N] raw rewards, truncated ones replaced by the penalty in `penalty` mode
    sequence_mask: torch.Tensor  # [N] bool, False for completions dropped from the loss in `mask` mode
    truncated: int  # completions cut at max_new_tokens (finish_reason "length")


def handle_overlong(
    rewards: torch.Tensor, truncated: torch.Tensor, mode: str, penalty: float = 0.0
) -> Overlong:
    """Config `reward.overlong`: none (count only) | mask (drop from the loss) | penalty (reward := penalty).

    rewards: [N] raw correctness, truncated: [N] bool. In `mask` mode the completion still counts in its
    group's success rate and baseline (it was a real attempt); the caller multiplies its completion-token mask by
    `sequence_mask` before advantages and loss, so its tokens neither move the policy nor the batch statistics.
    The penalty replaces the raw reward, before shaping.
    """
    truncated = truncated.bool()
    keep = torch.ones_like(truncated)
    if mode == "mask":
        keep = ~truncated
    elif mode == "penalty":
        rewards = torch.where(truncated, torch.full_like(rewards, penalty, dtype=rewards.dtype), rewards)
    elif mode != "none":
        raise ValueError(f"reward.overlong: unknown mode {mode!r} (none | mask | penalty)")
    return Overlong(rewards=rewards, sequence_mask=keep, truncated=int(truncated.sum()))
