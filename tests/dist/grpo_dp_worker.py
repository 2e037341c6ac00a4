"""torchrun worker: GRPO at DP=2 (or DP=1 with one process) on CPU with dynamic filtering, through
train/loop.py's `fit` (resume, checkpoints, metrics) and model/parallel.py's collectives, under the NCCL-strict
guard.

The task is the learnable one of tests/test_train.py (reward 1 when the first generated token id is even), with
4 samples per group, so that groups are often all right or all wrong: filtering drops them and ranks refill
unequally. Launched by tests/test_train.py and tests/test_dp_parity.py as
    torchrun --standalone --nproc-per-node 2 tests/dist/grpo_dp_worker.py RUN_DIR STEPS [key=value ...]
Resumes from RUN_DIR's newest checkpoint like `questa-nemo train`. Each rank writes its prompt-stream
position and a draw of its Python / numpy / torch generators (seeded per rank at the start) to
RUN_DIR/cursor_rank<r>.json at the end, every completion it scored (prompt id -> the group's token texts) to
RUN_DIR/samples_rank<r>.json, and rank 0 the final weights to RUN_DIR/weights.pt.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from questa_nemo.ckpt.load import load_chunks
from questa_nemo.config import load_config, read_hf_config
from questa_nemo.model.parallel import destroy_distributed, init_distributed, loop_collectives
from questa_nemo.model.policy import MegatronPolicy
from questa_nemo.reward.types import RewardResult
from questa_nemo.rollout import RolloutContext, build_backend
from questa_nemo.train.loop import fit
from questa_nemo.train.prompts import PromptRow, PromptSource
from questa_nemo.reward.types import Done


def main() -> None:
    run_dir, steps, extra = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    cfg = load_config("default", [
        "optim.lr=1e-2", "rollout.max_new_tokens=4", "rollout.n_samples=4", "train.prompts_per_step=8",
        "algo.advantage=reference", "algo.adv_norm=true", "algo.filter_enabled=true", "algo.max_prompt_batches=4",
        f"train.steps={steps}", "train.recovery_every=2", "train.save_every=100", "train.progress_bar=false", "train.log_tensorboard=false", "train.eval_every=0",
        *extra,
    ])  # fmt: skip
    hf = read_hf_config(cfg.model.hf_config)
    info = init_distributed(cfg.model)
    assert info.dp_size == info.world_size, info
    # per-rank Python / numpy / torch CPU generators: a resumed rank must get its own states back
    random.seed(100 + info.rank)
    np.random.seed(100 + info.rank)
    torch.manual_seed(100 + info.rank)
    try:
        policy = MegatronPolicy(load_chunks(cfg.model, hf, None), cfg.model, cfg.optim, steps, 4096, hf["vocab_size"])
        ctx = RolloutContext(policy.modules, hf["vocab_size"], hf)
        if cfg.rollout.max_staleness > 0:
            from questa_nemo.rollout.snapshot import build_async_backend

            backend = build_async_backend(cfg.rollout, ctx)
        else:
            backend = build_backend(cfg.rollout, ctx)
        g = torch.Generator().manual_seed(0)
        rows = [PromptRow(str(i), torch.randint(3, 100, (12,), generator=g).tolist(), "", False, {}) for i in range(64)]
        source = PromptSource(rows, seed=1)

        samples: dict[str, list[str]] = {}

        def even_first(texts, prompt_rows):
            for text, row in zip(texts, prompt_rows):
                samples.setdefault(row.id, []).append(text)
            even = [int(t.split()[0]) % 2 == 0 for t in texts]
            return Done([RewardResult(float(e), "correct" if e else "wrong") for e in even])

        def decode(ids):
            return " ".join(map(str, ids))

        status = fit(cfg, run_dir, policy, backend, source, even_first, decode, (), None,
                     dp_rank=info.dp_rank, dp_size=info.dp_size, comm=loop_collectives(cfg.rollout.max_staleness > 0),
                     is_main=info.rank == 0, hf_config=hf)
        assert status == 0, status
        draws = {"python": random.random(), "numpy": float(np.random.random()), "torch": float(torch.rand(()))}
        (run_dir / f"cursor_rank{info.rank}.json").write_text(json.dumps({**source.state_dict(), "rng": draws}))
        (run_dir / f"samples_rank{info.rank}.json").write_text(json.dumps(samples))
        if info.rank == 0:
            torch.save({k: v.detach().clone() for k, v in policy.modules[0].named_parameters()}, run_dir / "weights.pt")
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
