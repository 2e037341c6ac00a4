"""A colocated rollout engine on its OWN copy of the policy weights, for asynchronous rollouts.

The megatron backend reads the trainer's parameter tensors in place, so it cannot generate while the trainer
steps them. `SnapshotBackend` clones the bare GPTModel once (parameters and buffers owned, everything else -
config, process groups, plain attributes - shared), builds the inner backend on the clone, and refreshes the
clone only when the trainer publishes a version: `update_weights` copies the trainer's parameters into the
clone's tensors in place (so the inner engine's tensor references and any captured CUDA graphs stay valid).

One lock orders the two threads: a `generate` call (one chunk of prompts) and a weight copy never overlap, so
a chunk is sampled from one version, which its completions carry. Costs one extra copy of the weights in
memory; the trainer's publish waits for at most the in-flight chunk.
"""

from __future__ import annotations

import copy
import threading

import torch

from questa_nemo.config import ConfigError, RolloutConfig
from questa_nemo.rollout.base import GenerationBackend, GenerationResult, SamplingParams


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


class SnapshotBackend:
    """GenerationBackend over a private copy of the trainer's GPTModel (TP = PP = 1, backend megatron).

    `version` is the policy version last published by the trainer (the weights the copy holds)."""

    def __init__(self, cfg: RolloutConfig, policy: torch.nn.Module, vocab_size: int, version: int = 0):
        from questa_nemo.rollout import make_backend

        if cfg.backend != "megatron":
            raise ConfigError(
                "rollout.max_staleness",
                "asynchronous rollouts snapshot the colocated megatron engine; "
                f"rollout.backend={cfg.backend!r} is not supported with max_staleness > 0",
            )
        self.source = policy  # the trainer's bare module (its parameters may be views into DDP buffers)
        self.shadow = detached_clone(policy)
        self.inner: GenerationBackend = make_backend(cfg, policy=self.shadow, vocab_size=vocab_size)
        self.inner.update_weights(version)
        self.version = version
        self._lock = threading.Lock()

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(trainer tensor, shadow tensor) by name: parameters and floating-point buffers."""
        theirs = dict(self.source.named_parameters()) | dict(self.source.named_buffers())
        ours = dict(self.shadow.named_parameters()) | dict(self.shadow.named_buffers())
        if theirs.keys() != ours.keys():
            raise RuntimeError(
                f"snapshot: tensor names differ from the policy's: {sorted(theirs.keys() ^ ours.keys())}"
            )
        return [(theirs[name], ours[name]) for name in theirs if ours[name].is_floating_point()]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        with self._lock:
            return self.inner.generate(prompts, params)

    @torch.no_grad()
    def update_weights(self, version: int) -> None:
        """Copy the trainer's current parameters into the shadow (in place) and publish `version`. Called by
        the trainer thread after its optimizer step, so the source tensors are not being written."""
        with self._lock:
            for theirs, ours in self._pairs():  # looked up each time: a checkpoint load may re-bind tensors
                ours.copy_(theirs.detach())
            self.inner.update_weights(version)
            self.version = version

    def sleep(self) -> None:
        with self._lock:
            self.inner.sleep()

    def wake(self) -> None:
        with self._lock:
            self.inner.wake()
