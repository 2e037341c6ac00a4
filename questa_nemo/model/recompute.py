"""Full activation recompute that keeps each layer's attention output: `recompute_keep_attention`.

megatron's full recompute (`recompute_granularity="full"`) stores only each layer's input and reruns the
whole layer in backward, core attention included. At long contexts attention dominates the layer (at 32K
tokens on the 1.5B shape its forward is about a fifth of the step), so rerunning it is the most expensive
part of recompute, while its output is small: one [s, heads * head_dim] tensor and the softmax statistics
([heads, s] fp32), about 100 MB a layer at 32K for the 1.5B shape, against the GBs of activations full
recompute saves.

`keep_attention_recompute(layers)` wraps each layer's forward in torch's non-reentrant checkpoint with a
selective policy: the fused SDPA op's outputs (output, log-sum-exp, RNG state) are saved in the forward and
handed back during recompute; every other op is recomputed as in megatron's full recompute. Attention's
backward then runs from the recomputed query / key / value and the saved output, exactly what it would
have used without recompute, so gradients are unchanged (the tests compare them). torch's non-reentrant
checkpoint also stops recomputing once backward has every tensor it saved, so the MLP's down projection,
whose output backward does not need, is not rerun either (megatron's reentrant recompute reruns it).

Only torch's SDPA attention (model/attention.py) is kept: Transformer Engine's attention is not an aten op,
so with TE the policy would save nothing; `build_model` refuses that combination.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from questa_nemo.model import fused

_aten = torch.ops.aten
# The fused SDPA ops torch dispatches to (CUDA: cuDNN / flash / memory-efficient; CPU: flash for CPU).
KEPT_OPS = frozenset(
    {
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def keep_attention_contexts():
    """`context_fn` for torch.utils.checkpoint: save the fused SDPA ops' outputs, recompute the rest."""
    return create_selective_checkpoint_contexts(_policy)


def keep_attention_recompute(layers) -> None:
    """Recompute each layer in backward except its fused attention op (see the module docstring). Call on
    layers built without megatron's own recompute; idempotent."""
    for layer in layers:
        if getattr(layer, "_keeps_attention", False):
            continue
        layer.forward = functools.partial(_checkpointed_forward, layer.forward)
        layer._keeps_attention = True


def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # no backward will come: nothing to save or recompute
        return forward(*args, **kwargs)

    def run(*args, **kwargs):
        # The recompute must issue the ops the forward issued: RoPE's cos / sin tables are cached across
        # layers (model/fused.py), so each run starts without them and computes its own.
        fused.forget_rope_tables()
        return forward(*args, **kwargs)

    return checkpoint(run, *args, use_reentrant=False, context_fn=keep_attention_contexts, **kwargs)
