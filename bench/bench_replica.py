"""What the megatron engine's replica costs at TP or PP > 1: the gather (model/gather.py), the re-layout to the
decoder's tensors, and the in-place copy, per update; plus the memory a replica adds. Run under torchrun:

    torchrun --nproc-per-node 2 bench/bench_replica.py --tp 2 [--layers 4 --hidden 1536 --vocab 151936]

Prints one JSON line (rank 0). The model shape defaults to Qwen2.5-1.5B's layer (hidden 1536, 12 heads, 2 KV
heads, ffn 8960, vocab 151936) with fewer layers; costs scale with the bytes moved.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from questa_nemo.config import ModelConfig, RolloutConfig  # noqa: E402
from questa_nemo.model.megatron import build_model  # noqa: E402
from questa_nemo.model.parallel import destroy_distributed, init_distributed  # noqa: E402
from questa_nemo.rollout import RolloutContext, build_backend  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--ffn", type=int, default=8960)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    hf = dict(model_type="qwen2", num_hidden_layers=a.layers, hidden_size=a.hidden, num_attention_heads=12,
              num_key_value_heads=2, intermediate_size=a.ffn, vocab_size=a.vocab, tie_word_embeddings=True,
              max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6)
    on_gpu = torch.cuda.is_available()
    cfg = ModelConfig(params_dtype="bf16" if on_gpu else "fp32", attention="sdpa", recompute="none",
                      tensor_parallel=a.tp, pipeline_parallel=a.pp)
    init_distributed(cfg)
    chunks = build_model(hf, cfg)
    chunks = chunks if isinstance(chunks, list) else [chunks]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ctx = RolloutContext(chunks, a.vocab, hf)
    started = time.perf_counter()
    backend = build_backend(RolloutConfig(backend="megatron"), ctx)
    build_s = time.perf_counter() - started
    gather_s, update_s = [], []
    for _ in range(a.repeats):
        torch.distributed.barrier()
        t = time.perf_counter()
        ctx.hf_weights()
        gather_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        backend.update_weights(backend.version + 1)
        if on_gpu:
            torch.cuda.synchronize()
        update_s.append(time.perf_counter() - t)
    tensors = backend.weights.tensors()
    del tensors[2]  # lm_head: a view of the embedding here (tied)
    replica_bytes = sum(t.numel() * t.element_size() for t in tensors)
    shard_bytes = sum(t.numel() * t.element_size() for c in chunks for t in c.state_dict().values()
                      if isinstance(t, torch.Tensor))
    if torch.distributed.get_rank() == 0:
        print(json.dumps({
            "tp": a.tp, "pp": a.pp, "layers": a.layers, "device": "cuda" if on_gpu else "cpu",
            "shard_gib": shard_bytes / 2**30, "replica_gib": replica_bytes / 2**30,
            "build_s": build_s, "gather_s": min(gather_s), "update_s": min(update_s),
            "max_rss_gib_before_replica": rss0 / 2**20,
            "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }), flush=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
