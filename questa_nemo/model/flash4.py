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
import os
import threading
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
    kernels = _kernels()
    if cu_seqlens is None and FAST_FORWARD:
        out, lse = _direct_forward(kernels.fwd, q, k, v, scale)
    else:
        out, lse = _through_fa4(kernels.fwd, q, k, v, scale, **_varlen(cu_seqlens, max_seqlen))
    return out.contiguous(), lse.contiguous()


def _through_fa4(fwd, q, k, v, scale, **varlen) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention by FA4's own forward (its Python, then its kernel): (out, lse)."""
    return fwd(q, k, v, **varlen, softmax_scale=scale, causal=True, return_lse=True)[:2]


# FA4's forward spends ~0.37 ms of host time a call in Python before its kernel launches (heuristics, compile key,
# cache lookup: docs/benchmarks.md (φ)); in a step's first forward the GPU waits for it at every layer. For a
# dense problem seen before, `_direct_forward` calls the kernel FA4 compiled for it with the arguments FA4 passed
# it, our tensors in place of the first call's. The first call of each problem goes through FA4, with the
# kernels it takes from its forward compile cache recorded; the problem keeps FA4's own path unless that call
# took exactly one and passed it no tensor but q, k, v, out and lse (a split-KV combine, scheduler metadata or a
# copy FA4 makes of an input shows up there as another tensor). Off: on an H100 (docs/benchmarks.md (χ)) it was
# bit for bit FA4's forward and cut the host time a call from 0.14 to 0.04 ms, but the 8K and 32K training steps
# did not get faster (GPU-bound: 2.1 ms idle in 183.5), so FA4's private interface is not worth reaching into.
FAST_FORWARD = False
_direct: dict[tuple, object] = {}  # problem -> _Recorded, or None where FA4's own path stays
_recording = threading.Lock()  # one recording at a time: each swaps FA4's cache attribute and puts it back


class _Recorded(NamedTuple):
    kernel: object  # FA4's compiled function
    args: tuple  # its arguments at the first call, None where that call's tensors were
    slots: dict  # argument index -> "q" | "k" | "v" | "out" | "lse"
    out: tuple  # (shape, dtype) of the output FA4 allocated
    lse: tuple


def _problem(q, k, v, scale) -> tuple:
    """What FA4's choice of kernel and arguments can depend on for a dense causal call: layouts, alignment,
    device, scale, and the environment variables its heuristics read at each call (SM count, architecture).
    (Its log level, also in its compile key, changes only what the kernel logs.)"""
    env = tuple(os.environ.get(name) for name in ("FLASH_ATTENTION_NUM_SMS", "FLASH_ATTENTION_ARCH"))
    return (*(
        (x.shape, x.stride(), x.dtype, x.data_ptr() % 16) for x in (q, k, v)
    ), q.device, float(scale), env)  # fmt: skip


def _direct_forward(fwd, q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor]:
    key = _problem(q, k, v, scale)
    recorded = _direct.get(key, False)
    if recorded is False:
        out, lse, recorded = _record_forward(fwd, q, k, v, scale)
        _direct[key] = recorded
        return out, lse
    if recorded is None:
        return _through_fa4(fwd, q, k, v, scale)
    out = torch.empty(recorded.out[0], dtype=recorded.out[1], device=q.device)
    lse = torch.empty(recorded.lse[0], dtype=recorded.lse[1], device=q.device)
    mine = {"q": q.detach(), "k": k.detach(), "v": v.detach(), "out": out, "lse": lse}
    args = list(recorded.args)
    for i, name in recorded.slots.items():
        args[i] = mine[name]
    recorded.kernel(*args)
    return out, lse


class _Recorder:
    """FA4's compile cache (`_flash_attn_fwd.compile_cache`) for one call: lookups hand out the compiled
    function wrapped to record its calls."""

    def __init__(self, cache):
        self.cache, self.calls = cache, []

    def __getitem__(self, key):
        kernel = self.cache[key]

        def call(*args):
            self.calls.append((kernel, args))
            return kernel(*args)

        return call

    def __contains__(self, key):
        return key in self.cache

    def __setitem__(self, key, fn):
        self.cache[key] = fn

    def get(self, key, default=None):
        return self[key] if key in self.cache else default

    def __getattr__(self, name):
        return getattr(self.cache, name)


def _record_forward(fwd, q, k, v, scale) -> tuple[torch.Tensor, torch.Tensor, _Recorded | None]:
    """FA4's forward through its own path, with what it launched recorded: (out, lse, the recording where it
    can be replayed with other tensors, else None)."""
    cache = getattr(fwd, "compile_cache", None)
    if cache is None:
        return (*_through_fa4(fwd, q, k, v, scale), None)
    with _recording:
        recorder = fwd.compile_cache = _Recorder(cache)
        try:
            out, lse = _through_fa4(fwd, q, k, v, scale)
        finally:
            fwd.compile_cache = cache
    return out, lse, _replayable(recorder.calls, q, k, v, out, lse)


def _replayable(calls, q, k, v, out, lse) -> _Recorded | None:
    if len(calls) != 1 or not (out.is_contiguous() and lse.is_contiguous()):
        return None
    kernel, args = calls[0]
    ours = {"q": q, "k": k, "v": v, "out": out, "lse": lse}
    slots = {}
    for i, arg in enumerate(args):
        if isinstance(arg, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in _flat(arg)):
            return None  # tensors inside a structure (aux tensors, block sparsity): not ours to swap
        if not isinstance(arg, torch.Tensor):
            continue
        name = next((n for n, t in ours.items() if _same_view(arg, t)), None)
        if name is None:
            return None  # a buffer of FA4's own (scheduler metadata, a workspace): its path stays
        slots[i] = name
    if sorted(slots.values()) != sorted(ours):
        return None
    kept = tuple(None if i in slots else arg for i, arg in enumerate(args))  # not the first call's tensors
    return _Recorded(kernel, kept, slots, (out.shape, out.dtype), (lse.shape, lse.dtype))


def _flat(x):
    for y in x:
        if isinstance(y, (tuple, list)):
            yield from _flat(y)
        else:
            yield y


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


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
