"""Training checkpoints with megatron-core dist_checkpointing: model, optimizer, lr schedule and RNG states.

A checkpoint directory holds:
    model/          the model chunks' sharded state dict (keys as GPTModel.sharded_state_dict(), no prefix)
    optimizer/      optimizer state mapped onto the same parameter shards, plus the lr schedule (common part)
    rng/rank_<r>.pt this rank's RNG states (CPU, CUDA, megatron's tracker); tensors only (weights_only loads)
    config.json     the Hugging Face config the model was built from (when given), tokenizer files beside it
    metadata.json   step, the TP / PP / DP layout it was saved at, what it holds
    complete        written last: a directory without it is not a checkpoint

Saves write into `<dir>.tmp-<uuid>` (one name agreed by all ranks) and rename it into place once every rank
has finished, so an interrupted save leaves earlier checkpoints untouched and never a half-written `<dir>`.
Sharded tensors are global, so a checkpoint loads at another TP / PP layout; see `load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica
from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from questa_nemo.atomic import publish_dir, write_text_atomic
from questa_nemo.model import mcore_compat, parallel

COMPLETE_MARKER = "complete"
FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)


@dataclass
class CheckpointMetadata:
    """What `metadata.json` records; `load_checkpoint` returns it with what was restored."""

    step: int
    tensor_parallel: int
    pipeline_parallel: int
    virtual_pipeline: int | None
    data_parallel: int
    world_size: int
    has_optimizer: bool
    format_version: int = FORMAT_VERSION
    rng_restored: bool = False  # set on load: RNG states are per rank, restored only at the same layout
    optimizer_restored: bool = False  # set on load


def is_complete(directory: str | Path) -> bool:
    """Whether `directory` is a finished checkpoint (its `complete` marker exists)."""
    return (Path(directory) / COMPLETE_MARKER).is_file()


def _rank() -> int:
    return torch.distributed.get_rank()


def _layout(step: int, has_optimizer: bool) -> CheckpointMetadata:
    ps = parallel_state
    return CheckpointMetadata(
        step=step,
        tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline=ps.get_virtual_pipeline_model_parallel_world_size(),
        data_parallel=ps.get_data_parallel_world_size(),
        world_size=torch.distributed.get_world_size(),
        has_optimizer=has_optimizer,
    )


def _bare(chunk: torch.nn.Module) -> torch.nn.Module:
    return chunk.module if hasattr(chunk, "module") else chunk


def model_sharded_state_dict(model_chunks: list[torch.nn.Module]) -> dict:
    """The chunks' sharded state dicts, one entry per virtual-pipeline chunk (keys inside are global)."""
    return {f"chunk{i}": _bare(chunk).sharded_state_dict() for i, chunk in enumerate(model_chunks)}


def _shield_writer_manager() -> None:
    """megatron's checkpoint writer keeps one spawned multiprocessing Manager for write results. Slurm's
    pre-timeout SIGUSR1, a preemption's or scancel's SIGTERM (and `timeout`'s) reach every process of the job
    step or process group, and a spawned process dies of them (default action) - mid-save, as the preemption
    save starts (SIGUSR1 seen in tests/test_slurm.py; SIGTERM in .ci/fresh_install_main_job.sh: the next save
    then failed with BrokenPipeError). Start that manager once with both ignored: a spawned child inherits
    SIG_IGN, and the trainer's own handlers are put back. The manager still ends with the trainer (its
    finalizer sends a shutdown message, then SIGKILL if need be)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None or threading.current_thread() is not threading.main_thread():
        return
    shielded = (signal.SIGUSR1, signal.SIGTERM)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in shielded}
    try:
        mcore_compat.start_write_results_queue()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class CheckpointWriterDied(RuntimeError):
    """A process that megatron's checkpoint writer started died before the save finished."""


# Sent by the watchdog to the main thread to wake it from megatron's wait on its writers (see writer_watchdog).
# Slurm and the preemption handler use SIGUSR1 and SIGTERM; nothing else here uses SIGUSR2.
_WAKE_SIGNAL = signal.SIGUSR2


def _death_message(pid: int | None, exitcode: int, where: str) -> str:
    how = f"killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exit code {exitcode}"
    msg = f"checkpoint writer process {pid} died ({how}) while saving {where}"
    if importlib.util.find_spec("psutil") is None:
        msg += (
            ": psutil is not installed (megatron-core's checkpoint writer needs it; `pip install psutil`, "
            "or reinstall questa-nemo, which depends on it)"
        )
    else:
        msg += "; the save was abandoned (earlier checkpoints are untouched), see the writer's output above"
    return msg


def _stop_processes(processes) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(2)
        if p.is_alive():
            p.kill()
            p.join(1)


@contextlib.contextmanager
def writer_watchdog(where: str, poll_s: float = 0.1) -> Iterator[None]:
    """Turn the death of a checkpoint writer process into `CheckpointWriterDied` within a fraction of a second.

    megatron's torch_dist save (`FileSystemWriterAsync.write_preloaded_data_multiproc`, run in the calling
    process for a synchronous save) forks one writer per file bucket and waits on a JoinableQueue that each
    writer marks done as its last act. A writer that dies first (killed, out of memory, or raising before its
    try block, as it does when psutil is missing) never marks it, and the wait never ends. Here a thread polls
    the processes started during the save; when one ends with a non-zero exit code it records why and wakes
    the main thread with a signal whose handler raises (a blocked semaphore wait returns on EINTR and runs the
    handler), repeated until the exception has left the save. The surviving writers are stopped. Only in the main thread (signal handlers live there);
    elsewhere the save runs unguarded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from multiprocessing import process as mp_process

    before = set(mp_process._children)  # e.g. the reward pool's workers: not ours to watch
    seen: dict[int, object] = {}
    died: list[str] = []
    done = threading.Event()
    main_ident = threading.main_thread().ident

    def on_wake(signum, frame):
        if died and not done.is_set():
            raise CheckpointWriterDied(died[0])

    def watch() -> None:
        while not done.wait(poll_s):
            for p in list(mp_process._children):
                if p not in before and p.pid is not None:
                    seen.setdefault(p.pid, p)
            for p in list(seen.values()):
                code = p.exitcode
                if code not in (None, 0):
                    died.append(_death_message(p.pid, code, where))
                    # Again every half second until the main thread leaves the save: a handler that raises
                    # inside an at-fork callback (megatron is still starting writers) is swallowed.
                    while not done.is_set():
                        signal.pthread_kill(main_ident, _WAKE_SIGNAL)
                        done.wait(0.5)
                    return

    previous = signal.signal(_WAKE_SIGNAL, on_wake)
    thread = threading.Thread(target=watch, name="checkpoint-writer-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        signal.signal(_WAKE_SIGNAL, previous)
        if died:
            _stop_processes(list(seen.values()))
    if died:  # the save returned although a writer died: its files cannot be trusted
        raise CheckpointWriterDied(died[0])


class CheckpointDiskFull(OSError):
    """The checkpoint's file system has too little free space: found before writing, or it filled up mid-write
    (megatron's writer then fails with torch's "unexpected pos", a short write)."""


# torch_dist files hold the tensors plus per-item headers and metadata: a few percent over the tensor bytes.
_DISK_OVERHEAD = 1.05
_DISK_SLACK = 64 * 2**20


def _shard_bytes(sharded: object) -> int:
    """Bytes of the tensors this rank writes as the main replica (what a checkpoint holds once over all ranks)."""
    if isinstance(sharded, Mapping):
        return sum(_shard_bytes(v) for v in sharded.values())
    if isinstance(sharded, (list, tuple)):
        return sum(_shard_bytes(v) for v in sharded)
    if isinstance(sharded, (ShardedTensor, ShardedTensorFactory)) and is_main_replica(sharded.replica_id):
        data = sharded.data
        return data.numel() * data.element_size() if isinstance(data, torch.Tensor) else 0
    return 0


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing ancestor)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _check_disk(final: Path, *sharded_state_dicts: object) -> int:
    """Collective: the checkpoint's size (main replicas summed over all ranks, plus overhead); raise
    CheckpointDiskFull on every rank when rank 0 sees less free space beside `final`. Checkpoint folders are on
    a file system all ranks share (megatron's metadata is written once by rank 0), so one rank's view decides."""
    local = sum(_shard_bytes(sd) for sd in sharded_state_dicts if sd is not None)
    total = int(parallel.all_reduce(torch.tensor([local], dtype=torch.int64), "sum").item())
    need = int(total * _DISK_OVERHEAD) + _DISK_SLACK
    verdict = [None]
    if _rank() == 0:
        free = _free_bytes(final.parent)
        if free < need:
            verdict[0] = (
                f"not enough disk space for checkpoint {final}: it needs about {_gib(need)}, "
                f"{_gib(free)} are free there; free some space or save elsewhere (earlier checkpoints are untouched)"
            )
    torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointDiskFull(errno.ENOSPC, verdict[0])
    return need


_DISK_FULL_SIGNS = ("unexpected pos", "No space left on device", "Disk quota exceeded")
# megatron-core 0.17+ writes in threads and reports a writer's OSError by its class alone ("Worker failure: An
# error is caught while starting worker 0, error: <class 'OSError'>"): the errno is gone, so free space decides
_WRITER_OS_ERROR_SIGN = "<class 'OSError'>"


def _exception_chain(exc: BaseException | None):
    """`exc`, its causes and contexts, and the per-rank failures of torch's CheckpointException among them."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        # torch's CheckpointException: {rank: (exception, stack)} of the ranks whose writes failed
        for failure in (getattr(exc, "failures", None) or {}).values():
            yield from _exception_chain(failure[0] if isinstance(failure, tuple) else failure)
        exc = exc.__cause__ or exc.__context__


def _disk_filled(exc: BaseException) -> bool:
    """Whether a failed save ran out of space: ENOSPC / EDQUOT anywhere in the exception chain, or the message
    of torch's zip writer after a short write (megatron's writer re-raises worker failures as text)."""
    return any(
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or any(sign in str(e) for sign in _DISK_FULL_SIGNS)
        for e in _exception_chain(exc)
    )


def _ran_out_of_space(exc: BaseException, free: int, need: int) -> bool:
    """A failed save is a full disk when its exceptions say so, or when a writer failed with an OSError whose
    errno megatron dropped (0.17+) and the checkpoint's file system has less free space than the save needs."""
    if _disk_filled(exc):
        return True
    return free < need and any(_WRITER_OS_ERROR_SIGN in str(e) for e in _exception_chain(exc))


def _save_strategy():
    """torch_dist, written fully in parallel over data-parallel replicas (each writes a share of the shards)."""
    strategy = get_default_save_sharded_strategy("torch_dist")
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if torch.distributed.get_world_size(group) > 1:
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def _write_json(path: Path, payload: Mapping) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def _agreed_temp_dir(final: Path) -> Path:
    """A fresh sibling `<final>.tmp-<uuid>` with its sub-folders, the same on every rank, made by rank 0."""
    token = [uuid.uuid4().hex if _rank() == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    tmp = final.with_name(f"{final.name}.tmp-{token[0]}")
    if _rank() == 0:
        for sub in ("model", "optimizer", "rng"):
            (tmp / sub).mkdir(parents=True)
    torch.distributed.barrier()
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Rank 0: mark `tmp` complete and rename it to `final` (an older `final` is moved aside, then removed)."""
    write_text_atomic(tmp / COMPLETE_MARKER, "ok\n")
    publish_dir(tmp, final)


def _rng_states() -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    states: dict = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _restore_rng(states: Mapping) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    get_cuda_rng_tracker().set_states(dict(states["tracker"]))


def _write_side_files(tmp: Path, hf_config: Mapping | None, tokenizer_dir: str | Path | None) -> None:
    """Rank 0: the HF config and tokenizer files, so a checkpoint exports on its own."""
    if hf_config is not None:
        _write_json(tmp / "config.json", hf_config)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copy2(source, tmp / name)


def _save(
    directory: str | Path,
    model_chunks: list[torch.nn.Module],
    step: int,
    optimizer=None,
    scheduler=None,
    extra_common: Mapping | None = None,
    hf_config: Mapping | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    final = Path(directory).absolute()
    model_sd = model_sharded_state_dict(model_chunks)
    optim_sd = None
    if optimizer is not None:
        optim_sd = optimizer.sharded_state_dict(model_sharded_state_dict(model_chunks))
        optim_sd = {"optimizer": optim_sd, "lr_scheduler": scheduler.state_dict(), **(extra_common or {})}
    need = _check_disk(final, model_sd, optim_sd)
    tmp = _agreed_temp_dir(final)
    _shield_writer_manager()
    try:
        with writer_watchdog(str(final)):
            dist_checkpointing.save(model_sd, str(tmp / "model"), sharded_strategy=_save_strategy())
        if optim_sd is not None:
            with writer_watchdog(str(final)):
                dist_checkpointing.save(optim_sd, str(tmp / "optimizer"), sharded_strategy=_save_strategy())
        torch.save(_rng_states(), tmp / "rng" / f"rank_{_rank()}.pt")
        if _rank() == 0:
            _write_side_files(tmp, hf_config, tokenizer_dir)
            _write_json(tmp / "metadata.json", asdict(_layout(step, optimizer is not None)))
    except BaseException as e:
        # torch's CheckpointException (what megatron raises for a failed write) derives from BaseException
        failed = not isinstance(e, (KeyboardInterrupt, SystemExit))
        try:
            free = _free_bytes(tmp) if failed else 0
        except OSError:  # cannot tell: never hide the save's own error behind this one
            free = need
        filled = failed and _ran_out_of_space(e, free, need)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # earlier checkpoints were never touched
        if filled:
            raise CheckpointDiskFull(
                errno.ENOSPC,
                f"a write fell short while saving checkpoint {final}: the disk is full or over quota ({_gib(free)} "
                f"free now, about {_gib(need)} needed); the partial write was removed, earlier checkpoints are untouched",
            ) from e
        raise
    torch.distributed.barrier()
    if _rank() == 0:
        _publish(tmp, final)
    torch.distributed.barrier()
    return final


def save_checkpoint(
    policy,
    directory: str | Path,
    *,
    step: int,
    hf_config: Mapping | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Save a MegatronPolicy's model, optimizer, lr schedule, skip count and RNG states (collective)."""
    return _save(
        directory,
        policy.model_chunks,
        step,
        optimizer=policy.optimizer,
        scheduler=policy.scheduler,
        extra_common={"skipped_total": policy.skipped_total},
        hf_config=hf_config,
        tokenizer_dir=tokenizer_dir,
    )


def save_model_checkpoint(
    model_chunks: list[torch.nn.Module],
    directory: str | Path,
    *,
    step: int = 0,
    hf_config: Mapping | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Save model weights only (e.g. an imported HF model), in the same layout as `save_checkpoint`."""
    return _save(directory, model_chunks, step, hf_config=hf_config, tokenizer_dir=tokenizer_dir)


def read_metadata(directory: str | Path) -> CheckpointMetadata:
    """The metadata of a complete checkpoint; raises FileNotFoundError naming the directory otherwise."""
    directory = Path(directory)
    if not is_complete(directory):
        raise FileNotFoundError(f"{directory}: not a complete checkpoint (no '{COMPLETE_MARKER}' marker)")
    return CheckpointMetadata(**json.loads((directory / "metadata.json").read_text()))


def load_model_checkpoint(model_chunks: list[torch.nn.Module], directory: str | Path) -> CheckpointMetadata:
    """Load model weights into this rank's chunks, whatever TP / PP layout the checkpoint was saved at."""
    directory = Path(directory)
    meta = read_metadata(directory)
    loaded = dist_checkpointing.load(model_sharded_state_dict(model_chunks), str(directory / "model"))
    for i, chunk in enumerate(model_chunks):
        result = _bare(chunk).load_state_dict(loaded[f"chunk{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]  # TE's FP8 metadata
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{directory / 'model'}: chunk {i} is missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
    return meta


def _same_layout(meta: CheckpointMetadata) -> bool:
    now = _layout(meta.step, meta.has_optimizer)
    keys = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline", "data_parallel", "world_size")
    return all(getattr(now, k) == getattr(meta, k) for k in keys)


def load_checkpoint(
    policy, directory: str | Path, *, load_optimizer: bool = True, load_rng: bool = True
) -> CheckpointMetadata:
    """Restore a MegatronPolicy from `directory` (collective).

    Model weights load at any TP / PP layout. Optimizer state (Adam moments, step, and fp32 master weights
    under bf16) is stored per parameter shard, so it reshards with the model; the lr schedule and skip count
    are global. RNG states are per rank and restored only at the same layout (`rng_restored` says which).
    Without optimizer state, the optimizer's master weights are refreshed from the loaded model.
    """
    directory = Path(directory)
    meta = load_model_checkpoint(policy.model_chunks, directory)
    if load_optimizer and meta.has_optimizer:
        optim_sd = policy.optimizer.sharded_state_dict(
            model_sharded_state_dict(policy.model_chunks), is_loading=True
        )
        template = {"optimizer": optim_sd, "lr_scheduler": None, "skipped_total": None}
        loaded = dist_checkpointing.load(template, str(directory / "optimizer"))
        policy.optimizer.load_state_dict(loaded["optimizer"])
        policy.scheduler.load_state_dict(loaded["lr_scheduler"])
        policy.skipped_total = int(loaded["skipped_total"])
        meta.optimizer_restored = True
    else:
        policy.optimizer.reload_model_params()
    rng_file = directory / "rng" / f"rank_{_rank()}.pt"
    if load_rng and _same_layout(meta) and rng_file.is_file():
        _restore_rng(torch.load(rng_file, weights_only=True))
        meta.rng_restored = True
    return meta


def load_hf_checkpoint(
    model_chunks: list[torch.nn.Module], folder: str | Path, hf_config: Mapping, model_cfg
) -> None:
    """Copy an HF safetensors folder into this rank's chunks, reading only the tensors of its shard."""
    from questa_nemo.model.hf_io import HFCheckpoint
    from questa_nemo.model.megatron import load_hf_weights

    tensors = HFCheckpoint(folder)
    for vp_stage, chunk in enumerate(model_chunks):
        load_hf_weights(
            _bare(chunk), tensors, hf_config, model_cfg, vp_stage=vp_stage if len(model_chunks) > 1 else None
        )
