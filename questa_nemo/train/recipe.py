"""`questa-nemo train`: build the pieces a recipe names, then run its stages.

    [world data] -> [supervised warm-up] -> GRPO per arm (hint / no_hint / one run) -> final evaluation

Every stage resumes: finished stages are detected by their outputs (DONE markers, checkpoints) and skipped, so
rerunning the same command after a crash or a Slurm requeue continues where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from questa_nemo.ckpt.runs import latest_checkpoint
from questa_nemo.config import (
    Config,
    ConfigError,
    OptimConfig,
    load_config,
    read_hf_config,
    validate_model_shapes,
)
from questa_nemo.train.preempt import EXIT_PREEMPTED, PreemptionFlag

if TYPE_CHECKING:
    from questa_nemo.rollout import RolloutContext


@dataclass
class Session:
    """What every stage of a run shares: the parallel layout, the model's HF config and the tokenizer."""

    cfg: Config
    info: object  # model.parallel.ParallelInfo
    hf: dict
    tokenizer: object
    tokenizer_dir: str
    run_dir: Path

    @property
    def is_main(self) -> bool:
        return self.info.rank == 0

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary (config.json); megatron's padding rows past it are masked."""
        return int(self.hf["vocab_size"])

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.tokenizer.eos_token_id
        return (eos,) if eos is not None else ()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def model_source(cfg: Config) -> tuple[str, str]:
    """(config.json path, tokenizer folder) of the policy."""
    if not cfg.model.hf_config:
        raise ConfigError("model.hf_config", "the policy needs a Hugging Face config.json (or its folder)")
    hf_path = Path(cfg.model.hf_config)
    folder = hf_path if hf_path.is_dir() else hf_path.parent
    return str(hf_path), cfg.model.tokenizer or str(folder)


def open_session(cfg: Config) -> Session:
    from transformers import AutoTokenizer

    from questa_nemo.model.parallel import init_distributed

    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ and cfg.reward.kind != "world":
        # One intra-op thread on CPU beside the math reward's worker processes, unless asked otherwise: torch's
        # spinning thread pool on an oversubscribed 2-core machine ran a step 40x slower (10.6 s against
        # 0.27 s). The small world scores inline, so its runs keep every core (warm-up step 0.34 s on 2
        # threads against 0.49 s on 1, measured on a 2-core VM).
        torch.set_num_threads(1)
    hf_path, tokenizer_dir = model_source(cfg)
    hf = read_hf_config(hf_path)
    validate_model_shapes(cfg.model, hf)  # TP / PP against the heads and layers, before any process group
    info = init_distributed(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return Session(cfg, info, hf, tokenizer, tokenizer_dir, Path(cfg.train.run_dir))


def build_policy(s: Session, optim: OptimConfig, total_steps: int, init: str | None):
    """This rank's model chunks with `init`'s weights (an HF folder, .nemo, GGUF or one of our checkpoints;
    None = random), wrapped in a MegatronPolicy."""
    from questa_nemo.ckpt.load import load_chunks
    from questa_nemo.model.policy import MegatronPolicy

    chunks = load_chunks(s.cfg.model, s.hf, init)
    return MegatronPolicy(chunks, s.cfg.model, optim, total_steps, s.cfg.train.micro_batch_tokens, s.vocab_size)


def rollout_context(s: Session, chunks: list) -> RolloutContext:
    """What any rollout backend is built from, for this session's model held in `chunks`."""
    from questa_nemo.rollout import RolloutContext

    hf_path, _ = model_source(s.cfg)
    folder = Path(hf_path) if Path(hf_path).is_dir() else Path(hf_path).parent
    pad = s.tokenizer.pad_token_id if s.tokenizer.pad_token_id is not None else s.tokenizer.eos_token_id
    return RolloutContext(chunks, s.vocab_size, s.hf, str(folder), pad or 0)


def build_backend(s: Session, policy):
    """The rollout backend `rollout.backend` names, on the policy's live weights; in async mode one that may
    generate while the trainer steps (rollout/snapshot.py)."""
    ctx = rollout_context(s, policy.modules)
    if s.cfg.rollout.max_staleness > 0:
        from questa_nemo.rollout.snapshot import build_async_backend

        return build_async_backend(s.cfg.rollout, ctx)
    from questa_nemo.rollout import build_backend as build

    return build(s.cfg.rollout, ctx)


# ------------------------------------------------------------------------------------------ stages
def prepare_world(s: Session) -> None:
    """Write the small world's data under world.output_dir once (rank 0), others wait."""
    import datasets

    from questa_nemo.data.world import write_world
    from questa_nemo.model.parallel import barrier

    datasets.disable_progress_bars()
    out = Path(s.cfg.world.output_dir)
    if s.is_main and not (out / "warmup.jsonl").exists():
        s.log(f"[world] writing data sets under {out}")
        write_world(s.cfg.world, s.cfg.train.warmup.hint_fraction)
    barrier()


def warmup_stage(s: Session, scorer) -> Path:
    """Supervised warm-up into run_dir/warmup; returns its checkpoint (reused when already there). `scorer`
    judges the calibration samples of the stop by calibration."""
    from questa_nemo.eval.run import chat_prompt_ids
    from questa_nemo.model.checkpoint import save_checkpoint
    from questa_nemo.model.parallel import barrier
    from questa_nemo.train.validation import warmup_stopper
    from questa_nemo.train.warmup import run_warmup

    w = s.cfg.train.warmup
    out = s.run_dir / "warmup" / "checkpoint"
    if (out.parent / "warmup.json").exists():
        s.log(f"[warm-up] reusing {out}")
        return out
    examples = []
    source = Path(s.cfg.world.output_dir) / "warmup.jsonl"
    if not source.exists():
        raise FileNotFoundError(
            f"train.warmup.steps={w.steps}: no warm-up examples at {source} (train.build_world_data=true writes "
            "the small world's; `python -m questa_nemo.data.word_world` the word world's)"
        )
    with open(source) as f:
        for line in f:
            row = json.loads(line)
            prompt = chat_prompt_ids(s.tokenizer, row["prompt"], "{problem}")
            target = s.tokenizer.encode(row["completion"], add_special_tokens=False) + [s.tokenizer.eos_token_id]
            examples.append((prompt, target))
    optim = OptimConfig(**{**s.cfg.optim.__dict__, "lr": w.lr, "warmup_ratio": 0.0})
    policy = build_policy(s, optim, w.steps, s.cfg.model.checkpoint)
    checks: dict[int, dict[str, float]] = {}  # step -> hard pass@1 with and without hints (stop by calibration)
    stopper = warmup_stopper(s, policy, checks, scorer) if w.stop_at_pass1 is not None else None
    losses = run_warmup(policy, examples, w.steps, w.batch_size, s.cfg.train.seed, log=s.log,
                        warmup_done=stopper, check_every=stopper.rule.ask_every if stopper else w.check_every)
    kept = (stopper.kept_step if stopper else None) or len(losses)  # it may keep an earlier check's weights
    save_checkpoint(policy, out, step=kept, hf_config=s.hf, tokenizer_dir=s.tokenizer_dir)
    if s.is_main:  # written after the checkpoint: its presence marks the warm-up as done
        record = {"steps": len(losses), "kept_step": kept, "nll": losses, "pass1_checks": checks}
        (out.parent / "warmup.json").write_text(json.dumps(record) + "\n")
    barrier()
    return out


def grpo_stage(s: Session, arm: str, dataset: str, init: str | None, resources, preempt: PreemptionFlag) -> int:
    """GRPO on `dataset` from `init` into run_dir/<arm> (run_dir itself for a single run)."""
    from questa_nemo.model.parallel import loop_collectives
    from questa_nemo.train.loop import fit
    from questa_nemo.train.prompts import PromptSource, load_hint_prompts, read_rows, tokenize_rows
    from questa_nemo.train.scoring import make_train_scorer
    from questa_nemo.train.validation import make_validator

    cfg = s.cfg
    run_dir = s.run_dir / arm if arm else s.run_dir
    if (run_dir / "DONE").exists():
        s.log(f"[{arm or 'grpo'}] already done: {run_dir}")
        return 0
    rows, too_long = tokenize_rows(read_rows(dataset, cfg.train.split), s.tokenizer, cfg.rollout.max_prompt_tokens,
                                   dataset)
    if too_long:
        s.log(f"[{arm or 'grpo'}] {too_long} prompts longer than rollout.max_prompt_tokens skipped")
    source = PromptSource(rows, cfg.train.seed)
    hint_prompts = load_hint_prompts(cfg.algo.hints.splits, s.tokenizer, cfg.rollout.max_prompt_tokens,
                                     cfg.train.split) if cfg.algo.hints.splits else None
    policy = build_policy(s, cfg.optim, cfg.train.steps, init)
    backend = build_backend(s, policy)
    scorer = make_train_scorer(cfg.reward, resources)
    evaluate = make_validator(s, backend, resources)
    s.log(f"[{arm or 'grpo'}] {len(rows)} prompts from {dataset}; {cfg.train.steps} steps into {run_dir}")
    return fit(
        cfg, run_dir, policy, backend, source, scorer, s.decode, s.stop_token_ids, evaluate,
        dp_rank=s.info.dp_rank, dp_size=s.info.dp_size, comm=loop_collectives(cfg.rollout.max_staleness > 0),
        is_main=s.is_main,
        hf_config=s.hf, tokenizer_dir=s.tokenizer_dir, preempt=preempt, hint_prompts=hint_prompts,
    )


def initial_weights(s: Session) -> str | None:
    """Where GRPO starts: the warm-up, else the parent stage's final checkpoint, else model.checkpoint."""
    t = s.cfg.train
    if t.parent_stage:
        parent = latest_checkpoint(t.parent_stage)
        if parent is None or not (Path(t.parent_stage) / "DONE").exists():
            raise ConfigError("train.parent_stage", f"{t.parent_stage} has not finished (no DONE marker)")
        return str(parent)
    return s.cfg.model.checkpoint


def run(cfg: Config) -> int:
    """The stages in order; a preemption signal is honoured inside GRPO (checkpoint, then exit) and at every
    stage boundary (finished stages are already on disk)."""
    preempt = PreemptionFlag()
    try:
        return _run_stages(cfg, preempt)
    finally:
        preempt.restore()


def _run_stages(cfg: Config, preempt: PreemptionFlag) -> int:
    s = open_session(cfg)
    s.run_dir.mkdir(parents=True, exist_ok=True)
    if s.is_main:
        from omegaconf import OmegaConf

        from questa_nemo.atomic import write_text_atomic

        # atomic: a reader (a Slurm wrapper, tests/test_slurm.py) never sees it half written
        write_text_atomic(s.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if cfg.train.build_world_data:
        prepare_world(s)
    init = initial_weights(s)
    from questa_nemo.train.arms import plan_arms

    arms = plan_arms(cfg)  # every arm's config copy, validated before the warm-up spends any time
    for arm in arms:
        for note in arm.notes:
            s.log(f"[arms] {note}")
        if arm.skipped:
            s.log(f"[arms] {arm.name} skipped: {arm.skipped}")
    with contextlib.ExitStack() as resources:  # the math reward's worker pool, shared by every stage
        if cfg.train.warmup.steps > 0:
            from questa_nemo.train.validation import calibrate, eval_scorer

            scorer = eval_scorer(s, resources)
            init = str(warmup_stage(s, scorer))
            if preempt.agreed():  # e.g. SIGTERM during the warm-up or its save: the checkpoint is on disk
                return EXIT_PREEMPTED
            calibrate(s, init, scorer)
        for arm in arms:
            if preempt.agreed():
                return EXIT_PREEMPTED
            if arm.skipped:
                continue
            arm_session = copy.copy(s)  # the session's model, tokenizer and reward pool; the arm's config
            arm_session.cfg = arm.cfg
            status = grpo_stage(arm_session, arm.name, arm.dataset, init, resources, preempt)
            if status == EXIT_PREEMPTED:
                return status
        if preempt.agreed():
            return EXIT_PREEMPTED
        if cfg.train.final_eval and cfg.eval.benchmarks:
            from questa_nemo.train.report import final_report

            # the initial weights are evaluated by the run that trains every arm, or by one that trains none
            evaluate_init = cfg.train.run_arms is None or not cfg.train.run_arms
            final_report(s, init if evaluate_init else None, arms, resources)
    return 0


def main(config_name: str = "default", overrides: list[str] | None = None, positional=None) -> int:
    from questa_nemo.doctor import check_config
    from questa_nemo.model.parallel import cuda_allocator_defaults

    if positional:
        raise ConfigError("train", f"takes no positional arguments, got {positional}")
    cfg = load_config(config_name, overrides)
    cuda_allocator_defaults(cfg.rollout.backend)  # before anything (the checks below) starts CUDA
    problems = check_config(cfg)
    if problems:
        for p in problems:
            print(f"questa-nemo train: {p}", file=sys.stderr)
        return 2
    return run(cfg)
