"""Token sampling as pure tensor functions, free of host syncs so they run inside a captured CUDA graph.

Randomness comes in as a tensor of Exp(1) noise drawn by the caller from a seeded generator: the sample is
argmax(p / noise) (the exponential race, equivalent to sampling from p), so the same noise gives the same
tokens eagerly and in a graph, and no RNG state has to be registered with graph capture.

The returned log-prob is log_softmax(logits / temperature)[token] (raw logits at temperature 0), before top-p
truncation: the quantity the trainer recomputes from its own forward, so the two can be compared and used as
the behaviour policy of the decoupled loss.
"""

from __future__ import annotations

import torch


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
