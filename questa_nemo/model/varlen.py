"""torch's flash variable-length attention kernel (`torch.nn.attention.varlen`, torch >= 2.10): whether this
torch and a device can run it, for `model.packed_attention`.

Kept apart from model/attention.py, which imports megatron, so that `questa-nemo doctor` asks the same
question (and gives the same reasons) as the model build without importing megatron.
"""

from __future__ import annotations

import functools
import inspect

import torch

NEEDS_GPU = "needs a CUDA GPU"
NO_KERNEL = "this torch has no torch.nn.attention.varlen (torch >= 2.10)"


@functools.cache
def varlen_kernel():
    """torch's flash variable-length attention and whether it takes grouped key/value heads as they are
    (`enable_gqa`, torch >= 2.13; before, keys and values are repeated to the query heads); None without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, "enable_gqa" in inspect.signature(varlen_attn).parameters


def varlen_available(device: torch.device | str) -> str | None:
    """None when the variable-length kernel can run on `device` with this torch, else why not (a short
    reason). Whether one call can take it is decided per call (model/attention.py `varlen_usable`: dtype,
    head size, segments back to back)."""
    if torch.device(device).type != "cuda":
        return NEEDS_GPU
    if varlen_kernel() is None:
        return NO_KERNEL
    return None


TE_ATTENTION = "Transformer Engine attention attends packed rows itself (use model.attention=sdpa)"
LOCAL_ATTENTION = "megatron's local attention (model.attention=local) is not SDPA core attention"


def varlen_problem(te: bool, attention: str, device: torch.device | str) -> str | None:
    """Why model.packed_attention=varlen cannot run with `attention` (model.attention; `te`: it resolves to
    Transformer Engine's) on `device`, or None when it can. The model build (model/megatron.py
    packed_varlen_on) and `questa-nemo doctor` both ask this."""
    if te:
        return TE_ATTENTION
    if attention == "local":
        return LOCAL_ATTENTION
    return varlen_available(device)
