"""Token sampling as pure tensor functions, free of host syncs so they run inside a captured CUDA graph.

Randomness comes in as one uniform number per row: the sample is the inverse CDF of p at u (the first token
whose cumulative probability exceeds u times the total), so the same uniforms give the same tokens eagerly and
in a graph, and no RNG state has to be registered with graph capture.

The uniforms are keyed per sequence, not per slot: `uniform_draws` is a counter-based generator, a pure
function of (seed, prompt key, sample index, completion position), so a sequence samples the same tokens
whichever rank, slot, batch or call it is decoded in (the same GRPO run at DP = 2 samples what it samples at
DP = 1; a preempted and recomputed sequence samples on as it would have). It is integer tensor arithmetic
only (a 32-bit integer hash held in int64: every product of a 32-bit value and a constant below 2**31 stays
below 2**63, so nothing overflows and CPU and CUDA compute the same bits), with no host sync.

Why not the exponential race (argmax p / E with Exp(1) noise per token): keyed per sequence, its noise is a
[B, V] hash every step, 7.0 ms at 512 x 151,936 on an H100 (bench/results/sampling_noise_h100.json), half a
decode step; the inverse CDF needs B hashes and one cumulative sum over the probabilities.

The returned log-prob is log_softmax(logits / temperature)[token] (raw logits at temperature 0), before top-p
truncation: the quantity the trainer recomputes from its own forward, so the two can be compared and used as
the behaviour policy of the decoupled loss.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
# Wellons' lowbias32 variant (shifts 16, 15, 15); both multipliers are odd and below 2**31
_M1, _M2 = 0x21F0AAAD, 0x735A2D97
_SEED_KEY, _STEP_KEY = 0x9E3779B9, 0x85EBCA6B


def mix32(x):
    """A bijective 32-bit integer hash with full avalanche; x is a Python int or an int64 tensor of values
    in [0, 2**32) (out of place; both give the same numbers)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    return x ^ (x >> 15)


def sequence_key(seed: int, prompt_key: int, sample: int) -> int:
    """The noise key of one sequence: sample `sample` of the prompt keyed `prompt_key`, under `seed`."""
    h = _SEED_KEY
    for word in (seed, seed >> 32, prompt_key, prompt_key >> 32, sample):
        h = mix32(h ^ (word & _MASK))
    return h


def uniform_draws(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Uniforms [B] float32 in (0, 1) for sequences `keys` [B] (sequence_key) at completion positions [B]:
    the top 23 bits of mix32(keys ^ mix32(position ^ _STEP_KEY)), + 1/2, scaled by 2**-23, so at most
    1 - 2**-24 (23 bits + 1/2 is exact in float32's 24-bit mantissa; with 24 bits the top value would round
    to 1.0). u * total then stays below total: see sample_tokens."""
    x = mix32(keys ^ mix32((positions & _MASK) ^ _STEP_KEY))  # [B] in [0, 2**32)
    return ((x >> 9).float() + 0.5) * 2.0**-23


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches top_p. probs [B, V] -> [B, V]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # [B, V]: mass of strictly more likely tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of each row and its log-prob.

    logits: [B, V] float32; uniforms: [B] in (0, 1) (unused and may be None when temperature == 0).
    Returns tokens [B] int64 and log-probs [B] float32.

    Inverse CDF: the first token whose cumulative probability exceeds u * total, with total the row's last
    cumulative value (the mass kept by top-p, or 1 up to rounding). A token of probability 0 is never picked
    (its cumulative value equals its predecessor's), and u * total < total for u <= 1 - 2**-24 in float32
    round-to-nearest, so the search never runs past the vocabulary.
    """
    if temperature == 0:
        logprobs = logits.log_softmax(-1)
        tokens = logits.argmax(-1)
    else:
        # x / 1.0 is x: skip a [B, V] pass at the usual temperature (same bits)
        logprobs = (logits if temperature == 1 else logits / temperature).log_softmax(-1)
        probs = logprobs.exp()
        if top_p < 1:
            probs = top_p_filter(probs, top_p)
        cdf = probs.cumsum(-1)  # [B, V], non-decreasing
        target = uniforms[:, None] * cdf[:, -1:]  # [B, 1]
        tokens = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(cdf.size(-1) - 1)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
