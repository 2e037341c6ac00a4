"""Supervised warm-up: teach a fresh model the answer format before RL (the embedded default starts from random
weights; the reference recipe starts from a fine-tuned model and skips this). The loss is the token mean of the
negative log-likelihood of the solution tokens, through the same policy.train_step as GRPO."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from questa_nemo.model.packing import PackedMicroBatch, TokenSequence


def sft_sequence(prompt_ids: list[int], target_ids: list[int]) -> TokenSequence:
    """Prompt + target; only the target tokens enter the loss."""
    ids = torch.tensor(prompt_ids + target_ids, dtype=torch.long)
    mask = torch.zeros(len(ids), dtype=torch.float32)
    mask[len(prompt_ids) :] = 1.0
    zeros = torch.zeros(len(ids), dtype=torch.float32)
    return TokenSequence(ids, mask, zeros, zeros.clone())


def nll_loss(logprobs: torch.Tensor, entropy: torch.Tensor, mb: PackedMicroBatch):
    """Summed NLL of the micro-batch's target tokens; the policy divides by the step's token count."""
    mask = mb.loss_mask.to(logprobs.device)
    nll = -(logprobs * mask).sum()
    return nll, {"tokens": mask.sum().detach(), "nll": nll.detach()}


def run_warmup(
    policy,
    examples: list[tuple[list[int], list[int]]],
    steps: int,
    batch_size: int,
    seed: int,
    log=print,
    warmup_done: Callable[[int], bool] | None = None,
    check_every: int = 0,
) -> list[float]:
    """Up to `steps` updates on batches drawn from `examples` [(prompt_ids, target_ids)]; with `warmup_done`,
    asked every `check_every` steps whether to end here (validation.WarmupStopper decides whether a check is
    due and which checked weights to keep). Returns the loss curve (one value per update made)."""
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(1, steps + 1):
        picks = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        sequences = [sft_sequence(*examples[i]) for i in picks]
        micro_batches = policy.pack(sequences)
        normaliser = float(sum(s.loss_mask.sum() for s in sequences))
        stats = policy.train_step(micro_batches, nll_loss, normaliser)
        losses.append(stats.loss)
        if step == 1 or step % max(steps // 10, 1) == 0 or step == steps:
            log(f"[warm-up] step {step}/{steps} nll {stats.loss:.4f}" + (" (skipped)" if stats.skipped else ""))
        if not math.isfinite(stats.loss):
            log(f"[warm-up] step {step}: non-finite loss, update skipped")
        if warmup_done is not None and step % check_every == 0 and step < steps and warmup_done(step):
            break
    return losses
