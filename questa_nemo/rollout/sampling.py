"""Token sampling as pure tensor functions, free of host syncs so they run inside a captured CUDA graph.

Randomness comes in as a tensor of Exp(1) noise: the sample is argmax(p / noise) (the exponential race,
equivalent to sampling from p), so the same noise gives the same tokens eagerly and in a graph, and no RNG
state has to be registered with graph capture.

The noise is keyed per sequence, not per slot: `exponential_noise` is a counter-based generator, a pure
function of (seed, prompt key, sample index, completion position, vocabulary index), so a sequence samples
the same tokens whichever rank, slot, batch or call it is decoded in (the same GRPO run at DP = 2 samples
what it samples at DP = 1). It is integer tensor arithmetic only (a 32-bit integer hash held in int64:
every product of a 32-bit value and a constant below 2**31 stays below 2**63, so nothing overflows and CPU
and CUDA compute the same bits), with no host sync, so it runs inside the captured decode step.

The returned log-prob is log_softmax(logits / temperature)[token] (raw logits at temperature 0), before top-p
truncation: the quantity the trainer recomputes from its own forward, so the two can be compared and used as
the behaviour policy of the decoupled loss.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
# Wellons' lowbias32 variant (shifts 16, 15, 15); both multipliers are odd and below 2**31
_M1, _M2 = 0x21F0AAAD, 0x735A2D97
_SEED_KEY, _STEP_KEY, _VOCAB_KEY = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def mix32(x):
    """A bijective 32-bit integer hash with full avalanche; x is a Python int or an int64 tensor of values
    in [0, 2**32) (out of place; both give the same numbers)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK
    return x ^ (x >> 15)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """mix32 in place on an int64 tensor (the [B, V] hash: half the memory traffic of the pure form)."""
    x ^= x >> 16
    x.mul_(_M1).bitwise_and_(_MASK)
    x ^= x >> 15
    x.mul_(_M2).bitwise_and_(_MASK)
    x ^= x >> 15
    return x


def sequence_key(seed: int, prompt_key: int, sample: int) -> int:
    """The noise key of one sequence: sample `sample` of the prompt keyed `prompt_key`, under `seed`."""
    h = _SEED_KEY
    for word in (seed, seed >> 32, prompt_key, prompt_key >> 32, sample):
        h = mix32(h ^ (word & _MASK))
    return h


def vocab_hash(vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[V] int64: the per-token word of the noise hash (computed once per decode runner)."""
    return mix32(torch.arange(vocab, dtype=torch.int64, device=device) ^ _VOCAB_KEY)


def exponential_noise(keys: torch.Tensor, positions: torch.Tensor, vocab_words: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [B, V] float32 for sequences `keys` [B] (sequence_key) at completion positions [B].

    Element (b, v) is -log(u) with u the top 24 bits of mix32(row_b ^ vocab_words[v]) + 1/2, scaled into
    (0, 1), where row_b = mix32(keys[b] ^ mix32(positions[b] ^ _STEP_KEY)): a pure function of (key,
    position, v), so which slot or batch a sequence sits in never changes its noise.
    """
    rows = mix32(keys ^ mix32((positions & _MASK) ^ _STEP_KEY))  # [B]
    x = _mix32_(rows[:, None] ^ vocab_words[None, :])  # [B, V] in [0, 2**32)
    return x.bitwise_right_shift_(8).float().add_(0.5).mul_(2.0**-24).log_().neg_()


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set of tokens whose mass reaches top_p. probs [B, V] -> [B, V]."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # [B, V]: mass of strictly more likely tokens
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def sample_tokens(
    logits: torch.Tensor, noise: torch.Tensor | None, temperature: float, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of each row and its log-prob.

    logits: [B, V] float32; noise: [B, V] Exp(1) samples (unused and may be None when temperature == 0).
    Returns tokens [B] int64 and log-probs [B] float32.
    """
    if temperature == 0:
        logprobs = logits.log_softmax(-1)
        tokens = logits.argmax(-1)
    else:
        logprobs = (logits / temperature).log_softmax(-1)
        probs = logprobs.exp()
        if top_p < 1:
            probs = top_p_filter(probs, top_p)
        tokens = (probs / noise).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]
