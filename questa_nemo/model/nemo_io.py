"""Megatron distributed checkpoints (torch_dist format) read and written as plain tensors, on CPU, one process.

Export and import need exactly three things from megatron's `dist_checkpointing`: which tensors a checkpoint
holds, whole tensors by key, and writing tensors under given keys (with the per-layer stacking megatron's own
`sharded_state_dict` uses, so NeMo reads it back). They live here because only model/ imports megatron.
Written by the export engineer; the format is the one `GPTModel.sharded_state_dict()` saves: each decoder
parameter is one tensor `[num_layers, ...]` under `<prefix>decoder.layers.<suffix>`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from questa_nemo.model import cpu_shim


def ensure_process_group() -> None:
    """dist_checkpointing asks torch.distributed for ranks: start a gloo world of one unless one exists."""
    if not torch.cuda.is_available():
        cpu_shim.apply()  # the torch_dist writer synchronises "the GPU" before writing
    if not torch.distributed.is_initialized():
        from questa_nemo.model.parallel import destroy_at_exit

        destroy_at_exit()
        rendezvous = tempfile.NamedTemporaryFile(prefix="questa-nemo-pg-", delete=False)
        rendezvous.close()
        torch.distributed.init_process_group(
            backend="gloo", init_method=f"file://{rendezvous.name}", rank=0, world_size=1
        )


def is_dist_checkpoint(directory: str | Path) -> bool:
    from megatron.core import dist_checkpointing

    return Path(directory).is_dir() and dist_checkpointing.check_is_distributed_checkpoint(str(directory))


def tensor_shapes(directory: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (global shape, dtype) of every tensor in the checkpoint (optimizer state included if saved)."""
    from megatron.core import dist_checkpointing

    ensure_process_group()
    metadata = dist_checkpointing.load_tensors_metadata(str(directory))
    return {key: (tuple(t.global_shape), t.dtype) for key, t in metadata.items()}


def load_tensors(directory: str | Path, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Whole (TP/PP-gathered) tensors by key, read into host memory."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    shapes = tensor_shapes(directory)
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise KeyError(f"{directory}: no tensor {missing[0]!r} in this distributed checkpoint")
    request = {
        key: ShardedTensor.from_rank_offsets(
            key, torch.empty(shapes[key][0], dtype=shapes[key][1]), replica_id=0
        )
        for key in keys
    }
    # A subset of the checkpoint's keys is a valid request; the integrity check wants every shard of a
    # multi-rank access pattern, which one process reading whole tensors does not form.
    return dist_checkpointing.load(request, str(directory), validate_access_integrity=False)


def save_layer_stacked(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor],
    layer_tensors: Mapping[str, Sequence[torch.Tensor]],
    empty_layer_objects: Sequence[str] = (),
    num_layers: int = 0,
) -> None:
    """Write a torch_dist checkpoint into the existing empty `directory`.

    tensors: key -> whole tensor (embeddings, final norm). layer_tensors: key -> one tensor per decoder layer,
    saved as megatron does, one `[num_layers, ...]` tensor with a shard per layer. empty_layer_objects: keys
    of per-layer objects holding None (Transformer Engine's `_extra_state`, which NeMo's strict load expects).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    ensure_process_group()
    sharded: dict[str, object] = {}
    for key, tensor in tensors.items():
        sharded[key] = ShardedTensor.from_rank_offsets(key, tensor.contiguous(), replica_id=0)
    for key, per_layer in layer_tensors.items():
        count = len(per_layer)
        for i, tensor in enumerate(per_layer):
            sharded[f"{key}#{i}"] = ShardedTensor.from_rank_offsets(
                key, tensor.contiguous(), (0, i, count), replica_id=0, prepend_axis_num=1
            )
    for key in empty_layer_objects:
        for i in range(num_layers):
            sharded[f"{key}#{i}"] = ShardedObject(key, None, (num_layers,), (i,), replica_id=0)
    dist_checkpointing.save(sharded, str(directory))
    write_legacy_common(directory)


COMMON_FILE = "common.pt"  # where megatron-core before 0.17 keeps a checkpoint's non-tensor state


def write_legacy_common(directory: str | Path) -> None:
    """Add the `common.pt` older megatron-core needs to the checkpoint in `directory`, if it has none.

    megatron-core 0.17+ keeps the common (non-sharded) state inside the torch_dist files and writes no
    `common.pt`; 0.14 (NeMo 25.09's) opens `common.pt` first and fails without it ("Common file ... does not
    exist"), so an archive written under 0.19 could not be restored by NeMo. Every value we save is sharded, so
    the common state is the empty dict 0.14 itself would write; 0.17+ reads a `common.pt` where there is one
    (its "legacy" path), so both read the same thing."""
    path = Path(directory) / COMMON_FILE
    if not path.exists():
        torch.save({}, path)
