"""Dynamic filtering, refilling a step, overlong handling (algo/filtering.py)."""

import pytest
import torch

from questa_nemo.algo.filtering import FilterCounts, fill_step, filter_groups, handle_overlong


def test_filter_groups_bounds_are_inclusive_and_reasons_counted():
    correct = torch.tensor(
        [
            [1, 1, 1, 1],  # all correct
            [0, 0, 0, 0],  # all wrong
            [1, 0, 0, 0],  # .25: kept at lower bound .25
            [1, 1, 1, 0],  # .75: kept at upper bound .75
            [1, 1, 0, 0],  # .5 kept
        ]
    )
    result = filter_groups(correct, lower=0.25, upper=0.75)
    assert result.keep.tolist() == [False, False, True, True, True]
    assert result.counts == FilterCounts(kept=3, all_correct=1, all_wrong=1)
    assert result.success_rate.tolist() == [1.0, 0.0, 0.25, 0.75, 0.5]
    tight = filter_groups(correct, lower=0.3, upper=0.7)
    assert tight.counts == FilterCounts(kept=1, all_correct=1, all_wrong=1, too_easy=1, too_hard=1)
    assert tight.counts.dropped == 4


def test_recipe_bounds_with_group_of_16_drop_only_uniform_groups():
    rates = torch.tensor([[1] * k + [0] * (16 - k) for k in range(17)])
    keep = filter_groups(rates, 0.05, 0.95).keep
    assert keep.tolist() == [False] + [True] * 15 + [False]


def test_fill_step_draws_until_full_and_reports():
    batches = iter([[[1, 1], [0, 1]], [[0, 0], [1, 0]], [[1, 0], [0, 1]]])
    filled = fill_step(
        lambda: next(batches), lambda g: g, target_groups=3, max_prompt_batches=4, lower=0.1, upper=0.9
    )
    assert filled.full and filled.prompt_batches == 3
    assert filled.groups == [[0, 1], [1, 0], [1, 0]]
    assert filled.counts == FilterCounts(kept=4, all_correct=1, all_wrong=1)


def test_fill_step_stops_at_the_bound_and_says_it_is_short():
    draws = []

    def draw():
        draws.append(1)
        return [[1, 1], [0, 0]]

    filled = fill_step(draw, lambda g: g, target_groups=2, max_prompt_batches=2, lower=0.05, upper=0.95)
    assert not filled.full and filled.groups == [] and len(draws) == 3
    assert filled.counts.all_correct == 3 and filled.counts.all_wrong == 3


def test_fill_step_disabled_takes_the_first_batch():
    filled = fill_step(lambda: [[1, 1], [0, 0]], lambda g: g, 2, 4, 0.05, 0.95, enabled=False)
    assert filled.groups == [[1, 1], [0, 0]] and filled.prompt_batches == 1 and filled.full


def test_overlong_modes():
    rewards = torch.tensor([1.0, 0.0, 1.0])
    truncated = torch.tensor([False, True, True])
    none = handle_overlong(rewards, truncated, "none")
    assert none.truncated == 2 and none.sequence_mask.all() and torch.equal(none.rewards, rewards)
    masked = handle_overlong(rewards, truncated, "mask")
    assert masked.sequence_mask.tolist() == [True, False, False] and torch.equal(masked.rewards, rewards)
    penalised = handle_overlong(rewards, truncated, "penalty", penalty=-1.0)
    assert penalised.rewards.tolist() == [1.0, -1.0, -1.0] and penalised.sequence_mask.all()
    with pytest.raises(ValueError, match="reward.overlong"):
        handle_overlong(rewards, truncated, "drop")


def test_filter_counts_metrics_for_the_log():
    counts = FilterCounts(kept=3, all_correct=1, all_wrong=2) + FilterCounts(kept=1, too_hard=1)
    assert counts.metrics() == {
        "passed_groups": 4,
        "dropped_all_correct": 1,
        "dropped_all_wrong": 2,
        "dropped_too_easy": 0,
        "dropped_too_hard": 1,
    }
