"""Full activation recompute by torch's checkpoint per layer, optionally keeping the attention output.

`model.recompute_impl: torch` (with `recompute: full`) checkpoints each decoder layer with torch's non-reentrant
checkpoint instead of megatron's reentrant one: the same memory (each layer's input), and recompute stops as
soon as backward has every tensor it saved, so the MLP's down projection, whose output backward does not
need, is not rerun (megatron reruns the whole layer).

`model.recompute_keep_attention` also keeps each layer's attention output. At long contexts attention
dominates the layer (at 32K tokens on the 1.5B shape its forward is about a fifth of a full-recompute step),
so rerunning it is the most expensive part of recompute, while its output is small: one [s, heads x head_dim]
tensor and the softmax statistics ([heads, s] fp32), about 100 MB a layer at 32K for the 1.5B shape, against
the GBs of activations full recompute saves. A selective policy saves the fused SDPA op's outputs (output,
log-sum-exp, RNG state) in the forward and hands them back during recompute; every other op is recomputed.
Attention's backward then runs from the recomputed query / key / value and the saved output, exactly what it
would have used without recompute, so gradients are unchanged (the tests compare them).

`model.recompute_keep_swiglu` also keeps each layer's SwiGLU output (our op, `fused.swiglu`; the input of the
MLP's down projection, which its weight gradient needs). Recompute then stops after the MLP's up projection,
whose output the SwiGLU backward needs: the SwiGLU forward is not rerun. At 32K tokens on the 1.5B shape it
took 16.4 of a 1,205 ms step on an H100 (0.59 ms a layer, rerun for all 28), for 587 MB a layer kept
(16 GB in all; that step peaked at 34.6 GiB, transformers' at 68.7).

Only these attention ops are kept (model/attention.py): SDPA's, for packed rows torch's variable-length custom op
`torch_attn::_varlen_attn`, and with model.attention=fa4 our FlashAttention 4 op `questa::fa4_attention`
(model/flash4.py). Transformer Engine's attention is not one of them, so with TE the policy would save
nothing; `build_model` refuses that combination.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from questa_nemo.model import flash4, fused  # noqa: F401  (flash4: registers questa::fa4_attention, kept below)
from questa_nemo.model.varlen import varlen_kernel

_aten = torch.ops.aten
# The fused SDPA ops torch dispatches to (CUDA: cuDNN / flash / memory-efficient; CPU: flash for CPU), and
# FlashAttention 4's forward as our custom op (model/flash4.py).
KEPT_OPS = frozenset(
    {
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        torch.ops.questa.fa4_attention.default,  # registered by importing flash4
    }
)


@functools.cache
def kept_ops() -> frozenset:
    """KEPT_OPS and, where this torch has it, the variable-length attention's custom op (the packed path's
    kernel with model.packed_attention=varlen; registered when torch.nn.attention.varlen is imported)."""
    if varlen_kernel() is None:  # imports torch.nn.attention.varlen where this torch has it
        return KEPT_OPS
    return KEPT_OPS | {torch.ops.torch_attn._varlen_attn.default}


def _policy(kept: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE


def keep_contexts(kept: frozenset):
    """`context_fn` for torch.utils.checkpoint: save the outputs of the ops in `kept`, recompute the rest."""
    return create_selective_checkpoint_contexts(functools.partial(_policy, kept))


def keep_attention_contexts():
    """`context_fn` for torch.utils.checkpoint: save the fused attention ops' outputs, recompute the rest."""
    return keep_contexts(kept_ops())


def checkpoint_layers(layers, keep_attention: bool = False, keep_swiglu: bool = False) -> None:
    """Full recompute of each layer in backward by torch's non-reentrant checkpoint; with `keep_attention`,
    except its fused attention op, with `keep_swiglu` except our SwiGLU op (see the module docstring). Call on
    layers built without megatron's own recompute; idempotent."""
    kept = (kept_ops() if keep_attention else frozenset()) | (
        frozenset({torch.ops.questa.swiglu.default}) if keep_swiglu else frozenset()
    )
    context_fn = functools.partial(keep_contexts, kept) if kept else noop_context_fn
    if keep_swiglu:  # the policy sees the SwiGLU only as the custom op
        for layer in layers:
            for module in layer.modules():
                if isinstance(module, fused.SwiGLU):
                    module.as_op = True
    for layer in layers:
        if getattr(layer, "_checkpointed", False):
            continue
        layer.forward = functools.partial(_checkpointed_forward, layer.forward, context_fn)
        layer._checkpointed = True


# Drop what an early-stopped recompute leaves on the layer (see `run` below); a switch for
# bench/ckpt_leftovers.py, which measures what it holds with and without.
DROP_STOPPED_STASH = True


def _drop_stash(layer) -> None:
    """megatron-core's TransformerLayer (0.19) keeps `mlp_norm_manager`, an activation-offloading handle holding
    the post-attention hidden states, from its pre-MLP norm until the end of its MLP, where it sets it back to
    None. Torch's checkpoint stops a recompute early, before the MLP's down projection (its output is not
    needed), so the recompute's handle stays on the layer, and through the hidden states' autograd graph
    every tensor the recomputed attention saved, until the next forward replaces it: on an H100 at 32K tokens
    0.64 GiB a layer, 17.98 GiB over 28 layers and +10.6 GiB of peak memory (docs/benchmarks.md (σ),
    bench/ckpt_leftovers.py). Handles that offload (megatron's fine-grained activation offloading, which
    this trainer does not turn on) are left alone."""
    manager = getattr(layer, "mlp_norm_manager", None)
    if manager is not None and not getattr(manager, "offload", False):
        layer.mlp_norm_manager = None


def _checkpointed_forward(forward, context_fn, *args, **kwargs):
    if not torch.is_grad_enabled():  # no backward will come: nothing to save or recompute
        return forward(*args, **kwargs)

    def run(*args, **kwargs):
        # The recompute must issue the ops the forward issued: RoPE's cos / sin tables are cached across
        # layers (model/fused.py), so each run starts without them and computes its own.
        fused.forget_rope_tables()
        try:
            return forward(*args, **kwargs)
        finally:  # the forward ended, or torch stopped the recompute early by raising through it
            if DROP_STOPPED_STASH:
                _drop_stash(getattr(forward, "__self__", None))

    return checkpoint(run, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
