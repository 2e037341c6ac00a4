"""Rollout generation: one interface (base.py), three backends chosen by `rollout.backend`.

- megatron: colocated, decodes with the trainer's own GPTModel weights in place (megatron_engine.py)
- hf: plain transformers generate, the correctness reference (hf.py)
- trtllm: TensorRT-LLM with weight refit from the trainer (trtllm.py; not run on our machines)

Backends are imported lazily so that `import questa_nemo.rollout` needs neither transformers models nor
TensorRT-LLM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from questa_nemo.config import ConfigError, RolloutConfig
from questa_nemo.rollout.base import Completion, GenerationBackend, GenerationResult, SamplingParams

__all__ = [
    "Completion",
    "GenerationBackend",
    "GenerationResult",
    "SamplingParams",
    "make_backend",
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


def make_backend(
    cfg: RolloutConfig,
    *,
    policy: torch.nn.Module | None = None,
    vocab_size: int | None = None,
    hf_model: object | None = None,
    model_dir: str | None = None,
    hf_weights_fn: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
    pad_token_id: int = 0,
    gather: Callable[[object], list[object]] | None = None,
) -> GenerationBackend:
    """Build the backend `cfg.backend` names.

    megatron: `policy` is the trainer's unwrapped GPTModel (TP = PP = 1) and `vocab_size` the tokenizer's
    (unpadded) vocabulary. hf: `hf_model` a transformers causal LM. trtllm: `model_dir` an HF folder
    TensorRT-LLM loads first. hf and trtllm take the trainer's weights as HF-named tensors from `hf_weights_fn`
    on `update_weights`; trtllm's `gather` is model.parallel.model_parallel_all_gather_object when the
    replica has several ranks.
    """
    if cfg.backend == "megatron":
        from questa_nemo.rollout.megatron_engine import EngineOptions, MegatronBackend

        if policy is None or vocab_size is None:
            raise ConfigError("rollout.backend", "megatron needs the policy GPTModel and the vocabulary size")
        options = EngineOptions(
            max_batch_sequences=cfg.max_batch_sequences,
            cuda_graphs=cfg.cuda_graphs,
            kv_cache_memory_fraction=cfg.kv_cache_memory_fraction,
            prefill_chunk_tokens=cfg.prefill_chunk_tokens,
        )
        return MegatronBackend(policy, vocab_size, options)
    if cfg.backend == "hf":
        from questa_nemo.rollout.hf import HFBackend

        if hf_model is None:
            raise ConfigError("rollout.backend", "hf needs a transformers model")
        weights_fn = (lambda: dict(hf_weights_fn())) if hf_weights_fn is not None else None
        return HFBackend(hf_model, pad_token_id, cfg.max_batch_sequences, weights_fn)
    if cfg.backend == "trtllm":
        from questa_nemo.rollout.trtllm import TRTLLMBackend, TRTLLMOptions

        if model_dir is None:
            raise ConfigError("rollout.backend", "trtllm needs an HF model folder to start from")
        return TRTLLMBackend(model_dir, TRTLLMOptions.from_config(cfg), hf_weights_fn, gather=gather)
    raise ConfigError("rollout.backend", f"{cfg.backend!r} is not one of megatron, hf, trtllm")
