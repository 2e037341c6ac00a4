"""Adaptive hints: per-problem hint levels, in-step retries, mixed groups, annealing, the importance
correction toward the unhinted prompt, and the hint diagnostics. Pure functions on tensors and dicts.

QuestA shows every hard problem a fixed share of its reference solution (50%, then 25% in a second stage). The
methods after it (docs/recipe.md, last section) adapt the hint to each problem: a problem whose group fails entirely gets
a longer hint, one whose group succeeds entirely a shorter one (AdaBack, GHPO); a group that fails entirely is
sampled again at once with a longer hint (BREAD, Guide-GRPO); part of each group stays unhinted (NuRL, POPE);
the hint anneals to zero (UFT, Prefix-RFT); hinted samples can be reweighted toward the unhinted prompt
(Guide-GRPO).

Hint level: an integer k in [min_level, max_level]; the hint shown is the first k * ratio_per_level percent of
the reference solution (capped at 100), cut by `questa_nemo.data.hints.hint_end` in the run's cut mode (char,
token, sentence or step). Integer levels keep the checkpoint exact and the level histogram discrete.

Group conventions as in filtering.py / advantages.py: a step has B groups of G samples, samples of a group
adjacent (N = B*G), success rate of a group = mean of its samples' raw correctness. Problem ids are strings (the
data rows' `id`), so the level table is a JSON object.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

STATE_VERSION = 1
SCHEDULES = ("constant", "linear", "cosine", "stages")


# ------------------------------------------------------------------------------------- 1. level state
@dataclass
class HintLevels:
    """The per-problem hint levels and their bounds; kept across steps and in the checkpoint.

    levels: problem id -> level; a problem not yet seen is at `initial_level`. A level moves by `step` per
    update and stays in [min_level, max_level]. The hint ratio (percent) of level k is
    min(k * ratio_per_level, 100).
    """

    min_level: int = 0
    max_level: int = 4
    step: int = 1
    initial_level: int = 2
    ratio_per_level: float = 25.0
    levels: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.min_level <= self.max_level:
            raise ValueError(
                f"hint levels: need 0 <= min_level <= max_level, got {self.min_level}, {self.max_level}"
            )
        if not self.min_level <= self.initial_level <= self.max_level:
            raise ValueError(
                f"hint levels: initial_level {self.initial_level} is outside [{self.min_level}, {self.max_level}]"
            )
        if self.step < 1:
            raise ValueError(f"hint levels: step must be >= 1, got {self.step}")
        if not self.ratio_per_level > 0:
            raise ValueError(f"hint levels: ratio_per_level must be > 0, got {self.ratio_per_level}")

    def level(self, problem_id: str) -> int:
        return self.levels.get(problem_id, self.initial_level)

    def ratio(self, problem_id: str) -> float:
        """Hint ratio in percent of the problem's current level (0 = no hint)."""
        return level_ratio(self.level(problem_id), self.ratio_per_level)

    def clip(self, level: int) -> int:
        return min(max(level, self.min_level), self.max_level)

    def with_levels(self, levels: Mapping[str, int]) -> HintLevels:
        """A copy with these levels (the bounds unchanged)."""
        return replace(self, levels=dict(levels))

    def state_dict(self) -> dict:
        """Plain JSON-able dict (str keys, int/float values) for the checkpoint; no pickle."""
        return {
            "version": STATE_VERSION,
            "min_level": self.min_level,
            "max_level": self.max_level,
            "step": self.step,
            "initial_level": self.initial_level,
            "ratio_per_level": self.ratio_per_level,
            "levels": {str(k): int(v) for k, v in sorted(self.levels.items())},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> HintLevels:
        """Inverse of `state_dict`; a missing or ill-typed field raises ValueError naming it."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"hint levels: state version {state.get('version')!r}, expected {STATE_VERSION}")
        ints = {}
        for key in ("min_level", "max_level", "step", "initial_level"):
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"hint levels: field {key!r} must be an integer, got {value!r}")
            ints[key] = value
        ratio = state.get("ratio_per_level")
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
            raise ValueError(f"hint levels: field 'ratio_per_level' must be a number, got {ratio!r}")
        raw = state.get("levels")
        if not isinstance(raw, Mapping):
            raise ValueError("hint levels: field 'levels' must be an object of problem id -> level")
        levels: dict[str, int] = {}
        for pid, value in raw.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"hint levels: field 'levels'[{pid!r}] must be an integer, got {value!r}")
            if not ints["min_level"] <= value <= ints["max_level"]:
                raise ValueError(f"hint levels: field 'levels'[{pid!r}] = {value} is outside the bounds")
            levels[str(pid)] = value
        return cls(**ints, ratio_per_level=float(ratio), levels=levels)


def level_ratio(level: int, ratio_per_level: float) -> float:
    """Hint ratio (percent) of a level: min(level * ratio_per_level, 100)."""
    return min(level * ratio_per_level, 100.0)


def level_move(rate: float, filter_min: float, filter_max: float) -> int:
    """Direction of a problem's next level from its group's success rate: +1 longer hint, -1 shorter, 0 stay.

    All wrong (rate 0) or below the band -> +1; all right (rate 1) or above the band -> -1; inside the band
    [filter_min, filter_max] (inclusive, as the filter) -> 0. All wrong moves up and all right moves down even
    when the band includes 0 or 1.
    """
    if rate <= 0.0 or rate < filter_min:
        return 1
    if rate >= 1.0 or rate > filter_max:
        return -1
    return 0


def update_levels(
    state: HintLevels, outcomes: Mapping[str, float], filter_min: float = 0.05, filter_max: float = 0.95
) -> HintLevels:
    """The levels after one step: each problem in `outcomes` (problem id -> group success rate in [0, 1]) moves
    by state.step in the direction of `level_move`, clipped to [min_level, max_level]; other problems keep their
    level. Returns a new HintLevels; `state` is not changed.

    Level by level this walks toward the least hint that lands the group inside the band: too easy -> shorter
    until the group stops succeeding everywhere, too hard -> longer until it stops failing everywhere.
    """
    levels = dict(state.levels)
    for pid, rate in outcomes.items():
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"hint levels: success rate of problem {pid!r} is {rate}, outside [0, 1]")
        levels[pid] = state.clip(state.level(pid) + state.step * level_move(rate, filter_min, filter_max))
    return state.with_levels(levels)


def outcomes_from(problem_ids: Sequence[str], success_rate: torch.Tensor) -> dict[str, float]:
    """problem id -> success rate from a step's groups (ids [B], rates [B] as filter_groups returns). A problem
    drawn in several groups of the step gets the mean of their rates."""
    if len(problem_ids) != success_rate.numel():
        raise ValueError(f"{len(problem_ids)} problem ids for {success_rate.numel()} group success rates")
    sums: dict[str, list[float]] = {}
    for pid, rate in zip(problem_ids, success_rate.tolist()):
        sums.setdefault(pid, []).append(float(rate))
    return {pid: sum(r) / len(r) for pid, r in sums.items()}


# ------------------------------------------------------------------------------------- 2. in-step retry
class RetryPlan(NamedTuple):
    retry: list[int]  # indices of the groups to sample again now, with their problem's new (longer) level
    levels: HintLevels  # levels after the bump of the retried problems
    retries_used: dict[str, int]  # retries of this step per problem, including the ones planned here
    bound_reached: int  # all-wrong groups not retried: the problem used its max_retries this step
    at_max_level: int  # all-wrong groups not retried: no longer hint exists
    over_group_limit: int  # all-wrong groups not retried: max_groups (the budget) was reached


def plan_retries(
    problem_ids: Sequence[str],
    success_rate: torch.Tensor,
    state: HintLevels,
    retries_used: Mapping[str, int],
    max_retries: int,
    max_groups: int | None = None,
) -> RetryPlan:
    """Which groups of this step to sample again at once with a longer hint.

    problem_ids: [B], success_rate: [B] (filter_groups' rate). A group is retried when it failed entirely
    (rate 0), its problem is below max_level, and its problem has used fewer than `max_retries` retries in this
    step (`retries_used`, reset by the caller at each step). Retried problems move up by state.step; the retry
    is generated with the new level. At most `max_groups` groups are retried (None: no limit), in group order;
    the caller derives it from the token budget (`affordable_groups`). A problem occurring in several failed
    groups is retried once per plan. Returns the plan; nothing passed in is changed.

    The retry's own outcome then goes through `plan_retries` again (bounded by max_retries) and, at the end of
    the step, the problem's final group outcome through `update_levels`: a retry that still fails entirely
    therefore leaves the problem one more step higher for next time.
    """
    if len(problem_ids) != success_rate.numel():
        raise ValueError(f"{len(problem_ids)} problem ids for {success_rate.numel()} group success rates")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    used = dict(retries_used)
    levels = dict(state.levels)
    retry: list[int] = []
    planned: set[str] = set()
    bound = at_max = over_limit = 0
    for i, (pid, rate) in enumerate(zip(problem_ids, success_rate.tolist())):
        if rate > 0.0 or pid in planned:
            continue
        if used.get(pid, 0) >= max_retries:
            bound += 1
        elif state.level(pid) >= state.max_level:
            at_max += 1
        elif max_groups is not None and len(retry) >= max_groups:
            over_limit += 1
        else:
            retry.append(i)
            planned.add(pid)
            used[pid] = used.get(pid, 0) + 1
            levels[pid] = state.clip(state.level(pid) + state.step)
    return RetryPlan(retry, state.with_levels(levels), used, bound, at_max, over_limit)


@dataclass(frozen=True)
class TokenBudget:
    """Generated tokens of a run, against a limit (equal-compute arms: every token generated counts, retries,
    filtered-out groups and unhinted samples included). None = no limit. Immutable: `charge` returns a new one.
    """

    limit: int | None = None
    used: int = 0  # every generated completion token
    retry_used: int = 0  # the part of `used` generated by in-step retries

    def charge(self, tokens: int, retry: bool = False) -> TokenBudget:
        if tokens < 0:
            raise ValueError(f"token budget: cannot charge {tokens} tokens")
        return replace(self, used=self.used + tokens, retry_used=self.retry_used + (tokens if retry else 0))

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(self.limit - self.used, 0)

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    def state_dict(self) -> dict:
        return {"limit": self.limit, "used": self.used, "retry_used": self.retry_used}

    @classmethod
    def from_state_dict(cls, state: Mapping) -> TokenBudget:
        for key in ("used", "retry_used"):
            if not isinstance(state.get(key), int):
                raise ValueError(f"token budget: field {key!r} must be an integer, got {state.get(key)!r}")
        limit = state.get("limit")
        if limit is not None and not isinstance(limit, int):
            raise ValueError(f"token budget: field 'limit' must be an integer or null, got {limit!r}")
        return cls(limit=limit, used=state["used"], retry_used=state["retry_used"])


def generated_tokens(mask: torch.Tensor) -> int:
    """Completion tokens generated, from a completion mask [N, T] (1 on generated tokens, before any loss mask
    such as overlong masking: those tokens were generated all the same)."""
    return int(mask.bool().sum())


def affordable_groups(budget: TokenBudget, tokens_per_group: float) -> int | None:
    """How many retry groups fit in the remaining budget at an expected `tokens_per_group` (e.g. the step's
    mean generated tokens per group, or G * max_new_tokens for a hard bound). None when the budget is unlimited.
    """
    if budget.limit is None:
        return None
    if tokens_per_group <= 0:
        raise ValueError(f"tokens_per_group must be > 0, got {tokens_per_group}")
    return int(budget.remaining // tokens_per_group)


# ------------------------------------------------------------------------------------- 3. mixed groups
def unhinted_count(group_size: int, unhinted_share: float) -> int:
    """Samples of a group drawn without a hint: round(G * share) with halves rounded up (not to even), so
    G=8, share .25 -> 2; G=6, share .25 -> 2 (1.5 up); G=4, share .1 -> 0. Share 0 -> 0, share 1 -> G."""
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    if not 0.0 <= unhinted_share <= 1.0:
        raise ValueError(f"unhinted share must be in [0, 1], got {unhinted_share}")
    # the 1e-9 keeps exact halves (0.5 stored as 0.49999...) rounding up
    return min(int(math.floor(group_size * unhinted_share + 0.5 + 1e-9)), group_size)


def group_hint_mask(group_size: int, unhinted_share: float) -> torch.Tensor:
    """[G] bool, True for hinted samples: the first unhinted_count(G, share) samples are unhinted, the rest
    hinted (a fixed layout, so the unhinted samples of a step are easy to find)."""
    mask = torch.ones(group_size, dtype=torch.bool)
    mask[: unhinted_count(group_size, unhinted_share)] = False
    return mask


def sample_hint_ratios(group_ratios: torch.Tensor, group_size: int, unhinted_share: float) -> torch.Tensor:
    """Per-sample hint ratio (percent) of a step: group_ratios [B] (each problem's ratio) -> [B * G] float32,
    groups adjacent; in every group the unhinted samples get 0 and the others their group's ratio. A group whose
    ratio is 0 is unhinted throughout."""
    hinted = group_hint_mask(group_size, unhinted_share).float()
    return (group_ratios.float()[:, None] * hinted[None, :]).reshape(-1)


# ------------------------------------------------------------------------------------- 4. annealing
def training_progress(done: float, total: float) -> float:
    """Progress in [0, 1]: steps done / total steps, or generated tokens / token budget (equal compute)."""
    if total <= 0:
        raise ValueError(f"progress: total must be > 0, got {total}")
    return min(max(done / total, 0.0), 1.0)


def anneal_factor(progress: float, schedule: str, end: float = 1.0) -> float:
    """Multiplier in [0, 1] on the hint ratio at a training progress in [0, 1].

    constant: 1 throughout (no annealing); linear: 1 - progress / end; cosine: (1 + cos(pi * progress / end)) / 2.
    Both reach exactly 0 at progress >= end (end in (0, 1]: the rest of training runs without hints).
    """
    if not 0.0 < end <= 1.0:
        raise ValueError(f"anneal end must be in (0, 1], got {end}")
    if schedule == "constant":
        return 1.0
    if schedule not in ("linear", "cosine"):
        raise ValueError(f"unknown anneal schedule {schedule!r}; expected constant | linear | cosine")
    x = min(max(progress, 0.0), 1.0) / end
    if x >= 1.0:
        return 0.0
    return 1.0 - x if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * x))


def stage_ratio(progress: float, boundaries: Sequence[float], ratios: Sequence[float]) -> float:
    """Step function: ratios[i] while progress < boundaries[i] (boundaries increasing, the last one 1 or more);
    after the last boundary, 0. QuestA: boundaries (0.5, 1.0), ratios (50, 25) -> 50 in the first half, 25 in
    the second (its two chained stages as one schedule; it does not reach 0 before the end)."""
    if len(boundaries) != len(ratios):
        raise ValueError(f"{len(boundaries)} stage boundaries for {len(ratios)} ratios")
    if any(b2 <= b1 for b1, b2 in zip(boundaries, boundaries[1:])):
        raise ValueError(f"stage boundaries must increase, got {list(boundaries)}")
    for boundary, ratio in zip(boundaries, ratios):
        if progress < boundary:
            return float(ratio)
    return 0.0


def scheduled_ratio(
    progress: float,
    schedule: str,
    start_ratio: float = 50.0,
    end: float = 1.0,
    boundaries: Sequence[float] = (0.5, 1.0),
    ratios: Sequence[float] = (50.0, 25.0),
) -> float:
    """The hint ratio (percent) at a progress: `stages` -> stage_ratio (boundaries, ratios); constant, linear,
    cosine -> start_ratio * anneal_factor. With adaptive levels the trainer multiplies each problem's level ratio
    by anneal_factor instead."""
    if schedule == "stages":
        return stage_ratio(progress, boundaries, ratios)
    return start_ratio * anneal_factor(progress, schedule, end)


# ------------------------------------------------------------------------------------- 5. importance correction
class UnhintedWeight(NamedTuple):
    weight: torch.Tensor  # [N, T] float32: exp(unhinted - hinted) on kept tokens, 0 on capped and masked ones
    over_cap: torch.Tensor  # [N, T] bool: completion tokens masked because the weight exceeded the cap
    weight_max: float  # largest weight on completion tokens of hinted rows, before the cap (0 when none)


def unhinted_weight(
    logp_unhinted: torch.Tensor,
    logp_hinted: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None = 5.0,
    hinted: torch.Tensor | None = None,
) -> UnhintedWeight:
    """Per-token importance weight of a completion sampled with the hint, toward the prompt without it
    (Guide-GRPO): w = exp(logp_unhinted - logp_hinted).

    logp_unhinted: [N, T] the completion's token log-probs under the prompt without the hint; logp_hinted: [N, T]
    under the prompt it was sampled with (the proximal log-probs); mask: [N, T] completion tokens; hinted: [N]
    bool, rows sampled with a hint (None: all); unhinted rows get weight 1. As the behaviour weight in loss.py,
    tokens whose weight exceeds `cap` are masked (weight 0), not clamped; cap None keeps every weight. Padding
    may hold -inf or NaN: it gets weight 0. Since the weight is >= 0 and the PPO loss is linear in the advantage
    on both clip branches, multiplying the advantages by `weight` applies it without touching the loss.
    """
    mask = mask.bool()
    if hinted is None:
        hinted = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    rows = hinted.bool()[:, None] & mask
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    log_w = torch.where(rows, logp_unhinted.float() - logp_hinted.float(), zeros)
    w = log_w.exp()  # 1 outside the hinted completion tokens
    over_cap = (w > cap) & rows if cap is not None else torch.zeros_like(mask)
    weight = torch.where(mask & ~over_cap, w, zeros)
    weight_max = float(torch.where(rows, w, zeros).max()) if rows.any() else 0.0
    return UnhintedWeight(weight, over_cap, weight_max)


# ------------------------------------------------------------------------------------- 6. diagnostics
def zero_signal_share(rewards: torch.Tensor) -> float:
    """Share of groups whose G rewards are all equal (no learning signal under a group baseline).

    rewards: [B, G] raw correctness or shaped rewards. An empty step (B = 0) gives 0.0.
    """
    if rewards.numel() == 0:
        return 0.0
    flat = rewards.float()
    same = (flat == flat[:, :1]).all(dim=-1)
    return float(same.float().mean())


def level_histogram(state: HintLevels, problem_ids: Sequence[str] | None = None) -> dict[int, int]:
    """level -> number of problems at it, every level min..max present (0 when empty). Over the problems with a
    stored level, or over `problem_ids` (unseen ones count at initial_level)."""
    hist = dict.fromkeys(range(state.min_level, state.max_level + 1), 0)
    ids = state.levels.keys() if problem_ids is None else problem_ids
    for pid in ids:
        hist[state.level(pid)] += 1
    return hist


def level_metrics(state: HintLevels, problem_ids: Sequence[str] | None = None) -> dict[str, float]:
    """Flat metrics for the step log (the trainer adds a `hints/` prefix): `level_<k>` counts, `level_mean`,
    `ratio_mean` (percent) and `at_max_share`; means are 0 with no problems."""
    hist = level_histogram(state, problem_ids)
    n = sum(hist.values())
    out: dict[str, float] = {f"level_{k}": float(v) for k, v in hist.items()}
    out["level_mean"] = sum(k * v for k, v in hist.items()) / n if n else 0.0
    out["ratio_mean"] = (
        sum(level_ratio(k, state.ratio_per_level) * v for k, v in hist.items()) / n if n else 0.0
    )
    out["at_max_share"] = hist[state.max_level] / n if n else 0.0
    return out


def hint_reliance(with_hint: Mapping[str, float], without_hint: Mapping[str, float]) -> float | None:
    """Mean over the problems present in both of (success with the hint - success without): how much of the
    success the hint carries. Inputs map problem id -> success rate (e.g. validation pass@1 on the same problems
    with and without their hint). None when no problem is in both."""
    common = [pid for pid in with_hint if pid in without_hint]
    if not common:
        return None
    return sum(with_hint[p] - without_hint[p] for p in common) / len(common)


def group_reliance(correct: torch.Tensor, hinted: torch.Tensor) -> float | None:
    """Hint reliance within mixed groups: per group, hinted success rate - unhinted success rate, averaged over
    the groups holding both kinds. correct: [B, G] (1 = correct), hinted: [B, G] or [G] bool. None when no
    group holds both."""
    hinted = hinted.bool().expand_as(correct)
    c = (correct > 0).float()
    n_h = hinted.float().sum(-1)
    n_u = (~hinted).float().sum(-1)
    both = (n_h > 0) & (n_u > 0)
    if not both.any():
        return None
    rate_h = (c * hinted.float()).sum(-1) / n_h.clamp(min=1)
    rate_u = (c * (~hinted).float()).sum(-1) / n_u.clamp(min=1)
    return float((rate_h - rate_u)[both].mean())
