"""Rollout throughput: the contiguous KV cache ("old"), the paged KV cache ("paged") and transformers' generate,
on the same sequences at the same batch, side by side in one process.

The Qwen2.5-1.5B shape with RANDOM weights (bf16 on GPU; the decode arithmetic and memory traffic are the real
model's, the tokens are noise). Rows (every engine of a row decodes the same prompts to the same lengths):

- fixed_hf: P x n sequences, 1K prompt + `--hf-new-tokens` new tokens (EOS ignored): old, paged, transformers.
- fixed: the same sequences at `--new-tokens` (2K) new tokens (EOS ignored): old, paged.
- realistic: completion lengths drawn like R1 traces (lognormal, mean `--length-mean`, the longest set to
  `--realistic-max`), honoured as a stop token at the drawn length (`forced_lengths`: found at the harvest like a
  real EOS), so every engine does identical work: old, paged.
- recipe: the same spread with a tail to `--recipe-max` (24K, the recipe's max new tokens): paged (and old
  with --recipe-old): sequences in flight, tok/s, KV memory.

tokens_per_second counts output tokens over the whole call (prefill included); decode_tokens_per_second leaves
out the CUDA-graph capture time (a one-off: training reuses the graphs across steps).

    . bench/gpu_setup.sh && python bench/bench_rollout.py --out $OUT/rollout.json   # ~5-6 min on one H100
    python bench/bench_rollout.py --check                              # GPU self-check: graph vs eager vs HF
    python bench/bench_rollout.py --device cpu --tiny --check          # smoke (tests/test_rollout_bench.py)

`--check` compares, on the same model: CUDA-graph vs eager decoding (tokens must be identical, log-probs
within bf16 noise), sampled completions of each prompt decoded alone vs in the batch (reported: the noise is
keyed per sequence, but batch size may change bf16 rounding), greedy tokens vs transformers' greedy generate
(the matching prefix is reported: bf16 ties may diverge late), returned log-probs vs a full megatron forward over
prompt + completion, and the paged cache (Triton kernel on GPU) vs the contiguous one (greedy prefix, log-probs)
and vs a float64 oracle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import fractions, row_bounds  # noqa: E402
from shapes import QWEN25_1P5B, TINY_QWEN2, row_draw  # noqa: E402

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


ENGINES = {  # name -> EngineOptions besides the shared ones
    "old": {"paged_kv": False},  # the contiguous cache
    "paged": {"paged_kv": True},  # the defaults: fused_decode, fused_sampler
    "paged_main": {"paged_kv": True, "fused_decode": False, "fused_sampler": False, "merge_tile": False},  # before all
    "paged_ts": {"paged_kv": True, "fused_sampler": False},  # the defaults with torch's float32 sampler
    "paged_cascade": {"paged_kv": True, "cascade_attention": True},
    "paged_loop": {"paged_kv": True, "merge_tile": False},  # the defaults with the loop merge of the splits
    "paged_fn": {"paged_kv": True, "fused_norms": True},  # add + RMSNorm, SwiGLU in Triton (the default since)
    "paged_nofn": {"paged_kv": True, "fused_norms": False},  # the defaults with torch's add, RMSNorm, SwiGLU
    "paged_fnsk": {"paged_kv": True, "fused_norms": True, "skinny_gemm": True},  # and the skinny matmul
    "paged_i8": {"paged_kv": True, "weights8": "int8"},  # the defaults with int8 projections at <= 16 rows
    "paged_fp8": {"paged_kv": True, "weights8": "fp8"},  # the defaults with float8 projections at <= 16 rows
    "paged_pdl": {"paged_kv": True, "pdl": True},  # the defaults, Triton kernels as dependent launches
    "paged_skpd": {"paged_kv": True, "skinny_gemm": True, "pdl": True},  # and the projections in Triton too
    "paged_i8pd": {"paged_kv": True, "weights8": "int8", "pdl": True},  # int8 projections, dependent launches
    "paged_fp8pd": {"paged_kv": True, "weights8": "fp8", "pdl": True},  # float8 projections, dependent launches
}


def engine(policy, vocab: int, args: argparse.Namespace, name: str) -> MegatronBackend:
    """The engine called `name` in ENGINES, at the run's batch, KV share and block size."""
    options = EngineOptions(
        max_batch_sequences=args.batch,
        cuda_graphs=not args.no_graphs,
        kv_cache_memory_fraction=args.kv_fraction,
        kv_block_size=args.block_size,
        **ENGINES[name],
    )
    return MegatronBackend(policy, vocab, options)


def run_ours(
    backend: MegatronBackend,
    prompts: list[list[int]],
    n: int,
    new_tokens: int,
    lengths: list[list[int]] | None = None,
) -> dict:
    """One generate call (sampling at T = 1): its stats, peak GPU memory and decode rates. `lengths`: forced
    completion lengths [prompt][sample] (a stop at the drawn length); None: EOS ignored, all `new_tokens`."""
    params = SamplingParams(
        n=n, temperature=1.0, top_p=1.0, max_new_tokens=new_tokens, ignore_eos=True, seed=1
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    result = backend.generate(prompts, params, forced_lengths=lengths)
    sync()
    backend.sleep()  # free the KV cache for the next engine
    stats = dict(result.stats)
    stats.update(prompts=len(prompts), samples=n, new_tokens=new_tokens)
    if lengths is not None and stats["tokens"] != sum(map(sum, lengths)):
        raise RuntimeError(f"bench: {stats['tokens']} tokens generated, {sum(map(sum, lengths))} drawn")
    decode_s = stats["seconds"] - stats["prefill_seconds"] - stats["graph_capture_seconds"]
    stats["decode_ms_per_step"] = 1000 * decode_s / max(stats["decode_steps"], 1)
    stats["decode_tokens_per_second"] = stats["tokens"] / max(
        stats["seconds"] - stats["graph_capture_seconds"], 1e-9
    )
    if torch.cuda.is_available():
        stats["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return stats


class _ForcedEOS(LogitsProcessor):
    """transformers LogitsProcessor: row r emits EOS exactly as its lengths[r]-th token, never before."""

    def __init__(self, lengths: torch.Tensor, prompt_len: int, eos: int):
        self.lengths, self.prompt_len, self.eos = lengths, prompt_len, eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ending = self.lengths == input_ids.size(1) - self.prompt_len + 1  # this token is the last
        scores[:, self.eos] = float("-inf")
        scores[ending] = float("-inf")
        scores[ending, self.eos] = 0.0
        return scores


@torch.no_grad()
def run_hf(
    model,
    prompts: list[list[int]],
    n: int,
    new_tokens: int,
    lengths: list[list[int]] | None = None,
    static: bool = False,
):
    """transformers generate at batch len(prompts) x n (sampling at T = 1, no top-k): EOS ignored via
    min_new_tokens, or (lengths) an EOS forced at each row's drawn length. Plain generate keeps a dynamic
    cache; static=True asks for its static cache, with which generate compiles the model's decode forward
    (torch.compile, mode reduce-overhead: CUDA graphs), the fastest transformers offers. The compile is paid
    in a warm-up call of the same shapes (every row stopped after 4 tokens), reported, not timed."""
    from transformers import LogitsProcessorList

    ids = torch.tensor(prompts, device=model.device)
    extra: dict = dict(min_new_tokens=new_tokens, pad_token_id=0)
    eos = model.config.vocab_size - 1
    if lengths is not None:
        flat = torch.tensor([x for row in lengths for x in row], device=model.device)
        new_tokens = int(flat.max())
        extra = dict(
            eos_token_id=eos,
            pad_token_id=eos,
            logits_processor=LogitsProcessorList([_ForcedEOS(flat, ids.size(1), eos)]),
        )
    def generate(**kwargs):  # sampling at T = 1 over the whole vocabulary, len(prompts) x n rows
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=True,
            temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=n, **kwargs,
        )  # fmt: skip

    warmup_s = None
    if static:
        extra["cache_implementation"] = "static"
        # same batch, same max_new_tokens (the static cache's shape); every row's EOS forced as its 4th token,
        # fixed rows too (their timed run ignores EOS, so without it the warm-up would decode the whole row)
        four = torch.full((len(prompts) * n,), 4, device=model.device)
        short = {**extra, "eos_token_id": eos, "pad_token_id": eos, "min_new_tokens": 0}
        short["logits_processor"] = LogitsProcessorList([_ForcedEOS(four, ids.size(1), eos)])
        sync()
        tic = time.perf_counter()
        generate(**short)
        sync()
        warmup_s = time.perf_counter() - tic
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    started = time.perf_counter()
    out = generate(**extra)
    sync()
    seconds = time.perf_counter() - started
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # its dynamic cache's blocks: free for the next engine's KV cache
    generated = out[:, ids.size(1) :]
    if lengths is None:
        tokens = generated.numel()
    else:  # up to and including the forced EOS
        tokens = int(sum(map(sum, lengths)))
        got = ((generated == eos).float().argmax(1) + 1).tolist()
        if got != [x for row in lengths for x in row]:
            raise RuntimeError("bench: transformers did not stop at the drawn lengths")
    stats = dict(
        tokens=tokens, seconds=seconds, tokens_per_second=tokens / seconds, prompts=len(prompts), samples=n
    )
    if static:
        # generate keeps its torch.compile'd call on the model once it took the compiled path
        stats.update(cache="static", compiled=hasattr(model, "_compiled_call"), warmup_seconds=warmup_s)
    if torch.cuda.is_available():
        stats["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return stats


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


def logprob_error(policy, prompts, completions, vocab: int, params: SamplingParams) -> float:
    """Largest |returned log-prob - full-forward log-prob| over every completion of every prompt."""
    return max(
        (full_forward_logprobs(policy, prompts[i], c.token_ids, vocab, params.temperature) - torch.tensor(c.logprobs))
        .abs()
        .max()
        .item()
        for i, group in enumerate(completions)
        for c in group
    )


def weights8_mismatch(policy, vocab: int, tiny: bool, formats: list[str]) -> dict:
    """What EngineOptions.weights8 changes in what is sampled: 4 prompts x 4 samples (T = 1, 16 sequences,
    decoder.WEIGHTS8_MAX_ROWS: every decode step on the 8-bit projections), each token's returned log-prob
    against the bf16 policy's full forward (the trainer's), for the engine without 8-bit weights and with each
    of `formats` (its engine in ENGINES with no other option): the largest gap, and the mean of the k1 and k3
    estimators of KL(sampler || trainer) over the sampled tokens.
    RANDOM weights: a trained model's sharper distributions may move more (bench/weights8_kl.py: real
    weights)."""
    prompts = random_prompts(4, 64 if tiny else 256, vocab, seed=11)
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=32 if tiny else 256, ignore_eos=True, seed=5)
    out: dict = {"sequences": 16, "new_tokens": params.max_new_tokens}
    alone = {o["weights8"]: n for n, o in ENGINES.items() if set(o) == {"paged_kv", "weights8"}}  # paged_i8, ...
    for name, extra in (("paged", {}), *((alone[f], {"weights8": f}) for f in formats)):
        backend = MegatronBackend(policy, vocab, EngineOptions(max_batch_sequences=16, paged_kv=True, **extra))
        done = backend.generate(prompts, params).completions
        gaps = torch.cat([
            torch.tensor(c.logprobs) - full_forward_logprobs(policy, prompts[i], c.token_ids, vocab, 1.0)
            for i, group in enumerate(done) for c in group
        ])  # fmt: skip  # log sampler - log trainer, per sampled token
        out[name] = {"max_abs": gaps.abs().max().item(), "kl_k1": gaps.mean().item(),
                     "kl_k3": (torch.exp(-gaps) - 1 + gaps).mean().item(), "tokens": gaps.numel()}  # fmt: skip
        backend.sleep()
    return out


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
        report[f"{name}_logprob_vs_full_forward_max_abs"] = logprob_error(policy, prompts, b, vocab, params)
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
        if name == "sampled":  # noise keyed per sequence: each prompt alone (its key given) samples the same
            alone = [graphed.generate([p], replace(params, prompt_keys=(i,))).completions[0]
                     for i, p in enumerate(prompts)]
            same = [x.token_ids == y.token_ids for gx, gy in zip(b, alone) for x, y in zip(gx, gy)]
            report["sampled_alone_equals_batched"] = f"{sum(same)}/{len(same)}"  # bf16 GEMMs may round apart
    old_error = max(
        report["greedy_logprob_vs_full_forward_max_abs"], report["sampled_logprob_vs_full_forward_max_abs"]
    )
    report.update(check_paged(policy, vocab, prompts, greedy, sampled, eager, old_error))
    report["ok"] = (
        report["greedy_graph_equals_eager"] and report["sampled_graph_equals_eager"] and report["paged_ok"]
    )
    return report


def first_difference(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_paged(
    policy, vocab: int, prompts, greedy: SamplingParams, sampled: SamplingParams, old, old_error: float
) -> dict:
    """The paged cache (Triton kernel + CUDA graphs on GPU, the torch reference on CPU) against the contiguous
    eager decoder `old`: greedy tokens (equal on CPU in float32; on GPU bf16 sums in another order may flip a
    near-tie late, so the matching prefix is reported), log-probs against a full forward (on GPU within twice
    the contiguous path's own error `old_error`, or 0.1: a wrong key or value costs far more), and the kernel
    against a float64 oracle on a random bf16 pool."""
    from questa_nemo.rollout.paged import paged_attention_dense

    on_gpu = next(policy.parameters()).is_cuda
    report: dict = {}
    paged = MegatronBackend(
        policy, vocab, EngineOptions(max_batch_sequences=16, cuda_graphs=on_gpu, paged_kv=True)
    )
    a = old.generate(prompts, greedy).completions
    b = paged.generate(prompts, greedy).completions
    report["paged_greedy_prefix_matching_old"] = [
        first_difference(x.token_ids, y.token_ids) for gx, gy in zip(a, b) for x, y in zip(gx, gy)
    ]
    for name, params in (("greedy", greedy), ("sampled", sampled)):
        done = paged.generate(prompts, params).completions
        report[f"paged_{name}_logprob_vs_full_forward_max_abs"] = logprob_error(policy, prompts, done, vocab, params)
    exact = all(n == greedy.max_new_tokens for n in report["paged_greedy_prefix_matching_old"])
    report["paged_ok"] = exact if not on_gpu else True
    if on_gpu:
        from questa_nemo.rollout.paged_triton import paged_decode_attention

        g = torch.Generator(device="cuda").manual_seed(0)
        lengths = torch.tensor([1, 63, 64, 65, 700, 3000, 4096, 9000], device="cuda")
        bs, groups, per_group, dim = 64, 2, 6, 128
        need = (lengths + bs - 1) // bs
        pool = torch.randn(2, int(need.sum()) + 1, groups, bs, dim, device="cuda", generator=g).bfloat16()
        table = torch.zeros(len(lengths), int(need.max()), dtype=torch.int32, device="cuda")
        ids = torch.randperm(int(need.sum()), device="cuda", generator=g) + 1
        start = 0
        for row, n in enumerate(need.tolist()):
            table[row, :n] = ids[start : start + n].int()
            start += n
        q = torch.randn(len(lengths), groups, per_group, dim, device="cuda", generator=g).bfloat16()
        ref = paged_attention_dense(q, pool[0], pool[1], table, lengths - 1).float()
        errors = {}
        for splits in (1, 4, None):
            out = paged_decode_attention(q, pool[0], pool[1], table, lengths - 1, 132, splits)
            errors[str(splits)] = (out.float() - ref).abs().max().item()
        for split_len in (128, 1024, 9216):  # fixed-length splits (fused_decode); 9216: one split, no merge
            out = paged_decode_attention(q, pool[0], pool[1], table, lengths - 1, 132, split_len=split_len)
            errors[f"split_len_{split_len}"] = (out.float() - ref).abs().max().item()
        # the loop merge (merge_tile=False; the tile merge above); split_len 64: 141 splits, the tile merge in
        # two chunks of 128
        launches = {"4": {"splits": 4}, "split_len_128": {"split_len": 128}, "split_len_64": {"split_len": 64}}
        for name, launch in launches.items():
            out = paged_decode_attention(q, pool[0], pool[1], table, lengths - 1, 132, **launch, merge_tile=False)
            errors[f"{name}_loop_merge"] = (out.float() - ref).abs().max().item()
        out = paged_decode_attention(q, pool[0], pool[1], table, lengths - 1, 132, split_len=64)
        errors["split_len_64"] = (out.float() - ref).abs().max().item()
        # cascade: sequences 4..7 share their first 10 blocks (640 positions, all shorter than their lengths)
        from questa_nemo.rollout.paged import prompt_groups
        from questa_nemo.rollout.paged_triton import Cascade

        owned = [r[: int(n)] for r, n in zip(table.tolist(), need.tolist())]
        owned[5:] = [owned[4][:10] + r[10:] for r in owned[5:]]
        refs = [0] * pool.size(1)
        for r in owned:
            for blk in r:
                refs[blk] += 1
        shared_table = torch.zeros_like(table)
        for row, r in enumerate(owned):
            shared_table[row, : len(r)] = torch.tensor(r, dtype=torch.int32)
        host = prompt_groups(owned, refs)
        cascade = Cascade(*(torch.tensor(t, dtype=torch.int32, device="cuda") for t in host), 8)
        ref = paged_attention_dense(q, pool[0], pool[1], shared_table, lengths - 1).float()
        for split_len in (128, 1024):
            out = paged_decode_attention(
                q, pool[0], pool[1], shared_table, lengths - 1, 132, split_len=split_len, cascade=cascade
            )
            errors[f"cascade_split_len_{split_len}"] = (out.float() - ref).abs().max().item()
        out = paged_decode_attention(
            q, pool[0], pool[1], shared_table, lengths - 1, 132, split_len=128, cascade=cascade, merge_tile=False
        )
        errors["cascade_split_len_128_loop_merge"] = (out.float() - ref).abs().max().item()
        report["paged_kernel_vs_float64_max_abs"] = errors
        report["rope_append_same_bits_as_torch"] = rope_append_same_bits()
        report["add_rmsnorm"] = add_rmsnorm_same_bits()
        cascaded = MegatronBackend(
            policy, vocab, EngineOptions(max_batch_sequences=16, paged_kv=True, cascade_attention=True)
        )
        done = cascaded.generate(prompts, sampled).completions
        report["paged_cascade_sampled_logprob_vs_full_forward_max_abs"] = logprob_error(
            policy, prompts, done, vocab, sampled
        )
        torch_sampling = MegatronBackend(  # the engine above samples with the fused sampler (the default)
            policy, vocab, EngineOptions(max_batch_sequences=16, paged_kv=True, fused_sampler=False)
        )
        done = torch_sampling.generate(prompts, sampled).completions
        report["paged_ts_sampled_logprob_vs_full_forward_max_abs"] = logprob_error(
            policy, prompts, done, vocab, sampled
        )
        report["fused_sampler_vs_torch"] = fused_sampler_check(vocab)
        paged_error = max(
            report["paged_greedy_logprob_vs_full_forward_max_abs"],
            report["paged_sampled_logprob_vs_full_forward_max_abs"],
            report["paged_cascade_sampled_logprob_vs_full_forward_max_abs"],
            report["paged_ts_sampled_logprob_vs_full_forward_max_abs"],
        )
        # bf16 output rounding is ~4e-3 at |x| ~ 1
        report["paged_ok"] = (
            max(errors.values()) < 3e-2
            and paged_error <= max(2 * old_error, 0.1)
            and report["rope_append_same_bits_as_torch"]
            and report["fused_sampler_vs_torch"]["ok"]
        )
        try:
            report["attention_one_layer"] = attention_timing()
        except Exception as e:  # noqa: BLE001  (a timing, not a check: keep the rest of the report)
            report["attention_one_layer"] = {"error": repr(e)}
    return report


def rope_append_same_bits(batch: int = 64, groups: int = 2, per_group: int = 6, dim: int = 128) -> bool:
    """The fused RoPE + append kernel (fused_decode) against decoder.rope and index_put on bf16 GPU tensors."""
    from questa_nemo.rollout.decoder import rope, rope_tables
    from questa_nemo.rollout.paged_triton import rope_append

    g = torch.Generator(device="cuda").manual_seed(2)
    bs = 64
    qkv = torch.randn(batch, groups * (per_group + 2) * dim, device="cuda", generator=g).bfloat16() * 4
    positions = torch.randint(0, 30000, (batch,), device="cuda", generator=g)
    inv_freq = 1.0 / 1e6 ** (torch.arange(0, dim, 2, device="cuda") / dim)
    cos, sin = rope_tables(positions[:, None], inv_freq, torch.bfloat16)
    pool = torch.randn(2, batch + 1, groups, bs, dim, device="cuda", generator=g).bfloat16()
    blocks, offsets = torch.randperm(batch, device="cuda", generator=g) + 1, positions % bs
    k_ref, v_ref = pool[0].clone(), pool[1].clone()
    x = qkv.view(batch, 1, groups, per_group + 2, dim).permute(0, 2, 3, 1, 4)
    qk = rope(x[:, :, : per_group + 1], cos, sin)
    k_ref[blocks, :, offsets] = qk[:, :, per_group, 0]
    v_ref[blocks, :, offsets] = x[:, :, per_group + 1, 0]
    q = rope_append(qkv, cos.view(batch, -1), sin.view(batch, -1), pool[0], pool[1], blocks, offsets)
    return bool(
        torch.equal(q, qk[:, :, :per_group, 0]) and torch.equal(pool[0], k_ref) and torch.equal(pool[1], v_ref)
    )


def add_rmsnorm_same_bits(rows: int = 256, hidden: int = 1536) -> dict:
    """The decode step's fused residual add + RMSNorm (fused_norms) on bf16 GPU tensors: the sum against torch's
    add (same bits expected), the norm against the trainer's RMSNorm kernel on that sum (same bits expected) and
    against torch's F.rms_norm (the unfused step's; largest difference reported)."""
    from questa_nemo.model.triton_kernels import add_rmsnorm, rmsnorm_forward

    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(rows, 1, hidden, device="cuda", generator=g).bfloat16()
    residual = (torch.randn(rows, 1, hidden, device="cuda", generator=g) * 8).bfloat16()
    weight = torch.randn(hidden, device="cuda", generator=g).bfloat16()
    h, y = add_rmsnorm(x, residual, weight, 1e-6)
    ref = residual + x
    torch_norm = torch.nn.functional.rms_norm(ref, (hidden,), weight, 1e-6)
    return {
        "add_same_bits": bool(torch.equal(h, ref)),
        "norm_same_bits_as_trainer_kernel": bool(torch.equal(y, rmsnorm_forward(ref, weight, 1e-6)[0])),
        "norm_vs_torch_rms_norm_max_abs": (y.float() - torch_norm.float()).abs().max().item(),
        "norm_vs_torch_rms_norm_differing_share": (y != torch_norm).float().mean().item(),
    }


def bracket_miss(logits: torch.Tensor, u: torch.Tensor, temperature: float, tokens: torch.Tensor) -> torch.Tensor:
    """How far each row's pick lies outside its exact inverse-CDF bracket, in probability mass: 0 when
    cdf(t - 1) <= u * total <= cdf(t) in float64, else the distance of u * total to the nearer edge. A
    float32 sampler misses by its CDF's rounding (the test of a correct one), a wrong one by whole tokens."""
    cdf = torch.softmax(logits.double() / temperature, -1).cumsum(-1)
    target = u.double() * cdf[:, -1]
    high = cdf.gather(1, tokens[:, None])[:, 0]
    low = torch.where(tokens > 0, cdf.gather(1, (tokens - 1).clamp_min(0)[:, None])[:, 0], torch.zeros_like(high))
    return torch.maximum(low - target, target - high).clamp_min(0)


def fused_sampler_check(vocab: int, batch: int = 256) -> dict:
    """The fused sampler (rollout/sampling_triton.py) on bf16 GPU logits and sample_tokens on their float32
    upcast, at one uniform per row, each against the float64 inverse CDF: the share of rows picking the
    float64 token, the largest bracket miss (`bracket_miss`: rounding-sized for a correct float32 sampler),
    the share picking the same token as each other, and the largest log-prob difference. ok: the fused picks
    miss by no more than 2e-6 of mass or twice what torch's float32 sampler misses, log-probs within 1e-3."""
    from questa_nemo.rollout.sampling import sample_tokens
    from questa_nemo.rollout.sampling_triton import fused_sample

    g = torch.Generator(device="cuda").manual_seed(3)
    logits = (torch.randn(batch, vocab, device="cuda", generator=g) * 3).bfloat16()
    u = torch.rand(batch, device="cuda", generator=g).clamp(1e-6, 1 - 2**-24)
    out = {}
    for temperature in (1.0, 0.7):
        tokens, logprobs = fused_sample(logits, u, temperature)
        want, _ = sample_tokens(logits.float(), u, temperature, 1.0)
        exact = torch.log_softmax(logits.float() / temperature, -1).gather(1, tokens[:, None])[:, 0]
        fused_miss, torch_miss = (bracket_miss(logits, u, temperature, t) for t in (tokens, want))
        out[f"t{temperature}"] = {
            "same_token_share": (tokens == want).float().mean().item(),
            "fused_float64_share": (fused_miss == 0).float().mean().item(),
            "torch_float64_share": (torch_miss == 0).float().mean().item(),
            "fused_bracket_miss_max": fused_miss.max().item(),
            "torch_bracket_miss_max": torch_miss.max().item(),
            "logprob_max_abs": (logprobs - exact).abs().max().item(),
        }
    out["ok"] = all(
        r["fused_bracket_miss_max"] <= max(2e-6, 2 * r["torch_bracket_miss_max"]) and r["logprob_max_abs"] < 1e-3
        for r in out.values()
    )
    return out


def attention_timing(batch: int = 256, low: int = 1024, high: int = 3072, bs: int = 64) -> dict:
    """One layer's decode attention at the fixed row's shape (lengths uniform in [low, high], GQA 12 / 2,
    head dim 128, bf16): the paged kernel against the contiguous path's SDPA over the span `high`, in
    microseconds, with the key/value bytes each must read and the bandwidth that makes."""
    from questa_nemo.rollout.paged_triton import paged_decode_attention

    groups, per_group, dim = 2, 6, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    lengths = torch.randint(low, high + 1, (batch,), device="cuda", generator=g)
    max_blocks = high // bs
    pool = torch.randn(2, batch * max_blocks + 1, groups, bs, dim, device="cuda", dtype=torch.bfloat16)
    table = (torch.arange(batch * max_blocks, device="cuda").view(batch, max_blocks) + 1).int()
    q = torch.randn(batch, groups, per_group, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, groups, high, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    visible = (torch.arange(high, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    positions = lengths - 1

    def kernel(splits=None, warps=4, stages=None):
        return lambda: paged_decode_attention(
            q, pool[0], pool[1], table, positions, sms, splits, warps, stages
        )

    runs = {
        "paged_kernel": kernel(),
        "contiguous_sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=visible
        ),
    }
    # launch settings for the next tuning round (the engine runs paged_kernel's: auto splits, 4 warps)
    for splits, warps, stages in ((1, 4, None), (4, 4, None), (8, 4, None), (None, 8, None), (None, 4, 2),
                                  (None, 4, 4), (None, 8, 2)):  # fmt: skip
        name = f"paged_kernel_splits{splits or 'auto'}_warps{warps}_stages{stages or 'default'}"
        runs[name] = kernel(splits, warps, stages)
    out = {"batch": batch, "lengths": [low, high]}
    for name, fn in runs.items():
        for _ in range(3):
            fn()
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        sync()
        us = start.elapsed_time(end) * 1000 / 20
        read = 2 * groups * dim * 2 * (batch * high if name == "contiguous_sdpa" else int(lengths.sum()))
        out[name] = {"us": us, "kv_bytes": read, "gb_per_s": read / us / 1e3}
    return out


def write_json(path: str, data: dict) -> None:
    """Atomic write: temp file in the target folder, then rename."""
    write_text_atomic(path, json.dumps(data, indent=2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model (smoke runs)")
    p.add_argument("--check", action="store_true", help="correctness self-check only (graph vs eager vs HF)")
    p.add_argument("--also-check", action="store_true", help="the self-check first, then the throughput rows")
    p.add_argument(
        "--engines",
        default="old,paged",
        help="comma list of old (contiguous cache), paged (the defaults), paged_main (fused_decode and "
        "fused_sampler off: the step before both), paged_ts (torch's sampler instead of the fused one), "
        "paged_cascade (paged with cascade_attention), paged_loop (paged with the loop merge: merge_tile off), "
        "paged_fn (paged with fused_norms, the default since), paged_nofn (paged without fused_norms), "
        "paged_fnsk (paged_fn with skinny_gemm), paged_i8 / paged_fp8 (paged with weights8 int8 / fp8; GPU only, "
        "with a check of the log-probs they sample against the bf16 forward's first), paged_pdl (paged with "
        "pdl), paged_skpd (skinny_gemm and pdl), paged_i8pd / paged_fp8pd (weights8 int8 / fp8 and pdl)",
    )
    p.add_argument("--prompts", type=int, default=16, help="prompts of the fixed rows (x --samples)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=2048, help="fixed row; 0 skips it")
    p.add_argument("--hf-new-tokens", type=int, default=256, help="fixed_hf row (all engines); 0 skips it")
    p.add_argument("--batch", type=int, default=256, help="max_batch_sequences (transformers: the whole row)")
    p.add_argument("--kv-fraction", type=float, default=0.6, help="share of free GPU memory for the KV cache")
    p.add_argument("--block-size", type=int, default=64, help="paged KV block size (positions)")
    p.add_argument("--length-mean", type=float, default=1024.0, help="mean drawn completion length")
    p.add_argument("--length-sigma", type=float, default=1.2, help="lognormal sigma of drawn lengths")
    p.add_argument("--realistic-prompts", type=int, default=32, help="realistic row prompts; 0 skips it")
    p.add_argument("--realistic-max", type=int, default=8192)
    p.add_argument("--recipe-prompts", type=int, default=32, help="recipe-length row prompts; 0 skips it")
    p.add_argument("--recipe-max", type=int, default=24576)
    p.add_argument("--recipe-batch", type=int, default=512, help="max_batch_sequences of the recipe row")
    p.add_argument("--recipe-old", action="store_true", help="run the contiguous cache on the recipe row too")
    p.add_argument(
        "--hf-realistic",
        action="store_true",
        help="transformers on the realistic row too, one batch of all its sequences (small runs only: at 256 "
        "sequences and 8K its dynamic cache alone would need ~66 GB and ~8K eager steps)",
    )
    p.add_argument(
        "--hf-static",
        action="store_true",
        help="with the transformers rows, also transformers with its static cache, with which generate compiles "
        "the decode forward (CUDA graphs): the strongest transformers baseline",
    )
    p.add_argument(
        "--hf-skip-plain",
        action="store_true",
        help="with --hf-static, leave plain transformers out (its dynamic-cache row takes most of a call at 4K)",
    )
    p.add_argument("--no-graphs", action="store_true", help="decode eagerly (to measure what graphs buy)")
    p.add_argument("--out", default="bench_rollout.json")
    args = p.parse_args(argv)
    if args.hf_skip_plain and not args.hf_static:
        p.error("--hf-skip-plain leaves only the static-cache baseline: pass --hf-static with it")
    return args


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def device_ready(device: str, name: str) -> bool:
    """False (with a one-line reason) when --device cuda sees no GPU; --device cpu hides every GPU."""
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{name}: --device cuda but no GPU is visible (use --device cpu --tiny)", file=sys.stderr)
        return False
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not device_ready(args.device, "bench_rollout"):
        return 2
    hf = hf_config(args.tiny)
    vocab = hf["vocab_size"]
    policy, twin = build_policy(hf, "bf16" if args.device == "cuda" else "fp32")
    result: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        **versions(),
        "weights": "random (the Qwen2.5-1.5B shape; tokens are noise, the arithmetic and memory traffic real)",
        "model": {k: hf.get(k) for k in QWEN25_15B},
        "args": vars(args),
    }
    if args.check:
        result["check"] = check(policy, twin, vocab, args.tiny)
        write_json(args.out, result)
        print(json.dumps(result["check"], indent=2))
        return 0 if result["check"]["ok"] else 1

    if args.also_check:
        try:
            result["check"] = check(policy, twin, vocab, args.tiny)
        except Exception as e:  # noqa: BLE001  (a one-shot GPU run keeps its rows when the check breaks)
            result["check"] = {"ok": False, "error": repr(e)}
        print("check:", json.dumps(result["check"]), flush=True)
        write_json(args.out, result)
    unknown = sorted(set(args.engines.split(",")) - set(ENGINES))
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; known: {sorted(ENGINES)}")
    formats = sorted({ENGINES[e]["weights8"] for e in args.engines.split(",") if ENGINES[e].get("weights8")})
    if formats and args.device == "cuda":  # before the rows
        try:
            result["weights8_mismatch"] = weights8_mismatch(policy, vocab, args.tiny, formats)
        except Exception as e:  # noqa: BLE001
            result["weights8_mismatch"] = {"error": repr(e)}
        print("weights8_mismatch:", json.dumps(result["weights8_mismatch"]), flush=True)
        write_json(args.out, result)
    engines = {name: engine(policy, vocab, args, name) for name in args.engines.split(",")}
    for name, backend in list(engines.items()):  # library warm-up (kernels, Triton compile), not timed
        try:
            run_ours(backend, random_prompts(1, args.prompt_len, vocab, seed=0), 2, 8)
        except Exception as e:  # noqa: BLE001  (an engine that cannot run on this GPU: the others still do)
            backend.sleep()
            del engines[name]
            result[f"{name}_error"] = repr(e)
            print(f"warm-up {name}: {e!r}", flush=True)

    def row(
        name: str, prompts, new_tokens: int, lengths=None, which=None, with_hf: bool = False, batch=None
    ) -> None:
        out: dict = {"sequences": len(prompts) * args.samples, "prompt_len": args.prompt_len}
        out["max_batch_sequences"] = batch or args.batch
        for backend in engines.values():
            backend.options = dataclasses.replace(backend.options, max_batch_sequences=batch or args.batch)
        if lengths is not None:
            flat = [x for r in lengths for x in r]
            out["drawn_lengths"] = {
                "mean": sum(flat) / len(flat), "max": max(flat), "min": min(flat),
                "p50": sorted(flat)[len(flat) // 2], "p90": sorted(flat)[int(len(flat) * 0.9)],
            }  # fmt: skip
        runs = {
            k: (lambda b=b: run_ours(b, prompts, args.samples, new_tokens, lengths))
            for k, b in engines.items()
        }
        runs = {k: fn for k, fn in runs.items() if which is None or k in which}
        if with_hf:
            if not args.hf_skip_plain:  # parse_args: only with --hf-static
                runs["transformers"] = lambda: run_hf(twin, prompts, args.samples, new_tokens, lengths)
            if args.hf_static:
                runs["transformers_static"] = lambda: run_hf(
                    twin, prompts, args.samples, new_tokens, lengths, static=True
                )
            out["max_batch_sequences"] = len(prompts) * args.samples  # transformers: one batch of all
        for key, fn in runs.items():
            try:
                out[key] = fn()
            except Exception as e:  # noqa: BLE001  (e.g. out of memory: the other engines and rows still run)
                out[key] = {"error": repr(e)}
                if key in engines:
                    engines[key].sleep()
            print(f"{name} {key}:", json.dumps(out[key]), flush=True)
            result[name] = out
            write_json(args.out, result)  # after every engine: a run cut short keeps what it measured
        rates = {k: v["tokens_per_second"] for k, v in out.items() if isinstance(v, dict) and "seconds" in v}
        if "old" in rates and "paged" in rates:
            out["paged_vs_old"] = rates["paged"] / rates["old"]
        for k in ("paged", "paged_cascade", "paged_ts", "paged_loop", "paged_fn"):
            if "paged_main" in rates and k in rates:
                out[f"{k}_vs_paged_main"] = rates[k] / rates["paged_main"]
        if "paged" in rates and "paged_ts" in rates:
            out["paged_vs_paged_ts"] = rates["paged"] / rates["paged_ts"]
        for k in ("paged_fn", "paged_fnsk", "paged_i8", "paged_fp8", "paged_pdl", "paged_skpd", "paged_i8pd",
                  "paged_fp8pd"):  # fmt: skip
            if "paged" in rates and k in rates:
                out[f"{k}_vs_paged"] = rates[k] / rates["paged"]
        if "paged" in rates and "paged_nofn" in rates:
            out["paged_vs_paged_nofn"] = rates["paged"] / rates["paged_nofn"]
        if "paged" in rates and "paged_loop" in rates:
            out["paged_vs_paged_loop"] = rates["paged"] / rates["paged_loop"]
        for k in ("old", "paged"):
            for base in ("transformers", "transformers_static"):
                if k in rates and base in rates:
                    out[f"{k}_vs_{base}"] = rates[k] / rates[base]
        bounds = row_bounds(
            lengths or [[new_tokens] * args.samples for _ in prompts], args.prompt_len, hf, result["device"],
            slots=batch or args.batch,
        )  # fmt: skip
        if bounds is not None:  # the row's memory roofline on this card (bench/roofline.py), and each engine's share
            out["roofline"] = {**bounds, "fraction": fractions(out, bounds)}
        if "paged" in out and "kv_cache_gib" in out["paged"]:  # what a contiguous cache holds in that memory
            w = engines["paged"].weights
            per_slot = 2 * len(w.layers) * w.groups * w.head_dim * w.embedding.element_size()
            per_slot *= -(-(args.prompt_len + new_tokens) // 256) * 256
            out["contiguous_slots_in_same_memory"] = int(out["paged"]["kv_cache_gib"] * 2**30 // per_slot)
        result[name] = out
        write_json(args.out, result)  # after every row: a run cut short keeps what it measured

    if args.hf_new_tokens or args.hf_realistic:  # transformers' warm-up (cuBLAS, kernels), not timed
        run_hf(twin, random_prompts(1, args.prompt_len, vocab, seed=0), 2, 4)
    prompts = random_prompts(args.prompts, args.prompt_len, vocab, seed=1)
    if args.hf_new_tokens:
        row("fixed_hf", prompts, args.hf_new_tokens, with_hf=True)
    if args.new_tokens:
        row("fixed", prompts, args.new_tokens)
    if args.new_tokens and "old" in engines:
        tic = time.perf_counter()
        engines["old"].update_weights(engines["old"].version + 1)
        sync()
        result["weight_update_seconds"] = time.perf_counter() - tic
    rows = (
        ("realistic", args.realistic_prompts, args.realistic_max, None, args.hf_realistic, None),
        ("recipe", args.recipe_prompts, args.recipe_max, None if args.recipe_old else ("paged",), False,
         args.recipe_batch),
    )  # fmt: skip
    for name, count, longest, which, with_hf, batch in rows:
        if count:
            lengths = row_draw(name, count * args.samples, args.samples, args.length_mean, args.length_sigma, longest)
            prompts = random_prompts(count, args.prompt_len, vocab, seed=5)
            row(name, prompts, longest, lengths, which, with_hf=with_hf, batch=batch)
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("args", "model")}, indent=2))
    return 0 if result.get("check", {"ok": True})["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
