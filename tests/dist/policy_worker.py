"""torchrun worker for the policy / checkpoint tests: one job per call, results written under --out.

jobs:
  train  - pack the fixed batch, one NLL train step; write this rank's updated weights and the step stats
           (and, given --ckpt, save a model-only checkpoint of the updated weights there)
  save   - one train step, a full checkpoint (model + optimizer + schedule + RNG) to --ckpt, then a second
           step whose stats and updated weights are written (what a resumed run must reproduce)
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore", category=UserWarning)

from megatron.core import parallel_state  # noqa: E402
from policy_common import build_policy, fixed_sequences, nll_loss  # noqa: E402

from questa_nemo.model.megatron import shard_layout  # noqa: E402
from questa_nemo.model.parallel import destroy_distributed  # noqa: E402


def write_shards(policy, out: Path) -> None:
    """This rank's chunks as safetensors plus their shard layout (tests merge them with megatron_to_hf)."""
    rank = torch.distributed.get_rank()
    for vp, chunk in enumerate(policy.modules):
        layout = shard_layout(vp if len(policy.modules) > 1 else None)
        sd = {
            k: v.detach().contiguous()
            for k, v in chunk.state_dict().items()
            if not k.endswith("_extra_state")
        }
        save_file(sd, str(out / f"rank{rank}_chunk{vp}.safetensors"))
        (out / f"rank{rank}_chunk{vp}.json").write_text(json.dumps(layout._asdict()))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["train", "save"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vp", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--hf-folder", type=Path, required=True)
    args = parser.parse_args()
    policy = build_policy(args.tp, args.pp, weights=args.hf_folder, vp=args.vp)
    everything = fixed_sequences()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    sequences = everything[dp_rank::dp_size]  # each DP replica trains on its share of the same batch
    micro_batches = policy.pack(sequences)
    normaliser = sum(float(s.loss_mask.sum()) for s in everything)
    stats = policy.train_step(micro_batches, nll_loss, normaliser)
    if args.job == "train":
        if dp_rank == 0:
            write_shards(policy, args.out)
        if args.ckpt is not None:
            from questa_nemo.model.checkpoint import save_model_checkpoint

            save_model_checkpoint(policy.model_chunks, args.ckpt, step=1)
        logprobs = policy.logprobs(micro_batches)
        if torch.distributed.get_rank() == 0 and dp_size == 1:
            save_file(
                {f"mb{i}": t.contiguous() for i, t in enumerate(logprobs.logprobs)},
                str(args.out / "logprobs.safetensors"),
            )
    else:
        from questa_nemo.model.checkpoint import save_checkpoint

        save_checkpoint(policy, args.ckpt, step=1)
        logprobs = policy.logprobs(micro_batches)
        stats = policy.train_step(micro_batches, nll_loss, normaliser)
        if dp_rank == 0:
            write_shards(policy, args.out)
        if torch.distributed.get_rank() == 0:
            tensors = {f"logprobs{i}": t.contiguous() for i, t in enumerate(logprobs.logprobs)}
            tensors.update({f"entropy{i}": t.contiguous() for i, t in enumerate(logprobs.entropy)})
            save_file(tensors, str(args.out / "saved_logprobs.safetensors"))
    if torch.distributed.get_rank() == 0:
        (args.out / "stats.json").write_text(json.dumps({"loss": stats.loss, "grad_norm": stats.grad_norm}))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
