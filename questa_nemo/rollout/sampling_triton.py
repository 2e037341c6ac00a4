"""The sampler of rollout/sampling.py (inverse CDF at one uniform per row, temperature > 0, no top-p) as one
Triton kernel over the lm_head's own output (imported on CUDA only, or on CPU under TRITON_INTERPRET=1 in
tests: CI's CPU image has no Triton).

`sample_tokens` makes [B, V] float32 passes over the logits: the upcast, log_softmax, exp, cumsum (~1 GB of
memory traffic a step at 256 x 151,936). Here one program a row reads the row three times in the matmul's dtype
and writes two numbers: (1) the row max of l = logits / T, (2) Z = sum_v exp(l_v - max), (3) the first token
whose running sum of exp(l_v - max) exceeds u * Z, in vocabulary order. That is the same inverse CDF as
`sample_tokens` (first token whose cumulative probability exceeds u times the total), up to float rounding of
the sums: a uniform landing within rounding of a boundary between two tokens may pick the neighbour, so
tokens are not bit-equal to the torch path's (both are exact inverse-CDF samples of the same u). Should the
scan end without a hit (u within rounding of 1), the last token of non-zero probability is picked. The
log-prob is l_token - max - log Z, log_softmax(logits / T)[token] as the torch path returns.

Passes (2) and (3) add the same block sums in the same order, so the scan's total is Z itself. No host sync:
the launch is captured in the decode step's CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # vocabulary entries a program reads per iteration


@triton.jit
def _sample_kernel(
    logits_ptr, uniforms_ptr, tokens_ptr, logprobs_ptr, stride_row, inv_temperature,
    vocab: tl.constexpr, BLOCKS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, BLOCK)
    # (1) the row max of logits / T
    top = tl.full((), float("-inf"), tl.float32)
    for i in range(0, BLOCKS):
        offs = i * BLOCK + lanes
        x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) * inv_temperature
        top = tl.maximum(top, tl.max(x, 0))
    # (2) Z = sum exp(l - max), block by block
    total = tl.zeros((), tl.float32)
    for i in range(0, BLOCKS):
        offs = i * BLOCK + lanes
        x = tl.load(base + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32) * inv_temperature
        total += tl.sum(tl.exp(x - top), 0)
    # (3) the first token whose running sum exceeds u * Z; the last token of non-zero probability otherwise
    target = tl.load(uniforms_ptr + row) * total
    running = tl.zeros((), tl.float32)
    token = tl.full((), -1, tl.int32)
    last = tl.zeros((), tl.int32)
    for i in range(0, BLOCKS):
        offs = i * BLOCK + lanes
        inside = offs < vocab
        x = tl.load(base + offs, mask=inside, other=float("-inf")).to(tl.float32) * inv_temperature
        p = tl.exp(x - top)
        hit = ((tl.cumsum(p, 0) + running) > target) & inside
        first = tl.min(tl.where(hit, offs, vocab), 0)
        token = tl.where((token < 0) & (first < vocab), first, token)
        last = tl.maximum(last, tl.max(tl.where((p > 0) & inside, offs, 0), 0))
        running += tl.sum(p, 0)
    token = tl.where(token < 0, last, token)
    picked = tl.load(base + token).to(tl.float32) * inv_temperature
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, picked - top - tl.log(total))


def fused_sample(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] int64 and log-probs [B] float32 of logits [B, V] (any float dtype, rows contiguous) at
    uniforms [B] in (0, 1) and temperature > 0: `sample_tokens` at top_p = 1, in one kernel."""
    if temperature <= 0:
        raise ValueError("fused_sample: temperature must be > 0 (greedy decoding takes the argmax)")
    if logits.stride(-1) != 1:
        raise ValueError("fused_sample: the logits' rows must be contiguous")
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _sample_kernel[(rows,)](
        logits, uniforms.float(), tokens, logprobs, logits.stride(0), 1.0 / temperature,
        vocab=vocab, BLOCKS=triton.cdiv(vocab, BLOCK), BLOCK=BLOCK, num_warps=8,  # one compile a vocabulary
    )  # fmt: skip
    return tokens, logprobs
