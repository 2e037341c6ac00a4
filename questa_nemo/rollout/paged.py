"""A KV cache allocated in blocks (paged), and decode attention where each sequence reads only its own keys.

Layout. One pool of `num_blocks` blocks of `block_size` positions per layer: k, v [layers, blocks, groups,
block_size, head_dim], so one (block, query group) tile is contiguous. Slot s's position p lives in block
`table[s, p // block_size]` at offset p % block_size. The block table [slots, max_blocks] (int32, on the
device) and the step's positions are the only inputs the attention needs besides the pool, so the decode step
keeps static shapes and stays CUDA-graph capturable.

Host-side bookkeeping (`BlockAllocator`): a free list and a reference count per block. A slot owns blocks up
to its written length; `share_prefix` lets the samples of one prompt share the prompt's full blocks (counted,
never written again: decoding writes at positions past the prompt) and copies only the partial last block.
Blocks go back to the free list when a sequence ends (`release`) or is preempted. Block 0 is a trash block
that is never handed out: every unused table entry points at it, so parked slots and a stopped sequence's
garbage steps (until the next harvest) write there and never into another sequence's blocks.

Attention. On CUDA a Triton split-K (flash-decoding) kernel, grouped-query aware: a program takes one
sequence, one query group (its query heads share each key/value tile it loads) and 1/S of that sequence's own
blocks, keeps scores and the softmax in float32, and a second kernel merges the S partial results by their
log-sum-exp. The number of splits S depends on the batch only (enough programs to fill the GPU), so one graph
per batch bucket serves every length. On CPU (and in tests) the reference: gather the slot's blocks through the
table and run SDPA with the same float32 scores as the contiguous decoder (rollout/decoder.py), so greedy
tokens equal the contiguous cache's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRASH_BLOCK = 0  # never allocated: the target of every unused block-table entry


def blocks_for(length: int, block_size: int) -> int:
    """Blocks holding positions 0..length-1."""
    return -(-length // block_size)


def num_splits(batch: int, groups: int, num_sms: int, max_splits: int = 32) -> int:
    """Splits per sequence so that batch x groups x splits programs give each SM about four."""
    return max(1, min(max_splits, -(-4 * num_sms // max(batch * groups, 1))))


def split_positions(batch: int, groups: int, num_sms: int, block_size: int) -> int:
    """Positions a split reads (fixed-length splits): the power of two that gives about four programs per SM
    at a 2K context, within [2 blocks, 2048]. A sequence of length L then has ceil(L / split) programs, so the
    work of one program is bounded (no straggler at long lengths), and a sequence's arithmetic depends on the
    batch only through its bucket (not on the other sequences' lengths, nor on the exact batch size)."""
    target = batch * groups * 2048 // max(4 * num_sms, 1)
    split = 1 << max(target, 1).bit_length() - 1
    return max(2 * block_size, min(2048, split))


# EngineOptions.merge_tile merges by the tile kernel at split lengths up to this (many splits a sequence); above
# it (at most a few splits a sequence) the loop merge is as fast or faster. H100, the decode step, tile against
# loop (bench/results/merge_crossover_h100/summary.json): split 1024 (batch 256) +0.8 to +1.9% slower; split
# 512 (batch 128, 8K context) 1.2% faster; 256 (batch 64) 5.6%; 128 (batch 8 to 32, 8K) 15 to 19% faster.
TILE_MERGE_MAX_SPLIT = 512

CASCADE_MEMBERS = 16  # sequences one prefix-group tile holds (16 x 6 query heads = 96 rows of a 128-row tile)
CASCADE_ITEMS = 8  # prefix partials a sequence reserves (work items a group's shared prefix splits into)


def prompt_groups(
    owned: list[list[int]],
    refs: list[int],
    max_members: int = CASCADE_MEMBERS,
    max_items: int = CASCADE_ITEMS,
    min_item_blocks: int = 4,
) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """Cascade attention's groups from the block tables (host, pure): slots whose leading blocks are the same
    shared blocks (the samples of one prompt, paged share_prefix), at most `max_members` a group, each group's
    shared prefix cut into at most `max_items` work items of at least `min_item_blocks` blocks (each item is one
    more partial per member for the merge to read), at most one item per slot in all.

    Returns rows for one slot each: members [slots][max_members] (-1 pads), items [slots][4] (group row or -1,
    first block, last block, partial index), skip [slots] (shared leading blocks), count [slots] (partials)."""
    slots = len(owned)
    by_first: dict[int, list[int]] = {}
    for slot, row in enumerate(owned):
        if row and refs[row[0]] > 1:
            by_first.setdefault(row[0], []).append(slot)
    groups = []
    for same in by_first.values():
        for i in range(0, len(same), max_members):
            chunk = same[i : i + max_members]
            rows = [owned[s] for s in chunk]
            limit = min(len(r) for r in rows) - 1  # never a member's last block (it writes there)
            shared = 0
            while shared < limit and all(r[shared] == rows[0][shared] for r in rows):
                shared += 1
            if len(chunk) > 1 and shared:
                groups.append((chunk, shared))
    members = [[-1] * max_members for _ in range(slots)]
    items = [[-1, 0, 0, 0] for _ in range(slots)]
    skip, count = [0] * slots, [0] * slots
    per_group = max(1, min(max_items, slots // max(len(groups), 1)))
    k = 0
    for row, (chunk, shared) in enumerate(groups):
        members[row][: len(chunk)] = chunk
        step = max(min_item_blocks, -(-shared // per_group))
        n_items = -(-shared // step)
        for index in range(n_items):
            items[k] = [row, index * step, min(shared, (index + 1) * step), index]
            k += 1
        for slot in chunk:
            skip[slot], count[slot] = shared, n_items
    return members, items, skip, count


class BlockAllocator:
    """Free list and reference counts of the pool's blocks (host side; block 0 is the trash block)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"paged KV cache: {num_blocks} blocks leave none besides the trash block")
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, TRASH_BLOCK, -1))  # pop() hands out low ids first
        self.refs = [0] * num_blocks
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def used(self) -> int:
        return self.num_blocks - 1 - len(self.free)

    def take(self) -> int:
        block = self.free.pop()
        self.refs[block] = 1
        self.peak_used = max(self.peak_used, self.used)
        return block

    def share(self, block: int) -> int:
        self.refs[block] += 1
        return block

    def drop(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)


class PagedKVCache:
    """Block pool + per-slot block tables; the decode attention reads each slot's own blocks only.

    use_kernel: run the Triton kernel (CUDA; on CPU only under TRITON_INTERPRET=1) instead of the torch
    reference. Same interface as decoder.KVCache: `store` / `prefix` for prefill, `decode_context` /
    `decode_attention` for the decode step, `slots`, `max_len`.
    """

    def __init__(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        slots: int,
        max_len: int,
        use_kernel: bool = False,
        num_sms: int = 132,
    ):
        self.k, self.v = k, v  # [layers, blocks, groups, block_size, head_dim]
        self.block_size = k.size(3)
        if max_len % self.block_size:
            raise ValueError(f"paged KV cache: max_len {max_len} is not a multiple of the block size")
        self.max_len, self.slots = max_len, slots
        self.max_blocks = max_len // self.block_size
        self.allocator = BlockAllocator(k.size(1))
        self.owned: list[list[int]] = [[] for _ in range(slots)]  # host copy of each slot's table row
        self.host_table = torch.full((slots, self.max_blocks), TRASH_BLOCK, dtype=torch.int32)
        self.table = self.host_table.to(k.device)
        self._dirty = False
        self.use_kernel, self.num_sms = use_kernel, num_sms
        # with the kernel: fixed-length splits and RoPE + append fused (EngineOptions.fused_decode), and
        # cascade attention over shared prompt blocks (EngineOptions.cascade_attention; needs fused)
        self.fused = False
        self.cascade = False
        self.merge_tile = True  # the kernel's merge: one program per query head (EngineOptions.merge_tile)
        self.fused_norms = False  # with takes_qkv: the step's residual adds, norms, SwiGLU in Triton (decoder.py)
        self.skinny_gemm = False  # with fused_norms: the projections at <= 32 rows in Triton (decoder.py)
        self.pdl = False  # with fused_norms: the step's Triton kernels as programmatic dependent launches
        self._groups: tuple[torch.Tensor, ...] | None = None  # device: members, items, skip, count

    @classmethod
    def allocate(
        cls,
        w,
        slots: int,
        max_len: int,
        num_blocks: int,
        block_size: int,
        use_kernel: bool = False,
    ) -> PagedKVCache:
        """Pool of `num_blocks` blocks (one is the trash block) for DecoderWeights `w`."""
        shape = (len(w.layers), num_blocks, w.groups, block_size, w.head_dim)
        like = w.embedding
        sms = torch.cuda.get_device_properties(like.device).multi_processor_count if like.is_cuda else 132
        return cls(like.new_zeros(shape), like.new_zeros(shape), slots, max_len, use_kernel, sms)

    @staticmethod
    def bytes_per_block(w, block_size: int) -> int:
        return 2 * len(w.layers) * w.groups * block_size * w.head_dim * w.embedding.element_size()

    @property
    def span_matters(self) -> bool:
        """Whether the step's attention span (the graph key's attend_len) changes the work: the kernel reads
        each sequence's own length, so only the torch reference uses it."""
        return not self.use_kernel

    # ------------------------------------------------------------------------------ host bookkeeping
    def holds(self, length: int) -> bool:
        """Whether the pool holds one sequence of `length` positions (besides the trash block)."""
        return self.allocator.num_blocks > blocks_for(length, self.block_size)

    @property
    def free_blocks(self) -> int:
        return self.allocator.num_free

    def ensure(self, slot: int, length: int) -> bool:
        """Give `slot` blocks for positions 0..length-1; False (nothing taken) when the pool is short."""
        need = blocks_for(length, self.block_size) - len(self.owned[slot])
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        row = self.owned[slot]
        for _ in range(need):
            row.append(self.allocator.take())
        self.host_table[slot, len(row) - need : len(row)] = torch.tensor(row[-need:], dtype=torch.int32)
        self._dirty = True
        return True

    def release(self, slot: int) -> None:
        """The slot's sequence ended or was preempted: its blocks go back (shared ones when last dropped)."""
        for block in self.owned[slot]:
            self.allocator.drop(block)
        if self.owned[slot]:
            self.host_table[slot, : len(self.owned[slot])] = TRASH_BLOCK
            self._dirty = True
        self.owned[slot] = []

    def share_prefix(self, src: int, dst: int, length: int) -> bool:
        """Give empty slot `dst` slot `src`'s first `length` positions: full blocks shared, the partial last
        block copied (dst writes into it next). False when no block is free for the copy."""
        if self.owned[dst]:
            raise RuntimeError(f"paged KV cache: share_prefix into slot {dst}, which holds blocks")
        full, partial = divmod(length, self.block_size)
        if partial and not self.allocator.num_free:
            return False
        row = [self.allocator.share(b) for b in self.owned[src][:full]]
        if partial:
            block = self.allocator.take()
            source = self.owned[src][full]
            self.k[:, block] = self.k[:, source]
            self.v[:, block] = self.v[:, source]
            row.append(block)
        self.owned[dst] = row
        self.host_table[dst, : len(row)] = torch.tensor(row, dtype=torch.int32)
        self._dirty = True
        return True

    def move(self, src: int, dst: int) -> None:
        """Move a live sequence's blocks from slot src to the empty slot dst (compaction: no data moves)."""
        self.owned[dst], self.owned[src] = self.owned[src], []
        self.host_table[dst] = self.host_table[src]
        self.host_table[src] = TRASH_BLOCK
        self._dirty = True

    def sync(self) -> None:
        """Copy the host block table to the device (before a chunk of decode steps; one small copy)."""
        if self._dirty:
            self.table.copy_(self.host_table, non_blocking=False)
            if self.cascade and self.takes_qkv:  # the kernel path only (the torch reference has no cascade)
                host = prompt_groups(self.owned, self.allocator.refs)
                if self._groups is None:
                    self._groups = tuple(torch.tensor(t, dtype=torch.int32, device=self.k.device) for t in host)
                else:
                    for dst, t in zip(self._groups, host):
                        dst.copy_(torch.tensor(t, dtype=torch.int32), non_blocking=False)
            self._dirty = False

    def memory(self) -> dict[str, float]:
        per_block = self.k[:, 0].numel() * self.k.element_size() * 2
        return {
            "kv_block_size": float(self.block_size),
            "kv_blocks": float(self.allocator.num_blocks - 1),
            "kv_blocks_peak": float(self.allocator.peak_used),
            "kv_cache_gib": self.allocator.num_blocks * per_block / 2**30,
            "kv_peak_gib": self.allocator.peak_used * per_block / 2**30,
        }

    # ------------------------------------------------------------------------------ prefill
    def _flat(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids and offsets [C] of positions start..end-1 of `slot` (blocks must be owned)."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(self.owned[slot], dtype=torch.long)[pos // self.block_size]
        return blocks.to(self.k.device), (pos % self.block_size).to(self.k.device)

    def store(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [G, C, D] at positions start..start+C-1 of `slot` (its blocks allocated)."""
        blocks, offsets = self._flat(slot, start, start + k.size(1))
        self.k[layer, blocks, :, offsets] = k.transpose(0, 1)
        self.v[layer, blocks, :, offsets] = v.transpose(0, 1)

    def prefix(self, layer: int, slot: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys, values [1, G, end, D] of `slot`'s positions 0..end-1."""
        n = blocks_for(end, self.block_size)
        ids = torch.tensor(self.owned[slot][:n], dtype=torch.long, device=self.k.device)
        return tuple(
            pool[layer, ids].permute(1, 0, 2, 3).reshape(1, pool.size(2), -1, pool.size(4))[:, :, :end]
            for pool in (self.k, self.v)
        )

    # ------------------------------------------------------------------------------ decode
    def decode_context(self, positions: torch.Tensor, attend_len: int) -> dict:
        """Per-step index tensors shared by every layer (static shapes, no host sync)."""
        b = positions.numel()
        rows = torch.arange(b, device=positions.device)
        ctx = {
            "positions": positions,
            "blocks": self.table[rows, positions // self.block_size].long(),  # [B] block of the new token
            "offsets": positions % self.block_size,  # [B]
            "attend_len": attend_len,
        }
        if not self.use_kernel:
            n = blocks_for(attend_len, self.block_size)
            visible = (
                torch.arange(n * self.block_size, device=positions.device)[None, :] <= positions[:, None]
            )
            ctx["gather"] = self.table[:b, :n].long()  # [B, n]
            ctx["visible"] = visible[:, None, None, :]  # [B, 1, 1, n * block_size]
        return ctx

    def decode_attention(
        self, layer: int, ctx: dict, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Append k, v [B, G, D] at the step's positions, attend q [B, G, per_group, D] -> same shape."""
        kp, vp = self.k[layer], self.v[layer]  # [N, G, bs, D]
        kp[ctx["blocks"], :, ctx["offsets"]] = k
        vp[ctx["blocks"], :, ctx["offsets"]] = v
        if self.use_kernel:
            return self._kernel(q, kp, vp, ctx)
        return paged_attention_reference(q, kp, vp, ctx["gather"], ctx["visible"])

    @property
    def takes_qkv(self) -> bool:
        """Whether the decode step hands `decode_attention_qkv` the raw fused QKV (RoPE + append in one kernel)."""
        return self.use_kernel and self.fused

    @property
    def fused_residual(self) -> bool:
        """Whether the decode step runs its residual adds, RMSNorms and SwiGLU as Triton kernels
        (decoder._decode_fused_norms; EngineOptions.fused_norms, on the fused kernel path only)."""
        return self.takes_qkv and self.fused_norms

    def decode_attention_qkv(
        self, layer: int, ctx: dict, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """`decode_attention` from the layer's QKV projection qkv [B, G * (P + 2) * D] (megatron's layout) and
        the step's RoPE tables cos, sin [B, D / 2]: one kernel rotates q and k and appends k, v (Triton only)."""
        from questa_nemo.rollout.paged_triton import rope_append

        kp, vp = self.k[layer], self.v[layer]
        q = rope_append(qkv, cos, sin, kp, vp, ctx["blocks"], ctx["offsets"], pdl=self.pdl)
        return self._kernel(q, kp, vp, ctx)

    def launch_settings(self, batch: int) -> dict:
        """The attention kernel's launch settings at this batch (recorded by benchmarks)."""
        groups = self.k.size(2)
        if self.fused:
            split = split_positions(batch, groups, self.num_sms, self.block_size)
            out = {"split_len": split, "merge_tile": self.merge_tile and split <= TILE_MERGE_MAX_SPLIT}
            if self.cascade and self.use_kernel and self._groups is not None:
                from questa_nemo.rollout.paged_triton import Cascade

                out["cascade"] = Cascade(*self._groups, CASCADE_ITEMS)
            return out
        return {"splits": num_splits(batch, groups, self.num_sms), "merge_tile": self.merge_tile}

    def _kernel(self, q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, ctx: dict) -> torch.Tensor:
        from questa_nemo.rollout.paged_triton import paged_decode_attention

        return paged_decode_attention(
            q, kp, vp, self.table, ctx["positions"], self.num_sms, **self.launch_settings(q.size(0)), pdl=self.pdl
        )


def paged_attention_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, gather: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """q [B, G, P, D]; pools [N, G, bs, D]; gather [B, n] block ids; visible [B, 1, 1, n * bs] -> [B, G, P, D].

    The contiguous decoder's attention on keys gathered through the block table: a group's query heads take
    SDPA's query-length axis (no repeat of the cache) and scores stay in float32 inside the fused kernel.
    """
    b, n = gather.shape
    g, bs, d = k_pool.shape[1:]

    def rows(pool: torch.Tensor) -> torch.Tensor:
        return pool[gather].permute(0, 2, 1, 3, 4).reshape(b, g, n * bs, d)

    return F.scaled_dot_product_attention(q, rows(k_pool), rows(v_pool), attn_mask=visible)


def paged_attention_dense(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Test oracle in float64 math: each sequence b attends to its positions 0..positions[b] -> [B, G, P, D]."""
    out = torch.empty_like(q)
    bs = k_pool.size(2)
    for b in range(q.size(0)):
        length = int(positions[b]) + 1
        ids = table[b, : blocks_for(length, bs)].long()
        keys = k_pool[ids].permute(1, 0, 2, 3).reshape(k_pool.size(1), -1, k_pool.size(3))[:, :length]
        values = v_pool[ids].permute(1, 0, 2, 3).reshape(v_pool.size(1), -1, v_pool.size(3))[:, :length]
        scores = q[b].double() @ keys.double().transpose(-1, -2) / q.size(-1) ** 0.5  # [G, P, L]
        out[b] = (scores.softmax(-1) @ values.double()).to(q.dtype)
    return out
