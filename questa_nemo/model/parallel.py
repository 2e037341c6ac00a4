"""Process groups: torch.distributed + megatron parallel_state, from torchrun's environment or one process."""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import sys
import threading
from dataclasses import dataclass, field
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


# The CUDA caching allocator's setting when the user sets none: expandable segments. A step's packed
# micro-batches and attention gathers change shape every time beside the engine's fixed KV pool, the pattern
# that fragments fixed segments into out-of-memory retries (each one a device synchronize and a release of
# every cached block); bench_train and the SmolLM2 runs ran with it, CUDA graphs included.
ALLOCATOR_DEFAULT = "expandable_segments:True"


def cuda_allocator_defaults(rollout_backend: str) -> str | None:
    """Set PYTORCH_CUDA_ALLOC_CONF to ALLOCATOR_DEFAULT unless the user set it (or PYTORCH_ALLOC_CONF), the
    rollout backend shares weights by CUDA IPC handles (trtllm: memory of expandable segments may not be
    exportable), there is no GPU, or CUDA is already initialised (too late to take effect). Returns what it
    set, else None. Call before anything touches the GPU."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return None
    if rollout_backend == "trtllm" or not torch.cuda.is_available() or torch.cuda.is_initialized():
        return None
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_DEFAULT
    return ALLOCATOR_DEFAULT


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
        if strict_requested():
            install_nccl_strict_guard()
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
    destroy_at_exit()
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


# How long the exit hook waits for the teardown before it ends the process itself (exit status 1).
EXIT_TEARDOWN_S = 60.0
_exit_hook = threading.Lock()
_exit_hook_set = False


def destroy_at_exit() -> None:
    """Tear the process groups down at interpreter exit (once per process), while Python is still whole.

    A process that leaves with its groups alive lets interpreter finalization destroy gloo's pending work,
    whose tensors hold Python references, from gloo's worker threads: a run whose every rank printed its
    result then died with "terminate called without an active exception" and SIGABRT (exit 134; seen in CI on
    tests/dist/collectives_worker.py). Every entry point starts its groups through `init_distributed`, so
    registering here covers the trainer, eval and the benchmarks alike, and an explicit
    `destroy_distributed` before exit leaves the hook nothing to do. GPU runs have gloo groups too
    (megatron's DP copies, the loop's dedicated group). A teardown that blocks (a peer died mid-collective)
    ends the process after EXIT_TEARDOWN_S with status 1 instead of hanging the job."""
    global _exit_hook_set
    with _exit_hook:
        if _exit_hook_set:
            return
        _exit_hook_set = True
    atexit.register(_teardown_at_exit)


def _exit_watchdog():
    """Arm what ends the process with status 1 if the teardown outlives EXIT_TEARDOWN_S; returns its cancel.

    A timer thread where one can start. Python 3.12 refuses new threads once the interpreter is shutting
    down, which is when exit hooks run ("can't create new thread at interpreter shutdown"): there faulthandler's
    own watchdog takes over, which needs no Python thread and prints every thread's stack before it exits."""

    def give_up() -> None:
        print(f"questa-nemo: process group teardown at exit did not finish in {EXIT_TEARDOWN_S:.0f} s; "
              "exiting with status 1", file=sys.stderr, flush=True)  # fmt: skip
        os._exit(1)

    timer = threading.Timer(EXIT_TEARDOWN_S, give_up)
    timer.daemon = True
    try:
        timer.start()
        return timer.cancel
    except RuntimeError:  # its dump names _teardown_at_exit, where the stacks stopped
        faulthandler.dump_traceback_later(EXIT_TEARDOWN_S, exit=True)
        return faulthandler.cancel_dump_traceback_later


def _teardown_at_exit() -> None:
    cancel = _exit_watchdog()
    try:
        destroy_distributed()
    except Exception as e:  # the interpreter is leaving: say it, never raise from an exit hook
        print(f"questa-nemo: process group teardown at exit failed: {e}", file=sys.stderr, flush=True)
    finally:
        cancel()


# ------------------------------------------------------------------------------------------ collectives
# Every collective of the training loop (advantage moments, loss normaliser, sequence counts, step metrics,
# filtering's refill agreement, the preemption flag, checkpoint RNG states) goes through the functions below.
# They place tensors on the group's communication device - CUDA for an NCCL group, which has no CPU backend
# (torch maps "nccl" to {"cuda": "nccl"} only) - and return results on the caller's device. The loop calls a
# `Reduce` it is handed and never imports megatron or calls torch.distributed itself.

STRICT_ENV = "QUESTA_NCCL_STRICT"
_PLACED = "_questa_comm_placed"  # attribute set on tensors placed by `_place` (read by the strict guard)


def comm_device(group=None) -> torch.device:
    """Where a collective over `group` needs its tensors: the current CUDA device if the group's backend is
    NCCL, else the CPU (gloo)."""
    backend = str(torch.distributed.get_backend(group))
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _place(x: torch.Tensor, group) -> torch.Tensor:
    """A fresh contiguous copy of `x` on `group`'s communication device, tagged for the strict guard."""
    y = x.detach().to(comm_device(group), copy=True).contiguous()
    setattr(y, _PLACED, True)
    return y


def all_reduce(x: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """`x` reduced over `group` (op: sum | max | min), as a new tensor on `x`'s device; `x` is unchanged."""
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}
    y = _place(x, group)
    torch.distributed.all_reduce(y, op=ops[op], group=group)
    return y.to(x.device)


def all_gather(x: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `x` (same shape on every rank), in group-rank order, on `x`'s device."""
    y = _place(x, group)
    parts = [_place(torch.empty_like(y), group) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, y, group=group)
    return [p.to(x.device) for p in parts]


def broadcast(x: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """Global rank `src`'s `x` on every rank of `group`, as a new tensor on `x`'s device."""
    y = _place(x, group)
    torch.distributed.broadcast(y, src=src, group=group)
    return y.to(x.device)


def barrier(group=None) -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier(group=group)


class Reduce:
    """The collectives the training loop may call, over one process group; with one rank, no communication.

    `reduce(x)` sums `x` over the group (the AllReduce of algo/advantages.py); results are on `x`'s device.
    """

    def __init__(self, group=None, size: int = 1):
        self.group, self.size = group, size
        self.rank = torch.distributed.get_rank(group) if size > 1 else 0  # this process's rank in the group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(x)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 else all_reduce(x, "sum", self.group)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 else all_reduce(x, "max", self.group)

    def min(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.size == 1 else all_reduce(x, "min", self.group)

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank."""
        return bool(self.max(torch.tensor([float(flag)]))[0])

    def gather_objects(self, obj) -> list:
        """Every rank's picklable `obj`, in group-rank order (object collectives serialise on the device
        torch picks for the backend)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out


def model_parallel_all_gather_object(obj: object) -> list[object]:
    """Every rank's `obj` over megatron's model-parallel group (TP x PP of one data-parallel replica), in
    group-rank order; index 0 is the replica's first rank. For small picklable objects that hold no tensors
    (CUDA IPC handles, generation results). A world of one returns [obj] without a collective."""
    from megatron.core import parallel_state as ps

    group = ps.get_model_parallel_group()
    return Reduce(group, torch.distributed.get_world_size(group)).gather_objects(obj)


def world_reduce() -> Reduce:
    """Collectives over every process (the default group); the identity without torch.distributed."""
    if not torch.distributed.is_initialized():
        return Reduce()
    return Reduce(None, torch.distributed.get_world_size())


def dp_reduce(dedicated: bool = False) -> Reduce:
    """Collectives over this rank's data-parallel group (collective to call: every rank must).

    dedicated: a gloo group of the same ranks of its own, for collectives issued from another thread (the
    async rollout producer) - two threads must never share a group, whose messages pair up by issue order.
    """
    from megatron.core import parallel_state as ps

    size = ps.get_data_parallel_world_size()
    if size == 1:
        return Reduce()
    group = ps.get_data_parallel_group()
    if dedicated:
        group = _gloo_copy(group)
    return Reduce(group, size)


@dataclass
class LoopCollectives:
    """What the GRPO loop (train/loop.py) is handed: identity reduces for one process."""

    dp: Reduce = field(default_factory=Reduce)  # the step: advantages, normaliser, counts, metrics
    rollouts: Reduce = field(default_factory=Reduce)  # filtering's refill agreement (may be the producer thread)
    world: Reduce = field(default_factory=Reduce)  # preemption flag, checkpoints


def loop_collectives(async_rollouts: bool = False) -> LoopCollectives:
    """The loop's collectives (collective to call). With async rollouts the producer thread agrees over a DP
    group of its own."""
    dp = dp_reduce()
    return LoopCollectives(dp=dp, rollouts=dp_reduce(dedicated=True) if async_rollouts else dp,
                           world=world_reduce())


def _gloo_copy(group):
    """A gloo group of `group`'s ranks. torch.distributed.new_group must be called by every process for every
    new group, in one order: the ranks of every rank's group are gathered first."""
    mine = tuple(torch.distributed.get_process_group_ranks(group))
    everyone = world_reduce().gather_objects(mine)
    copy = None
    for ranks in sorted(set(everyone)):
        g = torch.distributed.new_group(list(ranks), backend="gloo")
        if ranks == mine:
            copy = g
    return copy


# ------------------------------------------------------------------------------------------ NCCL-strict guard
_GUARDED = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv", "batch_isend_irecv",
    "_all_gather_base", "_reduce_scatter_base", "all_reduce_coalesced", "all_gather_coalesced",
)  # fmt: skip
# isend / irecv stay unwrapped: P2POp checks its op against those very functions; their batched use is checked
# through batch_isend_irecv (each P2POp's tensor).


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors_in(v)
    elif hasattr(value, "tensor") and isinstance(getattr(value, "tensor", None), torch.Tensor):  # P2POp
        yield value.tensor


def _caller() -> tuple[str, int]:
    """File and line of the first frame outside torch and this guard."""
    import sys

    torch_dir = os.path.dirname(torch.__file__)
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(torch_dir) and not (name == __file__ and frame.f_code.co_name == "guarded"):
            return name, frame.f_lineno
        frame = frame.f_back
    return "?", 0


_MODEL_TENSORS = threading.local()


@contextlib.contextmanager
def model_tensors():
    """Inside, the strict guard lets this thread's collectives through: for code outside megatron and
    questa_nemo/model/ that exchanges model tensors (logits, activations: on the GPU in a real run), such as
    the tests' parity workers."""
    _MODEL_TENSORS.depth = getattr(_MODEL_TENSORS, "depth", 0) + 1
    try:
        yield
    finally:
        _MODEL_TENSORS.depth -= 1


def _model_side(filename: str) -> bool:
    """Collectives that megatron's and the model layer's code issue on model tensors (weights, activations,
    logits, grad buffers: on the GPU in a real run). Everything else must hand its tensors over through this
    module, or say it exchanges model tensors (`model_tensors()`)."""
    import megatron.core

    if getattr(_MODEL_TENSORS, "depth", 0) > 0:
        return True
    path = os.path.abspath(filename)
    megatron_dir = os.path.dirname(os.path.dirname(os.path.abspath(megatron.core.__file__)))
    model_dir = os.path.dirname(os.path.abspath(__file__))
    if path.startswith(megatron_dir + os.sep):
        return True
    if path.startswith(model_dir + os.sep):
        return path != os.path.abspath(__file__)  # this module places what it sends: its calls are checked
    return False


def install_nccl_strict_guard() -> bool:
    """CI on CPU: make torch.distributed's tensor collectives fail wherever NCCL would.

    gloo still does the arithmetic; each collective first checks its tensors. A CPU tensor passes only when
    this module placed it on the communication device (`_place` tags it), or when megatron or the model layer
    (questa_nemo/model/, other than this module) issues the collective on model tensors, or inside
    `model_tensors()`. Anything else - the loop reducing a CPU tensor over an NCCL group - raises with the caller's file
    and line. Object collectives (all_gather_object, broadcast_object_list) and barrier are not checked:
    torch serialises those on the backend's device itself. Installed by `init_distributed` when the
    environment sets QUESTA_NCCL_STRICT=1 (tests/conftest.py and tests/dist/launch.py do). Idempotent.
    """
    import functools

    dist = torch.distributed
    if getattr(dist, "_questa_strict", False):
        return False
    for name in _GUARDED:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def guarded(*args, __original=original, __name=name, **kwargs):
            unplaced = [t for t in _tensors_in((args, list(kwargs.values())))
                        if t.device.type == "cpu" and not getattr(t, _PLACED, False)]
            if unplaced:
                filename, line = _caller()
                if not _model_side(filename):
                    raise RuntimeError(
                        f"NCCL-strict: torch.distributed.{__name} was handed a CPU tensor (shape "
                        f"{tuple(unplaced[0].shape)}, {unplaced[0].dtype}) from {filename}:{line}. On GPUs the "
                        "group's backend is NCCL, which has no CPU backend, so this collective fails there. "
                        "Route it through questa_nemo.model.parallel (Reduce, all_reduce, all_gather, "
                        "broadcast), which places tensors on the communication device."
                    )
            return __original(*args, **kwargs)

        functools.update_wrapper(guarded, original)
        setattr(dist, name, guarded)
    dist._questa_strict = True
    return True


def strict_requested() -> bool:
    return os.environ.get(STRICT_ENV, "0") not in ("", "0", "false", "False")
