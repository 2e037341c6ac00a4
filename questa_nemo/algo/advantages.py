"""Advantage estimators: pure functions from sequence rewards to per-token advantages.

Three modes (config `algo.advantage`):
- `reference`: the QuestA/AReaL recipe. The shaped reward of a completion is spread over every one of its
  tokens (GAE with gamma = lambda = 1, no critic, no KL reward: each token's advantage is the sequence reward),
  then normalised by the mean and std over ALL completion tokens of the batch, in float64. Long completions
  therefore weigh more in the statistics than short ones, exactly as in the reference.
- `grpo`: the textbook group baseline, (r - group mean) / (group std + eps), or without the std.
- `drgrpo`: group mean only (Dr. GRPO); its loss must not length-normalise (see loss.py, `sequence_sum`).

Shapes: N = B*G completions, T = padded completion length. Masks are 1 on completion tokens that enter the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

# Sums a float64 tensor over data-parallel ranks, in place or not, and returns the sum. The trainer passes a
# closure over torch.distributed.all_reduce; tests and single-rank runs use the identity.
AllReduce = Callable[[torch.Tensor], torch.Tensor]


def no_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The single-rank AllReduce: the local sums are already the global ones."""
    return x


def shape_rewards(correctness: torch.Tensor, scaling: float, bias: float, clip: float) -> torch.Tensor:
    """AReaL's reward shaping, clip((r + bias) * scaling, -clip, clip).

    The reference applies the bias before the scaling; with the recipe's bias 0 this is 5 x correctness.
    correctness: [N] -> [N] float32.
    """
    return ((correctness.float() + bias) * scaling).clamp(min=-clip, max=clip)


def spread_over_tokens(sequence_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Give every completion token its sequence's value (return with gamma = lambda = 1, zero critic).

    sequence_values: [N], mask: [N, T] -> [N, T] float32, zero outside the mask.
    """
    return sequence_values.float()[:, None] * mask.float()


class TokenMoments(NamedTuple):
    """Sufficient statistics of the masked tokens, float64 0-dim tensors; summed over DP ranks they are global."""

    count: torch.Tensor
    total: torch.Tensor
    total_sq: torch.Tensor


def token_moments(
    values: torch.Tensor, mask: torch.Tensor, all_reduce: AllReduce = no_all_reduce
) -> TokenMoments:
    """Count, sum and sum of squares of `values` over masked tokens, reduced with one all_reduce call.

    values: [N, T], mask: [N, T]. The three sums travel in one float64 tensor so DP ranks exchange a single
    message.
    """
    m = mask.to(torch.float64)
    x = values.to(torch.float64) * m
    local = torch.stack([m.sum(), x.sum(), x.square().sum()])
    reduced = all_reduce(local)
    return TokenMoments(reduced[0], reduced[1], reduced[2])


def normalise_tokens(
    values: torch.Tensor, mask: torch.Tensor, moments: TokenMoments, eps: float
) -> torch.Tensor:
    """(x - mean) / (std + eps) with the population std of the moments; float32, zero outside the mask.

    values, mask: [N, T] -> [N, T]. An empty batch (count 0) returns zeros rather than NaN.
    """
    count = moments.count.clamp(min=1.0)
    mean = moments.total / count
    var = (moments.total_sq / count - mean.square()).clamp(min=0.0)
    normalised = (values.to(torch.float64) - mean) / (var.sqrt() + eps)
    return (normalised * mask.to(torch.float64)).float()


def reference_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalise: bool = True,
    eps: float = 1e-5,
    all_reduce: AllReduce = no_all_reduce,
) -> torch.Tensor:
    """The reference recipe: each token carries its completion's shaped reward, normalised over the batch's tokens.

    rewards: [N] shaped rewards (see shape_rewards), mask: [N, T] -> advantages [N, T] float32.
    Mean and std run over every masked token of the whole batch, on all DP ranks when `all_reduce` sums over
    them: local sums -> all_reduce -> normalise.
    """
    token_rewards = spread_over_tokens(rewards, mask)
    if not normalise:
        return token_rewards
    moments = token_moments(token_rewards, mask, all_reduce)
    return normalise_tokens(token_rewards, mask, moments, eps)


def group_ids_for(num_completions: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Group index of each completion when the G samples of a prompt are adjacent: [N] long, 0 0 .. 1 1 .."""
    if group_size < 1 or num_completions % group_size:
        raise ValueError(f"{num_completions} completions do not split into groups of {group_size}")
    return torch.arange(num_completions, device=device) // group_size


def group_baseline(
    rewards: torch.Tensor, group_ids: torch.Tensor, divide_by_std: bool, eps: float
) -> torch.Tensor:
    """(r - group mean), divided by (group std + eps) when asked; groups may have different sizes.

    rewards: [N], group_ids: [N] long (any labels) -> [N] float32. The std is the unbiased sample std (as in
    verl's GRPO); a group of one has std 0 and advantage 0: without peers there is no baseline to beat.
    """
    _, dense_ids = torch.unique(group_ids, return_inverse=True)
    num_groups = int(dense_ids.max()) + 1 if dense_ids.numel() else 0
    r = rewards.to(torch.float64)
    size = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(
        0, dense_ids, torch.ones_like(r)
    )
    total = torch.zeros_like(size).index_add_(0, dense_ids, r)
    mean = (total / size)[dense_ids]
    centred = r - mean
    if divide_by_std:
        sq = torch.zeros_like(size).index_add_(0, dense_ids, centred.square())
        std = (sq / (size - 1).clamp(min=1)).sqrt()[dense_ids]
        centred = centred / (std + eps)
    return centred.float()


def grpo_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    divide_by_std: bool = True,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Textbook GRPO: the group-relative reward on every completion token.

    rewards: [N], mask: [N, T], group_ids: [N] -> [N, T] float32.
    """
    return spread_over_tokens(group_baseline(rewards, group_ids, divide_by_std, eps), mask)


def drgrpo_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: reward minus the group mean, no std (the std up-weights near-solved and near-hopeless groups).

    rewards: [N], mask: [N, T], group_ids: [N] -> [N, T] float32. Pair with loss aggregation `sequence_sum`.
    """
    return spread_over_tokens(group_baseline(rewards, group_ids, divide_by_std=False, eps=0.0), mask)


def compute_advantages(
    mode: str,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    adv_norm: bool = True,
    group_std: bool = True,
    eps: float = 1e-5,
    all_reduce: AllReduce = no_all_reduce,
) -> torch.Tensor:
    """Dispatch on config `algo.advantage`; arguments as in the mode functions. -> [N, T] float32.

    Group modes need whole groups on one rank (the trainer keeps a prompt's samples together); only the
    reference mode communicates, through `all_reduce`.
    """
    if mode == "reference":
        return reference_advantages(rewards, mask, normalise=adv_norm, eps=eps, all_reduce=all_reduce)
    if mode == "grpo":
        return grpo_advantages(rewards, mask, group_ids, divide_by_std=group_std, eps=eps)
    if mode == "drgrpo":
        return drgrpo_advantages(rewards, mask, group_ids)
    raise ValueError(f"algo.advantage: unknown mode {mode!r} (reference | grpo | drgrpo)")
