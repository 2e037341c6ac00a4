"""Process groups: torch.distributed + megatron parallel_state, from torchrun's environment or one process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from questa_nemo.config import ConfigError, ModelConfig
from questa_nemo.model import cpu_shim


@dataclass(frozen=True)
class ParallelInfo:
    """Where this process sits in the TP x CP x DP x PP grid."""

    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    vp_size: int | None  # virtual pipeline chunks per stage (None: no interleaving)
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: ModelConfig, timeout_minutes: int = 30) -> ParallelInfo:
    """Start torch.distributed (nccl on GPU, gloo on CPU) and megatron's parallel state for `cfg`.

    Under torchrun the world comes from RANK / WORLD_SIZE / LOCAL_RANK; without it this is a world of one
    process on a free local port. On a machine without CUDA the CPU shim is applied first. Seeds megatron's
    RNG tracker with `cfg.seed` (distinct per TP rank, as megatron does).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_shim.apply()
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model_parallel = cfg.tensor_parallel * cfg.pipeline_parallel * cfg.context_parallel
    if world_size % model_parallel:
        raise ConfigError(
            "model.tensor_parallel",
            f"TP x PP x CP = {model_parallel} does not divide the world size {world_size}",
        )
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        # A world of one process (no torchrun): a free local port, passed directly rather than through
        # os.environ, so processes this one starts (tests, tools) never inherit a port already taken.
        single = "MASTER_ADDR" not in os.environ
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            init_method=f"tcp://127.0.0.1:{_free_port()}" if single else None,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if parallel_state.model_parallel_is_initialized():
        have = (
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_context_parallel_world_size(),
        )
        want = (cfg.tensor_parallel, cfg.pipeline_parallel, cfg.context_parallel)
        if have != want:
            raise RuntimeError(
                f"init_distributed: parallel state is already (TP, PP, CP) = {have}, not {want}"
            )
    else:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel,
            pipeline_model_parallel_size=cfg.pipeline_parallel,
            virtual_pipeline_model_parallel_size=cfg.virtual_pipeline,
            context_parallel_size=cfg.context_parallel,
            distributed_timeout_minutes=timeout_minutes,
        )
    model_parallel_cuda_manual_seed(cfg.seed, force_reset_rng=True)
    return parallel_info()


def parallel_info() -> ParallelInfo:
    """The current process's coordinates (parallel state must be initialised)."""
    from megatron.core import parallel_state as ps

    on_gpu = torch.cuda.is_available()
    return ParallelInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        vp_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=ps.get_context_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu"),
    )


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def model_parallel_all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj` over megatron's model-parallel group (TP x PP of one data-parallel replica), in
    group-rank order; index 0 is the replica's first rank.

    For small picklable objects that hold no tensors (CUDA IPC handles, generation results). On an NCCL group
    torch carries the pickled bytes through the current CUDA device, which init_distributed has set; on gloo
    they stay on the CPU. A world of one returns [obj] without a collective.
    """
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return [obj]
    gathered: list[object] = [None] * size
    torch.distributed.all_gather_object(gathered, obj, group=group)
    return gathered
