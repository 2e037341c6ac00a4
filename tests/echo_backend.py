"""A rollout backend added the way any backend is (tests/test_rollout_registry.py registers it): this one file,
one registry entry, one YAML. It 'generates' by repeating each prompt's last token, with log-prob 0."""

from __future__ import annotations

from questa_nemo.config import RolloutConfig
from questa_nemo.rollout.base import Completion, GenerationResult, RolloutContext, SamplingParams


class EchoBackend:
    def __init__(self, version: int):
        self.version = version
        self.updates = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        groups = [
            [Completion([p[-1]] * params.max_new_tokens, [0.0] * params.max_new_tokens, "length", self.version)
             for _ in range(params.n)]
            for p in prompts
        ]
        return GenerationResult(groups)

    def update_weights(self, version: int) -> None:
        self.version = version
        self.updates += 1

    def sleep(self) -> None:
        pass


def build(cfg: RolloutConfig, ctx: RolloutContext) -> EchoBackend:
    return EchoBackend(ctx.version)
