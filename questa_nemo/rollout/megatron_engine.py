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
the prompts over the group needs sampling noise drawn per sequence rather than per slot (so the samples do not
depend on the split); that is the next step, not done.

Scheduling is continuous batching over a fixed set of KV-cache slots. Sequences (prompt, sample) wait in
order; a free slot takes the next one. The n samples of a prompt share one prefill: a slot that starts a
prompt whose prefix another slot still holds copies those keys/values instead of recomputing them. The
decode step runs `harvest_every` times between harvests; a harvest (the loop's only host sync) copies the
chunk's tokens to the host, ends sequences at their first stop token or at max_new_tokens, and refills their
slots. A stopped slot decodes garbage until the harvest (at most `harvest_every` wasted steps) and, once the
queue is empty, is parked at position 0 so it can never run past the cache. When the queue is empty and at
most half the batch is live, the live sequences move to the lowest slots (cache rows included) and the
batch shrinks: a long tail stops paying for finished slots.

Limits: the attention span of a step is the longest live sequence's (rounded up), read
for every slot: a fused variable-length kernel would read less. CUDA graphs on GPU only; on CPU the same step
runs eagerly (tests, the embedded default in float32).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from questa_nemo.config import RolloutConfig
from questa_nemo.model.convert import ModelShape, ShardLayout, hf_to_megatron
from questa_nemo.rollout.base import Completion, GenerationResult, RolloutContext, SamplingParams
from questa_nemo.rollout.decoder import DecoderWeights, KVCache, prefill
from questa_nemo.rollout.graphs import ATTEND_LEN_BUCKET, DecodeRunner, StepKey, attend_bucket, batch_bucket

_ROLLOUT = RolloutConfig()  # the schema's defaults: the only place they are written (config.py)


@dataclass(frozen=True)
class EngineOptions:
    """The engine's knobs; those that are config keys (rollout.*) default to the schema's values."""

    max_batch_sequences: int = _ROLLOUT.max_batch_sequences  # slots decoded at once (fewer if no KV memory)
    cuda_graphs: bool = _ROLLOUT.cuda_graphs  # capture the decode step on GPU
    kv_cache_memory_fraction: float = _ROLLOUT.kv_cache_memory_fraction  # GPU: share of free memory
    prefill_chunk_tokens: int = _ROLLOUT.prefill_chunk_tokens  # prompt tokens per prefill forward
    harvest_every: int = 64  # decode steps between harvests (one host sync each; a stopped slot idles <= this)

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
    tokens: list[int]  # generated so far (harvested)
    logprobs: list[float]


def _stop_end(tokens: list[int], start: int, stops: set[int]) -> int | None:
    """Length of `tokens` cut after the first stop token at or after `start` (None: no stop there)."""
    return next((k + 1 for k in range(start, len(tokens)) if tokens[k] in stops), None)


def build(cfg: RolloutConfig, ctx: RolloutContext) -> MegatronBackend:
    """The registry's constructor: in place on a whole model, on a gathered replica for shards."""
    options = EngineOptions.from_config(cfg)
    model = ctx.chunks[0]
    if len(ctx.chunks) == 1 and ctx.model_parallel == 1:
        return MegatronBackend(model, ctx.vocab_size, options, ctx.version)
    if ctx.hf_config is None:
        raise ValueError("rollout.backend=megatron at TP or PP > 1 gathers the weights: it needs the hf_config")
    shape = ModelShape.from_hf(ctx.hf_config)

    def replica() -> DecoderWeights:  # collective over the model-parallel group
        whole = hf_to_megatron(ctx.hf_weights(), shape, ShardLayout())
        return DecoderWeights.from_state_dict(whole, model, ctx.vocab_size)

    return MegatronBackend(model, ctx.vocab_size, options, ctx.version, replica=replica)


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
            self.version = version
            return
        fresh = DecoderWeights.from_gpt_model(self.model, self.vocab_size)
        if self._runner is not None and fresh.data_ptrs() != self.weights.data_ptrs():
            self.sleep()  # graphs captured the old addresses
        self.weights = fresh
        self.version = version

    def sleep(self) -> None:
        """Free the KV cache, step buffers and graphs; the next generate reallocates them."""
        self._runner = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        if not prompts:
            return GenerationResult(completions=[])
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty")
        started = time.perf_counter()
        runner = self._ensure_runner(
            max(len(p) for p in prompts) + params.max_new_tokens, params.n * len(prompts)
        )
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.weights.embedding.device).manual_seed(params.seed)
        waiting = deque((p, s) for p in range(len(prompts)) for s in range(params.n))
        batch = batch_bucket(len(waiting), runner.cache.k.size(1))
        stops = set() if params.ignore_eos else set(params.stop_token_ids)
        slots: list[_Live | None] = [None] * batch
        start_position = [0] * batch  # position of the slot's first decode input
        start_step = [0] * batch
        prefix_holder: dict[int, int] = {}  # prompt -> a slot whose cache holds its prefix
        done: list[list[Completion | None]] = [[None] * params.n for _ in prompts]
        step = steps_run = compactions = 0
        prefill_s = 0.0
        while True:
            tic = time.perf_counter()
            self._admit(runner, prompts, waiting, slots, start_position, start_step, prefix_holder, step)
            prefill_s += time.perf_counter() - tic
            live = [i for i, seq in enumerate(slots) if seq is not None]
            if not live:
                break
            if not waiting and batch > 8 and len(live) <= batch // 2:
                batch = self._compact(runner, slots, start_position, start_step, step)
                live = list(range(len(live)))
                compactions += 1
            remaining = min(params.max_new_tokens - (step - start_step[i]) for i in live)
            chunk = min(self.options.harvest_every, remaining)
            top = max(start_position[i] - start_step[i] for i in live)  # position at step t: top + t
            out_tokens, out_logprobs = self._decode_chunk(runner, batch, step, chunk, top, params, generator)
            step += chunk
            steps_run += chunk
            for i in live:
                seq = slots[i]
                seq.tokens += out_tokens[i]
                seq.logprobs += out_logprobs[i]
                end = _stop_end(seq.tokens, len(seq.tokens) - chunk, stops)
                if end is not None or len(seq.tokens) >= params.max_new_tokens:
                    reason = "stop" if end is not None else "length"
                    end = end or params.max_new_tokens
                    done[seq.prompt][seq.sample] = Completion(
                        seq.tokens[:end], seq.logprobs[:end], reason, self.version
                    )
                    slots[i] = None
        completions = [list(group) for group in done]
        seconds = time.perf_counter() - started
        new_tokens = sum(len(c.token_ids) for group in completions for c in group)
        stats = {
            "tokens": float(new_tokens),
            "seconds": seconds,
            "prefill_seconds": prefill_s,
            "tokens_per_second": new_tokens / max(seconds, 1e-9),
            "decode_steps": float(steps_run),
            "slots": float(batch_bucket(params.n * len(prompts), runner.cache.k.size(1))),
            "compactions": float(compactions),
            "cuda_graphs": float(runner.num_graphs),
        }
        return GenerationResult(completions=completions, stats=stats)

    # ------------------------------------------------------------------------------------- internals
    def _ensure_runner(self, max_len: int, wanted_slots: int) -> DecodeRunner:
        """Reuse the cache when it is long enough and as wide as wanted (or as memory allowed), else allocate
        one sized to memory. Reuse keeps the captured graphs, so steady-state training captures none."""
        max_len = -(-max_len // ATTEND_LEN_BUCKET) * ATTEND_LEN_BUCKET
        slots = min(wanted_slots, self.options.max_batch_sequences)
        r = self._runner
        if (
            r is not None
            and r.cache.max_len >= max_len
            and (r.cache.k.size(1) >= slots or self._memory_bound)
        ):
            return r
        self.sleep()
        w = self.weights
        on_gpu = w.embedding.is_cuda
        if on_gpu:
            per_slot = 2 * len(w.layers) * w.groups * max_len * w.head_dim * w.embedding.element_size()
            per_slot += 4 * w.lm_head.size(0)  # the slot's row of sampling noise
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
        self._runner = DecodeRunner(w, cache, use_graphs=on_gpu and self.options.cuda_graphs)
        return self._runner

    def _admit(
        self,
        runner: DecodeRunner,
        prompts: list[list[int]],
        waiting: deque[tuple[int, int]],
        slots: list[_Live | None],
        start_position: list[int],
        start_step: list[int],
        prefix_holder: dict[int, int],
        step: int,
    ) -> None:
        """Fill free slots from the queue (prefill or copy the prompt prefix); park the rest at position 0."""
        device = self.weights.embedding.device
        index, tokens, positions = [], [], []
        for i, seq in enumerate(slots):
            if seq is not None:
                continue
            index.append(i)
            if not waiting:
                tokens.append(0)
                positions.append(0)
                continue
            p, sample = waiting.popleft()
            prompt = prompts[p]
            for held in [q for q, slot in prefix_holder.items() if slot == i]:
                del prefix_holder[held]  # slot i's cache is about to be overwritten
            if len(prompt) > 1:
                holder = prefix_holder.get(p)
                if holder is None:
                    ids = torch.tensor(prompt[:-1], dtype=torch.long, device=device)
                    prefill(self.weights, runner.cache, i, ids, self.options.prefill_chunk_tokens)
                else:
                    runner.cache.copy_prefix(holder, slice(i, i + 1), len(prompt) - 1)
            prefix_holder[p] = i
            slots[i] = _Live(p, sample, [], [])
            start_position[i], start_step[i] = len(prompt) - 1, step
            tokens.append(prompt[-1])
            positions.append(len(prompt) - 1)
        if index:
            at = torch.tensor(index, device=device)
            runner.tokens[at] = torch.tensor(tokens, dtype=torch.long, device=device)
            runner.positions[at] = torch.tensor(positions, dtype=torch.long, device=device)

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
        generator: torch.Generator | None,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """`chunk` decode steps of the first `batch` slots; their tokens and log-probs per slot, on the host.

        The highest live position at global step t is top + t: the attention span of each step follows it.
        """
        device = runner.tokens.device
        out_tokens = torch.empty(batch, chunk, dtype=torch.long, device=device)
        out_logprobs = torch.empty(batch, chunk, dtype=torch.float32, device=device)
        for k in range(chunk):
            span = attend_bucket(top + step + k, runner.cache.max_len)
            runner.step(StepKey(batch, span, float(params.temperature), float(params.top_p)), generator)
            out_tokens[:, k].copy_(runner.tokens[:batch])
            out_logprobs[:, k].copy_(runner.logprobs[:batch])
        return out_tokens.tolist(), out_logprobs.tolist()
