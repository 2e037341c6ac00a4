"""The trainer's current weights as one full Hugging Face state dict on every rank of a model-parallel group.

Rollout engines that cannot read the trainer's shards in place (the Megatron decoder at TP or PP > 1, the hf
and trtllm backends) take the weights through this gather once per policy update. Each rank of the
model-parallel group (TP x PP: the ranks that hold one replica between them) flattens its chunks' tensors
into one buffer per dtype and broadcasts it; every rank then rebuilds the HF tensors from all shards with
`convert.megatron_to_hf`, the exact inverse of the import. So a gathered replica equals the single-rank
model's weights bit for bit.

Costs, per update: one broadcast per rank of the group (its shard, 1/(TP x PP) of the model) and a full copy
of the model on every rank: for the 1.5B policy in bf16, 3.1 GB received and held per GPU.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from questa_nemo.model.convert import ModelShape, ShardLayout, megatron_to_hf


def _shards(chunks: list[torch.nn.Module]) -> dict[ShardLayout, dict[str, torch.Tensor]]:
    """This rank's chunks keyed by their shard layout (state-dict tensors, no TE extra state)."""
    from questa_nemo.model.megatron import shard_layout

    out = {}
    for vp, chunk in enumerate(chunks):
        layout = shard_layout(vp if len(chunks) > 1 else None)
        out[layout] = {
            name: t.detach() for name, t in chunk.state_dict().items() if not name.endswith("_extra_state")
        }
    return out


def model_parallel_size() -> int:
    """Ranks that hold one model replica between them (TP x PP); 1 when the chunks are the whole model."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()


def gather_hf_weights(chunks: list[torch.nn.Module], hf_config: Mapping) -> dict[str, torch.Tensor]:
    """Full HF-named tensors of the model whose shards the model-parallel group holds; on every rank of it.

    A collective over megatron's model-parallel group: every rank of the group calls it at the same point.
    The tensors live on the chunks' device and share no storage with the trainer's parameters.
    """
    from megatron.core import parallel_state as ps

    shape = ModelShape.from_hf(hf_config)
    local = _shards(chunks)
    if model_parallel_size() == 1:
        return megatron_to_hf(local, shape)  # copies (cat / clone): nothing aliases the trainer's tensors
    group = ps.get_model_parallel_group()
    ranks = torch.distributed.get_process_group_ranks(group)
    # what every rank holds: layouts, names, shapes, dtypes (small; pickled)
    meta = [(layout, [(n, tuple(t.shape), t.dtype) for n, t in sd.items()]) for layout, sd in local.items()]
    everyone: list = [None] * len(ranks)
    torch.distributed.all_gather_object(everyone, meta, group=group)
    device = next(iter(next(iter(local.values())).values())).device
    me = torch.distributed.get_rank()
    shards: dict[ShardLayout, dict[str, torch.Tensor]] = {}
    for src, their_meta in zip(ranks, everyone):
        entries = [(layout, n, s, d) for layout, named in their_meta for n, s, d in named]
        for dtype in sorted({d for *_, d in entries}, key=str):  # one flat buffer per dtype and rank
            mine = [e for e in entries if e[3] == dtype]
            numel = sum(torch.Size(s).numel() for _, _, s, _ in mine)
            if src == me:
                flat = torch.cat([local[layout][n].reshape(-1) for layout, n, _, _ in mine])
            else:
                flat = torch.empty(numel, dtype=dtype, device=device)
            torch.distributed.broadcast(flat, src=src, group=group)
            offset = 0
            for layout, name, size, _ in mine:
                count = torch.Size(size).numel()
                shards.setdefault(layout, {})[name] = flat[offset : offset + count].view(size)
                offset += count
    return megatron_to_hf(shards, shape)
