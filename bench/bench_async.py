"""Synchronous vs asynchronous rollouts, side by side in one process: GRPO steps of the 1.5B-shaped policy
(random weights, bf16) on one GPU, first with SyncRollouts on the colocated engine, then with AsyncRollouts
(rollout.max_staleness = K) on the snapshot engine, same prompts, same settings.

The async mode overlaps the next steps' generation (a producer thread, its own weight copy) with the current
step's training on the same GPU; what it buys depends on how much of each phase leaves the GPU idle. Per mode
the JSON has every step's wall time and phase breakdown (time/rollout_s is how long the trainer WAITED for
rollouts: near 0 when the producer keeps ahead), the staleness the trainer saw, and the mean step time over
the steps after the first (warm-up, graph capture). A mode that fails (e.g. CUDA graph capture on the producer
thread while the trainer runs) records its error instead of stopping the other.

    python bench/bench_async.py --out bench/results/async.json                          # GPU, ~5 minutes
    python bench/bench_async.py --device cpu --tiny --steps 3 --out /tmp/async.json     # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grpo_step import build_policy, decode, make_config, pseudo_reward  # noqa: E402
from shapes import QWEN25_1P5B, TINY_QWEN2, add_grpo_step_arguments, write_result  # noqa: E402

from questa_nemo.train.metrics import PhaseTimer  # noqa: E402
from questa_nemo.train.prompts import PromptRow, PromptSource  # noqa: E402


def run_mode(args, shape: dict, hf_path: str, max_staleness: int) -> dict:
    """`args.steps` GRPO steps of a fresh policy; max_staleness 0 = SyncRollouts on the in-place engine."""
    from questa_nemo.rollout import RolloutContext, build_backend
    from questa_nemo.rollout.snapshot import build_async_backend
    from questa_nemo.train.async_rollouts import AsyncRollouts
    from questa_nemo.train.grpo import SyncRollouts, grpo_step

    cfg = make_config(args, hf_path)
    cfg.rollout.cuda_graphs = cfg.rollout.cuda_graphs and not args.no_cuda_graphs
    cfg.rollout.max_staleness = max_staleness
    vocab = shape["vocab_size"]
    torch.manual_seed(0)
    policy = build_policy(cfg, shape, args.steps)
    g = torch.Generator().manual_seed(0)
    rows = [
        PromptRow(str(i), torch.randint(10, vocab, (args.prompt_tokens,), generator=g).tolist(), "", True, {})
        for i in range(args.prompts * args.steps)
    ]
    source = PromptSource(rows, seed=1)
    if max_staleness > 0:
        backend = build_async_backend(cfg.rollout, RolloutContext(policy.modules, vocab))
        rollouts = AsyncRollouts(cfg, source, backend, pseudo_reward, decode, ())
    else:
        backend = build_backend(cfg.rollout, RolloutContext(policy.modules, vocab))
        rollouts = SyncRollouts(cfg, source, backend, pseudo_reward, decode, ())
    steps = []
    try:
        for step in range(1, args.steps + 1):
            timer = PhaseTimer()
            start = time.perf_counter()
            metrics, data = grpo_step(cfg, step, policy, backend, rollouts, timer)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            record = {"step": step, "seconds": time.perf_counter() - start, **timer.pop()}
            record["generated_tokens"] = int(data.completion_lengths.sum())
            record["staleness_max"] = metrics.get("rollout/staleness_max")
            record["behave_kl"] = metrics.get("actor/behave_kl")
            record["capped_fraction"] = metrics.get("actor/capped_fraction")
            steps.append(record)
            print(json.dumps({"max_staleness": max_staleness, **record}), flush=True)
    finally:
        if max_staleness > 0:
            rollouts.close()
    timed = [s["seconds"] for s in steps[1:]] or [s["seconds"] for s in steps]
    return {
        "max_staleness": max_staleness,
        "mean_step_s_after_first": sum(timed) / len(timed),
        "steps": steps,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grpo_step_arguments(p, new_tokens=1024, steps=6)
    p.add_argument(
        "--staleness", type=int, nargs="+", default=[1, 4], help="async bounds to compare with sync"
    )
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly in every mode")
    p.add_argument("--out", default="bench/results/async.json")
    args = p.parse_args()

    from questa_nemo.model.parallel import init_distributed

    shape = TINY_QWEN2 if args.tiny else QWEN25_1P5B
    tmp = Path(tempfile.mkdtemp())
    (tmp / "config.json").write_text(json.dumps(shape))
    init_distributed(make_config(args, str(tmp / "config.json")).model)
    modes = []
    for k in [0, *args.staleness]:
        try:
            modes.append(run_mode(args, shape, str(tmp / "config.json"), k))
        except Exception as error:  # noqa: BLE001 - recorded in the result; the other modes still run
            traceback.print_exc()
            modes.append({"max_staleness": k, "error": repr(error)})
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    sync = modes[0].get("mean_step_s_after_first")
    for m in modes[1:]:
        if sync and "mean_step_s_after_first" in m:
            m["speedup_vs_sync"] = sync / m["mean_step_s_after_first"]
    write_result(args.out, "async_rollouts", args.tiny, vars(args), modes=modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
