"""Adaptive hints: levels, retries, mixed groups, annealing, importance correction, diagnostics
(algo/hint_levels.py). Hand-built groups, hand-computed results."""

import json
import math

import pytest
import torch

from questa_nemo.algo.hint_levels import (
    HintLevels,
    TokenBudget,
    affordable_groups,
    anneal_factor,
    generated_tokens,
    group_hint_mask,
    group_reliance,
    hint_reliance,
    level_histogram,
    level_metrics,
    level_move,
    outcomes_from,
    plan_retries,
    sample_hint_ratios,
    scheduled_ratio,
    stage_ratio,
    training_progress,
    unhinted_count,
    unhinted_weight,
    update_levels,
    zero_signal_share,
)


# ------------------------------------------------------------------------------------- 1. levels
def test_level_move_band_rule():
    assert level_move(0.0, 0.05, 0.95) == 1  # all wrong
    assert level_move(0.03, 0.05, 0.95) == 1  # too hard, not all wrong
    assert level_move(0.05, 0.05, 0.95) == 0  # lower bound inclusive
    assert level_move(0.5, 0.05, 0.95) == 0
    assert level_move(0.95, 0.05, 0.95) == 0  # upper bound inclusive
    assert level_move(0.97, 0.05, 0.95) == -1
    assert level_move(1.0, 0.05, 0.95) == -1  # all right
    # a band that includes 0 and 1 still moves all-wrong up and all-right down
    assert level_move(0.0, 0.0, 1.0) == 1 and level_move(1.0, 0.0, 1.0) == -1


def test_update_levels_moves_clips_and_leaves_others():
    state = HintLevels(
        min_level=0, max_level=4, step=1, initial_level=2, levels={"a": 2, "b": 2, "c": 4, "d": 0}
    )
    new = update_levels(
        state, {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": 0.5, "f": 0.25}, filter_min=0.05, filter_max=0.95
    )
    # a all wrong 2->3; b all right 2->1; c at max stays 4; d at min stays 0; e new, in band: initial 2;
    # f new, in band: 2
    assert new.levels == {"a": 3, "b": 1, "c": 4, "d": 0, "e": 2, "f": 2}
    assert state.levels == {"a": 2, "b": 2, "c": 4, "d": 0}  # the input is not changed
    assert new.ratio("a") == 75.0 and new.ratio("b") == 25.0 and new.ratio("unseen") == 50.0


def test_update_levels_step_two_and_ratio_cap():
    state = HintLevels(min_level=1, max_level=5, step=2, initial_level=3, ratio_per_level=30.0)
    new = update_levels(state, {"x": 0.0, "y": 1.0, "z": 0.0})
    assert new.levels == {"x": 5, "y": 1, "z": 5}
    assert new.ratio("x") == 100.0  # 5 * 30 capped at 100
    assert new.ratio("y") == 30.0
    again = update_levels(new, {"x": 0.0, "y": 1.0})
    assert again.levels == {"x": 5, "y": 1, "z": 5}  # all at max / min: unchanged


def test_update_levels_empty_step_and_bad_rate():
    state = HintLevels(levels={"a": 1})
    assert update_levels(state, {}).levels == {"a": 1}
    with pytest.raises(ValueError, match="'a'"):
        update_levels(state, {"a": 1.5})


def test_levels_walk_to_least_hint_in_band():
    """A problem that needs level 2 to leave all-wrong: starting at 4 it walks down to 2 and stays there."""
    state = HintLevels(min_level=0, max_level=4, initial_level=4)

    def rate(level: int) -> float:  # what the group does at each level
        return {0: 0.0, 1: 0.0, 2: 0.5, 3: 1.0, 4: 1.0}[level]

    seen = []
    for _ in range(5):
        state = update_levels(state, {"p": rate(state.level("p"))})
        seen.append(state.level("p"))
    assert seen == [3, 2, 2, 2, 2]


def test_bounds_are_validated():
    with pytest.raises(ValueError, match="initial_level"):
        HintLevels(min_level=1, max_level=3, initial_level=0)
    with pytest.raises(ValueError, match="step"):
        HintLevels(step=0)
    with pytest.raises(ValueError, match="min_level"):
        HintLevels(min_level=3, max_level=2, initial_level=2)


def test_state_json_round_trip():
    state = HintLevels(
        min_level=0,
        max_level=6,
        step=1,
        initial_level=3,
        ratio_per_level=12.5,
        levels={"p10": 6, "p2": 0, "p3": 4},
    )
    text = json.dumps(state.state_dict())
    back = HintLevels.from_state_dict(json.loads(text))
    assert back == state
    assert json.loads(text)["levels"] == {"p10": 6, "p2": 0, "p3": 4}


def test_state_dict_rejects_bad_fields():
    good = HintLevels(levels={"a": 1}).state_dict()
    with pytest.raises(ValueError, match="'step'"):
        HintLevels.from_state_dict({**good, "step": "1"})
    with pytest.raises(ValueError, match="'levels'"):
        HintLevels.from_state_dict({**good, "levels": {"a": 9}})  # outside [0, 4]
    with pytest.raises(ValueError, match="version"):
        HintLevels.from_state_dict({**good, "version": 99})


def test_outcomes_from_groups_averages_repeats():
    out = outcomes_from(["a", "b", "a"], torch.tensor([0.0, 0.75, 0.5]))
    assert out == {"a": 0.25, "b": 0.75}
    with pytest.raises(ValueError):
        outcomes_from(["a"], torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------------------------- 2. retries
def test_plan_retries_picks_all_wrong_groups_below_max():
    state = HintLevels(max_level=4, initial_level=2, levels={"a": 1, "b": 4, "c": 2})
    plan = plan_retries(
        ["a", "b", "c", "d", "e"],
        torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0]),
        state,
        retries_used={"e": 1},
        max_retries=1,
    )
    # a: retried, 1 -> 2; b: at max level; c: not all wrong; d: new, 2 -> 3; e: bound reached
    assert plan.retry == [0, 3]
    assert plan.levels.levels == {"a": 2, "b": 4, "c": 2, "d": 3}
    assert plan.retries_used == {"a": 1, "d": 1, "e": 1}
    assert (plan.bound_reached, plan.at_max_level, plan.over_group_limit) == (1, 1, 0)
    assert state.levels == {"a": 1, "b": 4, "c": 2}


def test_retry_chain_stops_at_the_bound():
    state = HintLevels(max_level=4, initial_level=0)
    used: dict[str, int] = {}
    levels_seen = []
    for _ in range(4):  # the problem keeps failing
        plan = plan_retries(["p"], torch.tensor([0.0]), state, used, max_retries=2)
        state, used = plan.levels, plan.retries_used
        levels_seen.append((plan.retry, state.level("p"), plan.bound_reached))
    assert levels_seen == [([0], 1, 0), ([0], 2, 0), ([], 2, 1), ([], 2, 1)]


def test_plan_retries_group_limit_duplicates_and_empty():
    state = HintLevels(initial_level=1)
    plan = plan_retries(["a", "a", "b", "c"], torch.zeros(4), state, {}, max_retries=3, max_groups=1)
    assert plan.retry == [0]  # "a" once; b and c over the limit
    assert plan.over_group_limit == 2 and plan.levels.levels == {"a": 2}
    empty = plan_retries([], torch.zeros(0), state, {}, max_retries=1)
    assert empty.retry == [] and empty.levels == state and empty.retries_used == {}
    none = plan_retries(["a"], torch.tensor([0.0]), state, {}, max_retries=0)
    assert none.retry == [] and none.bound_reached == 1


def test_all_problems_at_max_level_give_no_retry():
    state = HintLevels(max_level=3, initial_level=3)
    plan = plan_retries(["a", "b"], torch.zeros(2), state, {}, max_retries=5)
    assert plan.retry == [] and plan.at_max_level == 2
    assert update_levels(state, {"a": 0.0, "b": 0.0}).levels == {"a": 3, "b": 3}


def test_token_budget_counts_retries():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert generated_tokens(mask) == 4
    budget = TokenBudget(limit=100).charge(60).charge(generated_tokens(mask), retry=True)
    assert (budget.used, budget.retry_used, budget.remaining, budget.exhausted) == (64, 4, 36, False)
    assert affordable_groups(budget, 10.0) == 3
    assert affordable_groups(TokenBudget(), 10.0) is None
    spent = budget.charge(40)
    assert spent.exhausted and spent.remaining == 0 and affordable_groups(spent, 10.0) == 0
    assert TokenBudget.from_state_dict(json.loads(json.dumps(spent.state_dict()))) == spent
    with pytest.raises(ValueError):
        budget.charge(-1)


# ------------------------------------------------------------------------------------- 3. mixed groups
def test_unhinted_count_rounding():
    assert unhinted_count(8, 0.25) == 2
    assert unhinted_count(6, 0.25) == 2  # 1.5 rounds up
    assert unhinted_count(10, 0.25) == 3  # 2.5 rounds up, not to even
    assert unhinted_count(4, 0.1) == 0  # 0.4
    assert unhinted_count(8, 0.0) == 0
    assert unhinted_count(8, 1.0) == 8
    assert unhinted_count(1, 0.5) == 1
    with pytest.raises(ValueError):
        unhinted_count(8, 1.5)


def test_sample_hint_ratios_layout():
    assert group_hint_mask(4, 0.5).tolist() == [False, False, True, True]
    ratios = sample_hint_ratios(torch.tensor([50.0, 25.0, 0.0]), 4, 0.25)
    assert ratios.tolist() == [0, 50, 50, 50, 0, 25, 25, 25, 0, 0, 0, 0]
    assert sample_hint_ratios(torch.tensor([50.0]), 3, 0.0).tolist() == [50, 50, 50]
    assert sample_hint_ratios(torch.tensor([50.0]), 3, 1.0).tolist() == [0, 0, 0]
    assert sample_hint_ratios(torch.zeros(0), 4, 0.5).shape == (0,)


# ------------------------------------------------------------------------------------- 4. annealing
def test_anneal_start_middle_end():
    assert anneal_factor(0.0, "linear") == 1.0
    assert anneal_factor(0.5, "linear") == 0.5
    assert anneal_factor(1.0, "linear") == 0.0
    assert anneal_factor(0.0, "cosine") == 1.0
    assert anneal_factor(0.5, "cosine") == pytest.approx(0.5)
    assert anneal_factor(0.25, "cosine") == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert anneal_factor(1.0, "cosine") == 0.0
    assert anneal_factor(0.7, "constant") == 1.0
    # end 0.8: zero from 80% of training on
    assert anneal_factor(0.4, "linear", end=0.8) == 0.5
    assert anneal_factor(0.8, "cosine", end=0.8) == 0.0
    assert anneal_factor(0.9, "linear", end=0.8) == 0.0
    with pytest.raises(ValueError):
        anneal_factor(0.5, "exp")


def test_scheduled_ratio_and_questa_stages():
    assert scheduled_ratio(0.5, "linear", start_ratio=50.0) == 25.0
    assert scheduled_ratio(1.0, "cosine", start_ratio=50.0) == 0.0
    assert scheduled_ratio(0.0, "stages") == 50.0
    assert scheduled_ratio(0.49, "stages") == 50.0
    assert scheduled_ratio(0.5, "stages") == 25.0
    assert scheduled_ratio(0.99, "stages") == 25.0
    assert scheduled_ratio(1.0, "stages") == 0.0  # past the last boundary
    assert stage_ratio(0.7, (0.4, 0.8, 1.0), (50, 25, 0)) == 25.0
    with pytest.raises(ValueError):
        stage_ratio(0.5, (0.5, 0.5), (50, 25))
    assert training_progress(30, 120) == 0.25
    assert training_progress(200, 120) == 1.0


# ------------------------------------------------------------------------------------- 5. importance correction
def test_unhinted_weight_values_cap_and_padding():
    lp_h = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -0.5, float("-inf")]])
    lp_u = torch.tensor([[-1.0, -2.0, 1.0], [-2.0 + math.log(3.0), -0.5 + math.log(6.0), float("nan")]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = unhinted_weight(lp_u, lp_h, mask, cap=5.0)
    # row 0: exp(0)=1, exp(-1), exp(2)=7.39 > 5 masked; row 1: 3, 6 > 5 masked, padding 0
    expected = torch.tensor([[1.0, math.exp(-1.0), 0.0], [3.0, 0.0, 0.0]])
    assert torch.allclose(out.weight, expected, atol=1e-6)
    assert out.over_cap.tolist() == [[False, False, True], [False, True, False]]
    assert out.weight_max == pytest.approx(math.exp(2.0), rel=1e-6)
    assert not torch.isnan(out.weight).any()
    uncapped = unhinted_weight(lp_u, lp_h, mask, cap=None)
    assert uncapped.weight[0, 2] == pytest.approx(math.exp(2.0), rel=1e-6)
    assert not uncapped.over_cap.any()


def test_unhinted_rows_keep_weight_one():
    lp_h = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    lp_u = torch.tensor([[0.0, 0.0], [5.0, 5.0]])  # the unhinted row's values are ignored
    mask = torch.tensor([[True, True], [True, False]])
    out = unhinted_weight(lp_u, lp_h, mask, cap=5.0, hinted=torch.tensor([True, False]))
    assert torch.allclose(out.weight, torch.tensor([[math.e, math.e], [1.0, 0.0]]))
    assert not out.over_cap.any() and out.weight_max == pytest.approx(math.e)
    empty = unhinted_weight(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.bool))
    assert empty.weight.shape == (0, 3) and empty.weight_max == 0.0


# ------------------------------------------------------------------------------------- 6. diagnostics
def test_zero_signal_share():
    rewards = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [5.0, 5.0, 0.0, 5.0]])
    assert zero_signal_share(rewards) == 0.5
    assert zero_signal_share(torch.zeros(0, 4)) == 0.0


def test_level_histogram_and_metrics():
    state = HintLevels(max_level=3, initial_level=1, ratio_per_level=25.0, levels={"a": 0, "b": 3, "c": 3})
    assert level_histogram(state) == {0: 1, 1: 0, 2: 0, 3: 2}
    assert level_histogram(state, ["a", "new"]) == {0: 1, 1: 1, 2: 0, 3: 0}
    m = level_metrics(state)
    assert m["level_3"] == 2.0 and m["level_mean"] == 2.0 and m["ratio_mean"] == 50.0
    assert m["at_max_share"] == pytest.approx(2 / 3)
    assert level_metrics(HintLevels())["level_mean"] == 0.0


def test_hint_reliance():
    assert hint_reliance({"a": 0.75, "b": 0.5, "c": 1.0}, {"a": 0.25, "b": 0.5, "d": 0.0}) == 0.25
    assert hint_reliance({"a": 1.0}, {"b": 0.0}) is None
    correct = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0]])
    hinted = group_hint_mask(4, 0.25)  # first sample unhinted
    # group 0: 1 - 0; group 1: 1/3 - 1; group 2: 0 - 0 -> mean (1 - 2/3 + 0) / 3
    assert group_reliance(correct, hinted) == pytest.approx((1 - 2 / 3) / 3)
    assert group_reliance(correct, group_hint_mask(4, 0.0)) is None
