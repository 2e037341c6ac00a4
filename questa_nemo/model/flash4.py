"""FlashAttention 4 (the `flash-attn-4` package: FlashAttention's CuTe-DSL kernels, JIT-compiled on first use,
no CUDA toolkit needed) for `model.attention=fa4`: whether it can run here, and its two entry points.

Kept apart from model/attention.py, which imports megatron, so that `questa-nemo doctor` asks the same
question (and gives the same reasons) as the model build without importing megatron. It is offered on
Hopper (sm_90) and Blackwell (sm_100 / sm_103) GPUs, the ones its kernels are tuned for.
bench/bench_attention.py times them against cuDNN's SDPA; that has not run yet (docs/benchmarks.md (τ)).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

NEEDS_GPU = "needs a CUDA GPU"
NOT_INSTALLED = "flash-attn-4 is not installed (pip install flash-attn-4; it needs nvidia-cutlass-dsl)"
ARCHS = (9, 10)  # compute capability majors its training kernels (forward and backward) are built for


class FA4(NamedTuple):
    dense: object  # flash_attn_func(q [b, s, h, d], k, v [b, s, g, d], softmax_scale, causal) -> (out, lse)
    varlen: object  # flash_attn_varlen_func(q [t, h, d], k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, ...)


@functools.cache
def fa4_kernels() -> FA4 | str:
    """The two entry points, or why they do not import (a short reason)."""
    try:
        from flash_attn.cute import flash_attn_func, flash_attn_varlen_func
    except Exception as e:  # noqa: BLE001 - ImportError, or its CuTe DSL failing to load
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == "flash_attn":
            return NOT_INSTALLED  # (a missing part of the CuTe DSL, e.g. cutlass.cute, is named below)
        return f"flash_attn.cute does not import ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return FA4(flash_attn_func, flash_attn_varlen_func)


def fa4_problem(device: torch.device | str) -> str | None:
    """None when FlashAttention 4 can run on `device` (its GPU's architecture, the package imports), else why
    not. The model build (model/megatron.py) and `questa-nemo doctor` both ask this."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return NEEDS_GPU
    major, minor = torch.cuda.get_device_capability(device)
    if major not in ARCHS:
        return f"its kernels are for sm_90 / sm_100 GPUs, this one is sm_{major}{minor}"
    kernels = fa4_kernels()
    return kernels if isinstance(kernels, str) else None


def first_output(result):
    """FlashAttention's entry points return (out, lse); out alone where a version returns only that."""
    return result[0] if isinstance(result, tuple) else result


# FlashAttention 4's kernels are CuTe DSL programs called from Python: eager inside a compiled layer
@torch.compiler.disable
def fa4_dense(query, key, value, scale: float, kernels: FA4 | None = None) -> torch.Tensor:
    """Causal attention of [s, b, heads, d] queries over [s, b, groups, d] keys and values (grouped heads
    attended as they are) -> [s, b, heads, d]; `kernels`: tests pass a reference with FA4's signatures."""
    dense = (kernels or fa4_kernels()).dense
    q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [b, s, h, d] views
    return first_output(dense(q, k, v, softmax_scale=scale, causal=True)).transpose(0, 1)
