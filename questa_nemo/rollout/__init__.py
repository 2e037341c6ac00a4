"""Rollout generation: one interface (base.py), backends built through one registry (config.ROLLOUT_BACKENDS).

- megatron: colocated; decodes with the trainer's GPTModel weights in place at TP = PP = 1, with a gathered
  replica otherwise (megatron_engine.py)
- hf: plain transformers generate on gathered weights, the correctness reference (hf.py)
- trtllm: TensorRT-LLM with weight refit from the trainer (trtllm.py; not run on our machines)

Every backend module defines `build(cfg: RolloutConfig, ctx: RolloutContext) -> GenerationBackend`; callers
(train, validation, eval, the async snapshot) build any backend the same way, with `build_backend`. Modules
are imported only when their backend is built, so `import questa_nemo.rollout` needs neither transformers
models nor TensorRT-LLM.
"""

from __future__ import annotations

import importlib

from questa_nemo.config import ROLLOUT_BACKENDS, ConfigError, RolloutConfig
from questa_nemo.rollout.base import (
    Completion,
    GenerationBackend,
    GenerationResult,
    RolloutContext,
    SamplingParams,
)

__all__ = [
    "Completion",
    "GenerationBackend",
    "GenerationResult",
    "RolloutContext",
    "SamplingParams",
    "build_backend",
    "sampling_params",
]


def sampling_params(cfg: RolloutConfig, stop_token_ids: tuple[int, ...], seed: int) -> SamplingParams:
    """The training rollout's sampling settings; `seed` should change every step (e.g. cfg.seed + step)."""
    return SamplingParams(
        n=cfg.n_samples,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=tuple(stop_token_ids),
        seed=seed,
    )


def build_backend(cfg: RolloutConfig, ctx: RolloutContext) -> GenerationBackend:
    """The backend `cfg.backend` names, built by its module's `build(cfg, ctx)`.

    Every rank of a model-parallel group calls this together: backends that gather the weights (TP or PP > 1,
    hf, trtllm) do so once here and again on every `update_weights`.
    """
    info = ROLLOUT_BACKENDS.get(cfg.backend)
    if info is None:
        raise ConfigError("rollout.backend", f"{cfg.backend!r} is not one of {', '.join(ROLLOUT_BACKENDS)}")
    return importlib.import_module(info.module).build(cfg, ctx)
