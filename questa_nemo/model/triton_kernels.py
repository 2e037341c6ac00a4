"""Triton kernels for the fused ops of model/fused.py (imported on CUDA only: triton ships with CUDA torch).

SwiGLU over megatron's fused fc1 output y = [gate | up] ([rows, 2f], contiguous): each program handles one
row's block of columns, reads gate, up (and the upstream gradient) once and writes both halves of the input
gradient, where a compiled `cat` of the two halves reads its inputs twice.

`swiglu_forward`, `rmsnorm_forward` and `add_rmsnorm` (a residual add and the next RMSNorm in one launch) also
serve the rollout's decode step (rollout/decoder.py, EngineOptions.fused_norms), where each op is a
launch-bound kernel on a few rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

BLOCK = 1024


# ------------------------------------------------------------------------------ programmatic dependent launch
@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL (the kernel launched with `pdl_launch(True)`, Hopper+): wait until the previous kernel on the
    stream has finished and its writes are visible, then let the next one launch. Its programs are placed while
    this kernel's last ones run and wait here in turn, instead of launching when this kernel ends: the gap
    between two small kernels of a decode step. Every load of a previous kernel's output and every store
    must come after this call. Without PDL it is nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl_launch(pdl: bool) -> dict:
    """The launch option of a kernel that calls `pdl_enter(PDL=pdl)`; none without PDL. PDL needs a Hopper or
    later GPU: Triton's interpreter cannot run a kernel with PDL on (its wait is inline PTX)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _swiglu_forward_kernel(y_ptr, out_ptr, f, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    gate = tl.load(y_ptr + row * 2 * f + cols, mask=mask).to(tl.float32)
    up = tl.load(y_ptr + row * 2 * f + f + cols, mask=mask).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * f + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(g_ptr, y_ptr, dy_ptr, f, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < f
    g = tl.load(g_ptr + row * f + cols, mask=mask).to(tl.float32)
    gate = tl.load(y_ptr + row * 2 * f + cols, mask=mask).to(tl.float32)
    up = tl.load(y_ptr + row * 2 * f + f + cols, mask=mask).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = g * gate * sig
    tl.store(dy_ptr + row * 2 * f + cols, d_gate.to(dy_ptr.dtype.element_ty), mask=mask)
    tl.store(dy_ptr + row * 2 * f + f + cols, d_up.to(dy_ptr.dtype.element_ty), mask=mask)


def swiglu_forward(y: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """silu(gate) * up for y [..., 2f] -> [..., f]. pdl: a programmatic dependent launch (`pdl_enter`)."""
    f = y.size(-1) // 2
    y2d = y.reshape(-1, 2 * f).contiguous()
    out = torch.empty(y2d.size(0), f, dtype=y.dtype, device=y.device)
    if out.numel():
        _swiglu_forward_kernel[(y2d.size(0), triton.cdiv(f, BLOCK))](
            y2d, out, f, BLOCK=BLOCK, PDL=pdl, num_warps=4, **pdl_launch(pdl)
        )  # fmt: skip
    return out.view(*y.shape[:-1], f)


def swiglu_backward(g: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of `swiglu_forward` at y for upstream gradient g ([..., f]) -> [..., 2f]."""
    f = y.size(-1) // 2
    y2d, g2d = y.reshape(-1, 2 * f).contiguous(), g.reshape(-1, f).contiguous()
    dy = torch.empty_like(y2d)
    if dy.numel():
        _swiglu_backward_kernel[(y2d.size(0), triton.cdiv(f, BLOCK))](
            g2d, y2d, dy, f, BLOCK=BLOCK, num_warps=4
        )
    return dy.view(y.shape)


# ------------------------------------------------------------------------------------------ RoPE
@triton.jit
def _rotate(x1, x2, cos, sin):
    """Rotate-half RoPE of the two halves of a head: (x1 cos - x2 sin, x2 cos + x1 sin); with -sin, the opposite
    rotation (a rotation's backward)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, batch, heads, stride_s, stride_b, stride_h,
    SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """One (position, batch row, block of heads) per program. out1 = x1 cos - x2 sin', out2 = x2 cos + x1 sin'
    with sin' = SIGN sin: SIGN = 1 rotates (forward), -1 rotates back (the backward of a rotation)."""
    row = tl.program_id(0)
    s, b = row // batch, row % batch
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    mask = (h < heads)[:, None]
    src = x_ptr + s.to(tl.int64) * stride_s + b * stride_b + h[:, None] * stride_h + d[None, :]
    x1 = tl.load(src, mask=mask).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask).to(tl.float32)
    cos = tl.load(cos_ptr + s.to(tl.int64) * 2 * HALF + d)[None, :]  # both halves of a table row are equal
    sin = SIGN * tl.load(sin_ptr + s.to(tl.int64) * 2 * HALF + d)[None, :]
    dst = out_ptr + (row.to(tl.int64) * heads + h[:, None]) * 2 * HALF + d[None, :]
    o1, o2 = _rotate(x1, x2, cos, sin)
    tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself where its last dim is contiguous (the kernels take any other strides), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _table_rows(cos: torch.Tensor, sin: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE tables [s, ..., d] as the kernels read them: one contiguous row of d per position."""
    return cos.reshape(-1, dim).contiguous(), sin.reshape(-1, dim).contiguous()


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [s, b, heads, d] (any strides, d contiguous) rotated by fp32 tables cos / sin [s, 1, 1, d] (or
    [s, d]); inverse: the opposite rotation. Returns a contiguous tensor of x's shape and dtype."""
    s, b, heads, dim = x.shape
    x = _last_dim_contiguous(x)
    cos, sin = _table_rows(cos, sin, dim)
    out = torch.empty(s, b, heads, dim, dtype=x.dtype, device=x.device)
    if out.numel():
        block_h = min(triton.next_power_of_2(heads), 16)
        grid = (s * b, triton.cdiv(heads, block_h))
        _rope_kernel[grid](
            x, cos, sin, out, b, heads, x.stride(0), x.stride(1), x.stride(2),
            SIGN=-1.0 if inverse else 1.0, HALF=dim // 2, BLOCK_H=block_h, num_warps=4,
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------ QKV split + RoPE
# megatron's fused QKV projection output is [s, b, groups, (q_per_group + 2) * d]: each key/value group's query
# heads, then its key, then its value. megatron splits it into strided views and copies the query into
# [s, b, heads, d] (its `reshape` cannot be a view) before RoPE reads it again; in the backward the split's
# gradient is a `cat` of the three gradients. These two kernels do each direction in one pass (megatron's
# `fused_single_qkv_rope`; model/fused.py): forward, read a group's query and key heads once and write them
# rotated and contiguous; backward, write the rotated-back query and key gradients and the value gradient
# straight into the fused projection's gradient.
@triton.jit
def _qkv_rope_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, batch, groups, stride_s, stride_b, stride_g,
    QPG: tl.constexpr, BLOCK_Q: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """One (position, batch row, group) per program: its QPG query heads and its key head, rotated."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    s, b = row // batch, row % batch
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + s.to(tl.int64) * 2 * HALF + d)  # both halves of a table row are equal
    sin = tl.load(sin_ptr + s.to(tl.int64) * 2 * HALF + d)
    base = qkv_ptr + s.to(tl.int64) * stride_s + b * stride_b + g * stride_g
    h = tl.arange(0, BLOCK_Q)
    mask = (h < QPG)[:, None]
    src = base + h[:, None] * 2 * HALF + d[None, :]
    x1 = tl.load(src, mask=mask).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask).to(tl.float32)
    dst = q_ptr + ((row.to(tl.int64) * groups + g) * QPG + h[:, None]) * 2 * HALF + d[None, :]
    q1, q2 = _rotate(x1, x2, cos[None, :], sin[None, :])
    tl.store(dst, q1.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, q2.to(q_ptr.dtype.element_ty), mask=mask)
    k1 = tl.load(base + QPG * 2 * HALF + d).to(tl.float32)
    k2 = tl.load(base + QPG * 2 * HALF + HALF + d).to(tl.float32)
    kdst = k_ptr + (row.to(tl.int64) * groups + g) * 2 * HALF + d
    k1, k2 = _rotate(k1, k2, cos, sin)
    tl.store(kdst, k1.to(k_ptr.dtype.element_ty))
    tl.store(kdst + HALF, k2.to(k_ptr.dtype.element_ty))


@triton.jit
def _qkv_rope_backward_kernel(
    dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqkv_ptr, batch, groups,
    dq_s, dq_b, dq_h, dk_s, dk_b, dk_h, dv_s, dv_b, dv_h,
    QPG: tl.constexpr, BLOCK_Q: tl.constexpr, HALF: tl.constexpr,
):  # fmt: skip
    """One (position, batch row, group) per program: the group's slice of the fused projection's gradient,
    [query heads rotated back | key rotated back | value], from dq [s, b, heads, d], dk / dv [s, b, groups, d]
    (any strides but d's)."""
    row = tl.program_id(0)
    g = tl.program_id(1)
    s, b = row // batch, row % batch
    s64 = s.to(tl.int64)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + s64 * 2 * HALF + d)
    sin = -tl.load(sin_ptr + s64 * 2 * HALF + d)  # rotated back
    h = tl.arange(0, BLOCK_Q)
    mask = (h < QPG)[:, None]
    src = dq_ptr + s64 * dq_s + b * dq_b + (g * QPG + h[:, None]) * dq_h + d[None, :]
    x1 = tl.load(src, mask=mask).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask).to(tl.float32)
    base = dqkv_ptr + (row.to(tl.int64) * groups + g) * (QPG + 2) * 2 * HALF
    dst = base + h[:, None] * 2 * HALF + d[None, :]
    q1, q2 = _rotate(x1, x2, cos[None, :], sin[None, :])
    tl.store(dst, q1.to(dqkv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, q2.to(dqkv_ptr.dtype.element_ty), mask=mask)
    ksrc = dk_ptr + s64 * dk_s + b * dk_b + g * dk_h + d
    k1, k2 = _rotate(tl.load(ksrc).to(tl.float32), tl.load(ksrc + HALF).to(tl.float32), cos, sin)
    tl.store(base + QPG * 2 * HALF + d, k1.to(dqkv_ptr.dtype.element_ty))
    tl.store(base + QPG * 2 * HALF + HALF + d, k2.to(dqkv_ptr.dtype.element_ty))
    full = tl.arange(0, 2 * HALF)
    v = tl.load(dv_ptr + s64 * dv_s + b * dv_b + g * dv_h + full)
    tl.store(base + (QPG + 1) * 2 * HALF + full, v.to(dqkv_ptr.dtype.element_ty))


def qkv_rope(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_per_group: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [s, b, groups, (q_per_group + 2) * d] (any strides but the last) -> the rotated query
    [s, b, groups * q_per_group, d] and key [s, b, groups, d], contiguous; fp32 tables cos / sin [s, ..., d]."""
    s, b, groups, width = qkv.shape
    dim = width // (q_per_group + 2)
    qkv = _last_dim_contiguous(qkv)
    cos, sin = _table_rows(cos, sin, dim)
    q = torch.empty(s, b, groups * q_per_group, dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(s, b, groups, dim, dtype=qkv.dtype, device=qkv.device)
    if q.numel():
        _qkv_rope_kernel[(s * b, groups)](
            qkv, cos, sin, q, k, b, groups, qkv.stride(0), qkv.stride(1), qkv.stride(2),
            QPG=q_per_group, BLOCK_Q=triton.next_power_of_2(q_per_group), HALF=dim // 2, num_warps=4,
        )  # fmt: skip
    return q, k


def qkv_rope_backward(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The gradient of `qkv_rope` (with the value a view of qkv's last d columns of each group) at upstream
    gradients dq [s, b, heads, d], dk and dv [s, b, groups, d] -> [s, b, groups, (heads / groups + 2) * d],
    contiguous."""
    s, b, heads, dim = dq.shape
    groups = dk.size(2)
    q_per_group = heads // groups
    dq, dk, dv = _last_dim_contiguous(dq), _last_dim_contiguous(dk), _last_dim_contiguous(dv)
    cos, sin = _table_rows(cos, sin, dim)
    dqkv = torch.empty(s, b, groups, (q_per_group + 2) * dim, dtype=dq.dtype, device=dq.device)
    if dqkv.numel():
        _qkv_rope_backward_kernel[(s * b, groups)](
            dq, dk, dv, cos, sin, dqkv, b, groups,
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            QPG=q_per_group, BLOCK_Q=triton.next_power_of_2(q_per_group), HALF=dim // 2, num_warps=4,
        )  # fmt: skip
    return dqkv


# ------------------------------------------------------------------------------------------ log-prob head
# model/logprobs.py's per-chunk softmax maths on one chunk's logits [n, V] (V: this rank's vocabulary rows,
# ~152K): one program per row (statistics) or per row and column block (gradient), 64-bit row offsets, so a
# 32K-token chunk (5e9 logits, past 2^31) runs at the speed of an 8K one. torch.compile's pointwise gradient
# kernel took 14.7 ms on a 32K chunk on an H100 (1.4 TB/s; 1.8 ms at 8K) and its forward read the logits twice.
LOGPROB_BLOCK = 2048


@triton.jit
def _logprob_stats_kernel(
    logits_ptr, target_ptr, max_ptr, sum_ptr, weighted_ptr, picked_ptr, v, stride, temperature,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One pass over a row of l = logits / temperature: m = max l, s = sum exp(l - m), w = sum exp(l - m) l
    (online: the running sums rescaled when a block raises the max), and l[target] (0 where target < 0)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), 0)
    s = tl.zeros([BLOCK], tl.float32)  # per-lane sums, reduced once at the end
    w = tl.zeros([BLOCK], tl.float32)
    for start in range(0, v, BLOCK):
        mask = start + cols < v
        x = tl.load(base + start + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, 0))  # finite: every block holds at least one column
        alpha = tl.exp(m - m_new)
        p = tl.exp(x - m_new)
        s = s * alpha + p
        w = w * alpha + p * tl.where(mask, x, 0.0)
        m = m_new
    s = tl.sum(s, 0)
    w = tl.sum(w, 0)
    t = tl.load(target_ptr + row)
    picked = tl.load(base + tl.maximum(t, 0)).to(tl.float32) / temperature
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    tl.store(weighted_ptr + row, w)
    tl.store(picked_ptr + row, tl.where(t >= 0, picked, 0.0))


@triton.jit
def _logprob_grad_kernel(
    logits_ptr, grad_ptr, log_z_ptr, entropy_ptr, g_lp_ptr, g_h_ptr, target_ptr, v, stride, temperature,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """d(g_lp logp_target + g_h H) / d logits for one row's block of columns:
    ([v == target] g_lp - p_v (g_lp + g_h (log p_v + H))) / temperature, in the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < v
    x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32) / temperature
    log_z, entropy = tl.load(log_z_ptr + row), tl.load(entropy_ptr + row)
    g_lp, g_h = tl.load(g_lp_ptr + row), tl.load(g_h_ptr + row)
    t = tl.load(target_ptr + row)
    log_p = x - log_z
    grad = tl.where(cols == t, g_lp, 0.0) - tl.exp(log_p) * (g_lp + g_h * (log_p + entropy))
    tl.store(grad_ptr + row * v + cols, (grad / temperature).to(grad_ptr.dtype.element_ty), mask=mask)


def logprob_stats(logits: torch.Tensor, target: torch.Tensor, temperature: float):
    """logits [n, V] (rows may be strided), target [n] local column or -1 (the target is on another rank) ->
    fp32 [n] each: (max of l, sum exp(l - max), sum exp(l - max) l, l[target] or 0), l = logits / temperature."""
    logits = _last_dim_contiguous(logits)
    n, v = logits.shape
    out = torch.empty(4, n, dtype=torch.float32, device=logits.device)
    if n and v:
        _logprob_stats_kernel[(n,)](
            logits, target.contiguous(), out[0], out[1], out[2], out[3], v, logits.stride(0), temperature,
            BLOCK=LOGPROB_BLOCK, num_warps=8,
        )  # fmt: skip
    elif n:
        out[0].fill_(float("-inf"))
        out[1:].zero_()
    return out.unbind(0)


def logprob_grad(logits, log_z, entropy, g_lp, g_h, target, temperature: float) -> torch.Tensor:
    """The gradient of sum g_lp logp_target + g_h H with respect to logits [n, V] (contiguous, logits' dtype);
    log_z, entropy, g_lp, g_h: fp32 [n]; target [n]: local column or -1."""
    logits = _last_dim_contiguous(logits)
    n, v = logits.shape
    grad = torch.empty(n, v, dtype=logits.dtype, device=logits.device)
    if grad.numel():
        f32 = [t.to(torch.float32).contiguous() for t in (log_z, entropy, g_lp, g_h)]
        _logprob_grad_kernel[(n, triton.cdiv(v, LOGPROB_BLOCK))](
            logits, grad, *f32, target.contiguous(), v, logits.stride(0), temperature, BLOCK=LOGPROB_BLOCK,
            num_warps=8,
        )  # fmt: skip
    return grad


# ------------------------------------------------------------------------------------------ RMSNorm
@triton.jit
def _rmsnorm_forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row per program: rstd = 1 / sqrt(mean(x^2) + eps), y = x * rstd * w, fp32 math, one rounding."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
    tl.store(rstd_ptr + row, rstd)
    tl.store(y_ptr + row * n + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_backward_kernel(
    g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, rows, n,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """A block of rows per program: dx = rstd (w g - xhat mean(w g xhat)) with xhat = x rstd, and this block's
    partial weight gradient sum_rows g xhat (fp32, one row of dw_partial per program)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ROWS_PER_PROGRAM):
        row = pid.to(tl.int64) * ROWS_PER_PROGRAM + i
        live = mask & (row < rows)  # the last block may run past the rows: masked, adds 0 to dw
        g = tl.load(g_ptr + row * n + cols, mask=live, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * n + cols, mask=live, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row + cols * 0, mask=live, other=0.0)  # broadcast, masked like the row
        xhat = x * rstd
        wg = w * g
        c = tl.sum(wg * xhat, axis=0) / n
        tl.store(dx_ptr + row * n + cols, (rstd * (wg - xhat * c)).to(dx_ptr.dtype.element_ty), mask=live)
        dw += g * xhat
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n + cols, dw, mask=mask)


def rmsnorm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x [..., n] -> (y like x, rstd [rows] fp32). pdl: see `pdl_enter`."""
    n = x.size(-1)
    x2d = x.reshape(-1, n).contiguous()
    y = torch.empty_like(x2d)
    rstd = torch.empty(x2d.size(0), dtype=torch.float32, device=x.device)
    if x2d.numel():
        block = triton.next_power_of_2(n)
        _rmsnorm_forward_kernel[(x2d.size(0),)](
            x2d, weight.contiguous(), y, rstd, n, eps, BLOCK=block, PDL=pdl,
            num_warps=min(max(block // 256, 1), 16), **pdl_launch(pdl),
        )  # fmt: skip
    return y.view(x.shape), rstd


def rmsnorm_backward(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, programs: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx like x, dw like weight) of `rmsnorm_forward` for upstream g. Rows are split into about
    `programs` blocks (a power of two rows each, at most 64: a compile-time constant, so micro-batches of any
    length share a handful of compiled variants); their fp32 partial weight gradients are summed at the end."""
    n = x.size(-1)
    x2d, g2d = x.reshape(-1, n).contiguous(), g.reshape(-1, n).contiguous()
    rows = x2d.size(0)
    dx = torch.empty_like(x2d)
    per_program = min(triton.next_power_of_2(triton.cdiv(rows, max(programs, 1))), 64) if rows else 1
    programs = triton.cdiv(rows, per_program) if rows else 1
    partial = torch.empty(programs, n, dtype=torch.float32, device=x.device)  # every program writes its row
    if rows:
        block = triton.next_power_of_2(n)
        _rmsnorm_backward_kernel[(programs,)](
            g2d, x2d, weight.contiguous(), rstd, dx, partial, rows, n,
            ROWS_PER_PROGRAM=per_program, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
        )  # fmt: skip
    return dx.view(x.shape), partial.sum(0).to(weight.dtype)


# ------------------------------------------------------------------------------ residual add + RMSNorm
@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, h_ptr, y_ptr, n, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row per program: h = r + x (fp32 sum rounded to h's dtype, as torch's add), then y = RMSNorm(h) from
    the rounded h with `_rmsnorm_forward_kernel`'s maths (same block and warps: the same bits)."""
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
    h = (r + x).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + row * n + cols, h, mask=mask)
    hf = h.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / n + eps)
    tl.store(y_ptr + row * n + cols, (hf * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + x, RMSNorm(residual + x)) for x, residual [..., n] of one dtype, in one kernel: the decode
    step's residual stream (rollout/decoder.py), where the add and the norm were two launches each time.
    pdl: see `pdl_enter`."""
    n = x.size(-1)
    x2d, r2d = x.reshape(-1, n).contiguous(), residual.reshape(-1, n).contiguous()
    h, y = torch.empty_like(r2d), torch.empty_like(r2d)
    if x2d.numel():
        block = triton.next_power_of_2(n)
        _add_rmsnorm_kernel[(x2d.size(0),)](
            x2d, r2d, weight.contiguous(), h, y, n, eps, BLOCK=block, PDL=pdl,
            num_warps=min(max(block // 256, 1), 16), **pdl_launch(pdl),
        )  # fmt: skip
    return h.view(residual.shape), y.view(residual.shape)


# ------------------------------------------------------------------------------ skinny matmul (decode)
SKINNY_MAX_ROWS = 32  # rows (sequences) up to which `skinny_linear` runs its own kernel; more go to cuBLAS


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K,
    K_PER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """y [M, N] = x [M, K] @ w [N, K]^T (+ b) for a few rows M <= BLOCK_M: a decode step's projections, where
    the weight read is the whole cost. Program (n, s) reads columns n * BLOCK_N.. of w over K slice s
    (K_PER wide). With SPLIT_K > 1 each program leaves its float32 partial in part [SPLIT_K, BLOCK_M, N] and
    takes a ticket from count [tiles]; the last of a tile's programs sums the partials in split order (the
    same bits whoever finishes last), writes y and resets the ticket, so a captured graph replays cleanly.
    HAS_SCALE: w is 8-bit (int8 or float8 e4m3) with a float32 scale per output column in s [N]
    (model/weights8.py): each tile is widened to x's dtype (exact for both) for the dot, the column's scale
    multiplies its float32 sum once."""
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_start = pid_k * K_PER
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PER, BLOCK_K):
        k = k_start + k0 + rk
        kmask = (k0 + rk < K_PER) & (k < K)
        x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + k[None, :], mask=(rn[:, None] < N) & kmask[None, :],
                    other=0.0)  # fmt: skip
        if HAS_SCALE:
            w = w.to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    out_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        if HAS_SCALE:
            acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile = part_ptr + rm[:, None] * N + rn[None, :]
        tl.store(tile + pid_k * BLOCK_M * N, acc, mask=out_mask)
        ticket = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")  # after this program's partial is stored
        if ticket == SPLIT_K - 1:  # every other split of this tile has stored its partial
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(tile + s * BLOCK_M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_SCALE:
                total *= tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rm[:, None] * N + rn[None, :], total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0)


def skinny_config(rows: int, n: int, k: int, sms: int, eight_bit: bool = False) -> dict:
    """Tile sizes for `skinny_linear` at [rows, k] x [n, k]^T: 64 columns a program on wide outputs, 32 on
    narrow ones, and K split until the programs cover the SMs about twice (narrow outputs: the attention's
    projections and the MLP's down projection at a 1.5B model's hidden size). eight_bit: 8-bit weights (int8,
    float8), twice as deep a K tile (the same bytes a load as bf16's)."""
    block_m = 16 if rows <= 16 else 32
    block_n = 64 if n >= 8192 else 32
    block_k = 256 if eight_bit else 128
    tiles = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(2 * sms, tiles), k // (2 * block_k)))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split, "num_warps": 4,
            "num_stages": 4}  # fmt: skip


_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, block_m: int, n: int, split: int, tiles: int):
    """The split partials and the per-tile tickets (zeroed once; the kernel leaves them zero) for one shape,
    kept for the process: a captured graph keeps pointing at them. Launches of one shape must not overlap (two
    streams decoding at once in one process would share them); the rollout engine decodes on one stream at a
    time (the async producer's stream decodes while the trainer, which does not use this kernel, trains)."""
    key = (str(device), block_m, n, split, tiles)
    if key not in _WORKSPACE:
        _WORKSPACE[key] = (
            torch.empty(split, block_m, n, dtype=torch.float32, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device),
        )
    return _WORKSPACE[key]


_SMS: dict[str, int] = {}


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
    scale: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., k] with at most SKINNY_MAX_ROWS rows (more go to F.linear):
    `_skinny_kernel`, float32 accumulation, one rounding. config: tile sizes (default `skinny_config`).
    scale: weight is 8-bit (int8 or float8 e4m3) with this float32 scale per output row
    (model/weights8.quantize_rows): y = (x @ q^T) * scale (+ bias), at most SKINNY_MAX_ROWS rows (larger
    batches: the weight in x's dtype).
    pdl: a programmatic dependent launch (`pdl_enter`; not on the F.linear path)."""
    n, k = weight.shape
    x2d = x.reshape(-1, k)
    rows = x2d.size(0)
    if scale is not None:
        if not 0 < rows <= SKINNY_MAX_ROWS:
            raise ValueError(f"skinny_linear: 8-bit weights take 1..{SKINNY_MAX_ROWS} rows, got {rows}")
        eight_bit = weight.dtype in (torch.int8, torch.float8_e4m3fn)
        if not eight_bit or scale.dtype != torch.float32 or scale.shape != (n,):
            raise ValueError(f"skinny_linear: with scale the weight must be int8 or float8_e4m3fn and the scale "
                             f"float32 [{n}], got {weight.dtype} and {scale.dtype} {tuple(scale.shape)}")  # fmt: skip
        scale = scale.contiguous()
    if rows == 0 or rows > SKINNY_MAX_ROWS:
        return torch.nn.functional.linear(x, weight, bias)
    x2d, weight = x2d.contiguous(), weight.contiguous()
    if config is None:
        dev = str(x.device)
        if dev not in _SMS:
            _SMS[dev] = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
        config = skinny_config(rows, n, k, _SMS[dev], eight_bit=scale is not None)
    cfg = dict(config)
    block_m, block_n, block_k, split = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["SPLIT_K"]
    if rows > block_m:
        raise ValueError(f"skinny_linear: {rows} rows exceed BLOCK_M {block_m}")
    k_per = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per)
    cfg["SPLIT_K"] = split
    tiles = triton.cdiv(n, block_n)
    part, count = _workspace(x.device, block_m, n, split, tiles) if split > 1 else (x2d, x2d)
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    _skinny_kernel[(tiles, split)](
        x2d, weight, scale if scale is not None else x2d, bias if bias is not None else x2d, y, part, count,
        rows, n, k, K_PER=k_per, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, PDL=pdl, **cfg,
        **pdl_launch(pdl),
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)
