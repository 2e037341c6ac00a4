"""Shared by tests/test_grpo_parallel.py and bench/multi_gpu.py: `questa-nemo train` runs of the tiny world
model (4 layers, so PP=2 splits it) launched through tests/dist/launch.py, and what their comparison reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from launch import REPO, torchrun

STEPS = 3
COMMON = [
    f"train.steps={STEPS}",
    "train.arms={hint: ${world.output_dir}/rl/p50}",
    "train.prompts_per_step=8",
    "rollout.n_samples=4",
    "algo.filter_enabled=true",  # drop all-right / all-wrong groups, refilled from further prompt batches
    "algo.max_prompt_batches=3",
    "train.save_every=100",
    "train.eval_every=2",
    "train.validation_problems=8",
    "train.validation_samples=2",
    "train.final_eval=false",
    "train.progress_bar=false",
    "train.log_tensorboard=false",
    "world.rl_problems=64",
    "world.eval_problems=16",
    "world.warmup_examples=512",
    "world.calib_problems_per_length=2",
    # Answers mod 10, not 100: after 80 warm-up steps the 4-layer model has the format but not the arithmetic,
    # so its rewards are near chance. Mod 100 that is ~1% a sample, and whether any group came out mixed
    # depended on the machine's float rounding (an AVX2 CPU drew no correct sample in 3 steps, all 32 groups
    # dropped each step); mod 10 gave 7-8 kept groups of 8 every step there.
    "world.modulus=10",
]
# the reference's supervised warm-up: enough that some groups are neither all right nor all wrong
WARMUP = ["train.warmup.steps=80", "train.warmup.lr=5e-3", "train.warmup.stop_at_pass1=null"]
# per-step metrics that must agree: rollouts, rewards, filtering, validation exactly; the update within 1e-4
EXACT = ("reward/", "filter/", "rollout/length", "rollout/truncated", "eval/")
CLOSE = ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/clip_fraction")


def world_model_config(folder: Path) -> Path:
    """The embedded default's model with 4 layers instead of 3."""
    hf = json.loads((REPO / "data" / "world" / "config.json").read_text())
    hf["num_hidden_layers"] = 4
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf))
    return folder / "config.json"


def train(run_dir: Path, data: Path, hf_config: Path, *extra: str, nproc: int = 2) -> list[dict]:
    torchrun("grpo_worker.py", f"train.run_dir={run_dir}", f"world.output_dir={data}", f"model.hf_config={hf_config}",
             *COMMON, *extra, nproc=nproc, timeout=600)
    return [json.loads(line) for line in (run_dir / "hint" / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path, hf_config: Path) -> dict[str, torch.Tensor]:
    """The run's last checkpoint, loaded at TP = PP = 1 in this process, as HF tensors."""
    from questa_nemo.ckpt.load import load_chunks
    from questa_nemo.ckpt.runs import latest_checkpoint
    from questa_nemo.config import ModelConfig, read_hf_config
    from questa_nemo.model.gather import gather_hf_weights
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    cfg = ModelConfig(params_dtype="fp32", attention="sdpa", recompute="none")
    hf = read_hf_config(hf_config)
    init_distributed(cfg)
    try:
        chunks = load_chunks(cfg, hf, str(latest_checkpoint(run_dir / "hint")))
        return gather_hf_weights(chunks, hf)
    finally:
        destroy_distributed()


