"""Cost of the decode step's sampling noise, per step: the per-sequence counter-based noise
(rollout/sampling.py `exponential_noise`) against the per-slot generator it replaced (`exponential_` into a
[B, V] buffer), and the sampling itself (`sample_tokens`), at B sequences and a V-token vocabulary.

On a GPU it also checks that CUDA computes the CPU's noise (the integer hash bit for bit; -log within 1 ulp)
and times the noise inside a captured CUDA graph.

    OMP_NUM_THREADS=1 python bench/bench_sampling_noise.py                      # CPU, B=64, V=49152
    python bench/bench_sampling_noise.py --device cuda --batch 512 --vocab 151936 --json $OUT/noise.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from questa_nemo.rollout.sampling import exponential_noise, mix32, sample_tokens, sequence_key, vocab_hash


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
    words = vocab_hash(v, device)
    logits = torch.randn(b, v, device=device, generator=torch.Generator(device).manual_seed(0))
    buffer = torch.empty(b, v, device=device)
    gen = torch.Generator(device).manual_seed(0)
    out = {"device": str(device), "batch": b, "vocab": v, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    out["ms_per_step"] = {
        "old_per_slot_exponential_": timed(lambda: buffer.exponential_(generator=gen), device, args.repeats),
        "new_per_sequence_noise": timed(lambda: exponential_noise(keys, positions, words), device, args.repeats),
        "sample_tokens_T1_top_p1": timed(lambda: sample_tokens(logits, buffer, 1.0, 1.0), device, args.repeats),
        "sample_tokens_T1_top_p0.9": timed(lambda: sample_tokens(logits, buffer, 1.0, 0.9), device, args.repeats),
    }
    if device.type == "cuda":  # CUDA = CPU, and the noise inside a captured graph
        cpu = exponential_noise(keys.cpu(), positions.cpu(), words.cpu())
        gpu = exponential_noise(keys, positions, words).cpu()
        rows = mix32(keys.cpu() ^ mix32((positions.cpu() & 0xFFFFFFFF) ^ 0x85EBCA6B))
        out["rows_hash_equal_cpu_cuda"] = bool(torch.equal(rows, mix32(keys ^ mix32((positions & 0xFFFFFFFF)
                                                                                 ^ 0x85EBCA6B)).cpu()))
        out["noise_max_ulps_cpu_cuda"] = int(((gpu.view(torch.int32) - cpu.view(torch.int32)).abs()).max())
        static = torch.empty(b, v, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            static.copy_(exponential_noise(keys, positions, words))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static.copy_(exponential_noise(keys, positions, words))
        graph.replay()
        out["graph_equals_eager"] = bool(torch.equal(static, exponential_noise(keys, positions, words)))
        out["ms_per_step"]["new_per_sequence_noise_in_graph"] = timed(graph.replay, device, args.repeats)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        exponential_noise(keys, positions, words)
        out["noise_peak_temporaries_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        out["old_noise_buffer_gib"] = b * v * 4 / 2**30
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
