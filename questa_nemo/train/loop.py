"""The GRPO run around the step: resume, per-step logging and progress bar, periodic evaluation, atomic
checkpoints, preemption. Kept generic: algorithm variants live in algo/ and grpo.py, never here."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from questa_nemo.atomic import write_text_atomic
from questa_nemo.ckpt.runs import STATE_FILE, check_disk_headroom, checkpoint_dirs, latest_checkpoint
from questa_nemo.config import Config
from questa_nemo.model.parallel import LoopCollectives, barrier
from questa_nemo.train.async_rollouts import AsyncRollouts
from questa_nemo.train.grpo import SyncRollouts, grpo_step
from questa_nemo.train.hints import HintRuntime
from questa_nemo.train.metrics import MetricsLogger, PhaseTimer, SampleLogger
from questa_nemo.train.preempt import EXIT_PREEMPTED, PreemptionFlag
from questa_nemo.train.prompts import HintPrompts, PromptSource


@dataclass
class RunState:
    """Everything besides model and optimizer that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps done
    version: int = 0  # policy version the rollout engine holds
    source: dict | None = None  # PromptSource position (epoch, cursor): the same on every DP rank
    # Rank 0's RNG states, as older run_state.json files hold them (read when rng/run_rank_<r>.json is absent).
    python_rng: list | None = None
    numpy_rng: dict | None = None
    torch_rng: list[int] | None = None  # torch.get_rng_state() as a list of bytes (JSON, no pickle)
    world_size: int | None = None  # processes that wrote rng/run_rank_<r>.json, one each
    hint_levels: dict | None = None  # algo/hint_levels.py HintLevels.state_dict(): per-problem hint levels
    token_budget: dict | None = None  # TokenBudget.state_dict(): generated tokens so far (train.token_budget)


@dataclass
class RankRng:
    """One rank's Python / numpy / torch CPU generator states (rng/run_rank_<r>.json in a checkpoint)."""

    python_rng: list
    numpy_rng: dict
    torch_rng: list[int]


def capture_rng() -> RankRng:
    return RankRng(
        python_rng=[list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        numpy_rng=_jsonable_numpy_state(np.random.get_state(legacy=False)),
        torch_rng=torch.get_rng_state().tolist(),
    )


def restore_rng(state: RunState | RankRng) -> None:
    if state.python_rng is not None:
        version, internal, gauss = state.python_rng
        random.setstate((version, tuple(internal), gauss))
    if state.numpy_rng is not None:
        np.random.set_state(state.numpy_rng)
    if state.torch_rng is not None:
        torch.set_rng_state(torch.tensor(state.torch_rng, dtype=torch.uint8))


def _jsonable_numpy_state(state: dict) -> dict:
    return json.loads(json.dumps(state, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))


class Checkpointer:
    """Full checkpoints (model + optimizer + RunState) every `save_every` steps, kept; recovery checkpoints every
    `recovery_every` steps, each replacing the previous recovery one. Written via model/checkpoint.py, which
    writes to a temporary folder and renames it, so a crash mid-write leaves the previous checkpoint usable."""

    def __init__(self, run_dir: Path, policy, save_every: int, recovery_every: int, keep: int, hf_config: dict,
                 tokenizer_dir: str | None, is_main: bool, comm: LoopCollectives | None = None):
        self.run_dir, self.policy = run_dir, policy
        self.rank, self.world_size = (comm.world.rank, comm.world.size) if comm is not None else (0, 1)
        self.hf_config, self.tokenizer_dir, self.is_main = hf_config, tokenizer_dir, is_main
        self.save_every, self.recovery_every, self.keep = save_every, recovery_every, keep

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.save_every == 0 or step % self.recovery_every == 0

    def save(self, state: RunState) -> Path:
        """Model + optimizer via model/checkpoint.py (atomic), then every rank's RNG states
        (rng/run_rank_<r>.json), then run_state.json (atomic rename, after a barrier): a checkpoint without
        run_state.json is not listed, so a crash between them loses nothing."""
        from questa_nemo.model.checkpoint import save_checkpoint

        path = self.run_dir / "checkpoints" / f"step_{state.step}"
        rng = capture_rng()
        state.python_rng, state.numpy_rng, state.torch_rng = rng.python_rng, rng.numpy_rng, rng.torch_rng
        state.world_size = self.world_size
        save_checkpoint(self.policy, path, step=state.step, hf_config=self.hf_config, tokenizer_dir=self.tokenizer_dir)
        write_text_atomic(path / "rng" / f"run_rank_{self.rank}.json", json.dumps(asdict(rng)))
        barrier()
        if self.is_main:
            write_text_atomic(path / STATE_FILE, json.dumps(asdict(state)))
        barrier()
        self._prune(state.step)
        warning = check_disk_headroom(path, self.run_dir) if self.is_main else None
        if warning:
            print(warning, flush=True)
        return path

    def _prune(self, newest: int) -> None:
        """Drop recovery-only checkpoints older than the newest, and permanent ones beyond `keep`."""
        permanent = [s for s, _ in checkpoint_dirs(self.run_dir) if s % self.save_every == 0]
        keep = set(permanent[-self.keep :]) | {newest}
        if not self.is_main:
            return
        for step, path in checkpoint_dirs(self.run_dir):
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path) -> RunState:
        from questa_nemo.model.checkpoint import load_checkpoint

        load_checkpoint(self.policy, path)
        state = RunState(**json.loads((path / STATE_FILE).read_text()))
        mine = path / "rng" / f"run_rank_{self.rank}.json"
        if mine.is_file() and state.world_size == self.world_size:  # each rank from its own states
            restore_rng(RankRng(**json.loads(mine.read_text())))
        elif state.world_size is None and self.world_size == 1:  # an older checkpoint of one process
            restore_rng(state)
        return state


def memory_metrics() -> dict[str, float]:
    """The step's memory: the peak and what is held now, on the GPU and in host RAM. The peaks answer "does it
    fit"; the current values answer "does it grow" (a leak over a three-day run shows as a rising line long
    before the peak moves)."""
    import resource

    import psutil

    out = {
        "perf/cpu_rss_gib": psutil.Process().memory_info().rss / 2**30,
        "perf/cpu_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }
    if torch.cuda.is_available():
        out["perf/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["perf/gpu_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
        out["perf/gpu_reserved_gib"] = torch.cuda.memory_reserved() / 2**30
    return out


def fit(
    cfg: Config,
    run_dir: Path,
    policy,
    backend,
    source: PromptSource,
    scorer,
    decode: Callable[[list[int]], str],
    stop_token_ids: tuple[int, ...],
    evaluate: Callable[[int], dict[str, float]] | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
    comm: LoopCollectives | None = None,
    is_main: bool = True,
    hf_config: dict | None = None,
    tokenizer_dir: str | None = None,
    preempt: PreemptionFlag | None = None,
    hint_prompts: HintPrompts | None = None,
    hints: HintRuntime | None = None,
) -> int:
    """Train `cfg.train.steps` GRPO steps into run_dir, resuming from its newest checkpoint. Returns 0 when
    done, EXIT_PREEMPTED after a preemption signal (checkpoint written). `comm`: the collectives over the DP
    group and the world (model/parallel.py `loop_collectives`; None for one process). `hint_prompts`: the
    algo.hints.splits tokenised (train/prompts.py load_hint_prompts). The run also stops once the rollouts have
    generated train.token_budget tokens. `hints`: the hint state to use (built from cfg and hint_prompts when
    None); the caller may read its levels and budget afterwards."""
    from tqdm import tqdm

    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    comm = comm or LoopCollectives()
    ckpt = Checkpointer(run_dir, policy, t.save_every, t.recovery_every, t.keep_checkpoints, hf_config, tokenizer_dir,
                        is_main, comm)
    state = RunState()
    hints = hints or HintRuntime.from_config(cfg, hint_prompts)
    hints.check_rows(source.rows, cfg.train.dataset or "train.dataset")
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        state = ckpt.load(latest)
        source.load_state_dict(state.source)
        hints.load_state_dict(state.hint_levels, state.token_budget)
        backend.update_weights(state.version)
        print(f"[questa-nemo] resumed {run_dir} at step {state.step}", flush=True)
    logger = MetricsLogger(run_dir, cfg.train.log_tensorboard and is_main, resume_step=state.step) if is_main else None
    samples = SampleLogger(run_dir, t.log_samples, resume_step=state.step) if is_main and t.log_samples else None
    own_flag = preempt is None
    preempt = preempt or PreemptionFlag()
    bar = tqdm(
        total=cfg.train.steps, initial=state.step, desc=run_dir.name, disable=not (cfg.train.progress_bar and is_main),
        dynamic_ncols=True,
    )
    if cfg.rollout.max_staleness > 0:  # async mode: a producer thread samples ahead (train/async_rollouts.py)
        rollouts = AsyncRollouts(cfg, source, backend, scorer, decode, stop_token_ids, state.step + 1, dp_rank,
                                 dp_size, comm.rollouts, hints)
    else:
        rollouts = SyncRollouts(cfg, source, backend, scorer, decode, stop_token_ids, dp_rank, dp_size,
                                comm.rollouts, hints)
    try:
        while state.step < cfg.train.steps and not hints.exhausted(state.step):
            step = state.step + 1
            timer = PhaseTimer()
            start = time.perf_counter()
            metrics, data = grpo_step(cfg, step, policy, backend, rollouts, timer, comm.dp)
            seconds = timer.pop()
            metrics.update(seconds)
            generated = float(data.completion_lengths.sum()) if data.sequences else 0.0
            trained = float(sum(len(s) for s in data.sequences))
            metrics["perf/rollout_tokens_per_s"] = generated / max(seconds.get("time/rollout_s", 0.0), 1e-9)
            metrics["perf/train_tokens_per_s"] = trained / max(seconds.get("time/train_s", 0.0), 1e-9)
            if evaluate is not None and cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0:
                with timer("eval"):
                    metrics.update(evaluate(step))
                metrics.update(timer.pop())
            metrics["time/step_s"] = time.perf_counter() - start
            metrics.update(memory_metrics())
            if not math.isfinite(metrics.get("actor/loss", 0.0)):
                print(f"[questa-nemo] step {step}: non-finite loss, update skipped", flush=True)

            state.step, state.version, state.source = step, backend.version, rollouts.source_state()
            state.hint_levels, state.token_budget = hints.state_dict(step)
            if logger is not None:
                logger.log(step, metrics)
            if samples is not None:
                samples.log(step, data.groups, decode)
            bar.update(1)
            bar.set_postfix(
                success=f"{metrics.get('reward/success', math.nan):.3f}",
                loss=f"{metrics.get('actor/loss', math.nan):.4f}",
            )
            last = step == cfg.train.steps or hints.exhausted(step)  # the token budget is spent
            preempted = preempt.agreed(comm.world)
            if ckpt.due(step, last) or preempted:
                ckpt.save(state)
                # signalled during the save: this step's checkpoint is written
                preempted = preempted or preempt.agreed()
            if preempted and not last:
                print(f"[questa-nemo] {preempt.signal_name}: checkpoint at step {step} written; exiting for requeue",
                      flush=True)
                return EXIT_PREEMPTED
    finally:
        if isinstance(rollouts, AsyncRollouts):  # stop the producer thread
            rollouts.close()
        bar.close()
        if own_flag:
            preempt.restore()
        if logger is not None:
            logger.close()
    if is_main:
        (run_dir / "DONE").write_text(json.dumps({"step": state.step}) + "\n")
    return 0
