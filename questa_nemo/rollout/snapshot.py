"""Backends for asynchronous rollouts: generation on weights the trainer is not stepping at that moment.

A producer thread generates while the trainer steps. Any backend qualifies:
- one that owns its weights (refit: the megatron engine at TP or PP > 1, hf, trtllm) is used as is, behind a
  lock: its `update_weights` (the gather, in the trainer thread) waits for the in-flight `generate` chunk.
- one that reads the trainer's tensors in place (`shares_trainer_weights`: the megatron engine at TP = PP = 1)
  is built on a private copy of the chunks (`detached_clone`: parameters and buffers owned, everything else -
  config, process groups, plain attributes - shared); `update_weights` copies the trainer's parameters into
  the copy's tensors in place (so the engine's tensor references and captured CUDA graphs stay valid).

One lock orders the two threads: a `generate` call (one chunk of prompts) and a weight update never overlap,
so a chunk is sampled from one version, which its completions carry. The snapshot costs one extra copy of the
weights in memory; the trainer's publish waits for at most the in-flight chunk. No backend issues a collective
inside `generate`, so the producer thread never competes with the trainer's collectives.

On GPU with `stream` (config rollout.producer_stream) `generate` runs on a CUDA stream of its own (high
priority), so decoding and training kernels run concurrently instead of queueing on the one default stream
(there the trainer's first pass after a step's rollouts waited for the producer's next decode). It starts after the last
update's copies (an event recorded on the trainer's stream, first after the snapshot's own copy) and
synchronises its stream before returning, so the next update never writes weights a decode kernel still reads.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import replace

import torch

from questa_nemo.config import RolloutConfig
from questa_nemo.rollout.base import GenerationBackend, GenerationResult, RolloutContext, SamplingParams


def detached_clone(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module`'s tree whose parameters and buffers are fresh tensors (no grad); every other
    attribute (config, process groups, ...) is shared with the original, dicts copied one level deep. A plain
    deepcopy fails on megatron modules: they hold process groups, which cannot be copied (and must not be)."""
    clones: dict[int, torch.Tensor] = {}  # id(original tensor) -> its copy, so tied weights stay tied

    def tensor(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in clones:
            data = t.detach().clone()
            clones[id(t)] = (
                torch.nn.Parameter(data, requires_grad=False) if isinstance(t, torch.nn.Parameter) else data
            )
        return clones[id(t)]

    def clone(m: torch.nn.Module) -> torch.nn.Module:
        out = copy.copy(m)  # new object and attribute dict; the values are shared until replaced below
        out._parameters = {name: tensor(p) for name, p in m._parameters.items()}
        out._buffers = {name: tensor(b) for name, b in m._buffers.items()}
        out._modules = {
            name: clone(child) if child is not None else None for name, child in m._modules.items()
        }
        for name, value in vars(m).items():
            if isinstance(value, torch.Tensor) and id(value) in clones:  # aliases a tensor copied above
                out.__dict__[name] = clones[id(value)]  # plain attribute: not registered as a parameter
            elif isinstance(value, dict) and name not in ("_parameters", "_buffers", "_modules"):
                out.__dict__[name] = copy.copy(
                    value
                )  # hook registries: a hook added to one stays off the other
        return out

    return clone(module)


def build_async_backend(cfg: RolloutConfig, ctx: RolloutContext) -> AsyncSafeBackend:
    """`cfg.backend`, safe to generate from a producer thread while the trainer steps (see the module doc)."""
    from questa_nemo.rollout import build_backend

    backend = build_backend(cfg, ctx)
    stream = cfg.producer_stream
    if not getattr(backend, "shares_trainer_weights", False):
        return AsyncSafeBackend(backend, stream=stream)
    shadow = [detached_clone(chunk) for chunk in ctx.chunks]
    inner = build_backend(cfg, replace(ctx, chunks=shadow))
    return AsyncSafeBackend(inner, ctx.chunks, shadow, stream=stream)


class AsyncSafeBackend:
    """GenerationBackend whose `generate` and `update_weights` exclude each other; with `shadow`, the inner
    backend reads a private copy of `source` (the trainer's bare chunks) that each update refreshes.

    `version` is the policy version last published by the trainer (the weights the backend holds)."""

    def __init__(
        self,
        inner: GenerationBackend,
        source: list[torch.nn.Module] | None = None,
        shadow: list[torch.nn.Module] | None = None,
        stream: bool = False,
    ):
        self.inner, self.source, self.shadow = inner, source or [], shadow or []
        self.version = inner.version
        self._lock = threading.Lock()
        # the producer's stream (module doc) and the event its next generate waits for: recorded after the last
        # update's copies, first after the snapshot's own copy (detached_clone, just before)
        # high priority: the decode step's small kernels go ahead of queued training blocks (its graphs replay at
        # the stream's priority), so decoding barely slows and training fills the SMs it leaves idle
        self._stream = torch.cuda.Stream(priority=-1) if stream and torch.cuda.is_available() else None
        self._updated: torch.cuda.Event | None = None
        if self._stream is not None:
            self._updated = torch.cuda.Event()
            self._updated.record()

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(trainer tensor, shadow tensor) by name: parameters and floating-point buffers of every chunk."""
        pairs = []
        for source, shadow in zip(self.source, self.shadow):
            theirs = dict(source.named_parameters()) | dict(source.named_buffers())
            ours = dict(shadow.named_parameters()) | dict(shadow.named_buffers())
            if theirs.keys() != ours.keys():
                raise RuntimeError(
                    f"snapshot: tensor names differ from the policy's: {sorted(theirs.keys() ^ ours.keys())}"
                )
            pairs += [(theirs[name], ours[name]) for name in theirs if ours[name].is_floating_point()]
        return pairs

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        with self._lock:
            if self._stream is None:
                return self.inner.generate(prompts, params)
            if self._updated is not None:
                self._stream.wait_event(self._updated)
            with torch.cuda.stream(self._stream):
                result = self.inner.generate(prompts, params)
            self._stream.synchronize()
            return result

    @torch.no_grad()
    def update_weights(self, version: int) -> None:
        """Refresh the copy (if any) from the trainer's current parameters, then the inner backend, and publish
        `version`. Called by the trainer thread after its optimizer step, so the sources are not being written."""
        with self._lock:
            for theirs, ours in self._pairs():  # looked up each time: a checkpoint load may re-bind tensors
                ours.copy_(theirs.detach())
            self.inner.update_weights(version)
            if self._stream is not None:
                self._updated = torch.cuda.Event()
                self._updated.record()  # on the trainer's stream, after the copies
            self.version = version

    def sleep(self) -> None:
        with self._lock:
            self.inner.sleep()
