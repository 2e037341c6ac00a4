"""Triton split-K decode attention over the paged KV cache of rollout/paged.py (imported on CUDA only, or on
CPU under TRITON_INTERPRET=1 in tests: CI's CPU image has no Triton).

Grid (sequence, query group, split). A program loads its group's query heads once (padded to 16 rows for
`tl.dot`), walks its share of the sequence's own blocks (a sequence of length L has ceil(L / block_size)
blocks, split evenly over the S programs of that sequence) through the block table, and keeps an online
softmax in float32 (scores = q k^T accumulated in float32, as SDPA's fused kernels do; the probabilities are
rounded to the value dtype for the p @ v product, as flash attention does). It writes its normalised partial
output and log-sum-exp; `_merge_tile_kernel` combines the S partials (a program per live head row reading all
its partials as one tile; with merge_tile=False, `_merge_kernel`: a program per query group walking them).
Nothing depends on the host: lengths come from the step's positions tensor (length = position + 1), so the
launch is captured in the decode step's CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from questa_nemo.model.triton_kernels import pdl_enter, pdl_launch
from questa_nemo.rollout.paged import num_splits

HEAD_ROWS = 16  # query heads of a group, padded: tl.dot needs at least 16 rows
# _merge_tile_kernel: float32 partial values one program holds at once (chunk of the split axis x head dim):
# 128 splits of a 128-wide head; more splits go in chunks, rescaled online. At most 64 values a thread (4 warps
# up to 8192, 8 above): sm_90 ptxas, JIT-aligned pointers: 80 registers at 64 x 128 / 4 warps and at
# 128 x 128 / 8 warps, no spills (184 registers at 128 x 128 / 4 warps; 256 x 128 / 4 spills)
MERGE_TILE_ELEMENTS = 16384


@triton.jit
def _softmax_step(scores, v, m, l_sum, acc):
    """One key/value block of an online softmax: scores [rows, BS] float32 (masked positions -inf), v [BS, D];
    the running max m, sum l_sum [rows] and output acc [rows, D] -> their updated values. The probabilities are
    rounded to v's dtype for p @ v, as flash attention does."""
    m_new = tl.maximum(m, tl.max(scores, 1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_sum, acc


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, part_ptr, lse_ptr, out_ptr, skip_ptr,
    groups, per_group, num_splits, part_splits, split_blocks, scale,
    stride_qb, stride_qg, stride_qh,
    stride_kn, stride_kg, stride_ks,
    stride_tb, stride_ob, stride_og, stride_oh,
    BS: tl.constexpr, D: tl.constexpr, H: tl.constexpr, FIXED: tl.constexpr, DIRECT: tl.constexpr,
    CASCADE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(PDL)
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.load(pos_ptr + b).to(tl.int32) + 1
    num_blocks = tl.cdiv(length, BS)
    if FIXED:  # fixed-length splits: a sequence has cdiv(num_blocks, split_blocks) of them
        per_split = split_blocks
    else:  # the batch's S splits evenly over each sequence's blocks
        per_split = tl.cdiv(num_blocks, num_splits)
    if CASCADE:  # the sequence's first skip[b] blocks are shared: _prefix_kernel reads them for its group
        first = tl.load(skip_ptr + b) + s * per_split
    else:
        first = s * per_split
    if FIXED and first >= num_blocks:
        return  # past this sequence's last split: nothing to write (the merge reads only its splits)
    last = tl.minimum(first + per_split, num_blocks)

    h = tl.arange(0, H)
    d = tl.arange(0, D)
    n = tl.arange(0, BS)
    head_mask = h < per_group
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + g * stride_qg + h[:, None] * stride_qh + d[None, :],
        mask=head_mask[:, None],
        other=0.0,
    )
    m = tl.full([H], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([H], dtype=tl.float32)
    acc = tl.zeros([H, D], dtype=tl.float32)
    tile = g * stride_kg + n[:, None] * stride_ks + d[None, :]
    for j in range(first, last):
        block = tl.load(table_ptr + b.to(tl.int64) * stride_tb + j).to(tl.int64)
        k = tl.load(k_ptr + block * stride_kn + tile)  # [BS, D]
        scores = tl.dot(q, tl.trans(k)) * scale  # [H, BS] float32
        scores = tl.where((j * BS + n)[None, :] < length, scores, float("-inf"))
        v = tl.load(v_ptr + block * stride_kn + tile)  # [BS, D]
        m, l_sum, acc = _softmax_step(scores, v, m, l_sum, acc)
    nonempty = l_sum > 0
    out = acc / tl.where(nonempty, l_sum, 1.0)[:, None]
    if DIRECT:  # one split a sequence: its normalised output is the answer (what the merge of one split gives)
        dst = out_ptr + b.to(tl.int64) * stride_ob + g * stride_og + h[:, None] * stride_oh + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])
        return
    lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l_sum, 1.0)), float("-inf"))
    row = (b.to(tl.int64) * groups + g) * part_splits + s  # part [B, G, S', H, D], lse [B, G, S', H]
    if FIXED:  # the padded head rows are never read (the merge masks them): do not write them
        rows = head_mask
    else:
        rows = h < H
    tl.store(part_ptr + row * H * D + h[:, None] * D + d[None, :], out, mask=rows[:, None])
    tl.store(lse_ptr + row * H + h, lse, mask=rows)


@triton.jit
def _written(pos_ptr, skip_ptr, count_ptr, b, num_splits, split_blocks,
             BS: tl.constexpr, FIXED: tl.constexpr, CASCADE: tl.constexpr):  # fmt: skip
    """Sequence b's partials the merges read: its own splits [0, used) (FIXED: only those were written) and,
    with CASCADE, `shared` prefix partials from index num_splits on."""
    if FIXED:
        length = tl.load(pos_ptr + b).to(tl.int32) + 1
        own = tl.cdiv(length, BS)
        if CASCADE:
            own = own - tl.load(skip_ptr + b)
        used = tl.minimum(tl.cdiv(own, split_blocks), num_splits)
    else:
        used = num_splits
    if CASCADE:
        shared = tl.load(count_ptr + b)
    else:
        shared = 0
    return used, shared


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr, pos_ptr, skip_ptr, count_ptr,
    groups, per_group, num_splits, part_splits, split_blocks,
    stride_ob, stride_og, stride_oh,
    BS: tl.constexpr, D: tl.constexpr, H: tl.constexpr, FIXED: tl.constexpr, CASCADE: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Combine a sequence's split partials [splits 0..used) and, with CASCADE, its group's prefix partials
    [num_splits .. num_splits + count[b]) by their log-sum-exp."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    g = tl.program_id(1)
    h = tl.arange(0, H)
    d = tl.arange(0, D)
    base = (b.to(tl.int64) * groups + g) * part_splits
    used, shared = _written(pos_ptr, skip_ptr, count_ptr, b, num_splits, split_blocks, BS, FIXED, CASCADE)
    if FIXED:  # padded head rows: not written, not read (0 stands in: finite, stored nowhere)
        live = h < per_group
    else:
        live = h < H
    lse_at = lse_ptr + base * H + h
    part_at = part_ptr + base * H * D + h[:, None] * D + d[None, :]
    m = tl.full([H], float("-inf"), dtype=tl.float32)
    for s in range(0, used):
        m = tl.maximum(m, tl.load(lse_at + s * H, mask=live, other=0.0))
    for s in range(0, shared):
        m = tl.maximum(m, tl.load(lse_at + (num_splits + s) * H, mask=live, other=0.0))
    total = tl.zeros([H], dtype=tl.float32)
    acc = tl.zeros([H, D], dtype=tl.float32)
    for s in range(0, used):
        weight = tl.exp(tl.load(lse_at + s * H, mask=live, other=0.0) - m)  # split 0 is never empty: m finite
        total += weight
        acc += weight[:, None] * tl.load(part_at + s * H * D, mask=live[:, None], other=0.0)
    for s in range(0, shared):
        weight = tl.exp(tl.load(lse_at + (num_splits + s) * H, mask=live, other=0.0) - m)
        total += weight
        acc += weight[:, None] * tl.load(part_at + (num_splits + s) * H * D, mask=live[:, None], other=0.0)
    out = acc / total[:, None]
    dst = out_ptr + b.to(tl.int64) * stride_ob + g * stride_og + h[:, None] * stride_oh + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=(h < per_group)[:, None])


@triton.jit
def _merge_tile_kernel(
    part_ptr, lse_ptr, out_ptr, pos_ptr, skip_ptr, count_ptr,
    groups, per_group, num_splits, part_splits, split_blocks,
    stride_ob, stride_og, stride_oh,
    BS: tl.constexpr, D: tl.constexpr, H: tl.constexpr, FIXED: tl.constexpr, CASCADE: tl.constexpr,
    C: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """`_merge_kernel`'s result, one program a (sequence, query group, live head row): the head's partials are
    read C at a time as one [C] vector of log-sum-exps and one [C, D] tile (C >= part_splits: all in one go,
    no serial walk over the splits). Valid indices: [0, used) and, with CASCADE, [num_splits, num_splits +
    count[b]); the rest are masked (never read). Over several chunks the max and sums are rescaled online."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    g = tl.program_id(1)
    h = tl.program_id(2)  # < per_group: the grid has no padded rows
    base = (b.to(tl.int64) * groups + g) * part_splits
    used, shared = _written(pos_ptr, skip_ptr, count_ptr, b, num_splits, split_blocks, BS, FIXED, CASCADE)
    if CASCADE:
        end = tl.where(shared > 0, num_splits + shared, used)  # past the last valid index
    else:
        end = used
    s = tl.arange(0, C)
    d = tl.arange(0, D)
    lse_at = lse_ptr + base * H + h
    part_at = part_ptr + base * H * D + h * D + d[None, :]
    m = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([D], dtype=tl.float32)
    for c in range(0, tl.cdiv(end, C)):  # one chunk when C >= part_splits
        idx = c * C + s
        valid = (idx < used) | ((idx >= num_splits) & (idx < num_splits + shared))
        x = tl.load(lse_at + idx * H, mask=valid, other=float("-inf"))  # [C]
        m_new = tl.maximum(m, tl.max(x, 0))  # finite from the first chunk on: split 0 is never empty
        alpha = tl.exp(m - m_new)  # 0 on the first chunk (m = -inf)
        weight = tl.where(valid, tl.exp(x - m_new), 0.0)  # [C]
        tile = tl.load(part_at + (idx * H * D)[:, None], mask=valid[:, None], other=0.0)  # [C, D]
        total = total * alpha + tl.sum(weight, 0)
        acc = acc * alpha + tl.sum(weight[:, None] * tile, 0)
        m = m_new
    out = acc / total
    dst = out_ptr + b.to(tl.int64) * stride_ob + g * stride_og + h * stride_oh + d
    tl.store(dst, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefix_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, members_ptr, items_ptr, part_ptr, lse_ptr,
    groups, per_group, num_splits, part_splits, scale,
    stride_qb, stride_qg, stride_qh,
    stride_kn, stride_kg, stride_ks,
    stride_tb, stride_mg,
    BS: tl.constexpr, D: tl.constexpr, H: tl.constexpr, M: tl.constexpr, R: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Cascade: one work item (a prompt group, blocks [first, last) of its shared prefix, its partial index)
    and one query group. The query heads of every member (up to M sequences sharing the prefix) are the rows of
    one tile, so each shared key/value block is read once for the whole group instead of once per member.
    Writes each member's partial output and log-sum-exp at split num_splits + index of its part rows."""
    pdl_enter(PDL)
    item = tl.program_id(0)
    g = tl.program_id(1)
    grp = tl.load(items_ptr + item * 4)
    if grp < 0:
        return
    first = tl.load(items_ptr + item * 4 + 1)
    last = tl.load(items_ptr + item * 4 + 2)
    index = tl.load(items_ptr + item * 4 + 3)
    r = tl.arange(0, R)
    member = r // per_group
    head = r % per_group
    inside = member < M
    slot = tl.load(members_ptr + grp.to(tl.int64) * stride_mg + member, mask=inside, other=-1)
    valid = inside & (slot >= 0)
    seq = tl.where(valid, slot, 0).to(tl.int64)
    d = tl.arange(0, D)
    n = tl.arange(0, BS)
    q = tl.load(
        q_ptr + seq[:, None] * stride_qb + g * stride_qg + head[:, None] * stride_qh + d[None, :],
        mask=valid[:, None],
        other=0.0,
    )
    leader = tl.load(members_ptr + grp.to(tl.int64) * stride_mg).to(tl.int64)
    m = tl.full([R], float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros([R], dtype=tl.float32)
    acc = tl.zeros([R, D], dtype=tl.float32)
    tile = g * stride_kg + n[:, None] * stride_ks + d[None, :]
    for j in range(first, last):  # full prompt blocks: every position is visible to every member
        block = tl.load(table_ptr + leader * stride_tb + j).to(tl.int64)
        k = tl.load(k_ptr + block * stride_kn + tile)  # [BS, D]
        scores = tl.dot(q, tl.trans(k)) * scale  # [R, BS] float32
        v = tl.load(v_ptr + block * stride_kn + tile)  # [BS, D]
        m, l_sum, acc = _softmax_step(scores, v, m, l_sum, acc)
    out = acc / l_sum[:, None]
    lse = m + tl.log(l_sum)
    row = (seq * groups + g) * part_splits + num_splits + index
    tl.store(part_ptr + row[:, None] * H * D + head[:, None] * D + d[None, :], out, mask=valid[:, None])
    tl.store(lse_ptr + row * H + head, lse, mask=valid)


class Cascade(NamedTuple):
    """Prompt groups for cascade attention (paged.PagedKVCache builds them from its block tables): sequences
    whose leading blocks are the same blocks (a prompt's samples) read those blocks once per group.

    members [NG, M] int32: each group's member slots (-1 pads; members[g, 0] is the one whose table names the
    blocks); items [NI, 4] int32: work items (group row or -1, first block, last block, partial index);
    skip [>= B] int32: shared leading blocks of each sequence (0: none); count [>= B] int32: its group's
    partials; max_items: partial slots a sequence reserves (>= every count)."""

    members: torch.Tensor
    items: torch.Tensor
    skip: torch.Tensor
    count: torch.Tensor
    max_items: int


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
    num_sms: int,
    splits: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    split_len: int | None = None,
    cascade: Cascade | None = None,
    merge_tile: bool = True,
    pdl: bool = False,
) -> torch.Tensor:
    """q [B, G, P, D] (D contiguous); pools [N, G, bs, D] (one layer, bs x D contiguous); table [>= B, MB]
    int32; positions [B] (sequence b reads its positions 0..positions[b]) -> attention output [B, G, P, D].
    splits / num_warps / num_stages: launch settings (None: about 4 programs per SM / Triton's default).
    split_len: fixed-length splits of that many positions (a multiple of bs; `splits` is then ignored): the
    grid covers the table's width, programs past a sequence's length exit at once, and a grid of one split
    writes the output directly (no merge).
    cascade (with split_len): the shared leading blocks of each prompt group are read once for the whole group
    (`_prefix_kernel`), each sequence's split programs start after them, the merge takes both.
    merge_tile: merge with `_merge_tile_kernel` (a program per live head row, its partials read as one tile;
    the default) or, False, with `_merge_kernel` (a program per query group walking the splits: 6x slower at
    8 sequences of 8K on an H100); same maths, sums in another order.
    pdl: every kernel as a programmatic dependent launch (model/triton_kernels.pdl_enter)."""
    b, g, per_group, d = q.shape
    bs = k_pool.size(2)
    if per_group > HEAD_ROWS or d & (d - 1) or bs & (bs - 1) or bs < 16:
        raise ValueError(f"paged decode kernel: {per_group} heads a group, head dim {d}, block size {bs}")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or k_pool.stride() != v_pool.stride():
        raise ValueError("paged decode kernel: q and the pools need a contiguous head dim, pools alike")
    split_blocks = 0
    if split_len:
        if split_len % bs:
            raise ValueError(f"paged decode kernel: split length {split_len} is not a multiple of block size {bs}")
        split_blocks = split_len // bs
        s = -(-table.size(1) // split_blocks)
    else:
        s = splits or num_splits(b, g, num_sms)
    if cascade is not None and not split_blocks:
        raise ValueError("paged decode kernel: cascade attention needs fixed-length splits (split_len)")
    direct = bool(split_blocks) and s == 1 and cascade is None
    part_splits = s + (cascade.max_items if cascade is not None else 0)
    part = torch.empty(0 if direct else b * g * part_splits * HEAD_ROWS * d, dtype=torch.float32, device=q.device)
    lse = torch.empty(0 if direct else b * g * part_splits * HEAD_ROWS, dtype=torch.float32, device=q.device)
    out = q.new_empty(q.shape)  # contiguous
    stages = {} if num_stages is None else {"num_stages": num_stages}
    skip = cascade.skip if cascade is not None else positions  # unread without CASCADE
    if cascade is not None:
        members = cascade.members
        _prefix_kernel[(cascade.items.size(0), g)](
            q, k_pool, v_pool, table, members, cascade.items, part, lse,
            g, per_group, s, part_splits, d**-0.5,
            q.stride(0), q.stride(1), q.stride(2),
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
            table.stride(0), members.stride(0),
            BS=bs, D=d, H=HEAD_ROWS, M=members.size(1),
            R=max(16, triton.next_power_of_2(members.size(1) * per_group)), PDL=pdl, num_warps=8,
            **pdl_launch(pdl),
        )  # fmt: skip
    _split_kernel[(b, g, s)](
        q, k_pool, v_pool, table, positions, part, lse, out, skip,
        g, per_group, s, part_splits, split_blocks, d**-0.5,
        q.stride(0), q.stride(1), q.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        table.stride(0), out.stride(0), out.stride(1), out.stride(2),
        BS=bs, D=d, H=HEAD_ROWS, FIXED=bool(split_blocks), DIRECT=direct, CASCADE=cascade is not None,
        PDL=pdl, num_warps=num_warps, **stages, **pdl_launch(pdl),
    )  # fmt: skip
    if direct:
        return out
    count = cascade.count if cascade is not None else positions
    if merge_tile:  # every partial index in one tile of up to MERGE_TILE_ELEMENTS values (else chunks of it)
        cap = max(1, MERGE_TILE_ELEMENTS // d)
        chunk = min(triton.next_power_of_2(part_splits), 1 << cap.bit_length() - 1)  # a power of two (tl.arange)
        _merge_tile_kernel[(b, g, per_group)](
            part, lse, out, positions, skip, count, g, per_group, s, part_splits, split_blocks,
            out.stride(0), out.stride(1), out.stride(2),
            BS=bs, D=d, H=HEAD_ROWS, FIXED=bool(split_blocks), CASCADE=cascade is not None, C=chunk, PDL=pdl,
            num_warps=8 if chunk * d > 8192 else 4, **pdl_launch(pdl),
        )  # fmt: skip
    else:
        _merge_kernel[(b, g)](
            part, lse, out, positions, skip, count, g, per_group, s, part_splits, split_blocks,
            out.stride(0), out.stride(1), out.stride(2),
            BS=bs, D=d, H=HEAD_ROWS, FIXED=bool(split_blocks), CASCADE=cascade is not None, PDL=pdl, num_warps=4,
            **pdl_launch(pdl),
        )  # fmt: skip
    return out


@triton.jit
def _rope_append_kernel(
    qkv_ptr, cos_ptr, sin_ptr, blocks_ptr, offsets_ptr, q_ptr, k_ptr, v_ptr,
    per_group, stride_xb, stride_cb, stride_qb, stride_qg, stride_qh, stride_kn, stride_kg, stride_ks,
    HALF: tl.constexpr, R: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One (sequence, query group): rotate the group's query heads and key (rotate-half RoPE), write the
    queries to q [B, G, P, D] and the key and value into the pool at the sequence's new position. Every product
    and sum is rounded to the model dtype as the torch ops of decoder.rope round them (same bits)."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    g = tl.program_id(1)
    r = tl.arange(0, R)  # the group's rows: per_group query heads, then its key, then its value
    d = tl.arange(0, HALF)
    src = qkv_ptr + b.to(tl.int64) * stride_xb + (g * (per_group + 2) + r[:, None]) * (2 * HALF) + d[None, :]
    rows = (r < per_group + 2)[:, None]
    x1 = tl.load(src, mask=rows, other=0.0)  # [R, HALF]
    x2 = tl.load(src + HALF, mask=rows, other=0.0)
    dt = x1.dtype
    c = tl.load(cos_ptr + b.to(tl.int64) * stride_cb + d)[None, :].to(tl.float32)
    s = tl.load(sin_ptr + b.to(tl.int64) * stride_cb + d)[None, :].to(tl.float32)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    lo = ((a1 * c).to(dt).to(tl.float32) - (a2 * s).to(dt).to(tl.float32)).to(dt)  # x1 cos - x2 sin
    hi = ((a2 * c).to(dt).to(tl.float32) + (a1 * s).to(dt).to(tl.float32)).to(dt)  # x2 cos + x1 sin
    is_q = (r < per_group)[:, None]
    dst = q_ptr + b.to(tl.int64) * stride_qb + g * stride_qg + r[:, None] * stride_qh + d[None, :]
    tl.store(dst, lo, mask=is_q)
    tl.store(dst + HALF, hi, mask=is_q)
    block = tl.load(blocks_ptr + b).to(tl.int64)
    offset = tl.load(offsets_ptr + b).to(tl.int64)
    at = block * stride_kn + g * stride_kg + offset * stride_ks + d[None, :] + 0 * r[:, None]  # [R, HALF]
    is_k = (r == per_group)[:, None]
    is_v = (r == per_group + 1)[:, None]
    tl.store(k_ptr + at, lo, mask=is_k)
    tl.store(k_ptr + at + HALF, hi, mask=is_k)
    tl.store(v_ptr + at, x1, mask=is_v)
    tl.store(v_ptr + at + HALF, x2, mask=is_v)


def rope_append(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    pdl: bool = False,
) -> torch.Tensor:
    """qkv [B, G * (P + 2) * D] (megatron's fused layout: per group its P query heads, key, value; rows
    contiguous), cos / sin [B, D / 2] (decoder.rope_tables of the step's positions); pools [N, G, bs, D] of one
    layer; blocks / offsets [B]: where each sequence's new position lives. Writes the rotated key and the value
    into the pools, returns the rotated queries [B, G, P, D] (contiguous). One kernel for what decoder._qkv's
    RoPE and PagedKVCache's index_put do in about ten. pdl: see model/triton_kernels.pdl_enter."""
    b = qkv.size(0)
    groups, d = k_pool.size(1), k_pool.size(3)
    per_group = qkv.size(1) // (groups * d) - 2
    if qkv.stride(1) != 1 or cos.stride(1) != 1 or sin.stride() != cos.stride() or d % 2:
        raise ValueError("rope_append: qkv and the RoPE tables need contiguous rows, an even head dim")
    q = qkv.new_empty(b, groups, per_group, d)
    rows = triton.next_power_of_2(per_group + 2)
    _rope_append_kernel[(b, groups)](
        qkv, cos, sin, blocks, offsets, q, k_pool, v_pool,
        per_group, qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), q.stride(2),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        HALF=d // 2, R=rows, PDL=pdl, num_warps=4, enable_fp_fusion=False,  # float32: no FMA, torch's rounding
        **pdl_launch(pdl),
    )  # fmt: skip
    return q
