"""Core attention on torch's scaled_dot_product_attention, for megatron layer specs without Transformer Engine.

megatron-core's own fallback (`DotProductAttention`) materialises the [b, heads, s, s] score matrix and
rejects packed sequences; SDPA runs flash / memory-efficient kernels on GPU, never builds the matrix, and
handles GQA natively. Packed (THD) micro-batches are attended per segment from `cu_seqlens`, each segment
causal on its own (segments of similar length batched into one call), so no [T, T] block-diagonal mask is
ever built.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention with grouped key/value heads.

    query: [b, heads, s, d]; key, value: [b, groups, s, d] with groups dividing heads. Returns [b, heads, s, d].
    """
    return F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=key.size(1) != query.size(1)
    )


def packed_causal_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    starts: list[int],
    lengths: list[int],
    scale: float,
) -> torch.Tensor:
    """Causal attention within each packed segment.

    query: [t, heads, d]; key, value: [t, groups, d]; segment i is rows starts[i] : starts[i] + lengths[i].
    Rows outside every segment (padding) come back as zeros. Returns [t, heads, d].

    Segments of similar length (many short rollouts) go through one batched SDPA call, right-padded to the
    longest: under a causal mask a real row never sees the padding after it, so the result is exact. When
    padding would more than double the rows (one long sequence among short ones) each segment is attended on
    its own instead.
    """
    segments = [(start, length) for start, length in zip(starts, lengths) if length > 0]
    out = torch.zeros_like(query)
    if not segments:
        return out
    longest = max(length for _, length in segments)
    if len(segments) * longest <= 2 * sum(length for _, length in segments):
        return _batched_segments(query, key, value, segments, longest, scale, out)
    for start, length in segments:
        rows = slice(start, start + length)
        # [len, h, d] -> [1, h, len, d]
        q, k, v = (x[rows].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        out[rows] = causal_sdpa(q, k, v, scale).squeeze(0).transpose(0, 1)
    return out


def _batched_segments(query, key, value, segments, longest, scale, out):
    """The segments gathered into [S, h, longest, d] (right-padded), one causal SDPA call, scattered back."""
    offsets = torch.arange(longest, device=query.device)
    starts = torch.tensor([s for s, _ in segments], device=query.device)
    lengths = torch.tensor([n for _, n in segments], device=query.device)
    valid = offsets.unsqueeze(0) < lengths.unsqueeze(1)  # [S, longest]
    # padded slots read row 0 (any real row would do): their outputs are dropped below
    index = torch.where(valid, starts.unsqueeze(1) + offsets.unsqueeze(0), torch.zeros_like(starts).unsqueeze(1))
    # [t, h, d] -> [S, longest, h, d] -> [S, h, longest, d]
    q, k, v = (x[index].transpose(1, 2) for x in (query, key, value))
    attended = causal_sdpa(q, k, v, scale).transpose(1, 2)  # [S, longest, h, d]
    out[index[valid]] = attended[valid]
    return out


def _segments(params: PackedSeqParams) -> tuple[list[int], list[int]]:
    """Segment starts (padded layout when given) and true lengths from cu_seqlens; CPU ints."""
    cu = params.cu_seqlens_q.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    padded = params.cu_seqlens_q_padded
    starts = padded.tolist()[:-1] if padded is not None else cu[:-1]
    return starts, lengths


# Segment lengths are host ints that differ every micro-batch: eager even inside a compiled layer (model.compile)
@torch.compiler.disable
def _packed_forward(query, key, value, params: PackedSeqParams, scale: float) -> torch.Tensor:
    starts, lengths = _segments(params)
    out = packed_causal_sdpa(query, key, value, starts, lengths, scale)
    return out.reshape(out.size(0), -1)


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron's `core_attention` submodule (same constructor and forward signature)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        model_comm_pgs=None,  # pg_collection's name before megatron-core 0.15 (model/mcore_compat.py)
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention: context parallelism needs Transformer Engine attention")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout != 0.0:
            raise ValueError("SDPACoreAttention: attention dropout must be 0 (RL training runs without it)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPACoreAttention: mask type {attn_mask_type} is not supported (causal only)")
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """sbhd: query [s, b, heads, d], key/value [s, b, groups, d] -> [s, b, heads * d].

        thd (packed): query [t, heads, d], key/value [t, groups, d] -> [t, heads * d]. `attention_mask` is
        ignored: the mask is causal (per segment when packed); padding is handled by packing, not masking.
        """
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention: attention_bias is not supported")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return _packed_forward(query, key, value, packed_seq_params, self.softmax_scale)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = causal_sdpa(q, k, v, self.softmax_scale)
        s, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
