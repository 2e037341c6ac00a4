"""The policy's train step and proximal log-prob pass on one device: packed micro-batches vs one sequence each.

Random weights in the Qwen2.5-1.5B shape (bench/shapes.py), bf16, full activation recompute, the distributed
optimizer (one GPU: DP = 1, but its code path and checkpoint format), and a batch of random sequences whose
lengths spread like RL completions. Side by side in one process, on the same sequences and weights:
  packed     MegatronPolicy.pack: first-fit-decreasing THD rows of at most --micro-batch-tokens tokens;
  unpacked   the baseline: one sequence per micro-batch (megatron's usual micro_batch_size=1, no padding).
Then a checkpoint round trip: save (timed, size on disk), one more step, reload, and the same step again:
the resumed step must give the same loss and grad norm (bf16 / distributed-optimizer resume on GPU).

    python bench/bench_policy.py --out bench/results/policy_step.json           # H100: about 5 minutes
    python bench/bench_policy.py --device cpu --tiny --out /tmp/policy.json     # CPU smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import QWEN25_1P5B, TINY_QWEN2  # noqa: E402

from questa_nemo.config import ModelConfig, OptimConfig  # noqa: E402
from questa_nemo.model.packing import TokenSequence, pack  # noqa: E402


def random_sequences(count: int, min_len: int, max_len: int, vocab: int, seed: int) -> list[TokenSequence]:
    """Prompt (1/8 of the length, out of the loss) + completion, lengths uniform in [min_len, max_len]."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        mask = torch.ones(n)
        mask[: max(1, n // 8)] = 0
        out.append(
            TokenSequence(
                token_ids=torch.randint(0, vocab, (n,), generator=g),
                loss_mask=mask,
                advantages=torch.randn(n, generator=g),
                behaviour_logprobs=torch.zeros(n),
            )
        )
    return out


def pg_loss(logprobs, entropy, mb):
    """A policy-gradient-shaped summed loss: -(advantage x log-prob) over the loss tokens."""
    mask = mb.loss_mask.to(logprobs.device)
    return -(logprobs * mb.advantages.to(logprobs.device) * mask).sum(), {"tokens": mask.sum()}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def run_mode(policy, micro_batches, normaliser: float, steps: int, device: str) -> dict:
    """Warm-up step, then `steps` timed train steps and one timed log-prob pass."""
    tokens = sum(mb.num_real_tokens for mb in micro_batches)
    policy.train_step(micro_batches, pg_loss, normaliser)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, logprob_s = timed(device, lambda: policy.logprobs(micro_batches))
    train_s = []
    for _ in range(steps):
        stats, seconds = timed(device, lambda: policy.train_step(micro_batches, pg_loss, normaliser))
        train_s.append(seconds)
        if stats.skipped:
            raise RuntimeError("a benchmark step came out non-finite")
    mean_train = sum(train_s) / len(train_s)
    return {
        "micro_batches": len(micro_batches),
        "row_tokens": micro_batches[0].tokens.size(1),
        "real_tokens": tokens,
        "logprobs_s": logprob_s,
        "logprobs_tokens_per_s": tokens / logprob_s,
        "train_step_s": mean_train,
        "train_tokens_per_s": tokens / mean_train,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
    }


def checkpoint_round_trip(policy, micro_batches, normaliser: float, device: str) -> dict:
    from questa_nemo.model.checkpoint import load_checkpoint, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        path, save_s = timed(device, lambda: save_checkpoint(policy, Path(tmp) / "step_1", step=1))
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        expected = policy.train_step(micro_batches, pg_loss, normaliser)
        meta, load_s = timed(device, lambda: load_checkpoint(policy, path))
        resumed = policy.train_step(micro_batches, pg_loss, normaliser)
    return {
        "save_s": save_s,
        "load_s": load_s,
        "size_gib": size / 2**30,
        "optimizer_restored": meta.optimizer_restored,
        "expected_loss": expected.loss,
        "resumed_loss": resumed.loss,
        "expected_grad_norm": expected.grad_norm,
        "resumed_grad_norm": resumed.grad_norm,
        "resume_exact": (expected.loss, expected.grad_norm) == (resumed.loss, resumed.grad_norm),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny Qwen2 shape (CPU smoke runs)")
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--min-len", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=16384)
    p.add_argument("--micro-batch-tokens", type=int, default=32768)
    p.add_argument("--steps", type=int, default=2, help="timed train steps per mode")
    p.add_argument("--recompute", choices=("none", "full", "selective"), default="full")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device (use --device cpu for the smoke run)")

    from questa_nemo.model.megatron import build_model
    from questa_nemo.model.parallel import destroy_distributed, init_distributed
    from questa_nemo.model.policy import MegatronPolicy

    hf = TINY_QWEN2 if args.tiny else QWEN25_1P5B
    model_cfg = ModelConfig(
        params_dtype="bf16" if args.device == "cuda" else "fp32",
        attention="sdpa",
        recompute=args.recompute,
        logprob_chunk_tokens=4096,
    )
    init_distributed(model_cfg)
    chunks = build_model(hf, model_cfg)
    chunks = chunks if isinstance(chunks, list) else [chunks]
    optim = OptimConfig(lr=1e-6, warmup_ratio=0.0, distributed=True)
    policy = MegatronPolicy(chunks, model_cfg, optim, 100, args.micro_batch_tokens, hf["vocab_size"])

    sequences = random_sequences(args.sequences, args.min_len, args.max_len, hf["vocab_size"], seed=1)
    normaliser = sum(float(s.loss_mask.sum()) for s in sequences)
    packed = policy.pack(sequences)
    unpacked = [pack([s], args.micro_batch_tokens)[0] for s in sequences]
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shape": "tiny" if args.tiny else "qwen2.5-1.5b",
        "params_dtype": model_cfg.params_dtype,
        "recompute": args.recompute,
        "distributed_optimizer": policy.distributed_optimizer,
        "sequences": args.sequences,
        "micro_batch_tokens": args.micro_batch_tokens,
        "packed": run_mode(policy, packed, normaliser, args.steps, args.device),
        "unpacked": run_mode(policy, unpacked, normaliser, args.steps, args.device),
    }
    result["speedup_train"] = (
        result["packed"]["train_tokens_per_s"] / result["unpacked"]["train_tokens_per_s"]
    )
    result["checkpoint"] = checkpoint_round_trip(policy, packed, normaliser, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
