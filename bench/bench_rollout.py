"""Rollout throughput: our Megatron backend against transformers' generate, side by side in one process.

The Qwen2.5-1.5B shape with random weights (bf16 on GPU): output tokens/s for P prompts x n samples with
1K-token prompts and 2K new tokens (EOS ignored), the same at 8K new tokens, and the time of a weight update.
transformers runs a smaller batch (its dynamic cache and eager decode are the baseline, not its memory limit).

    python bench/bench_rollout.py --out rollout.json                  # full size on one GPU (~4-5 min on H100)
    python bench/bench_rollout.py --check                              # GPU self-check: graph vs eager vs HF
    python bench/bench_rollout.py --device cpu --tiny --check          # smoke (tests/test_rollout_bench.py)

`--check` compares, on the same model: CUDA-graph vs eager decoding (tokens must be identical, log-probs
within bf16 noise), greedy tokens vs transformers' greedy generate (the matching prefix is reported: bf16
ties may diverge late), and returned log-probs vs a full megatron forward over prompt + completion.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from shapes import QWEN25_1P5B, TINY_QWEN2  # noqa: E402

from questa_nemo.atomic import write_text_atomic  # noqa: E402
from questa_nemo.config import ModelConfig  # noqa: E402
from questa_nemo.model.convert import ModelShape, ShardLayout, megatron_to_hf  # noqa: E402
from questa_nemo.model.megatron import build_model  # noqa: E402
from questa_nemo.model.parallel import init_distributed  # noqa: E402
from questa_nemo.rollout.base import SamplingParams  # noqa: E402
from questa_nemo.rollout.megatron_engine import EngineOptions, MegatronBackend  # noqa: E402

# The rollout results in bench/results/rollout_h100.json were measured with tied embeddings (the earlier local
# copy of this shape); ties change memory, not the decode arithmetic.
QWEN25_15B = QWEN25_1P5B
TINY = TINY_QWEN2


def hf_config(tiny: bool) -> dict:
    from transformers import Qwen2Config

    return Qwen2Config(**(TINY if tiny else QWEN25_15B)).to_dict()


def build_policy(hf: dict, dtype: str):
    """The megatron GPTModel (random init, world of one process) and its HF twin with the same weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = ModelConfig(params_dtype=dtype, attention="sdpa", recompute="none")
    init_distributed(cfg)
    policy = build_model(hf, cfg).eval()
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    device = next(policy.parameters()).device
    weights = megatron_to_hf({ShardLayout(): policy.state_dict()}, ModelShape.from_hf(hf))
    with torch.device(device):  # initialise on the GPU: a CPU init of 1.5B parameters takes minutes
        twin = Qwen2ForCausalLM._from_config(
            Qwen2Config(**{k: v for k, v in hf.items() if k != "dtype"}), dtype=torch_dtype
        )
    missing, unexpected = twin.load_state_dict(weights, strict=False)
    if set(missing) - {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"bench: HF twin load: missing {missing}, unexpected {unexpected}")
    return policy, twin.eval()


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=g).tolist()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ours(backend: MegatronBackend, prompts: list[list[int]], n: int, new_tokens: int) -> dict:
    params = SamplingParams(
        n=n, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, ignore_eos=True, seed=1
    )
    sync()
    result = backend.generate(prompts, params)
    sync()
    stats = dict(result.stats)
    stats.update(prompts=len(prompts), samples=n, new_tokens=new_tokens)
    decode_s = stats["seconds"] - stats["prefill_seconds"]
    stats["decode_ms_per_step"] = 1000 * decode_s / max(stats["decode_steps"], 1)
    return stats


@torch.no_grad()
def run_hf(model, prompts: list[list[int]], n: int, new_tokens: int) -> dict:
    """Plain transformers generate (sampling, dynamic cache, EOS ignored via min_new_tokens)."""
    ids = torch.tensor(prompts, device=model.device)
    sync()
    started = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        num_return_sequences=n,
        pad_token_id=0,
    )
    sync()
    seconds = time.perf_counter() - started
    tokens = (out.size(1) - ids.size(1)) * out.size(0)
    return dict(
        tokens=tokens, seconds=seconds, tokens_per_second=tokens / seconds, prompts=len(prompts), samples=n
    )


@torch.no_grad()
def full_forward_logprobs(policy, prompt: list[int], completion: list[int], vocab: int, temperature: float):
    """log_softmax(logits / T) of each completion token from one megatron forward over prompt + completion."""
    device = next(policy.parameters()).device
    ids = torch.tensor([prompt + completion], device=device)
    positions = torch.arange(ids.size(1), device=device)[None]
    logits = policy(ids, positions, None)[0, len(prompt) - 1 : -1, :vocab].float()  # [C, V]
    if temperature > 0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion, device=device)[:, None])[:, 0].cpu()


def check(policy, twin, vocab: int, tiny: bool) -> dict:
    """Graph vs eager, greedy vs transformers, log-probs vs a full forward (see the module docstring)."""
    prompts = random_prompts(4, 64 if tiny else 256, vocab, seed=7)
    report: dict = {}
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=32 if tiny else 128, ignore_eos=True)
    sampled = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=32 if tiny else 128, seed=3)
    eager = MegatronBackend(policy, vocab, EngineOptions(max_batch_sequences=16, cuda_graphs=False))
    graphed = MegatronBackend(policy, vocab, EngineOptions(max_batch_sequences=16, cuda_graphs=True))
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        a = eager.generate(prompts, params).completions
        b = graphed.generate(prompts, params).completions
        pairs = [(x, y) for gx, gy in zip(a, b) for x, y in zip(gx, gy)]
        report[f"{name}_graph_equals_eager"] = all(x.token_ids == y.token_ids for x, y in pairs)
        report[f"{name}_graph_vs_eager_logprob_max_abs"] = max(
            (torch.tensor(x.logprobs) - torch.tensor(y.logprobs)).abs().max().item() for x, y in pairs
        )
        diffs = [
            (
                full_forward_logprobs(policy, prompts[i], c.token_ids, vocab, params.temperature)
                - torch.tensor(c.logprobs)
            )
            .abs()
            .max()
            .item()
            for i, group in enumerate(b)
            for c in group
        ]
        report[f"{name}_logprob_vs_full_forward_max_abs"] = max(diffs)
        if name == "greedy":
            matched = []
            for i, group in enumerate(b):
                ids = torch.tensor([prompts[i]], device=twin.device)
                ref = twin.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=params.max_new_tokens,
                    min_new_tokens=params.max_new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )[0, ids.size(1) :].tolist()
                ours = group[0].token_ids
                matched.append(next((k for k, (x, y) in enumerate(zip(ours, ref)) if x != y), len(ref)))
            report["greedy_prefix_matching_hf"] = matched
            report["greedy_tokens_per_prompt"] = params.max_new_tokens
    report["ok"] = report["greedy_graph_equals_eager"] and report["sampled_graph_equals_eager"]
    return report


def write_json(path: str, data: dict) -> None:
    """Atomic write: temp file in the target folder, then rename."""
    write_text_atomic(path, json.dumps(data, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (smoke runs)")
    p.add_argument("--check", action="store_true", help="correctness self-check only (graph vs eager vs HF)")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256, help="max_batch_sequences of our backend")
    p.add_argument("--kv-fraction", type=float, default=0.6, help="share of free GPU memory for the KV cache")
    p.add_argument("--long-new-tokens", type=int, default=8192, help="0 skips the long run")
    p.add_argument("--long-prompts", type=int, default=8, help="prompts of the long run (x --samples)")
    p.add_argument("--hf-prompts", type=int, default=4, help="prompts of the transformers run (x --samples)")
    p.add_argument("--hf-new-tokens", type=int, default=256, help="0 skips transformers")
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly (to measure what graphs buy)")
    p.add_argument("--out", default="bench_rollout.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_rollout: --device cuda but no GPU is visible (use --device cpu --tiny)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    hf = hf_config(args.tiny)
    vocab = hf["vocab_size"]
    policy, twin = build_policy(hf, "bf16" if args.device == "cuda" else "fp32")
    result: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": {k: hf.get(k) for k in QWEN25_15B},
        "args": vars(args),
    }
    if args.check:
        result["check"] = check(policy, twin, vocab, args.tiny)
        write_json(args.out, result)
        print(json.dumps(result["check"], indent=2))
        return 0 if result["check"]["ok"] else 1

    options = EngineOptions(
        max_batch_sequences=args.batch,
        cuda_graphs=not args.no_graphs,
        kv_cache_memory_fraction=args.kv_fraction,
    )
    ours = MegatronBackend(policy, vocab, options)
    run_ours(ours, random_prompts(1, args.prompt_len, vocab, seed=0), args.samples, 8)  # library warm-up
    prompts = random_prompts(args.prompts, args.prompt_len, vocab, seed=1)
    result["megatron"] = run_ours(ours, prompts, args.samples, args.new_tokens)
    print("megatron:", json.dumps(result["megatron"]), flush=True)

    sync()
    tic = time.perf_counter()
    ours.update_weights(ours.version + 1)
    sync()
    result["weight_update_seconds"] = time.perf_counter() - tic

    if args.long_new_tokens:
        long_prompts = random_prompts(args.long_prompts, args.prompt_len, vocab, seed=2)
        result["megatron_long"] = run_ours(ours, long_prompts, args.samples, args.long_new_tokens)
        print("megatron_long:", json.dumps(result["megatron_long"]), flush=True)
    ours.sleep()

    if args.hf_new_tokens:
        hf_prompts = random_prompts(args.hf_prompts, args.prompt_len, vocab, seed=3)
        result["transformers"] = run_hf(twin, hf_prompts, args.samples, args.hf_new_tokens)
        result["speedup_vs_transformers"] = (
            result["megatron"]["tokens_per_second"] / result["transformers"]["tokens_per_second"]
        )
        print("transformers:", json.dumps(result["transformers"]), flush=True)
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("args", "model")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
