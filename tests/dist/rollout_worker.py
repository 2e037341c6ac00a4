"""torchrun worker: rollouts of the tiny Qwen2 (policy_common.TINY_HF) at the given TP / PP, through the backend
registry, before and after one train step (so the refit is exercised too).

Launched by tests/test_rollout_parallel.py (and bench/multi_gpu.sh with --device cuda) as
    torchrun --nproc-per-node 2 tests/dist/rollout_worker.py --tp 2 --out DIR --hf-folder HF
Every rank writes DIR/rank<r>.json: {backend: {"before"|"after": {"greedy"|"sampled": [[tokens]], ...}}}.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", category=UserWarning)

from policy_common import TINY_HF, build_policy, fixed_sequences, hf_weights, nll_loss  # noqa: E402

from questa_nemo.config import RolloutConfig  # noqa: E402
from questa_nemo.model.parallel import destroy_distributed  # noqa: E402
from questa_nemo.rollout import RolloutContext, SamplingParams, build_backend  # noqa: E402

PROMPTS = [[5, 17, 3, 44, 9], [7], [60, 2, 2, 81, 13, 13, 40, 1, 90, 33, 8, 27], [11, 12]]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
SAMPLED = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=5)


def write_scaled_hf_folder(folder: Path) -> Path:
    """The tiny Qwen2 with weights scaled up (std ~0.15), so greedy choices are not near-ties."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: (v if "norm" in k else v * 7.5).contiguous() for k, v in hf_weights().items()}
    (folder / "config.json").write_text(json.dumps(TINY_HF))
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def rollouts(backend) -> dict:
    out = {}
    for name, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
        result = backend.generate(PROMPTS, params)
        out[name] = [[c.token_ids for c in group] for group in result.completions]
        out[name + "_logprobs"] = [[c.logprobs for c in group] for group in result.completions]
        out[name + "_versions"] = sorted({c.version for group in result.completions for c in group})
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vp", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hf-folder", type=Path, required=True)
    parser.add_argument("--backends", nargs="+", default=["megatron", "hf"])
    parser.add_argument("--cuda-graphs", action="store_true")
    args = parser.parse_args()
    policy = build_policy(args.tp, args.pp, weights=args.hf_folder, vp=args.vp)
    ctx = RolloutContext(policy.modules, TINY_HF["vocab_size"], TINY_HF)
    backends = {
        name: build_backend(RolloutConfig(backend=name, max_batch_sequences=8, cuda_graphs=args.cuda_graphs), ctx)
        for name in args.backends
    }
    record = {name: {"before": rollouts(b)} for name, b in backends.items()}
    sequences = fixed_sequences()
    stats = policy.train_step(policy.pack(sequences), nll_loss, sum(float(s.loss_mask.sum()) for s in sequences))
    assert not stats.skipped
    for name, backend in backends.items():
        backend.update_weights(1)
        record[name]["after"] = rollouts(backend)
        record[name]["shares_trainer_weights"] = bool(getattr(backend, "shares_trainer_weights", False))
    rank = torch.distributed.get_rank()
    (args.out / f"rank{rank}.json").write_text(json.dumps(record))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
