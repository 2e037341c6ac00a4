"""Fused RoPE and SwiGLU for megatron's layers when Transformer Engine is absent.

megatron's unfused RoPE (`rope_utils._apply_rotary_pos_emb_bshd`) runs about ten kernels per call (cos, sin,
casts, two products, a negation, two concatenations, a sum) on query and key of every layer, forward and
backward: 14 ms of GPU time in a 1.5B training step at 8K tokens on an H200 (of about 200). With
`apply_rope_fusion` megatron instead calls the module-level functions `rope_utils.fused_apply_rotary_pos_emb`
(sbhd) and `fused_apply_rotary_pos_emb_thd` (packed), which it imports from TE. Without TE those are None;
`install()` (called by the spec provider, model/spec.py) fills them with the functions below: one Triton
kernel each way (model/triton_kernels.py), on cos / sin tables computed once per forward. (A torch.compile'd
version took 5 ms a step, about five times what its memory traffic needs.)

SwiGLU: megatron's own fusion (`bias_swiglu_impl`, torch.compile'd) writes its input gradient as a `cat` of
the two halves and reads every input twice; its backward took 8.2 ms of that step, ours 5.0. `SwiGLU` is
the MLP's activation submodule (megatron builds it from the layer spec when `use_te_activation_func` is
set) on two Triton kernels that read each element once (model/triton_kernels.py); off CUDA it runs the
same maths eagerly.

RoPE is the same maths as megatron's: rotate-half (not interleaved) over the full head dim, no mscale;
computed in fp32 and rounded once (megatron rounds cos and sin to the input dtype first). Packed (thd)
sequences take positions from the start of their own segment in `cu_seqlens`, as TE's fused thd RoPE does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings import rope_utils


def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [s, b, heads, d] rotated by angles with cos / sin tables [s, 1 or b, 1, d] (`cat(f, f)` layout)."""
    x = t.to(cos.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(t.dtype)


_tables: tuple = ()  # (freqs, cu_seqlens, cos, sin) of the last call


def rope_tables(freqs: torch.Tensor, t: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """cos / sin of megatron's angles freqs [max_s, 1, 1, d] (for packed t: at each token's position in its
    segment), in at least fp32. Every layer of a forward gets the same freqs (and cu_seqlens) tensors, so
    the tables of the last call are reused: one computation per forward instead of two per layer."""
    global _tables
    dtype = torch.promote_types(t.dtype, torch.float32)
    compiling = torch.compiler.is_compiling()  # a compiled layer computes its own (fused into its graph)
    if (
        not compiling
        and _tables
        and _tables[0] is freqs
        and _tables[1] is cu_seqlens
        and _tables[2].dtype == dtype
    ):
        return _tables[2], _tables[3]
    angles = freqs.to(dtype)
    if cu_seqlens is not None:
        angles = angles[segment_positions(cu_seqlens, t.size(0))]
    cos, sin = angles.cos(), angles.sin()
    if not compiling:
        _tables = (freqs, cu_seqlens, cos, sin)
    return cos, sin


def forget_rope_tables() -> None:
    """Drop the cached cos / sin tables (the next RoPE call computes them again)."""
    global _tables
    _tables = ()


def segment_positions(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each packed token's offset from its segment's start in `cu_seqlens` ([n + 1], ending at `tokens`)."""
    index = torch.arange(tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    segment = torch.searchsorted(cu_seqlens[1:], index, right=True)
    return (index - cu_seqlens[segment]).long()


class _RopeFunction(torch.autograd.Function):
    """The Triton rotation; its backward is the opposite rotation of the upstream gradient."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        from questa_nemo.model.triton_kernels import rope as triton_rope

        ctx.save_for_backward(cos, sin)
        return triton_rope(t, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        from questa_nemo.model.triton_kernels import rope as triton_rope

        cos, sin = ctx.saved_tensors
        return triton_rope(grad, cos, sin, inverse=True), None, None


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The Triton kernel on CUDA (half head dim a power of two, one table row per position); else eager."""
    half = t.size(-1) // 2
    if t.is_cuda and half & (half - 1) == 0 and cos.size(1) == 1:
        return _RopeFunction.apply(t, cos, sin)
    return rope(t, cos, sin)


def fused_rope_sbhd(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_) -> torch.Tensor:
    """megatron's `fused_apply_rotary_pos_emb` signature: t [s, b, heads, d], freqs [s, 1, 1, d]."""
    _check(t, freqs, interleaved)
    cos, sin = rope_tables(freqs, t)
    return _rotate(t, cos, sin)


def fused_rope_thd(
    t: torch.Tensor,
    cu_seqlens: torch.Tensor,
    freqs: torch.Tensor,
    cp_size: int = 1,
    cp_rank: int = 0,
    interleaved: bool = False,
    **_,
) -> torch.Tensor:
    """megatron's `fused_apply_rotary_pos_emb_thd` signature: t [T, heads, d], freqs [max_s, 1, 1, d]
    (megatron-core 0.19 also passes `interleaved`; later keywords are ignored like the sbhd one's)."""
    if cp_size != 1:
        raise ValueError("fused RoPE: context parallelism needs Transformer Engine's thd RoPE")
    _check(t, freqs, interleaved)
    cos, sin = rope_tables(freqs, t, cu_seqlens)
    return _rotate(t.unsqueeze(1), cos, sin).squeeze(1)


def _check(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool) -> None:
    if interleaved:
        raise ValueError("fused RoPE: interleaved rotary embeddings are not supported")
    if freqs.size(-1) != t.size(-1):
        raise ValueError("fused RoPE: partial rotary embeddings (rotary_percent < 1) are not supported")


def install() -> None:
    """Give megatron our fused RoPE where TE's is missing (idempotent; TE's, when present, stays)."""
    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = fused_rope_sbhd
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = fused_rope_thd


# ------------------------------------------------------------------------------------------ SwiGLU
def swiglu_reference(y: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for megatron's fc1 output y = [gate | up] ([..., 2f] -> [..., f]), in fp32."""
    gate, up = y.to(torch.promote_types(y.dtype, torch.float32)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(y.dtype)


def swiglu_reference_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    compute = torch.promote_types(y.dtype, torch.float32)
    gate, up = y.to(compute).chunk(2, dim=-1)
    g = g.to(compute)
    sig = torch.sigmoid(gate)
    d_gate = g * up * sig * (1 + gate * (1 - sig))
    return torch.cat((d_gate, g * gate * sig), dim=-1).to(y.dtype)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        ctx.save_for_backward(y)
        if y.is_cuda:
            from questa_nemo.model.triton_kernels import swiglu_forward

            return swiglu_forward(y)
        return swiglu_reference(y)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        if y.is_cuda:
            from questa_nemo.model.triton_kernels import swiglu_backward

            return swiglu_backward(g, y)
        return swiglu_reference_backward(g, y)


class SwiGLU(torch.nn.Module):
    """The MLP's activation submodule: [..., 2f] fc1 output -> [..., f]."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(y)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Nothing to save; megatron-core 0.15 and 0.16's MLP asks each of its children for this."""
        return {}


# ------------------------------------------------------------------------------------------ RMSNorm
def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, in fp32, rounded once to x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(compute)).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """The Triton kernels (model/triton_kernels.py): forward keeps x and the per-row rstd; backward writes dx
    and per-block fp32 partial weight gradients in one pass, summed by one small reduction."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        from questa_nemo.model.triton_kernels import rmsnorm_forward

        y, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, g):
        from questa_nemo.model.triton_kernels import rmsnorm_backward

        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(g, x, weight, rstd)
        return dx, dw, None


class RMSNorm(torch.nn.Module):
    """megatron's input / pre-MLP norm submodule (WrappedTorchNorm's constructor; a `weight` like
    torch.nn.RMSNorm's, so checkpoints and conversions are unchanged). Triton on CUDA, else eager fp32."""

    def __init__(self, config=None, hidden_size: int = 0, eps: float = 1e-5, **_):
        super().__init__()
        if config is not None and getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("fused RMSNorm: zero-centred gamma is not supported")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            return _RMSNormFunction.apply(x, self.weight, self.eps)
        return rmsnorm_reference(x, self.weight, self.eps)
