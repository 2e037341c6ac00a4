"""Cost of the decode step's sampling randomness, per step: the per-sequence counter-based uniforms
(rollout/sampling.py `uniform_draws`, one per row, inverse-CDF sampling) against the per-slot generator the
engine used before (`exponential_` into a [B, V] buffer for the exponential race), and the sampling itself
(`sample_tokens`), at B sequences and a V-token vocabulary. The [B, V] per-sequence exponential noise that was
tried in between cost 7.0 ms a step at 512 x 151,936 on an H100 (bench/results/sampling_noise_h100.json).

On a GPU it also checks that CUDA computes the CPU's uniforms bit for bit, that one row sampled alone picks
what it picks in the batch, and times sampling inside a captured CUDA graph.

    OMP_NUM_THREADS=1 python bench/bench_sampling_noise.py                      # CPU, B=64, V=49152
    python bench/bench_sampling_noise.py --device cuda --batch 512 --vocab 151936 --json $OUT/noise.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from questa_nemo.rollout.sampling import sample_tokens, sequence_key, uniform_draws


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `fn()` over `repeats` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - tic) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    b, v = args.batch, args.vocab
    keys = torch.tensor([sequence_key(1234, i // 8, i % 8) for i in range(b)], device=device)
    positions = torch.arange(b, device=device) % 97
    logits = torch.randn(b, v, device=device, generator=torch.Generator(device).manual_seed(0))
    buffer = torch.empty(b, v, device=device)
    gen = torch.Generator(device).manual_seed(0)
    out = {"device": str(device), "batch": b, "vocab": v, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    u = uniform_draws(keys, positions)
    out["ms_per_step"] = {
        "old_per_slot_exponential_": timed(lambda: buffer.exponential_(generator=gen), device, args.repeats),
        "per_sequence_uniforms": timed(lambda: uniform_draws(keys, positions), device, args.repeats),
        "sample_tokens_T1_top_p1": timed(lambda: sample_tokens(logits, u, 1.0, 1.0), device, args.repeats),
        "sample_tokens_T1_top_p0.9": timed(lambda: sample_tokens(logits, u, 1.0, 0.9), device, args.repeats),
    }
    tokens = sample_tokens(logits, u, 1.0, 1.0)[0]
    alone = [sample_tokens(logits[i : i + 1], u[i : i + 1], 1.0, 1.0)[0] for i in range(0, b, max(1, b // 16))]
    out["row_alone_equals_batch"] = all(
        int(t) == int(tokens[i]) for t, i in zip(alone, range(0, b, max(1, b // 16)))
    )
    if device.type == "cuda":  # CUDA = CPU, and sampling inside a captured graph
        out["uniforms_equal_cpu_cuda"] = bool(torch.equal(uniform_draws(keys.cpu(), positions.cpu()), u.cpu()))
        static = torch.empty(b, dtype=torch.long, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            static.copy_(sample_tokens(logits, uniform_draws(keys, positions), 1.0, 1.0)[0])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static.copy_(sample_tokens(logits, uniform_draws(keys, positions), 1.0, 1.0)[0])
        graph.replay()
        out["graph_equals_eager"] = bool(torch.equal(static, tokens))
        out["ms_per_step"]["uniforms_and_sample_tokens_in_graph"] = timed(graph.replay, device, args.repeats)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        sample_tokens(logits, u, 1.0, 1.0)
        out["sample_tokens_peak_temporaries_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
