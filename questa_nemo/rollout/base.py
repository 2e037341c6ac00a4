"""The generation interface every rollout backend implements (megatron, hf, trtllm): token ids in, sampled
completions with their behaviour log-probs and the policy version out. Modelled on NeMo-RL's GenerationInterface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt (the GRPO group size)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (EOS included)
    ignore_eos: bool = False  # benchmarks: always run to max_new_tokens
    seed: int = 0  # same prompts + params + seed + weights -> same samples


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
        """Take the trainer's current weights (colocated backends share them and only bump the version)."""
        ...

    def sleep(self) -> None:
        """Release GPU memory held for generation (KV cache, graphs) while the trainer runs."""
        ...

    def wake(self) -> None: ...
