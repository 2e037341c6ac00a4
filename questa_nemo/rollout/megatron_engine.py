"""Colocated rollout on the trainer's own megatron GPTModel, with our own fast decoder.

Weights. At TP = PP = 1 a weight update costs nothing: the decoder aliases the model's parameter tensors
(rollout/decoder.py), so `update_weights` only re-reads the references (in case the trainer re-bound its
parameters, e.g. into DDP buffers; moved storage drops the captured graphs) and bumps `version`.
At TP or PP > 1 every rank holds an unsharded replica, gathered from the model-parallel group's shards once
per update (model/gather.py: one broadcast per rank of the group) and copied into the replica's tensors in
place (so captured graphs stay valid). Each rank then decodes the prompts of its DP replica on its own, the
same prompts with the same seed on every rank of the group, so all of them produce the same completions as a
single-rank run with the same weights (bit for bit on CPU; the tests check it) and no collective runs during
decoding. Why a replica rather than Megatron-style sharded decoding, for the 1.5B policy: the replica costs
3.1 GB (bf16) per GPU, about 3x that briefly during a refresh, and one gather of 3.1 GB per step (estimated,
not measured: 10-30 ms over NVLink, against a step of tens of seconds); sharded decoding would add two all-reduces per layer per token (56 per decode step of the 28-layer
model) inside the captured step, and the model's 2 KV heads cap TP at 2. The price: the ranks of a
model-parallel group decode the same sequences, so rollout throughput is that of world / (TP x PP) GPUs. Splitting
the prompts over the group is now possible without changing the samples (the sampling uniforms are keyed per
sequence: SamplingParams.prompt_keys, rollout/sampling.py), but not done.

Scheduling is continuous batching over a fixed set of KV-cache slots. Sequences (prompt, sample) wait in
order; a free slot takes the next one. The n samples of a prompt share one prefill: a slot that starts a
prompt whose prefix another slot still holds copies those keys/values instead of recomputing them. The
decode step runs `harvest_every` times between harvests; a harvest (the loop's only host sync) copies the
chunk's tokens to the host, ends sequences at their first stop token or at max_new_tokens, and refills their
slots. A stopped slot decodes garbage until the harvest (at most `harvest_every` wasted steps) and, once the
queue is empty, is parked at position 0 so it can never run past the cache. When the queue is empty and at
most half the batch is live, the live sequences move to the lowest slots (cache rows included) and the
batch shrinks: a long tail stops paying for finished slots.

KV cache, two layouts (`EngineOptions.paged_kv`). Contiguous (decoder.KVCache): one max-length row per slot,
slots limited by memory at the longest sequence, and every step reads every slot up to the longest live
sequence (rounded up). Paged (rollout/paged.py): a block pool sized by memory, blocks taken as sequences grow
and returned when they end, each sequence reading only its own blocks (a Triton kernel on GPU). A waiting
sequence is admitted when the free blocks cover its prompt plus `kv_headroom_tokens` beyond what the live
sequences need for the next chunk; when the live sequences outgrow the pool, the most recently admitted ones
are preempted (their blocks freed, their tokens kept) and recomputed later: re-admitted first, their prompt and
tokens so far prefilled again. Samples of one prompt share its full prompt blocks.

CUDA graphs on GPU only; on CPU the same step runs eagerly (tests, the embedded default in float32).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from questa_nemo.config import RolloutConfig
from questa_nemo.model.convert import ModelShape, ShardLayout, hf_to_megatron
from questa_nemo.model.weights8 import FORMATS as WEIGHTS8_FORMATS
from questa_nemo.model.weights8 import quantize_rows
from questa_nemo.rollout.base import Completion, GenerationResult, RolloutContext, SamplingParams
from questa_nemo.rollout.decoder import DecoderWeights, KVCache, prefill
from questa_nemo.rollout.graphs import ATTEND_LEN_BUCKET, DecodeRunner, StepKey, attend_bucket, batch_bucket
from questa_nemo.rollout.paged import PagedKVCache, blocks_for
from questa_nemo.rollout.sampling import sequence_key

_ROLLOUT = RolloutConfig()  # the schema's defaults: the only place they are written (config.py)


@dataclass(frozen=True)
class EngineOptions:
    """The engine's knobs; those that are config keys (rollout.*) default to the schema's values."""

    max_batch_sequences: int = _ROLLOUT.max_batch_sequences  # slots decoded at once (fewer if no KV memory)
    cuda_graphs: bool = _ROLLOUT.cuda_graphs  # capture the decode step on GPU
    kv_cache_memory_fraction: float = _ROLLOUT.kv_cache_memory_fraction  # GPU: share of free memory
    prefill_chunk_tokens: int = _ROLLOUT.prefill_chunk_tokens  # prompt tokens per prefill forward
    harvest_every: int = 64  # decode steps between harvests (one host sync each; a stopped slot idles <= this)
    paged_kv: bool = False  # KV cache in blocks, each sequence reading its own (rollout/paged.py)
    kv_block_size: int = 64  # positions a block (paged): a divisor of 256, at least 16
    kv_blocks: int = 0  # paged pool size in blocks; 0 = sized by kv_cache_memory_fraction (GPU) or need
    kv_headroom_tokens: int = 128  # paged: free positions beyond its prompt a sequence needs to be admitted
    # paged, Triton kernel: splits of a fixed length per sequence and RoPE + the key/value append fused in one
    # kernel (paged_triton.py); False runs the earlier step (torch RoPE, index_put, splits by batch)
    fused_decode: bool = True
    # paged + fused_decode: the samples of a prompt read its shared blocks once per group (cascade attention,
    # paged_triton._prefix_kernel); off until measured on a GPU (bench/profile_decode.py variant "cascade")
    cascade_attention: bool = False
    # paged, Triton kernel: merge the split partials with paged_triton._merge_tile_kernel (a program per query
    # head, all its partials in one tile) instead of _merge_kernel (a program per query group walking them),
    # at batches whose splits are short (paged.TILE_MERGE_MAX_SPLIT: many splits a sequence). H100: the decode
    # step at 8 sequences of 8K 3.90 -> 3.17 ms (merge 0.90 -> 0.14 ms of kernels); docs/benchmarks.md (μ).
    # False: the loop merge at every batch.
    merge_tile: bool = True
    # paged + fused_decode, Triton kernel: the decode step's residual add and the RMSNorm after it in one kernel,
    # SwiGLU in one (decoder._decode_fused_norms: 84 fewer launches a step at 28 layers; the add's bits as
    # torch's, the norm's as the trainer's kernel). H100: the step at 8 sequences of 8K 3.15 -> 2.85 ms, the
    # realistic row at 512 slots 14,366 -> 15,878 tok/s (docs/benchmarks.md (κ)), the fixed row 35,232 ->
    # 40,624 (docs/benchmarks.md (λ)). False: torch's add, RMSNorm and SwiGLU.
    fused_norms: bool = True
    # with fused_norms: the decode step's projections at up to 32 sequences (a rollout's tail) in Triton's
    # skinny matmul (model/triton_kernels.skinny_linear: K split over the SMs, the partials summed in a fixed
    # order by the last program of a tile) instead of cuBLAS. Off: on an H100 no faster (bench/bench_skinny.py:
    # a step's projections at 8 rows 1.510 against cuBLAS's 1.508 ms; the realistic row 15,862 against 15,878)
    skinny_gemm: bool = False
    # with fused_norms: the layers' four projections at up to 16 sequences (rollout/decoder.WEIGHTS8_MAX_ROWS:
    # a rollout's tail, where the weight read is most of the step) multiply by 8-bit copies of the weights with
    # one float32 scale per output row (model/weights8.quantize_rows), in the skinny matmul: half the bytes.
    # "int8" (a uniform grid of 255 levels a row) or "fp8" (e4m3, a 3-bit mantissa; Ada / Hopper or later);
    # None: off. Larger batches and the output head keep the weights' dtype. Changes what is sampled: the
    # decoupled loss's behaviour weight exp(proximal - behaviour) (algo/loss.py) corrects for it, its cap masks
    # the tokens that moved most. SmolLM2-135M on CPU, KL(8-bit || bf16) a token over 3 seeds
    # (bench/weights8_kl.py): int8 0.0052, fp8 0.021; bf16's own against float32 0.0011. The copies (half the
    # projections' size) are requantized on every weight update and kept through sleep(). Off: on an H100 int8
    # with pdl ran the 512-sequence realistic row 1.062x (fp8 1.053x) and the 2,048-sequence one 0.997x
    # (docs/benchmarks.md (π)); on an H200 it took a decode step at 8 sequences from 2.404 to 2.094 ms
    # (docs/benchmarks.md (ο)).
    weights8: str | None = None
    # with fused_norms, Hopper or later: the step's Triton kernels (RoPE + append, attention and its merge, the
    # residual add + RMSNorm, SwiGLU, and the projections where they run in Triton: skinny_gemm, weights8)
    # as programmatic dependent launches (model/triton_kernels.pdl_enter): each kernel's programs are placed
    # while the previous one's last ones run, instead of after it ends (the gaps of a launch-bound step at a
    # rollout's tail). Same bits. H200, a decode step at 8 sequences of 8K: with cuBLAS projections no change
    # (2.404 ms: the chain breaks at each GEMM), with the skinny matmul 2.405 -> 2.281, with int8 2.243 -> 2.094
    # (docs/benchmarks.md (ο)). Off: on the realistic row the skinny matmul with it gave 1.014x.
    pdl: bool = False
    # GPU: sample (temperature > 0, no top-p) in one Triton kernel over the lm_head's bf16 output instead of
    # torch's float32 passes (rollout/sampling_triton.py). H100, bench_rollout "paged_fs" against "paged":
    # 38,120 against 34,535 tok/s at 256 x (1K + 2K), 13,442 against 12,520 at realistic lengths; the same
    # inverse-CDF picks up to the rounding of the sums (253 of 256 rows the same token as torch's float32
    # sampler on random logits, log-probs within 1.6e-6). False: torch's sampler (rollout/sampling.py).
    fused_sampler: bool = True

    @classmethod
    def from_config(cls, cfg: RolloutConfig) -> EngineOptions:
        """The options a `rollout` config section sets (harvest_every is not a config key)."""
        return cls(
            max_batch_sequences=cfg.max_batch_sequences,
            cuda_graphs=cfg.cuda_graphs,
            kv_cache_memory_fraction=cfg.kv_cache_memory_fraction,
            prefill_chunk_tokens=cfg.prefill_chunk_tokens,
        )


@dataclass
class _Live:
    """A sequence occupying a slot."""

    prompt: int  # index into the prompts of the call
    sample: int  # 0..n-1
    tokens: list[int]  # generated so far (harvested; kept when a paged cache preempts the sequence)
    logprobs: list[float]


def _set_noise_keys(
    runner: DecodeRunner,
    slots: list[_Live | None],
    start_position: list[int],
    start_step: list[int],
    step: int,
    seed: int,
    prompt_keys,
) -> None:
    """Give each live slot its sequence's noise key and the position of its completion's first decode input
    (free slots get zeros): the uniforms a sequence samples with depend on (seed, prompt key, sample, completion
    position) only, not on its slot, nor on a preemption (a resumed sequence keeps counting from its first token).
    """
    keys, starts = [], []
    for i, s in enumerate(slots):
        if s is None:
            keys.append(0)
            starts.append(0)
            continue
        keys.append(sequence_key(seed, prompt_keys[s.prompt], s.sample))
        tokens_at_admission = len(s.tokens) - (step - start_step[i])
        starts.append(start_position[i] - tokens_at_admission)
    device = runner.noise_key.device
    runner.noise_key[: len(slots)] = torch.tensor(keys, dtype=torch.long, device=device)
    runner.noise_start[: len(slots)] = torch.tensor(starts, dtype=torch.long, device=device)


def _stop_end(tokens: list[int], start: int, stops: set[int]) -> int | None:
    """Length of `tokens` cut after the first stop token at or after `start` (None: no stop there)."""
    return next((k + 1 for k in range(start, len(tokens)) if tokens[k] in stops), None)


def build(cfg: RolloutConfig, ctx: RolloutContext) -> MegatronBackend:
    """The registry's constructor: in place on a whole model, on a gathered replica for shards."""
    options = EngineOptions.from_config(cfg)
    model = ctx.chunks[0]
    on_gpu = next(model.parameters()).is_cuda
    options = replace(options, paged_kv=cfg.kv_cache == "paged" or (cfg.kv_cache == "auto" and on_gpu))
    if len(ctx.chunks) == 1 and ctx.model_parallel == 1:
        return MegatronBackend(model, ctx.vocab_size, options, ctx.version)
    if ctx.hf_config is None:
        raise ValueError("rollout.backend=megatron at TP or PP > 1 gathers the weights: it needs the hf_config")
    shape = ModelShape.from_hf(ctx.hf_config)

    def replica() -> DecoderWeights:  # collective over the model-parallel group
        whole = hf_to_megatron(ctx.hf_weights(), shape, ShardLayout())
        return DecoderWeights.from_state_dict(whole, model, ctx.vocab_size)

    return MegatronBackend(model, ctx.vocab_size, options, ctx.version, replica=replica)


WEIGHTS8_PROJECTIONS = ("qkv", "proj", "fc1", "fc2")


def _quantize_layers(
    weights: DecoderWeights, fmt: str, into: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None
) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """8-bit copies of every layer's projections (EngineOptions.weights8), into `into`'s buffers if given."""
    out = []
    for i, lw in enumerate(weights.layers):
        buffers = {} if into is None else into[i]
        out.append({name: quantize_rows(getattr(lw, name), fmt, buffers.get(name)) for name in WEIGHTS8_PROJECTIONS})
    return out


class MegatronBackend:
    """GenerationBackend over an unwrapped megatron GPTModel: its own tensors (TP = PP = 1), or with `replica`
    (a collective returning fresh unsharded DecoderWeights of the trainer's current weights) a replica that
    `update_weights` refreshes; `model` then only supplies the architecture."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int,
        options: EngineOptions,
        version: int = 0,
        replica: Callable[[], DecoderWeights] | None = None,
    ):
        self.model, self.vocab_size, self.options, self.version = model, vocab_size, options, version
        self._replica = replica
        self.weights = replica() if replica is not None else DecoderWeights.from_gpt_model(model, vocab_size)
        if options.weights8 is not None and options.weights8 not in WEIGHTS8_FORMATS:
            raise ValueError(f"rollout: weights8 is {options.weights8!r}: one of {sorted(WEIGHTS8_FORMATS)} or None")
        for name in ("weights8", "pdl"):
            if getattr(options, name) and not (options.paged_kv and options.fused_decode and options.fused_norms):
                raise ValueError(
                    f"rollout: {name} runs in the fused-norms decode step: it needs paged_kv, fused_decode and "
                    "fused_norms"
                )
        self._w8 = _quantize_layers(self.weights, options.weights8) if options.weights8 else None
        self.weights.w8 = self._w8
        self._runner: DecodeRunner | None = None
        self._memory_bound = False  # the current cache has fewer slots than wanted because memory ran short

    @property
    def shares_trainer_weights(self) -> bool:
        """True when decoding reads the trainer's parameters in place (async rollouts must snapshot them)."""
        return self._replica is None

    # ------------------------------------------------------------------------------ GenerationBackend
    @torch.no_grad()
    def update_weights(self, version: int) -> None:
        """The trainer stepped its parameters: re-read the references (in place) or refresh the replica (one
        gather, copied into the replica's tensors so captured graphs stay valid); bump the version."""
        if self._replica is not None:
            for mine, fresh in zip(self.weights.tensors(), self._replica().tensors()):
                mine.copy_(fresh)
        else:
            fresh = DecoderWeights.from_gpt_model(self.model, self.vocab_size)
            if self._runner is not None and fresh.data_ptrs() != self.weights.data_ptrs():
                self.sleep()  # graphs captured the old addresses
            fresh.w8 = self._w8
            self.weights = fresh
        if self._w8 is not None:  # into the same buffers: captured graphs read them
            _quantize_layers(self.weights, self.options.weights8, self._w8)
        self.version = version

    def sleep(self) -> None:
        """Free the KV cache, step buffers and graphs; the next generate reallocates them."""
        self._runner = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        forced_lengths: list[list[int]] | None = None,
    ) -> GenerationResult:
        """forced_lengths[p][s] (benchmarks): completion s of prompt p ends after that many tokens as if it had
        sampled a stop token there (found at the harvest, like a real one), so every engine does the same work.
        """
        if not prompts:
            return GenerationResult(completions=[])
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty")
        started = time.perf_counter()
        runner = self._ensure_runner(
            max(len(p) for p in prompts) + params.max_new_tokens, params.n * len(prompts)
        )
        if params.prompt_keys and len(params.prompt_keys) != len(prompts):
            raise ValueError(f"generate: {len(params.prompt_keys)} prompt_keys for {len(prompts)} prompts")
        prompt_keys = params.prompt_keys or range(len(prompts))
        waiting = deque(_Live(p, s, [], []) for p in range(len(prompts)) for s in range(params.n))
        cache, captured_before = runner.cache, runner.capture_seconds
        paged = isinstance(cache, PagedKVCache)
        if paged:
            cache.allocator.peak_used = cache.allocator.used
        batch = batch_bucket(len(waiting), cache.slots)
        stops = set() if params.ignore_eos else set(params.stop_token_ids)
        slots: list[_Live | None] = [None] * batch
        start_position = [0] * batch  # position of the slot's first decode input
        start_step = [0] * batch
        prefix_holder: dict[int, int] = {}  # prompt -> a slot whose cache holds its prefix
        done: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        step = steps_run = compactions = preemptions = peak_live = 0
        prefill_s = 0.0
        while True:
            tic = time.perf_counter()
            self._admit(runner, prompts, waiting, slots, start_position, start_step, prefix_holder, step)
            prefill_s += time.perf_counter() - tic
            live = [i for i, seq in enumerate(slots) if seq is not None]
            if not live:
                if waiting:
                    raise RuntimeError("rollout: the paged KV cache cannot hold one waiting sequence")
                break
            if not waiting and batch > 8 and len(live) <= batch // 2:
                batch = self._compact(runner, slots, start_position, start_step, step)
                live = list(range(len(live)))
                compactions += 1
                prefix_holder.clear()  # slots moved (a paged preemption may requeue a sequence with no tokens)
            remaining = min(params.max_new_tokens - len(slots[i].tokens) for i in live)
            chunk = min(self.options.harvest_every, remaining)
            if paged:
                preempted = self._reserve(cache, slots, start_position, start_step, step, chunk, prefix_holder)
                waiting.extendleft(reversed(preempted))  # recomputed first, oldest first
                preemptions += len(preempted)
                live = [i for i, seq in enumerate(slots) if seq is not None]
                cache.sync()
            peak_live = max(peak_live, len(live))
            top = max(start_position[i] - start_step[i] for i in live)  # position at step t: top + t
            if params.temperature > 0:
                _set_noise_keys(runner, slots, start_position, start_step, step, params.seed, prompt_keys)
            out_tokens, out_logprobs = self._decode_chunk(runner, batch, step, chunk, top, params)
            step += chunk
            steps_run += chunk
            for i in live:
                seq = slots[i]
                seq.tokens += out_tokens[i]
                seq.logprobs += out_logprobs[i]
                end = _stop_end(seq.tokens, len(seq.tokens) - chunk, stops)
                if forced_lengths is not None:
                    forced = forced_lengths[seq.prompt][seq.sample]
                    if len(seq.tokens) >= forced and (end is None or forced < end):
                        end = forced
                if end is not None or len(seq.tokens) >= params.max_new_tokens:
                    reason = "stop" if end is not None else "length"
                    end = end or params.max_new_tokens
                    done[seq.prompt][seq.sample] = Completion(
                        seq.tokens[:end], seq.logprobs[:end], reason, self.version
                    )
                    slots[i] = None
                    if paged:
                        self._release(cache, i, prefix_holder)
        completions = [list(group) for group in done]
        seconds = time.perf_counter() - started
        new_tokens = sum(len(c.token_ids) for group in completions for c in group)
        stats = {
            "tokens": float(new_tokens),
            "seconds": seconds,
            "prefill_seconds": prefill_s,
            "tokens_per_second": new_tokens / max(seconds, 1e-9),
            "decode_steps": float(steps_run),
            "slots": float(batch_bucket(params.n * len(prompts), cache.slots)),
            "compactions": float(compactions),
            "cuda_graphs": float(runner.num_graphs),
            "graph_capture_seconds": runner.capture_seconds - captured_before,
            "peak_sequences_in_flight": float(peak_live),
            "paged_kv": float(paged),
        }
        if paged:
            stats.update(cache.memory(), preemptions=float(preemptions))
        else:
            stats["kv_cache_gib"] = 2 * cache.k.numel() * cache.k.element_size() / 2**30
        return GenerationResult(completions=completions, stats=stats)

    # ------------------------------------------------------------------------------------- internals
    def _ensure_runner(self, max_len: int, wanted_slots: int) -> DecodeRunner:
        """Reuse the cache when it is long enough and as wide as wanted (or as memory allowed), else allocate
        one sized to memory. Reuse keeps the captured graphs, so steady-state training captures none."""
        longest, max_len = max_len, -(-max_len // ATTEND_LEN_BUCKET) * ATTEND_LEN_BUCKET
        slots = min(wanted_slots, self.options.max_batch_sequences)
        r = self._runner
        if (
            r is not None
            and r.cache.max_len >= max_len
            and (r.cache.slots >= slots or self._memory_bound)
            and (not isinstance(r.cache, PagedKVCache) or r.cache.holds(longest))
        ):
            return r
        self.sleep()
        w = self.weights
        on_gpu = w.embedding.is_cuda
        if self.options.paged_kv:
            cache = self._paged_cache(max_len, slots, longest)
            self._runner = self._new_runner(cache)
            return self._runner
        if on_gpu:
            per_slot = 2 * len(w.layers) * w.groups * max_len * w.head_dim * w.embedding.element_size()
            per_slot += 8 * w.lm_head.size(0)  # the slot's rows of sampling temporaries (probs, cumsum)
            free, _ = torch.cuda.mem_get_info(w.embedding.device)
            fit = int(free * self.options.kv_cache_memory_fraction) // per_slot
            if fit < 1:
                raise RuntimeError(
                    f"rollout: no room for one KV-cache slot of {max_len} positions "
                    f"({per_slot / 2**30:.2f} GiB); raise rollout.kv_cache_memory_fraction or shorten sequences"
                )
            self._memory_bound = fit < slots
            slots = min(slots, fit)
        cache = KVCache.allocate(w, slots, max_len)
        self._runner = self._new_runner(cache)
        return self._runner

    def _new_runner(self, cache) -> DecodeRunner:
        on_gpu = self.weights.embedding.is_cuda
        fp8 = self.options.weights8 == "fp8"  # int8 runs wherever Triton does
        for name, on, least, card in (
            (f"weights8={self.options.weights8!r}", self.options.weights8 is not None, (8, 9) if fp8 else None,
             "an Ada, Hopper or later GPU (float8 loads)"),
            ("pdl", self.options.pdl, (9, 0), "a Hopper or later GPU (programmatic dependent launch)"),
        ):  # fmt: skip
            if not on:
                continue
            if not getattr(cache, "fused_residual", False):
                raise RuntimeError(f"rollout: {name} needs the Triton decode step (a GPU); this cache runs torch's")
            if on_gpu and least and torch.cuda.get_device_capability(self.weights.embedding.device) < least:
                raise RuntimeError(f"rollout: {name} needs {card}")
        return DecodeRunner(
            self.weights,
            cache,
            use_graphs=on_gpu and self.options.cuda_graphs,
            fused_sampler=on_gpu and self.options.fused_sampler,
        )

    def _paged_cache(self, max_len: int, slots: int, longest: int) -> PagedKVCache:
        """A block pool: `kv_blocks`, or what kv_cache_memory_fraction of free GPU memory holds (at most what
        `slots` sequences of max_len need), at least one sequence of `longest` positions. Slots are not
        memory-bound: admission is (see `_admit`)."""
        w, opts = self.weights, self.options
        bs = opts.kv_block_size
        if bs < 16 or ATTEND_LEN_BUCKET % bs:
            raise ValueError(f"rollout: kv_block_size {bs} must be at least 16 and divide {ATTEND_LEN_BUCKET}")
        per_seq = blocks_for(max_len, bs)
        blocks = opts.kv_blocks or slots * per_seq + 1
        if not opts.kv_blocks and w.embedding.is_cuda:
            free, _ = torch.cuda.mem_get_info(w.embedding.device)
            budget = int(free * opts.kv_cache_memory_fraction) - slots * 8 * w.lm_head.size(0)  # sampling temporaries
            blocks = min(blocks, budget // PagedKVCache.bytes_per_block(w, bs))
        if blocks < blocks_for(longest, bs) + 1:
            raise RuntimeError(
                f"rollout: the paged KV cache holds {max(blocks - 1, 0)} blocks of {bs} positions, fewer than one "
                f"sequence of {longest} needs; raise rollout.kv_cache_memory_fraction or shorten sequences"
            )
        self._memory_bound = False
        cache = PagedKVCache.allocate(w, slots, max_len, blocks, bs, use_kernel=w.embedding.is_cuda)
        cache.fused = opts.fused_decode
        cache.cascade = opts.fused_decode and opts.cascade_attention
        cache.merge_tile = opts.merge_tile
        cache.fused_norms = opts.fused_norms
        cache.skinny_gemm = opts.skinny_gemm
        cache.pdl = opts.pdl
        return cache

    def _admit(
        self,
        runner: DecodeRunner,
        prompts: list[list[int]],
        waiting: deque[_Live],
        slots: list[_Live | None],
        start_position: list[int],
        start_step: list[int],
        prefix_holder: dict[int, int],
        step: int,
    ) -> None:
        """Fill free slots from the queue (prefill or copy the prompt prefix); park the rest at position 0.

        Paged cache: a sequence enters only while the free blocks, less what the live sequences need for the
        next chunk, cover its prefix plus `kv_headroom_tokens`; a preempted sequence (tokens kept) has its
        prompt and tokens so far prefilled again.
        """
        device = self.weights.embedding.device
        cache = runner.cache
        paged = isinstance(cache, PagedKVCache)
        spare = self._spare_blocks(cache, slots, start_position, start_step, step) if paged else 0
        blocked = False
        index, tokens, positions = [], [], []
        for i, seq in enumerate(slots):
            if seq is not None:
                continue
            index.append(i)
            if waiting and paged and not blocked:
                nxt = waiting[0]
                length = len(prompts[nxt.prompt]) - 1 + len(nxt.tokens)  # positions to prefill
                need = blocks_for(length + self.options.kv_headroom_tokens, cache.block_size)
                # wait for blocks, unless nothing is live (the pool holds one sequence of max_len)
                blocked = need > spare and any(s is not None for s in slots)
                spare -= need
            if not waiting or blocked:
                tokens.append(0)
                positions.append(0)
                continue
            seq = waiting.popleft()
            prompt = prompts[seq.prompt]
            ids = prompt + seq.tokens[:-1] if seq.tokens else prompt[:-1]  # positions 0..len(ids)-1
            for held in [q for q, slot in prefix_holder.items() if slot == i]:
                del prefix_holder[held]  # slot i's cache is about to be overwritten
            holder = prefix_holder.get(seq.prompt) if not seq.tokens else None
            if ids:
                if holder is not None and not paged:
                    cache.copy_prefix(holder, slice(i, i + 1), len(ids))
                elif holder is not None and cache.share_prefix(holder, i, len(ids)):
                    pass
                else:
                    if paged and not cache.ensure(i, len(ids)):
                        raise RuntimeError(f"rollout: the paged KV cache cannot hold a prefix of {len(ids)}")
                    ids_t = torch.tensor(ids, dtype=torch.long, device=device)
                    prefill(self.weights, cache, i, ids_t, self.options.prefill_chunk_tokens)
            if not seq.tokens:
                prefix_holder[seq.prompt] = i
            slots[i] = seq
            start_position[i], start_step[i] = len(ids), step
            tokens.append(seq.tokens[-1] if seq.tokens else prompt[-1])
            positions.append(len(ids))
        if index:
            at = torch.tensor(index, device=device)
            runner.tokens[at] = torch.tensor(tokens, dtype=torch.long, device=device)
            runner.positions[at] = torch.tensor(positions, dtype=torch.long, device=device)

    def _spare_blocks(
        self,
        cache: PagedKVCache,
        slots: list[_Live | None],
        start_position: list[int],
        start_step: list[int],
        step: int,
    ) -> int:
        """Free blocks left once every live sequence has blocks for the next `harvest_every` steps."""
        grow = 0
        for i, seq in enumerate(slots):
            if seq is not None:
                end = start_position[i] + step - start_step[i] + self.options.harvest_every
                grow += max(0, blocks_for(min(end, cache.max_len), cache.block_size) - len(cache.owned[i]))
        return cache.free_blocks - grow

    def _reserve(
        self,
        cache: PagedKVCache,
        slots: list[_Live | None],
        start_position: list[int],
        start_step: list[int],
        step: int,
        chunk: int,
        prefix_holder: dict[int, int],
    ) -> list[_Live]:
        """Blocks for the next `chunk` steps of every live sequence; when the pool runs out, preempt the most
        recently admitted sequences (freed, returned oldest first for recompute) until the rest fit."""
        live = sorted((i for i, seq in enumerate(slots) if seq is not None), key=lambda i: (start_step[i], i))
        preempted: list[_Live] = []
        while not all(cache.ensure(i, start_position[i] + step - start_step[i] + chunk) for i in live):
            if len(live) == 1:
                raise RuntimeError("rollout: the paged KV cache cannot hold one sequence")
            victim = live.pop()  # the newest
            preempted.append(slots[victim])
            slots[victim] = None
            self._release(cache, victim, prefix_holder)
        return preempted[::-1]

    @staticmethod
    def _release(cache: PagedKVCache, slot: int, prefix_holder: dict[int, int]) -> None:
        """A paged slot's sequence ended or was preempted: its blocks go back, it holds no prompt prefix."""
        cache.release(slot)
        for held in [q for q, s in prefix_holder.items() if s == slot]:
            del prefix_holder[held]

    def _compact(
        self,
        runner: DecodeRunner,
        slots: list[_Live | None],
        start_position: list[int],
        start_step: list[int],
        step: int,
    ) -> int:
        """Queue empty and most slots finished: move the live sequences (cache rows, token, position) into the
        lowest slots and shrink the batch, so a long tail stops paying attention reads for finished slots.
        The lists are cut to the new batch in place; returns it."""
        live = [i for i, seq in enumerate(slots) if seq is not None]
        batch = batch_bucket(len(live), len(slots))
        targets = iter(range(len(live)))
        for i in live:
            j = next(targets)
            if j != i:
                written = start_position[i] + step - start_step[i]  # cache positions 0..written-1 hold keys
                if isinstance(runner.cache, PagedKVCache):
                    runner.cache.move(i, j)
                else:
                    runner.cache.copy_prefix(i, slice(j, j + 1), written)
                runner.tokens[j : j + 1].copy_(runner.tokens[i : i + 1])
                runner.positions[j : j + 1].copy_(runner.positions[i : i + 1])
                slots[j], slots[i] = slots[i], None
                start_position[j], start_step[j] = start_position[i], start_step[i]
        for state in (slots, start_position, start_step):
            del state[batch:]
        return batch

    def _decode_chunk(
        self,
        runner: DecodeRunner,
        batch: int,
        step: int,
        chunk: int,
        top: int,
        params: SamplingParams,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """`chunk` decode steps of the first `batch` slots; their tokens and log-probs per slot, on the host.

        The highest live position at global step t is top + t: the attention span of each step follows it.
        """
        device = runner.tokens.device
        out_tokens = torch.empty(batch, chunk, dtype=torch.long, device=device)
        out_logprobs = torch.empty(batch, chunk, dtype=torch.float32, device=device)
        for k in range(chunk):
            span = runner.cache.max_len
            if runner.cache.span_matters:  # else one graph per batch serves every length
                span = attend_bucket(top + step + k, span)
            runner.step(StepKey(batch, span, float(params.temperature), float(params.top_p)))
            out_tokens[:, k].copy_(runner.tokens[:batch])
            out_logprobs[:, k].copy_(runner.logprobs[:batch])
        return out_tokens.tolist(), out_logprobs.tolist()
