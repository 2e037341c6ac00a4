"""GRPO steps of the 1.5B-shaped policy (random weights, bf16) on one GPU, with the per-phase time breakdown.

Everything runs through the trainer's own code (train/grpo.py: rollout on the colocated megatron engine,
reward, advantages, packing, proximal log-prob recompute, decoupled PPO loss, optimizer step, weight update);
only the prompts are random token ids and the reward is a fixed pseudo-random function of the completion
(a random-weight model never answers a math problem), so advantages are non-zero and the update is real.

    python bench/bench_grpo_step.py --out bench/results/grpo_step.json            # GPU, ~2 minutes
    python bench/bench_grpo_step.py --device cpu --tiny --out /tmp/grpo.json     # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import QWEN25_1P5B, TINY_QWEN2, add_grpo_step_arguments, write_result  # noqa: E402

from questa_nemo.config import Config  # noqa: E402
from questa_nemo.reward.types import Done, RewardResult  # noqa: E402
from questa_nemo.train.metrics import PhaseTimer  # noqa: E402
from questa_nemo.train.prompts import PromptRow, PromptSource  # noqa: E402


def make_config(args, hf_path: str) -> Config:
    cfg = Config()
    cfg.model.hf_config = hf_path
    cfg.model.params_dtype = "fp32" if args.device == "cpu" else "bf16"
    cfg.model.attention = "sdpa"
    cfg.model.recompute = args.recompute
    cfg.rollout.n_samples = args.samples
    cfg.rollout.max_new_tokens = args.new_tokens
    cfg.rollout.max_prompt_tokens = args.prompt_tokens
    cfg.rollout.max_batch_sequences = args.prompts * args.samples
    cfg.rollout.cuda_graphs = args.device != "cpu"
    cfg.algo.filter_enabled = False
    cfg.train.prompts_per_step = args.prompts
    cfg.train.micro_batch_tokens = args.micro_batch_tokens
    cfg.optim.distributed = True
    return cfg


def pseudo_reward(texts: list[str], rows: list[PromptRow]) -> Done:
    """1 for about half the completions, decided by their content: deterministic, non-degenerate groups."""
    return Done([RewardResult(float(hash(t) % 2), "correct" if hash(t) % 2 else "wrong") for t in texts])


def decode(ids: list[int]) -> str:
    """Token ids as text: the pseudo reward only needs distinct completions to read distinctly."""
    return " ".join(map(str, ids))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grpo_step_arguments(p, new_tokens=512, steps=3)
    p.add_argument("--out", default="bench/results/grpo_step.json")
    args = p.parse_args()

    from questa_nemo.ckpt.load import load_chunks
    from questa_nemo.model.parallel import init_distributed
    from questa_nemo.model.policy import MegatronPolicy
    from questa_nemo.rollout import RolloutContext, build_backend
    from questa_nemo.train.grpo import SyncRollouts, grpo_step

    shape = TINY_QWEN2 if args.tiny else QWEN25_1P5B
    tmp = Path(tempfile.mkdtemp())
    (tmp / "config.json").write_text(json.dumps(shape))
    cfg = make_config(args, str(tmp / "config.json"))
    init_distributed(cfg.model)
    vocab = shape["vocab_size"]
    policy = MegatronPolicy(
        load_chunks(cfg.model, shape, None),
        cfg.model,
        cfg.optim,
        args.steps,
        cfg.train.micro_batch_tokens,
        vocab,
    )
    backend = build_backend(cfg.rollout, RolloutContext(policy.modules, vocab))
    g = torch.Generator().manual_seed(0)
    rows = [
        PromptRow(
            str(i),
            torch.randint(10, vocab, (args.prompt_tokens,), generator=g).tolist(),
            "\\boxed{1}",
            True,
            {},
        )
        for i in range(args.prompts * args.steps)
    ]
    source = PromptSource(rows, seed=1)

    rollouts = SyncRollouts(cfg, source, backend, pseudo_reward, decode, ())
    records = []
    for step in range(1, args.steps + 1):
        timer = PhaseTimer()
        start = time.perf_counter()
        metrics, data = grpo_step(cfg, step, policy, backend, rollouts, timer)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = timer.pop()
        record = {
            "step": step,
            "seconds": time.perf_counter() - start,
            **seconds,
            "generated_tokens": int(data.completion_lengths.sum()),
            "trained_tokens": int(sum(len(s) for s in data.sequences)),
            "loss": metrics.get("actor/loss"),
            "grad_norm": metrics.get("actor/grad_norm"),
            "behave_kl": metrics.get("actor/behave_kl"),
        }
        record["rollout_tokens_per_s"] = record["generated_tokens"] / seconds["time/rollout_s"]
        record["train_tokens_per_s"] = record["trained_tokens"] / seconds["time/train_s"]
        records.append(record)
        print(json.dumps(record), flush=True)
    write_result(args.out, "grpo_step", args.tiny, vars(args), steps=records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
