"""Log-probs and entropy of target tokens from vocab-parallel logits, without materialising the logits.

A 32K-token micro-batch against a 152K vocabulary would need 20 GB for fp32 logits, and as much again for
their gradient. `chunked_logprobs` instead walks the tokens in chunks: forward keeps only per-token softmax
statistics ([T] floats), backward recomputes each chunk's logits from the hidden states and the output
weight. The last chunk's logits are still in memory when the forward ends, and backward begins with them:
they are kept, not recomputed, which costs no peak memory (forward held them anyway); a micro-batch of one
chunk is never recomputed and its weight gradient needs no fp32 accumulator. With tensor parallelism every
rank holds a slice of the vocabulary; the max, the partition sum, the target logit and the entropy sum are
all-reduced over the TP group, so the result equals the full softmax.

The trainer calls `final_hidden_states` (the GPTModel up to its final norm) and then
`chunked_logprobs(hidden, output_weight(model), targets, temperature)`.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist


class TokenLogprobs(NamedTuple):
    logprobs: (
        torch.Tensor
    )  # [T] fp32 (fp64 for fp64 inputs), log p(target) under softmax(logits / temperature)
    entropy: torch.Tensor  # [T], entropy of that same distribution


def _distributed(group) -> bool:
    return group is not None and dist.get_world_size(group) > 1


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if _distributed(group):
        dist.all_reduce(t, op=op, group=group)
    return t


def _stats_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


# Per-chunk elementwise math on raw (matmul-dtype) logits [n, V_local]. Each is one pass over the chunk;
# under torch.compile each becomes one fused kernel that never writes an upcast copy of the logits.
def _max_and_target(logits, local_t, mine, temperature: float):
    """-> (row max [n], target logit [n] or 0 where the target is on another rank), both / temperature."""
    scaled = logits.to(_stats_dtype(logits)) / temperature
    picked = scaled.gather(1, local_t.clamp(0, scaled.size(1) - 1)[:, None]).squeeze(1)
    return scaled.max(dim=-1).values, torch.where(mine, picked, 0.0)


def _exp_sums(logits, row_max, temperature: float):
    """-> (sum_v exp(l_v - max) [n], sum_v exp(l_v - max) * l_v [n]) with l = logits / temperature."""
    scaled = logits.to(_stats_dtype(logits)) / temperature
    shifted = torch.exp(scaled - row_max[:, None])
    return shifted.sum(-1), (shifted * scaled).sum(-1)


def _grad_logits(logits, log_z, entropy, g_lp, g_h, local_t, mine, temperature: float):
    """d(sum g_lp * logp_target + g_h * H) / d logits, in the logits' dtype [n, V_local].

    d logp_target / d l_v = [v == target] - p_v;  d H / d l_v = -p_v (log p_v + H).
    """
    scaled = logits.to(_stats_dtype(logits)) / temperature
    log_p = scaled - log_z[:, None]
    # the target's one-hot as a comparison, not a scatter: one pass, no fp32 [n, V] intermediate
    columns = torch.arange(logits.size(1), device=logits.device)
    is_target = (columns[None, :] == local_t[:, None]) & mine[:, None]
    grad = torch.where(is_target, g_lp[:, None], 0.0) - torch.exp(log_p) * (
        g_lp[:, None] + g_h[:, None] * (log_p + entropy[:, None])
    )
    return (grad / temperature).to(logits.dtype)


def logprob_stats_reference(logits, local_t, mine, temperature: float):
    """What the Triton statistics kernel computes, in torch: (row max, sum exp(l - max), sum exp(l - max) l,
    target logit or 0) with l = logits / temperature, each [n] in the statistics dtype."""
    row_max, picked = _max_and_target(logits, local_t, mine, temperature)
    return row_max, *_exp_sums(logits, row_max, temperature), picked


def _triton_grad_logits(logits, log_z, entropy, g_lp, g_h, local_t, mine, temperature: float):
    from questa_nemo.model.triton_kernels import logprob_grad

    return logprob_grad(logits, log_z, entropy, g_lp, g_h, torch.where(mine, local_t, -1), temperature)


def _triton_stats(logits, local_t, mine, temperature: float):
    """-> (row max, sum exp(l - max), sum exp(l - max) l, target logit or 0), one read of the logits."""
    from questa_nemo.model.triton_kernels import logprob_stats

    return logprob_stats(logits, torch.where(mine, local_t, -1), temperature)


# Which kernels run the per-chunk maths on CUDA: "compile" (the functions above under torch.compile, measured)
# or "triton" (model/triton_kernels.py: one read of the logits in forward, 64-bit offsets; tested on the CPU
# through Triton's interpreter, not yet run on a GPU: bench/train_pending.sh has its rows). Off CUDA: eager.
CUDA_KERNELS = "compile"
_EAGER = (_max_and_target, _exp_sums, _grad_logits)
_COMPILED: tuple | None = None


def _kernels(mode: str) -> tuple:
    """-> (max_and_target or the one-pass statistics, exp_sums or None, grad_logits) for mode eager /
    compile / triton."""
    global _COMPILED
    if mode == "triton":
        return _triton_stats, None, _triton_grad_logits
    if mode == "eager":
        return _EAGER
    if _COMPILED is None:
        # automatic dynamic shapes: the chunk length becomes symbolic once it varies, the vocabulary stays a
        # constant (with dynamic=True the gradient kernel ran at a quarter of the memory bandwidth)
        _COMPILED = tuple(torch.compile(fn) for fn in _EAGER)
    return _COMPILED


def _kernel_mode(hidden: torch.Tensor, compiled: bool | None) -> str:
    if compiled is False or (compiled is None and not hidden.is_cuda):
        return "eager"
    if (
        CUDA_KERNELS == "triton"
        and hidden.is_cuda
        and hidden.dtype in (torch.bfloat16, torch.float16, torch.float32)
    ):
        return "triton"
    return "compile"


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_tokens, vocab_start, group, mode, keep_last):
        # hidden [T, h]; weight [V_local, h] holding only real (unpadded) vocabulary rows;
        # targets [T] global token ids; vocab_start: global id of this rank's first row.
        max_and_target, exp_sums, _ = _kernels(mode)
        n_tokens, v_local = hidden.size(0), weight.size(0)
        stats_dtype = _stats_dtype(hidden)
        log_z = torch.empty(n_tokens, dtype=stats_dtype, device=hidden.device)
        entropy = torch.empty_like(log_z)
        target_logit = torch.empty_like(log_z)
        kept = None  # the last chunk's logits, for backward
        for start in range(0, n_tokens, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            local_t = targets[rows] - vocab_start
            mine = (local_t >= 0) & (local_t < v_local)
            n = local_t.size(0)
            if not v_local:  # this rank holds only vocabulary padding
                zeros = torch.zeros(n, dtype=stats_dtype, device=hidden.device)
                logits, picked, sum_exp, weighted = None, zeros, zeros, zeros
                row_max = torch.full((n,), -torch.inf, dtype=stats_dtype, device=hidden.device)
                row_max = _all_reduce(row_max, dist.ReduceOp.MAX, group)
            else:
                logits = hidden[rows] @ weight.t()  # [n, V_local], matmul dtype
                if exp_sums is None:  # one pass: sums relative to this rank's max, rescaled to the global one
                    row_max, sum_exp, weighted, picked = max_and_target(logits, local_t, mine, temperature)
                    if _distributed(group):
                        local_max = row_max
                        row_max = _all_reduce(row_max.clone(), dist.ReduceOp.MAX, group)
                        rescale = torch.exp(local_max - row_max)
                        sum_exp, weighted = sum_exp * rescale, weighted * rescale
                else:
                    row_max, picked = max_and_target(logits, local_t, mine, temperature)
                    row_max = _all_reduce(row_max, dist.ReduceOp.MAX, group)
                    sum_exp, weighted = exp_sums(logits, row_max, temperature)
            if keep_last and start + chunk_tokens >= n_tokens:
                kept = logits
            del logits
            sum_exp, weighted, picked = _all_reduce(
                torch.stack([sum_exp, weighted, picked]), dist.ReduceOp.SUM, group
            )
            log_z[rows] = row_max + sum_exp.log()
            entropy[rows] = log_z[rows] - weighted / sum_exp  # H = log Z - E_p[l]
            target_logit[rows] = picked
        ctx.save_for_backward(hidden, weight, targets, log_z, entropy, kept)
        ctx.temperature, ctx.chunk_tokens, ctx.vocab_start = temperature, chunk_tokens, vocab_start
        ctx.group, ctx.mode = group, mode
        return target_logit - log_z, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, log_z, entropy, kept = ctx.saved_tensors
        _, _, grad_logits_fn = _kernels(ctx.mode)
        v_local, n_tokens = weight.size(0), hidden.size(0)
        grad_hidden = torch.zeros_like(hidden)
        zeros = torch.zeros_like(log_z)
        g_lp = grad_logprobs if grad_logprobs is not None else zeros
        g_h = grad_entropy if grad_entropy is not None else zeros
        starts = list(range(0, n_tokens if v_local else 0, ctx.chunk_tokens))
        # one chunk: the matmul's own (fp32-accumulated) result; several: summed in fp32
        grad_weight = None if len(starts) <= 1 else torch.zeros_like(weight, dtype=_stats_dtype(weight))
        for start in reversed(starts):  # the last chunk first: its logits were kept
            rows = slice(start, start + ctx.chunk_tokens)
            local_t = targets[rows] - ctx.vocab_start
            mine = (local_t >= 0) & (local_t < v_local)
            logits = kept if kept is not None else hidden[rows] @ weight.t()  # [n, V_local]
            kept = None
            grad_logits = grad_logits_fn(
                logits, log_z[rows], entropy[rows], g_lp[rows], g_h[rows], local_t, mine, ctx.temperature
            )
            del logits
            grad_hidden[rows] = grad_logits @ weight
            if grad_weight is None:
                grad_weight = grad_logits.t() @ hidden[rows]
            else:
                grad_weight += grad_logits.t() @ hidden[rows]
        if grad_weight is None:  # no tokens, or no vocabulary rows on this rank
            grad_weight = torch.zeros_like(weight)
        # Each rank saw only its vocabulary slice: the hidden-state gradient is the sum over TP ranks.
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None, None


def chunked_logprobs(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    vocab_size: int | None = None,
    chunk_tokens: int = 4096,
    tp_group: dist.ProcessGroup | None = None,
    compiled: bool | None = None,
) -> TokenLogprobs:
    """Log-prob and entropy of each target token under softmax(hidden @ output_weight.T / temperature).

    hidden: [T, h] (or [s, b, h], flattened s-major like megatron's layout; targets then [s, b]).
    output_weight: [V_pad / tp, h], this TP rank's rows of the (padded) vocabulary; rows at global index
    >= vocab_size are padding and are excluded from the softmax. targets: [T] global token ids.
    Returns fp32 [T] (or [s, b]) tensors; differentiable in hidden and output_weight.
    compiled: fuse the per-chunk softmax math (default: on CUDA, in the kernels CUDA_KERNELS names; eager on
    the CPU); False: eager.
    """
    shape = targets.shape
    hidden = hidden.reshape(-1, hidden.size(-1))
    targets = targets.reshape(-1)
    if hidden.size(0) != targets.size(0):
        raise ValueError(f"chunked_logprobs: {hidden.size(0)} hidden rows but {targets.size(0)} targets")
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    vocab_start = tp_rank * output_weight.size(0)
    real_rows = output_weight.size(0)
    if vocab_size is not None:
        real_rows = max(0, min(output_weight.size(0), vocab_size - vocab_start))
    logprobs, entropy = _ChunkedLogprobs.apply(
        hidden,
        output_weight[:real_rows],
        targets,
        float(temperature),
        int(chunk_tokens),
        vocab_start,
        tp_group,
        _kernel_mode(hidden, compiled),
        torch.is_grad_enabled() and (hidden.requires_grad or output_weight.requires_grad),
    )
    return TokenLogprobs(logprobs.reshape(shape), entropy.reshape(shape))


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> TokenLogprobs:
    """Reference: full fp32 log-softmax over gathered logits [..., V] (V = real vocabulary only)."""
    log_p = torch.log_softmax(logits.to(_stats_dtype(logits)) / temperature, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return TokenLogprobs(log_p.gather(-1, targets[..., None]).squeeze(-1), entropy)


# ---------------------------------------------------------------------------- GPTModel helpers
def _unwrap(model):
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def output_weight(model) -> torch.Tensor:
    """The LM head's [V_pad / tp, h] weight on the last pipeline stage (the embedding when tied)."""
    gpt = _unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def _without_output_layer(gpt):
    """GPTModel returns the decoder's output (final norm applied) when post_process is off."""
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


def final_hidden_states(model, input_ids, position_ids, attention_mask=None, packed_seq_params=None):
    """The model's forward up to and including the final norm: [s, b, h] (full sequence, even with SP).

    Works on any pipeline stage (non-last stages return their output hidden states, as megatron does).
    With sequence parallelism the last stage's [s / tp, b, h] shard is all-gathered; its backward keeps
    only this rank's rows, and `chunked_logprobs` sums the gradient over TP, together a reduce-scatter.
    """
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    gpt = _unwrap(model)
    if not gpt.post_process:
        return model(input_ids, position_ids, attention_mask, packed_seq_params=packed_seq_params)
    with _without_output_layer(gpt):
        hidden = model(input_ids, position_ids, attention_mask, packed_seq_params=packed_seq_params)
    if gpt.config.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    return hidden
