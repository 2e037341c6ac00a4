"""The decode step over static buffers, run eagerly (CPU) or replayed from CUDA graphs (GPU).

A step reads `tokens` / `positions` of the first B slots, appends their keys/values to the cache, samples the
next tokens and writes them back into `tokens` and their log-probs into `logprobs`; then positions advance.
Stop tokens are found on the host when the engine harvests a chunk of steps (one sync per chunk), so the step
has no data-dependent control flow. Everything it touches is a preallocated tensor, so on GPU the step is captured
once per (batch bucket, attention length bucket, sampling settings) and replayed: one launch instead of
~20 per layer. The sampling uniforms are computed inside the step from each slot's sequence key and
completion position (rollout/sampling.py `uniform_draws`, counter-based: no RNG state), so eager and
graph runs give the same tokens, and a sequence gets the same noise in whichever slot it sits.

Graphs share one memory pool. That is safe here because a replay leaves nothing in the pool that a later
replay reads: all state lives in the buffers below and the KV cache, allocated outside the pool.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from questa_nemo.rollout.decoder import DecoderWeights, decode_logits
from questa_nemo.rollout.sampling import sample_tokens, uniform_draws

# Attention spans grow in steps of this many positions: at most max_len / 256 graphs per batch bucket.
ATTEND_LEN_BUCKET = 256


class StepKey(NamedTuple):
    """What a captured step bakes in."""

    batch: int  # slots 0..batch-1 are decoded
    attend_len: int  # keys at positions < attend_len are read
    temperature: float
    top_p: float


def batch_bucket(n: int, slots: int) -> int:
    """Smallest power of two >= n (at least 8), capped at the cache's slot count: few graphs, little waste."""
    bucket = 8
    while bucket < n:
        bucket *= 2
    return min(bucket, slots)


def attend_bucket(max_position: int, max_len: int) -> int:
    """Attention span covering positions 0..max_position, rounded up to ATTEND_LEN_BUCKET."""
    span = -(-(max_position + 1) // ATTEND_LEN_BUCKET) * ATTEND_LEN_BUCKET
    return min(span, max_len)


class DecodeRunner:
    """Static step buffers for every cache slot, and the captured graphs keyed by StepKey."""

    def __init__(self, weights: DecoderWeights, cache, use_graphs: bool, fused_sampler: bool = False):
        """cache: a decoder.KVCache or a paged.PagedKVCache (the same step interface). fused_sampler: sample
        at temperature > 0 without top-p in one Triton kernel over the lm_head's output (sampling_triton.py;
        Triton needed: CUDA, or the interpreter in tests)."""
        self.weights, self.cache, self.use_graphs = weights, cache, use_graphs
        self.fused_sampler = fused_sampler
        slots = cache.slots
        device = weights.embedding.device
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)  # [S] next input token per slot
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)  # [S] where that token sits
        self.logprobs = torch.zeros(slots, dtype=torch.float32, device=device)  # [S] of the last sample
        # sampling: the slot's sequence key (sampling.sequence_key) and the position of its first decode
        # input (the completion position of the token a step samples is positions - noise_start)
        self.noise_key = torch.zeros(slots, dtype=torch.long, device=device)  # [S]
        self.noise_start = torch.zeros(slots, dtype=torch.long, device=device)  # [S]
        self._graphs: dict[StepKey, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0  # wall time spent capturing (benchmarks report decode time without it)
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _step(self, key: StepKey) -> None:
        """The captured region: static shapes, no host syncs."""
        b = key.batch
        tokens, positions = self.tokens[:b], self.positions[:b]
        fused = self.fused_sampler and key.temperature > 0 and key.top_p >= 1
        logits = decode_logits(self.weights, self.cache, tokens, positions, key.attend_len, upcast=not fused)
        uniforms = None
        if key.temperature > 0:
            uniforms = uniform_draws(self.noise_key[:b], positions - self.noise_start[:b])
        if fused:
            from questa_nemo.rollout.sampling_triton import fused_sample

            next_tokens, logprobs = fused_sample(logits, uniforms, key.temperature)
        else:
            next_tokens, logprobs = sample_tokens(logits, uniforms, key.temperature, key.top_p)
        tokens.copy_(next_tokens)
        self.logprobs[:b].copy_(logprobs)
        positions.add_(1)

    def step(self, key: StepKey) -> None:
        """Run one decode step (captured on first use when graphs are on)."""
        if not self.use_graphs:
            self._step(key)
            return
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key)
        graph.replay()

    def _capture(self, key: StepKey) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (lazy library init), restore the state the warm-up advanced, capture."""
        torch.cuda.synchronize()
        tic = time.perf_counter()
        saved = [t.clone() for t in (self.tokens, self.positions)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(key)
        torch.cuda.current_stream().wait_stream(side)
        for buffer, value in zip((self.tokens, self.positions), saved):
            buffer.copy_(value)
        graph = torch.cuda.CUDAGraph()
        # thread_local: an async rollout producer may capture while the trainer thread runs (and syncs,
        # allocates) on the same GPU; the default (global) mode would fail the trainer's calls
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._step(key)
        self._graphs[key] = graph
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - tic
        return graph
