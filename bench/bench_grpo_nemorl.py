"""End-to-end GRPO shaped like NeMo-RL's published performance table, scaled to the 1.5B policy on ONE GPU: the
step's tokens/s/GPU counted as NeMo-RL counts them, seconds a step and the phase breakdown, synchronous and one
step off-policy (asynchronous), both in one process on the same GPU.

The reference row (NeMo-RL v0.5 docs/about/performance-summary.md, DGX-H100, Megatron backend): GRPO on
Llama-3.1-8B-Instruct, 16 GPUs, 4,096 max total length, 2,048 rollout samples a step (64 prompts x 32; G-GBS)
trained in minibatches of 512 (T-GBS), about 1K average generation (1,019 on-policy, 1,123 off-policy):
1,581 tokens/s/GPU on-policy (92.8 s a step), 2,478 one step off-policy (64.8 s; there the generation runs on
8 GPUs of its own, non-colocated).

How NeMo-RL counts (nemo_rl/algorithms/utils.py `print_performance_metrics`, v0.5.0 and main alike):
    E2E tokens/s/GPU = total_num_tokens / total_step_time / total_num_gpus
where total_num_tokens (nemo_rl/algorithms/grpo.py: `"total_num_tokens": input_lengths`, summed) is the sum over
ALL the step's rollout samples of prompt + generated tokens (the unpadded input lengths of the training batch,
which holds all 2,048 samples), total_step_time is the wall time of the whole step (generation, reward, log-probs,
training, weight refit) and total_num_gpus counts every GPU of the job (16: generation and training GPUs alike
when not colocated). The table's numbers are averages over 5 steps. Per-phase rates divide the same token count
by the phase's time (training, log-probs, generation; for async generation NeMo-RL uses exposed generation +
log-probs + training). Their own figures check out this way: 1,581 x 92.8 s x 16 / 2,048 = 1,146 tokens a sample,
i.e. ~127 prompt tokens + 1,019 generated (our arithmetic).

Scaled to one GPU (what is compared is the per-GPU rate):
- samples: NeMo-RL's 2,048 samples on 16 GPUs are 128 per GPU; here `--prompts` x `--samples` (default 8 x 32 =
  256, NeMo-RL's 32 generations a prompt) on one GPU, so that sync and async (3 steps each, the first a warm-up)
  fit one ~6-minute GPU call with the model builds.
- training: ALL rollout samples are trained in one optimizer step (our recipe trains one minibatch a step,
  rollout = training batch). NeMo-RL trains the same 2,048 samples as 4 minibatches of 512: the same forward and
  backward tokens, 3 more optimizer updates (cheap next to the token work). Sub-sampling 1/4 of the samples
  instead would process a quarter of the training tokens while NeMo-RL's count (all rollout tokens) stays the
  same: it would flatter us, so we do not.
- reference log-probs: NeMo-RL's recipe (grpo_math_1B.yaml, reference_policy_kl_penalty 0.01) runs a second
  forward over every token for the KL reference ("policy_and_reference_logprobs"); our recipe has no KL term.
  `--reference-pass` (on by default) runs one extra forward of the policy over the same micro-batches inside
  the log-probs phase (same FLOPs as a frozen reference; its seconds are reported apart) so the work matches.
- lengths: prompts of random token ids with lengths uniform in [--prompt-min, --prompt-max] (math problems with a
  chat template: ~150-400 tokens; NeMo-RL's OpenMathInstruct-2 prompts average ~127, by the arithmetic above);
  completion lengths drawn R1-like (lognormal, `--length-mean` before the cap, sigma `--length-sigma`, capped at
  --max-total-tokens minus the longest prompt, the longest draw set to the cap) and forced: a completion ends at
  its drawn length as if it had sampled EOS there (MegatronBackend.generate `forced_lengths`). Lengths belong to
  the prompt row, so sync and async generate exactly the same token counts at every step. The realised mean is
  in the JSON.
- engine: the colocated megatron engine with the paged KV cache (EngineOptions.paged_kv; set directly on the
  engine, since it is not a config key), its block pool sized to hold every sequence of a step at once (no
  preemption), CUDA graphs on; bf16, full activation recompute (NeMo-RL: activation_checkpointing too).
- async = the recipe's asynchronous rollouts (rollout.max_staleness = 1: one step off-policy) on ONE GPU: the
  producer thread decodes step s + 1 on its own weight copy while the trainer trains step s, on the same GPU, so
  it only gains where one side leaves the GPU idle; NeMo-RL's off-policy row gives generation 8 GPUs of its own.
- weights are random (Qwen2.5-1.5B shape, bench/shapes.py) and the reward is a pseudo-random function of the
  completion (bench_grpo_step.pseudo_reward): the speed does not depend on either once the lengths are forced.

Options beyond the defaults (the defaults are main's recipe: each of these is off unless asked for):
- `--proximal train_forward` (algo.proximal_logprobs): no proximal log-prob pass; the update's own forward,
  detached, serves as the proximal policy. The same update (one optimizer update a step from the weights the
  pass would read; tests/test_proximal_logprobs.py), one forward over every token less. The reference pass
  still runs once a step (then at the start of training; its seconds are counted as log-probs).
- `--recompute none|selective`, `--recompute-num-layers N`, `--micro-batch-tokens`: activation memory against
  the recompute forward. The engine keeps its KV pool and graphs through training (the loop never calls
  sleep), so the training activations must fit beside them.
- `--producer-stream` (rollout.producer_stream): async decoding on a CUDA stream of its own, so its kernels
  run concurrently with training instead of queueing behind them on the default stream.
- `--skip-sync`: only the async mode.

Before the first step the torch.compile'd log-prob kernels are compiled for varying lengths
(`warm_logprob_kernels`: what a run's first steps do once), so no setting recompiles inside its timed step.

Per step the JSON has the wall time, the phases (generation = time inside the engine's generate, reward = the
rest of the rollout phase: decoding to text, scoring, grouping; log-probs incl. the reference pass; train;
weight update; advantages + packing), the token counts and tokens/s/GPU; per mode the means over the steps after
the first. The result file is written after each mode, so a run cut short keeps the sync numbers.

    python3 bench/bench_grpo_nemorl.py --out bench/results/grpo_nemorl_h100.json                 # GPU, ~5 min
    python3 bench/bench_grpo_nemorl.py --device cpu --tiny --out /tmp/nemorl.json                # CPU smoke run
    python3 bench/bench_grpo_nemorl.py --proximal train_forward --recompute none --micro-batch-tokens 8192 \
        --producer-stream --out /tmp/nemorl_fast.json                                            # GPU, faster
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_grpo_step import build_policy, decode, make_config, pseudo_reward  # noqa: E402
from shapes import QWEN25_1P5B, TINY_QWEN2, drawn_lengths, write_result  # noqa: E402

from questa_nemo.train.metrics import PhaseTimer  # noqa: E402
from questa_nemo.train.prompts import PromptRow, PromptSource  # noqa: E402

# NeMo-RL v0.5 performance table, DGX-H100 BF16, Llama-3.1-8B-Instruct GRPO (their numbers, not ours)
NEMO_RL_V05 = {
    "source": "NeMo-RL v0.5.0 docs/about/performance-summary.md (DGX-H100, Megatron backend, BF16)",
    "model": "Llama-3.1-8B-Instruct",
    "gpus": 16,
    "max_total_tokens": 4096,
    "rollout_samples_per_step": 2048,
    "train_samples_per_minibatch": 512,
    "on_policy": {"tokens_per_s_per_gpu": 1581, "step_s": 92.8, "mean_generated_tokens": 1019},
    "one_step_off_policy": {"tokens_per_s_per_gpu": 2478, "step_s": 64.8, "mean_generated_tokens": 1123},
    "flop_scaled_to_1p5b_on_policy": 8400,  # our arithmetic: 1,581 x the 8B / 1.5B FLOP-per-token ratio
}


def sync_device() -> None:
    """Wait for this thread's stream: with --producer-stream the async producer decodes on a stream of its own,
    which neither the trainer's step times nor the producer's generate times should wait for."""
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


class ForcedEngine:
    """The megatron engine with each prompt's completions ending at their drawn lengths, and every generate
    call's wall time and tokens recorded (one call a step here: all prompts fit one call). Everything else
    (version, update_weights, sleep, ...) is the engine's."""

    def __init__(self, inner, lengths: dict[tuple[int, ...], list[int]]):
        self.inner, self.lengths = inner, lengths
        self.calls: list[dict] = []

    def generate(self, prompts, params):
        forced = [self.lengths[tuple(p)] for p in prompts]
        sync_device()
        start = time.perf_counter()
        result = self.inner.generate(prompts, params, forced_lengths=forced)
        sync_device()
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for group in result.completions for c in group)
        if tokens != sum(map(sum, forced)):
            raise RuntimeError(f"bench: {tokens} tokens generated, {sum(map(sum, forced))} drawn")
        stats = {k: result.stats.get(k) for k in ("prefill_seconds", "graph_capture_seconds", "preemptions")}
        self.calls.append(
            {"seconds": seconds, "tokens": tokens, **stats, "thread": threading.current_thread().name}
        )
        return result

    def __getattr__(self, name):
        return getattr(self.inner, name)


class ReferencePass:
    """The policy, with one extra forward over the step's micro-batches: the work of NeMo-RL's reference-model
    log-probs (its KL term), which our recipe does not have. It runs in the log-probs call (before the proximal
    pass), or, when the step has none (algo.proximal_logprobs=train_forward), at the start of train_step, where
    its seconds are moved back to the log-probs phase (`in_train`). Seconds recorded a step."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds: list[float] = []
        self.in_train: list[bool] = []
        self._done = False  # the reference pass of the current step has run

    def _reference(self, micro_batches, temperature: float) -> None:
        sync_device()
        start = time.perf_counter()
        self.inner.logprobs(micro_batches, temperature=temperature)
        sync_device()
        self.seconds.append(time.perf_counter() - start)
        self._done = True

    def logprobs(self, micro_batches, temperature: float = 1.0):
        if not self._done:
            self._reference(micro_batches, temperature)
            self.in_train.append(False)
        return self.inner.logprobs(micro_batches, temperature=temperature)

    def train_step(self, micro_batches, loss_fn, normaliser, temperature: float = 1.0):
        if not self._done:
            self._reference(micro_batches, temperature)
            self.in_train.append(True)
        self._done = False
        return self.inner.train_step(micro_batches, loss_fn, normaliser, temperature=temperature)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class LastTrainCall:
    """The trainer, keeping the arguments of its last train_step (what --profile replays)."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def train_step(self, micro_batches, loss_fn, normaliser, temperature: float = 1.0):
        self.last = (micro_batches, loss_fn, normaliser, temperature)
        return self.inner.train_step(micro_batches, loss_fn, normaliser, temperature=temperature)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def profile_passes(policy, last, count: int, out_dir: Path) -> dict:
    """The last step's first `count` training micro-batches again, each pass under torch.profiler (bench_train's
    profile_step: GPU time by kernel kind, idle gaps and what the host did in them, top kernels): a forward-only
    log-prob pass (the reference / proximal pass's work) and a train_step (forward, backward and the megatron
    optimizer update, which moves the weights: run after the timed steps). Set beside bench_train's unpacked and
    `docs=r1` rows of the same card, it shows what the trainer's step adds to the bare model's."""
    from bench_train import profile_step

    from questa_nemo.model.attention import attention_path, segment_plan

    micro_batches, loss_fn, normaliser, temperature = last
    mbs = micro_batches[:count]
    out = {"micro_batches": len(mbs), "of": len(micro_batches), "row_tokens": int(mbs[0].tokens.numel())}
    config = policy.modules[0].config
    core = policy.modules[0].decoder.layers[0].self_attention.core_attention  # VarlenCoreAttention: varlen
    # queries as the layers see them: the model's device and dtype, heads and head size
    query = torch.empty(0, config.num_attention_heads, config.kv_channels, dtype=config.params_dtype,
                        device=policy.device)  # fmt: skip
    layouts = []
    for mb in mbs:
        cu = mb.cu_seqlens.tolist()[: len(mb.sequence_ids) + 1]
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        plan = segment_plan(cu[:-1], lengths, policy.device)
        layouts.append({"segments": len(lengths), "longest": max(lengths), "tokens": sum(lengths),
                        "attention": attention_path(query, plan, varlen=core.varlen)})  # fmt: skip
    out["layouts"] = layouts
    out["logprobs"] = profile_step(lambda: policy.logprobs(mbs, temperature), "grpo_logprobs", out_dir)
    out["train_step"] = profile_step(
        lambda: policy.train_step(mbs, loss_fn, normaliser * len(mbs) / len(micro_batches), temperature),
        "grpo_train_step", out_dir,
    )  # fmt: skip
    return out


def warm_logprob_kernels(policy, cfg) -> None:
    """Compile the torch.compile'd log-prob kernels (model/logprobs.py) for varying chunk lengths, with and
    without grad, before the first step: what a run's first steps do once. Without it a setting whose
    micro-batches are one chunk each (micro-batch tokens <= model.logprob_chunk_tokens) would see its first
    second length, and recompile, inside the timed step, while 16K micro-batches (two chunk lengths a row) do
    it in the warm-up step. Random inputs of the real dtype and shapes; the policy's weights are not touched."""
    from questa_nemo.model.logprobs import chunked_logprobs, output_weight

    if not torch.cuda.is_available():
        return
    weight = output_weight(policy.modules[0]).detach().clone().requires_grad_(True)
    for grad in (False, True):
        for n in (1000, 1010):
            with torch.set_grad_enabled(grad):
                hidden = torch.randn(n, 1, weight.size(1), device=weight.device, dtype=weight.dtype)
                hidden.requires_grad_(grad)
                targets = torch.randint(0, policy.vocab_size, (n, 1), device=weight.device)
                out = chunked_logprobs(hidden, weight, targets, 1.0, vocab_size=policy.vocab_size,
                                       chunk_tokens=cfg.model.logprob_chunk_tokens)
                if grad:  # as in the loss: a dense gradient for the log-probs, none for the entropy
                    (out.logprobs * torch.randn_like(out.logprobs)).sum().backward()
    sync_device()


def make_rows(args, vocab: int) -> tuple[list[PromptRow], dict[tuple[int, ...], list[int]]]:
    """Prompt rows for every step the producer may draw (random ids, lengths uniform in [prompt_min,
    prompt_max]) and the drawn completion lengths of each row's samples, keyed by its token ids (what the engine
    sees)."""
    g = torch.Generator().manual_seed(0)
    count = args.prompts * (args.steps + args.staleness)
    sizes = torch.randint(args.prompt_min, args.prompt_max + 1, (count,), generator=g).tolist()
    rows = [
        PromptRow(str(i), torch.randint(10, vocab, (n,), generator=g).tolist(), "", True, {})
        for i, n in enumerate(sizes)
    ]
    longest = args.max_total_tokens - args.prompt_max
    drawn = drawn_lengths(count * args.samples, args.length_mean, args.length_sigma, longest, seed=1)
    lengths = {
        tuple(r.prompt_ids): drawn[i * args.samples : (i + 1) * args.samples] for i, r in enumerate(rows)
    }
    if len(lengths) != len(rows):
        raise RuntimeError("bench: two prompt rows drew the same token ids")
    return rows, lengths


def pool_blocks(rows: list[PromptRow], lengths: dict, args) -> int:
    """Paged KV blocks that hold every sequence of the largest step at once (each sample its own blocks)."""
    block = args.kv_block_size
    per_row = sorted(
        (sum(-(-(len(r.prompt_ids) + n) // block) for n in lengths[tuple(r.prompt_ids)]) for r in rows),
        reverse=True,
    )
    return sum(per_row[: args.prompts]) + 1


def configure(args, hf_path: str, max_staleness: int):
    cfg = make_config(args, hf_path)
    cfg.rollout.max_new_tokens = args.max_total_tokens - args.prompt_min
    cfg.rollout.max_prompt_tokens = args.prompt_max
    cfg.rollout.max_staleness = max_staleness
    cfg.algo.proximal_logprobs = args.proximal
    cfg.model.recompute_num_layers = args.recompute_num_layers
    cfg.rollout.producer_stream = args.producer_stream
    cfg.model.packed_attention = args.packed_attention
    cfg.model.attention = args.attention
    # the async producer keeps max_staleness steps ahead through the last timed step, as in a long run (it
    # would otherwise stop early and the last steps would wait for no generation); their rollouts are dropped
    cfg.train.steps = args.steps + max_staleness
    return cfg


def run_mode(args, shape: dict, hf_path: str, max_staleness: int, rows, lengths) -> dict:
    """`args.steps` GRPO steps of a fresh policy: max_staleness 0 = SyncRollouts on the colocated engine, else
    AsyncRollouts on the snapshot engine (bench_async.py's mechanism)."""
    from questa_nemo.rollout import RolloutContext, build_backend
    from questa_nemo.rollout.snapshot import build_async_backend
    from questa_nemo.train.async_rollouts import AsyncRollouts
    from questa_nemo.train.grpo import SyncRollouts, grpo_step

    cfg = configure(args, hf_path, max_staleness)
    vocab = shape["vocab_size"]
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    policy = build_policy(cfg, shape, args.steps)
    warm_logprob_kernels(policy, cfg)
    trainer = ReferencePass(policy) if args.reference_pass else policy
    recorder = LastTrainCall(trainer)  # --profile replays its last train_step
    ctx = RolloutContext(policy.modules, vocab)
    outer = build_async_backend(cfg.rollout, ctx) if max_staleness > 0 else build_backend(cfg.rollout, ctx)
    engine = outer.inner if max_staleness > 0 else outer  # the MegatronBackend that decodes
    engine.options = replace(
        engine.options,
        paged_kv=not args.contiguous_kv,
        kv_block_size=args.kv_block_size,
        kv_blocks=0 if args.contiguous_kv else pool_blocks(rows, lengths, args),
    )
    forced = ForcedEngine(engine, lengths)
    if max_staleness > 0:
        outer.inner = forced  # the lock and the weight snapshot stay the async wrapper's
        backend = outer
        rollouts = AsyncRollouts(cfg, PromptSource(rows, seed=1), backend, pseudo_reward, decode, ())
    else:
        backend = forced
        rollouts = SyncRollouts(cfg, PromptSource(rows, seed=1), backend, pseudo_reward, decode, ())
    steps = []
    try:
        for step in range(1, args.steps + 1):
            timer = PhaseTimer()
            sync_device()
            allocator = allocator_counts()
            start = time.perf_counter()
            metrics, data = grpo_step(cfg, step, recorder, backend, rollouts, timer)
            sync_device()
            seconds = time.perf_counter() - start
            phases = timer.pop()
            steps.append(step_record(step, seconds, phases, metrics, data, forced, trainer, max_staleness))
            # memory pressure shows here: a retry frees every cached block after a synchronize, and cudaMalloc /
            # cudaFree each synchronise the device
            steps[-1]["allocator"] = {k: v - allocator.get(k, 0) for k, v in allocator_counts().items()}
            print(json.dumps({"max_staleness": max_staleness, **steps[-1]}), flush=True)
    finally:
        if max_staleness > 0:
            rollouts.close()
    mode = {"max_staleness": max_staleness, "steps": steps, **summary(steps)}
    if args.profile is not None and max_staleness == 0 and recorder.last:
        mode["profile"] = profile_passes(policy, recorder.last, args.profile_micro_batches, Path(args.profile))
    mode["generate_calls"] = forced.calls
    if torch.cuda.is_available():
        mode["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        mode["peak_gpu_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        mode["gpu_memory_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return mode


def allocator_counts() -> dict[str, int]:
    """The CUDA caching allocator's event counters (empty on CPU)."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    keys = ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free")
    return {k: int(stats.get(k, 0)) for k in keys}


def step_record(step, seconds, phases, metrics, data, forced, trainer, max_staleness) -> dict:
    """One step as NeMo-RL counts it (one GPU), with the phase breakdown."""
    generated = int(data.completion_lengths.sum())
    total = int(sum(len(s) for s in data.sequences))  # prompt + completion of every rollout sample
    call = forced.calls[step - 1]  # one generate call a step, in step order (sync: this step's)
    rollout = phases.get("time/rollout_s", 0.0)
    reference = trainer.seconds[-1] if isinstance(trainer, ReferencePass) else 0.0
    moved = reference if isinstance(trainer, ReferencePass) and trainer.in_train[-1] else 0.0
    record = {
        "step": step,
        "seconds": seconds,
        "samples": len(data.sequences),
        "total_num_tokens": total,
        "generated_tokens": generated,
        "prompt_tokens": total - generated,
        "tokens_per_s_per_gpu": total / seconds,
        "generation_s": call["seconds"],  # async: on the producer thread, overlapped with training
        "generation_prefill_s": call["prefill_seconds"],
        "generation_graph_capture_s": call["graph_capture_seconds"],
        "exposed_rollout_s": rollout,  # what the trainer waited for its rollouts (sync: generation + reward)
        # log-probs: the proximal pass (none with --proximal train_forward) and the reference pass, wherever it ran
        "logprobs_s": phases.get("time/logprobs_s", 0.0) + moved,
        "reference_logprobs_s": reference,
        "train_s": phases.get("time/train_s", 0.0) - moved,
        "update_weights_s": phases.get("time/update_weights_s", 0.0),
        "advantages_and_pack_s": phases.get("time/advantages_s", 0.0) + phases.get("time/pack_s", 0.0),
        "behave_kl": metrics.get("actor/behave_kl"),
        "staleness_max": metrics.get("rollout/staleness_max"),
        "preemptions": call["preemptions"],
    }
    if max_staleness == 0:
        record["reward_s"] = max(rollout - call["seconds"], 0.0)
    return record


def summary(steps: list[dict]) -> dict:
    """Means over the steps after the first (warm-up: graph capture, allocator growth), and NeMo-RL's rates."""
    timed = steps[1:] or steps
    mean = {
        k: sum(s[k] for s in timed) / len(timed) for k in timed[0] if isinstance(timed[0][k], (int, float))
    }
    mean.pop("step", None)
    tokens = sum(s["total_num_tokens"] for s in timed)
    seconds = sum(s["seconds"] for s in timed)
    out = {
        "timed_steps": [s["step"] for s in timed],
        "mean": mean,
        "tokens_per_s_per_gpu": tokens / seconds,  # E2E, over the timed steps together
        "mean_step_s": seconds / len(timed),
        "mean_generated_tokens_per_sample": sum(s["generated_tokens"] for s in timed)
        / sum(s["samples"] for s in timed),
        "mean_prompt_tokens_per_sample": sum(s["prompt_tokens"] for s in timed)
        / sum(s["samples"] for s in timed),
        "policy_training_tokens_per_s_per_gpu": tokens / sum(s["train_s"] for s in timed),
        "logprobs_tokens_per_s_per_gpu": tokens / sum(s["logprobs_s"] for s in timed),
    }
    if "reward_s" in timed[0]:  # sync: NeMo-RL's generation time is the generation phase
        generation = sum(s["generation_s"] for s in timed)
    else:  # async, as NeMo-RL: exposed generation + log-probs + training
        generation = sum(s["exposed_rollout_s"] + s["logprobs_s"] + s["train_s"] for s in timed)
    out["generation_tokens_per_s_per_gpu"] = tokens / generation
    out["generation_output_tokens_per_s"] = sum(s["generated_tokens"] for s in timed) / sum(
        s["generation_s"] for s in timed
    )  # decode rate inside generate (our usual rollout metric; not NeMo-RL's)
    return out


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="a 2-layer model at toy lengths (CPU smoke run)")
    p.add_argument("--prompts", type=int, default=8, help="prompts a step")
    p.add_argument("--samples", type=int, default=32, help="samples a prompt (NeMo-RL's recipe: 32)")
    p.add_argument("--max-total-tokens", type=int, default=4096, help="prompt + completion cap")
    p.add_argument("--prompt-min", type=int, default=150)
    p.add_argument("--prompt-max", type=int, default=400)
    p.add_argument(
        "--length-mean", type=float, default=1100.0, help="lognormal mean before the cap (~1K after)"
    )
    p.add_argument("--length-sigma", type=float, default=1.0)
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--recompute", default="full", choices=("none", "full", "selective"))
    p.add_argument(
        "--recompute-num-layers", type=int, default=None, help="recompute=full: only the first N layers"
    )
    p.add_argument(
        "--proximal", default="recompute", choices=("recompute", "train_forward"),
        help="algo.proximal_logprobs: recompute (a no-grad pass before the update, the recipe's default) or "
        "train_forward (the update's own forward, detached: one forward less a step, the same update)",
    )
    p.add_argument(
        "--producer-stream", action="store_true",
        help="rollout.producer_stream: async decoding on a CUDA stream of its own, concurrent with training",
    )
    p.add_argument("--skip-sync", action="store_true", help="only the async mode (--staleness > 0)")
    p.add_argument("--steps", type=int, default=3, help="GRPO steps a mode; the first is a warm-up")
    p.add_argument(
        "--staleness", type=int, default=1, help="async bound (1 = one step off-policy); 0: sync only"
    )
    p.add_argument("--reference-pass", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--contiguous-kv", action="store_true", help="the contiguous KV cache instead of paged")
    p.add_argument("--kv-block-size", type=int, default=64)
    p.add_argument(
        "--profile", default=None,
        help="after the sync mode's steps, its last step's first micro-batches again under torch.profiler "
        "(a log-prob pass and a train_step), kernel breakdowns written here and into the result (CPU: host ops)",
    )
    p.add_argument("--profile-micro-batches", type=int, default=6)
    p.add_argument(
        "--packed-attention", default="auto", choices=("auto", "varlen", "sdpa"),
        help="model.packed_attention: packed rows through torch's flash varlen kernel (auto: where it can run) or SDPA",
    )
    p.add_argument(
        "--attention", default="auto", choices=("auto", "sdpa", "fa4"),
        help="model.attention for the log-prob and training passes (fa4: FlashAttention 4's kernels)",
    )
    p.add_argument(
        "--wgrad-into-main-grad", action=argparse.BooleanOptionalAction, default=True,
        help="model/linear.py WGRAD_INTO_MAIN_GRAD: weight gradients added into DDP's fp32 main grad by the GEMM",
    )
    p.add_argument(
        "--logprob-kernels", default="compile", choices=("compile", "triton"),
        help="model/logprobs.py CUDA_KERNELS: the log-prob head's per-chunk kernels on CUDA",
    )
    p.add_argument("--out", default="bench/results/grpo_nemorl.json")
    args = p.parse_args(argv)
    if args.recompute_num_layers is not None and (args.recompute != "full" or args.recompute_num_layers < 1):
        p.error("--recompute-num-layers needs --recompute full and a value >= 1")
    if args.skip_sync and args.staleness < 1:
        p.error("--skip-sync needs --staleness >= 1 (an async mode to run)")
    if args.tiny:  # toy lengths: a 2-layer model on CPU in seconds
        args.max_total_tokens = min(args.max_total_tokens, 64)
        args.prompt_min, args.prompt_max = min(args.prompt_min, 8), min(args.prompt_max, 16)
        args.length_mean, args.kv_block_size = min(args.length_mean, 12.0), 16
    # bench_grpo_step.make_config's names
    args.new_tokens = args.max_total_tokens - args.prompt_min
    args.prompt_tokens = args.prompt_max
    return args


def main(argv=None) -> int:
    args = arguments(argv)
    from questa_nemo.model.parallel import cuda_allocator_defaults, init_distributed

    cuda_allocator_defaults("megatron")  # what `questa-nemo train` sets (model/parallel.py), unless the user did
    from questa_nemo.model import linear

    linear.WGRAD_INTO_MAIN_GRAD = args.wgrad_into_main_grad
    from questa_nemo.model import logprobs

    logprobs.CUDA_KERNELS = args.logprob_kernels
    shape = TINY_QWEN2 if args.tiny else QWEN25_1P5B
    tmp = Path(tempfile.mkdtemp())
    (tmp / "config.json").write_text(json.dumps(shape))
    hf_path = str(tmp / "config.json")
    init_distributed(configure(args, hf_path, 0).model)
    rows, lengths = make_rows(args, shape["vocab_size"])
    drawn = [n for ns in lengths.values() for n in ns]
    settings = {
        **vars(args),
        "weights": "random (Qwen2.5-1.5B shape)" if not args.tiny else "random (tiny)",
        "rollout_samples_per_step": args.prompts * args.samples,
        "trained_samples_per_step": args.prompts * args.samples,  # all of them, one optimizer step
        "drawn_lengths": {"mean": sum(drawn) / len(drawn), "max": max(drawn), "min": min(drawn)},
        "kv_blocks": 0 if args.contiguous_kv else pool_blocks(rows, lengths, args),
        "gpus": 1,
        "torch": torch.__version__,
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    }
    modes: list[dict] = []

    def save() -> None:
        sync = next((m for m in modes if m["max_staleness"] == 0), {})
        ahead = next((m for m in modes if m["max_staleness"] > 0), {})
        extra = {}
        if "mean_step_s" in sync and "mean_step_s" in ahead:
            extra["async_speedup_vs_sync"] = sync["mean_step_s"] / ahead["mean_step_s"]
        write_result(
            args.out, "grpo_nemorl", args.tiny, settings, nemo_rl_v05=NEMO_RL_V05, modes=modes, **extra
        )

    for k in ([] if args.skip_sync else [0]) + ([args.staleness] if args.staleness > 0 else []):
        try:
            modes.append(run_mode(args, shape, hf_path, k, rows, lengths))
        except Exception as error:  # noqa: BLE001 - recorded in the result; the other mode still runs
            traceback.print_exc()
            modes.append({"max_staleness": k, "error": repr(error)})
        save()  # after every mode: a run cut short keeps what it measured
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for m in modes:
        if "error" not in m:
            print(
                f"max_staleness={m['max_staleness']}: {m['tokens_per_s_per_gpu']:.0f} tokens/s/GPU (NeMo-RL's count), "
                f"{m['mean_step_s']:.1f} s a step, {m['mean_generated_tokens_per_sample']:.0f} generated tokens a sample"
            )
    return 0 if all("error" not in m for m in modes) else 1


if __name__ == "__main__":
    sys.exit(main())
