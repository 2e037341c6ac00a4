"""The generation interface every rollout backend implements (megatron, hf, trtllm): token ids in, sampled
completions with their behaviour log-probs and the policy version out. Modelled on NeMo-RL's GenerationInterface.

`RolloutContext` is what every backend is built from (one constructor signature, see rollout/__init__.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt (the GRPO group size)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    # no default: the caller's config says it (rollout.max_new_tokens 24,000, eval.max_new_tokens 32,768)
    max_new_tokens: int = field(kw_only=True)
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (EOS included)
    ignore_eos: bool = False  # benchmarks: always run to max_new_tokens
    seed: int = 0  # same prompts + params + seed + weights -> same samples
    # Sampling key of each prompt of the call (default: its index in the call). The megatron engine draws a
    # sequence's noise from (seed, prompt key, sample index, position) alone, so a prompt keyed the same gets
    # the same completions whatever else is in the call, its slot or rank (DP-independent rollouts). Backends
    # with their own sampler (hf, trtllm) ignore it.
    prompt_keys: tuple[int, ...] = ()


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens only, the stop token included when one was hit
    # behaviour log-prob of each generated token: log_softmax(logits / temperature) (raw logits at temperature
    # 0), before top-p truncation - the quantity the trainer recomputes from its own forward
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token) | "length" (max_new_tokens reached)
    version: int  # policy version whose weights produced it (async staleness bound)


@dataclass
class GenerationResult:
    completions: list[list[Completion]]  # [num_prompts][n]
    stats: dict[str, float] = field(default_factory=dict)  # tokens, seconds, ... for the logs


class GenerationBackend(Protocol):
    """A rollout engine. `version` is the policy version of the weights it currently holds."""

    version: int

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult: ...

    def update_weights(self, version: int) -> None:
        """Take the trainer's current weights (colocated backends share them and only bump the version).

        Every rank calls it after each optimizer step; a backend that gathers the weights (TP or PP > 1, hf,
        trtllm) runs a collective over the model-parallel group here, so all its ranks call it together."""
        ...

    def sleep(self) -> None:
        """Release the memory held for generation (KV cache, graphs); the next `generate` takes it back.

        Called where generation is over for a while: by eval between checkpoints. The GRPO loop does not call
        it: the colocated engine keeps its KV cache and captured graphs from step to step, so steady-state
        training captures no graph."""
        ...


# A backend whose generation reads the trainer's parameter tensors in place sets `shares_trainer_weights =
# True` (the colocated megatron engine at TP = PP = 1); asynchronous rollouts then build it on a private copy
# of the weights (rollout/snapshot.py). Backends without the attribute own their weights (they refit).


@dataclass
class RolloutContext:
    """Everything a backend may be built from: the same for every caller (train, validation, eval, async)."""

    chunks: list[torch.nn.Module]  # this rank's bare GPTModel chunks: the trainer's (or a checkpoint's) weights
    vocab_size: int  # the tokenizer's vocabulary; megatron's padding rows past it are never sampled
    hf_config: Mapping | None = None  # the model's config.json (needed to name weights the HF way)
    model_dir: str | None = None  # a Hugging Face folder of the model (trtllm loads it before the first refit)
    pad_token_id: int = 0
    version: int = 0  # policy version of the weights in `chunks`

    @property
    def model_parallel(self) -> int:
        """Ranks holding one model replica between them (TP x PP of the chunks' megatron config; 1 without)."""
        config = getattr(self.chunks[0], "config", None)
        if config is None:
            return 1
        return config.tensor_model_parallel_size * config.pipeline_model_parallel_size

    def hf_weights(self) -> dict[str, torch.Tensor]:
        """The current weights as full HF-named tensors, gathered from every TP / PP shard (model/gather.py).

        A collective over the model-parallel group: every rank of it must call this at the same point."""
        from questa_nemo.model.gather import gather_hf_weights

        if self.hf_config is None:
            raise ValueError("RolloutContext.hf_weights: no hf_config to name the weights with")
        return gather_hf_weights(self.chunks, self.hf_config)
