"""Core attention on torch's scaled_dot_product_attention, for megatron layer specs without Transformer Engine.

megatron-core's own fallback (`DotProductAttention`) materialises the [b, heads, s, s] score matrix and
rejects packed sequences; SDPA runs flash / memory-efficient kernels on GPU, never builds the matrix, and
handles GQA natively. Packed (THD) micro-batches are attended per segment from `cu_seqlens`, each segment
causal on its own, so no [T, T] block-diagonal mask is ever built: segments of similar length batched into
one SDPA call, or one call each; or (`VarlenCoreAttention`, chosen by `model.packed_attention`, on GPU in
bf16 / fp16) all in one call of torch's flash variable-length kernel (`torch.nn.attention.varlen`, torch >=
2.10) when the segments lie back to back. `FA4CoreAttention` (`model.attention=fa4`) attends through
FlashAttention 4's kernels instead (model/flash4.py), unpacked and packed alike.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

# megatron-free (model/varlen.py: what `questa-nemo doctor` asks too); varlen_available is re-exported
from questa_nemo.model.flash4 import fa4_attention, fa4_dense
from questa_nemo.model.varlen import varlen_available, varlen_kernel  # noqa: F401


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention with grouped key/value heads.

    query: [b, heads, s, d]; key, value: [b, groups, s, d] with groups dividing heads. Returns [b, heads, s, d].
    """
    return F.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scale, enable_gqa=key.size(1) != query.size(1)
    )


class SegmentPlan(NamedTuple):
    """How one packed micro-batch is attended, worked out once on the host and shared by every layer (and the
    recompute), so a layer's forward issues no host sync: the segments as ints, and for the batched path the
    device index tensors of the gather and the scatter back."""

    segments: tuple[tuple[int, int], ...]  # (start, length) of each non-empty segment
    longest: int
    # the batched path's tensors (None: each segment is attended on its own)
    index: torch.Tensor | None  # [S, longest] the packed row each padded slot reads (padding reads row 0)
    take: torch.Tensor | None  # [n] positions of the real slots in the flattened [S * longest]
    rows: torch.Tensor | None  # [n] the packed rows they are written to
    # the variable-length kernel's (None: the segments do not lie back to back from row 0)
    cu: torch.Tensor | None = None  # [S + 1] int32 cumulative segment lengths
    end: int = 0  # rows 0 .. end are the segments; the rest is padding (zeros out)


def segment_plan(starts: list[int], lengths: list[int], device: torch.device) -> SegmentPlan:
    """Segments of similar length (many short rollouts) go through one batched SDPA call, right-padded to the
    longest: under a causal mask a real row never sees the padding after it, so the result is exact. When
    padding would more than double the rows (one long sequence among short ones) each segment is attended on
    its own instead."""
    segments = tuple((start, length) for start, length in zip(starts, lengths) if length > 0)
    longest = max((length for _, length in segments), default=0)
    bounds = [0, *itertools.accumulate(n for _, n in segments)]
    cu, end = None, 0
    if segments and [start for start, _ in segments] == bounds[:-1]:  # back to back from row 0
        end = bounds[-1]
        cu = torch.tensor(bounds, dtype=torch.int32).to(device, non_blocking=True)
    if not segments or len(segments) * longest > 2 * sum(length for _, length in segments):
        return SegmentPlan(segments, longest, None, None, None, cu, end)
    offsets = torch.arange(longest)
    first = torch.tensor([s for s, _ in segments])
    valid = offsets.unsqueeze(0) < torch.tensor([n for _, n in segments]).unsqueeze(1)  # [S, longest]
    index = torch.where(valid, first.unsqueeze(1) + offsets.unsqueeze(0), torch.zeros_like(first).unsqueeze(1))
    take = valid.flatten().nonzero().squeeze(1)
    rows = index.flatten()[take]
    return SegmentPlan(segments, longest, *(t.to(device, non_blocking=True) for t in (index, take, rows)), cu, end)


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
    """
    return _attend(query, key, value, segment_plan(starts, lengths, query.device), scale)


# The variable-length kernel is the knob model.packed_attention (sdpa | varlen | auto; default auto: varlen
# where usable). On an H100 (bench/results/train_packed_varlen_h100.json) the rows the trainer packs from
# R1-like lengths (2-21 segments: one batched or up to 21 SDPA calls a layer and direction) ran 39,016 tok/s
# through it against 21,817 through SDPA, 8 x 1K 47,348 against 43,299; its float32 check matched SDPA's
# error (outputs 0.0084 both, gradients within 0.049); tests/test_model_build.py's GPU test passed there.
def varlen_usable(query: torch.Tensor, plan: SegmentPlan) -> bool:
    """Whether the variable-length kernel can attend `plan` with queries like `query`: segments back to
    back, CUDA, bf16 / fp16, a head size it takes, a torch that has it (whether to ask is the caller's
    choice: `varlen`)."""
    return (
        plan.cu is not None
        and query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.size(-1) % 8 == 0
        and query.size(-1) <= 256
        and varlen_kernel() is not None
    )


def _varlen_attend(query, key, value, plan: SegmentPlan, scale: float, kernel=None) -> torch.Tensor:
    """All segments in one call of the variable-length kernel (causal within each; `kernel`: tests pass a
    reference with its signature); padding rows after the last segment come back as zeros."""
    fn, native_gqa = kernel or varlen_kernel()
    heads, groups = query.size(1), key.size(1)
    extra = {}
    if heads != groups:
        if native_gqa:
            extra["enable_gqa"] = True
        else:
            key, value = (x.repeat_interleave(heads // groups, dim=1) for x in (key, value))
    end = plan.end
    out = fn(
        query[:end], key[:end], value[:end], plan.cu, plan.cu, plan.longest, plan.longest,
        scale=scale, window_size=(-1, 0), **extra,
    )  # fmt: skip
    return _zero_padded(out, query.size(0))


def _zero_padded(out: torch.Tensor, rows: int) -> torch.Tensor:
    """A variable-length kernel's output for the segments' rows, with zero rows for the padding after them."""
    if out.size(0) < rows:
        out = torch.cat([out, out.new_zeros(rows - out.size(0), *out.shape[1:])])
    return out


def attention_path(query: torch.Tensor, plan: SegmentPlan, varlen: bool = False) -> str:
    """The path `_attend` takes for `plan` with queries like `query` (a [0, heads, d] tensor of the model's
    device and dtype will do) and `varlen` (the variable-length kernel asked for, as `VarlenCoreAttention`
    does): "varlen", "batched" (one padded SDPA call) or "per_segment"."""
    if varlen and varlen_usable(query, plan):
        return "varlen"
    return "batched" if plan.index is not None else "per_segment"


def _attend(query, key, value, plan: SegmentPlan, scale: float, varlen: bool = False) -> torch.Tensor:
    """packed_causal_sdpa with the plan worked out (no host work or sync here); `varlen`: through the
    variable-length kernel where usable."""
    path = attention_path(query, plan, varlen)
    if path == "varlen":
        return _varlen_attend(query, key, value, plan, scale)
    out = torch.zeros_like(query)
    if path == "per_segment":
        for start, length in plan.segments:
            rows = slice(start, start + length)
            # [len, h, d] -> [1, h, len, d]
            q, k, v = (x[rows].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            out[rows] = causal_sdpa(q, k, v, scale).squeeze(0).transpose(0, 1)
        return out
    # [t, h, d] -> [S, longest, h, d] -> [S, h, longest, d]; one causal SDPA call; the real slots scattered back
    q, k, v = (x[plan.index].transpose(1, 2) for x in (query, key, value))
    attended = causal_sdpa(q, k, v, scale).transpose(1, 2)  # [S, longest, h, d]
    return out.index_copy(0, plan.rows, attended.flatten(0, 1).index_select(0, plan.take))


# The plans of the last micro-batches, by the identity of their cu_seqlens_q tensor: every layer of a forward
# (and of its recompute) gets the same PackedSeqParams, whose tensors the policy builds once per micro-batch
# (model/policy.py registers the plan from its host copy, so no layer ever syncs). Enough are kept for a
# pipeline schedule's micro-batches in flight, whose recompute comes after later forwards (a few hundred KB each).
_plans: list[tuple[torch.Tensor, SegmentPlan]] = []
PLANS_KEPT = 32
plans_kept = PLANS_KEPT  # bench_train's segplan=0 sets 0 (every layer reads the segments back, as before)


def register_segment_plan(params: PackedSeqParams, starts: list[int], lengths: list[int]) -> SegmentPlan:
    """Record (and return) the plan of `params` from host ints (the packer's own copy of cu_seqlens)."""
    plan = segment_plan(starts, lengths, params.cu_seqlens_q.device)
    _plans.insert(0, (params.cu_seqlens_q, plan))
    del _plans[plans_kept:]
    return plan


def _plan_for(params: PackedSeqParams) -> SegmentPlan:
    for cu, plan in _plans:
        if cu is params.cu_seqlens_q:
            return plan
    return register_segment_plan(params, *_segments(params))  # not registered: one host read, then kept


def _segments(params: PackedSeqParams) -> tuple[list[int], list[int]]:
    """Segment starts (padded layout when given) and true lengths from cu_seqlens; CPU ints."""
    cu = params.cu_seqlens_q.tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    padded = params.cu_seqlens_q_padded
    starts = padded.tolist()[:-1] if padded is not None else cu[:-1]
    return starts, lengths


# Segment lengths are host ints that differ every micro-batch: eager even inside a compiled layer (model.compile)
@torch.compiler.disable
def _packed_forward(
    query, key, value, params: PackedSeqParams, scale: float, varlen: bool = False
) -> torch.Tensor:
    out = _attend(query, key, value, _plan_for(params), scale, varlen)
    return out.reshape(out.size(0), -1)


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron's `core_attention` submodule (same constructor and forward signature)."""

    varlen: bool = False  # packed rows through torch's variable-length kernel where usable (subclass below)

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
            raise ValueError(f"{type(self).__name__}: attention_bias is not supported")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params)
        s, b = query.shape[:2]
        return self._dense(query, key, value).reshape(s, b, -1)

    def _packed(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        return _packed_forward(query, key, value, params, self.softmax_scale, self.varlen)

    def _dense(self, query, key, value) -> torch.Tensor:
        """[s, b, heads, d] (key / value: groups) -> [s, b, heads, d]."""
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # -> [b, h, s, d]
        return causal_sdpa(q, k, v, self.softmax_scale).permute(2, 0, 1, 3)


class VarlenCoreAttention(SDPACoreAttention):
    """Packed rows through torch's variable-length kernel where usable (`varlen_usable`: GPU, bf16 / fp16,
    segments back to back), else as SDPACoreAttention; unpacked batches as SDPACoreAttention
    (model.packed_attention=varlen, or auto where `varlen_available`)."""

    varlen = True


@torch.compiler.disable  # the segment plan reads cu_seqlens on the host
def fa4_packed(query, key, value, params: PackedSeqParams, scale: float, varlen: bool):
    """Packed rows [t, heads, d] -> [t, heads * d]: every segment in one call of FA4's variable-length kernel
    when they lie back to back from row 0 (padding after them comes back as zeros), else as SDPA does."""
    plan = _plan_for(params)
    if plan.cu is None:
        out = _attend(query, key, value, plan, scale, varlen)
    else:
        end = plan.end
        out = fa4_attention(query[:end], key[:end], value[:end], plan.cu, plan.longest, scale)[0]
        out = _zero_padded(out, query.size(0))
    return out.reshape(out.size(0), -1)


class FA4CoreAttention(SDPACoreAttention):
    """Causal attention through FlashAttention 4 (model.attention=fa4; GPU, see model/flash4.py): unpacked
    batches in one call, packed rows in one variable-length call (segments not back to back: as
    VarlenCoreAttention). The model build refuses it where `fa4_problem` says it cannot run."""

    varlen = True  # only for packed rows FA4's varlen call cannot take: torch's kernel where usable

    def _packed(self, query, key, value, params: PackedSeqParams) -> torch.Tensor:
        return fa4_packed(query, key, value, params, self.softmax_scale, self.varlen)

    def _dense(self, query, key, value) -> torch.Tensor:
        return fa4_dense(query, key, value, self.softmax_scale)
