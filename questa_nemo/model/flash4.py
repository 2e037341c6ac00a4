"""FlashAttention 4 (the `flash-attn-4` package: FlashAttention's CuTe-DSL kernels, JIT-compiled on first use,
no CUDA toolkit needed) for `model.attention=fa4`: whether it can run here, and causal attention through its
kernels as torch custom ops.

Kept apart from model/attention.py, which imports megatron, so that `questa-nemo doctor` asks the same
question (and gives the same reasons) as the model build without importing megatron. It is offered on
Hopper (sm_90) and Blackwell (sm_100 / sm_103) GPUs, the ones its kernels are tuned for. On an H100
(docs/benchmarks.md (υ)) its kernels ran the 1.5B shape's attention 12-14% faster than cuDNN's SDPA forward and
backward, at the same error against fp32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

NEEDS_GPU = "needs a CUDA GPU"
NOT_INSTALLED = "flash-attn-4 is not installed (pip install flash-attn-4; it needs nvidia-cutlass-dsl)"
ARCHS = (9, 10)  # compute capability majors its training kernels (forward and backward) are built for


class FA4(NamedTuple):
    """FA4's forward and backward (flash_attn.cute.interface's _flash_attn_fwd / _flash_attn_bwd: what its own
    autograd functions call), wrapped below in torch custom ops of our own."""

    fwd: object  # (q, k, v, cu_seqlens_q=, cu_seqlens_k=, max_seqlen_q=, max_seqlen_k=, softmax_scale=, causal=,
    #              return_lse=) -> (out, lse, ...): dense q [b, s, h, d] (lse [b, h, s]) or packed [t, h, d] ([h, t])
    bwd: object  # (q, k, v, out, dout, lse, softmax_scale, causal, cu_seqlens_q=, ...) -> (dq, dk, dv)


@functools.cache
def fa4_kernels() -> FA4 | str:
    """FA4's forward and backward, or why they do not import (a short reason)."""
    try:
        from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd
    except Exception as e:  # noqa: BLE001 - ImportError, or its CuTe DSL failing to load
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "flash_attn":
            return NOT_INSTALLED  # (a missing part of the CuTe DSL, e.g. cutlass.cute, is named below)
        return f"flash_attn.cute does not import ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return FA4(_flash_attn_fwd, _flash_attn_bwd)


def fa4_problem(device: torch.device | str, head_dim: int | None = None) -> str | None:
    """None when FlashAttention 4 can run on `device` (its GPU's architecture, the package imports, and the
    model's `head_dim` where given), else why not. The model build (model/megatron.py) and `questa-nemo
    doctor` both ask this."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return NEEDS_GPU
    major, minor = torch.cuda.get_device_capability(device)
    if major not in ARCHS:
        return f"its kernels are for sm_90 / sm_100 GPUs, this one is sm_{major}{minor}"
    if head_dim is not None and (problem := fa4_head_dim_problem(head_dim, major)) is not None:
        return problem
    kernels = fa4_kernels()
    return kernels if isinstance(kernels, str) else None


def fa4_head_dim_problem(head_dim: int, major: int) -> str | None:
    """None when FA4's kernels take `head_dim` on a GPU of compute capability `major` (flash-attn-4's
    `_validate_head_dims`: multiples of 8, up to 256 on sm_90, up to 128 or exactly 256 on sm_100), else why."""
    fits = 8 <= head_dim <= 256 if major == 9 else 8 <= head_dim <= 128 or head_dim == 256
    if head_dim % 8 == 0 and fits:
        return None
    allowed = "8-256" if major == 9 else "8-128 or 256"
    return f"its kernels take head sizes {allowed} in multiples of 8 on sm_{major}0, this model's is {head_dim}"


def _kernels() -> FA4:
    kernels = fa4_kernels()
    if isinstance(kernels, str):
        raise RuntimeError(f"model.attention=fa4: {kernels}")
    return kernels


def _varlen(cu_seqlens: torch.Tensor | None, max_seqlen: int) -> dict:
    if cu_seqlens is None:
        return {}
    return dict(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)


# Causal attention as two custom ops (not FA4's autograd functions): torch.compile traces around them without a
# graph break, and recompute's keep-attention policy (model/recompute.py) can keep the forward's outputs by
# name, as it keeps SDPA's. Dense: q [b, s, h, d], k / v [b, s, g, d] (grouped heads as they are), lse
# [b, h, s]; packed (cu_seqlens given): [t, h, d] rows, lse [h, t]. lse is fp32, for the backward only.
# Explicit schemas: torch 2.4 (our floor) infers none from this module's postponed (string) annotations.
@torch.library.custom_op(
    "questa::fa4_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens, SymInt max_seqlen, float scale) -> (Tensor, Tensor)",
)
def fa4_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _kernels().fwd(
        q, k, v, **_varlen(cu_seqlens, max_seqlen), softmax_scale=scale, causal=True, return_lse=True
    )[:2]
    return out.contiguous(), lse.contiguous()


@fa4_attention.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    lse = (q.size(0), q.size(2), q.size(1)) if cu_seqlens is None else (q.size(1), q.size(0))
    out = q.new_empty((*q.shape[:-1], v.size(-1)))
    return out, q.new_empty(lse, dtype=torch.float32)


@torch.library.custom_op(
    "questa::fa4_attention_backward",
    mutates_args=(),
    schema="(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens, SymInt max_seqlen, "
    "float scale) -> (Tensor, Tensor, Tensor)",
)
def fa4_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None, max_seqlen: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    grads = _kernels().bwd(
        q, k, v, out, dout, lse, softmax_scale=scale, causal=True, **_varlen(cu_seqlens, max_seqlen)
    )[:3]
    # each gradient laid out as empty_like(its input), what the fake below promises a compiled graph (FA4 allocates
    # them so; a copy only where it did not)
    return tuple(
        g if g.stride() == _empty_like_strides(x) else torch.empty_like(x).copy_(g) for g, x in zip(grads, (q, k, v))
    )


@fa4_attention_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _empty_like_strides(x: torch.Tensor) -> tuple[int, ...]:
    return torch.empty_like(x, device="meta").stride()


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.mark_non_differentiable(output[1])  # lse: for the backward only


def _backward(ctx, dout, dlse):  # lse is not differentiable (marked above): dlse is unused
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = fa4_attention_backward(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


fa4_attention.register_autograd(_backward, setup_context=_setup)


def fa4_dense(query, key, value, scale: float) -> torch.Tensor:
    """Causal attention of [s, b, heads, d] queries over [s, b, groups, d] keys and values (grouped heads
    attended as they are) -> [s, b, heads, d]; the kernel sees [b, s, h, d] views, no copies."""
    q, k, v = (x.transpose(0, 1) for x in (query, key, value))
    return fa4_attention(q, k, v, None, 0, scale)[0].transpose(0, 1)
