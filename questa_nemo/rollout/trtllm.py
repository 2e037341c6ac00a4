"""TensorRT-LLM rollout (production clusters): its LLM API, weight refit from the trainer, sleep/wake.

Written against TensorRT-LLM's current PyTorch-backend LLM API, read from NVIDIA/TensorRT-LLM:
- examples/ray_orchestrator/rl_perf_repro.py: `LLM(model=..., backend="pytorch", orchestrator_type="ray",
  ray_worker_extension_cls="tensorrt_llm.llmapi.rlhf_utils.WorkerExtension", kv_cache_config=KvCacheConfig(
  free_gpu_memory_fraction=...), tensor_parallel_size=..., enable_sleep=True)`, `SamplingParams(temperature,
  top_p, top_k, max_tokens, logprobs, detokenize, end_id, pad_id, stop_token_ids, include_stop_str_in_output)`,
  and reading `output.outputs[i].token_ids` / `.logprobs` (a list of {token_id: Logprob(logprob, rank)}).
- tensorrt_llm/llmapi/rlhf_utils.py: `WorkerExtension.update_weights(ipc_handles)`, called through
  `llm._collective_rpc("update_weights", args=(handles,))` with {device_uuid: [(hf_name, reduce_tensor(t))]}
  per bucket and a final call with None that runs post-load processing and resets the prefix cache.
- tensorrt_llm/executor/ray_gpu_worker.py: `sleep(tags)` / `wakeup(tags)` with tags from
  `ExecutorMemoryType` ("kv_cache", "model", ...), which need `enable_sleep=True`.
NeMo-RL and verl refit vLLM the same way (HF-named full tensors over CUDA IPC, loader slices per TP rank).

Weights: the trainer's Megatron shards are gathered into full HF-named tensors (`model.convert.megatron_to_hf`,
the exact inverse of our import), and TensorRT-LLM's HF loader slices them for its own TP size. That is the
TP resharding: rollout TP may differ from training TP because the exchange format is unsharded.

What was run: everything around the engine call (sampling-parameter mapping, weight naming and bucketing,
request building, result parsing), in tests/test_rollout_trtllm.py with stand-ins shaped like TensorRT-LLM's
objects. What was NOT run: `TRTLLMBackend` against a real engine; TensorRT-LLM cannot be installed on our
machines. Expect to debug its first real run on a cluster with TensorRT-LLM >= 1.1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from questa_nemo.config import ConfigError, RolloutConfig
from questa_nemo.model.convert import ModelShape, ShardLayout, megatron_to_hf
from questa_nemo.rollout.base import Completion, GenerationResult, RolloutContext, SamplingParams

WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
SLEEP_TAGS = ("kv_cache",)  # weights stay resident: the next refit writes into them


@dataclass(frozen=True)
class TRTLLMOptions:
    tensor_parallel: int = 1  # rollout TP; independent of training TP
    kv_cache_memory_fraction: float = 0.5  # KvCacheConfig.free_gpu_memory_fraction
    max_batch_sequences: int = 512  # LLM(max_batch_size=...)
    max_seq_len: int = 28672  # prompt + completion
    refit_bucket_bytes: int = 1 << 30  # weights sent per update_weights call


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams -> keyword arguments of tensorrt_llm.SamplingParams.

    Greedy is top_k=1 (TensorRT-LLM's samplers read temperature 0 differently across versions). logprobs=1
    returns the chosen token's log-prob; detokenize=False keeps everything in token ids. end_id=-1 disables
    the tokenizer's EOS, so only our stop tokens end a sequence (none with ignore_eos).
    """
    greedy = params.temperature == 0
    return {
        "n": params.n,
        "max_tokens": params.max_new_tokens,
        "temperature": 1.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": 1 if greedy else None,
        "seed": params.seed,
        "end_id": -1,
        "stop_token_ids": [] if params.ignore_eos else list(params.stop_token_ids),
        "include_stop_str_in_output": True,
        "ignore_eos": params.ignore_eos,
        "logprobs": 1,
        "detokenize": False,
    }


def _chosen_logprob(entry: Any, token: int) -> float:
    """One step of CompletionOutput.logprobs: a float, or {token_id: Logprob} holding the chosen token."""
    if isinstance(entry, Mapping):
        value = entry[token]
        return float(getattr(value, "logprob", value))
    return float(entry)


def parse_request_output(output: Any, params: SamplingParams, version: int) -> list[Completion]:
    """One RequestOutput (its `.outputs`: n CompletionOutputs) -> our n Completions."""
    completions = []
    for choice in output.outputs:
        tokens = [int(t) for t in choice.token_ids]
        logprobs = choice.logprobs or []
        if len(logprobs) != len(tokens):
            raise ValueError(
                f"trtllm: {len(logprobs)} log-probs for {len(tokens)} tokens (was logprobs=1 set?)"
            )
        stopped = bool(tokens) and not params.ignore_eos and tokens[-1] in params.stop_token_ids
        reason = "stop" if stopped else "length"
        completions.append(
            Completion(tokens, [_chosen_logprob(e, t) for e, t in zip(logprobs, tokens)], reason, version)
        )
    return completions


def hf_weights_from_shards(
    shards: Mapping[ShardLayout, Mapping[str, torch.Tensor]], shape: ModelShape
) -> Iterator[tuple[str, torch.Tensor]]:
    """The trainer's Megatron shards (every TP rank of every PP stage) as full HF-named tensors."""
    yield from megatron_to_hf(shards, shape).items()


def weight_buckets(
    named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors into lists of at most bucket_bytes (a larger tensor travels alone), in order."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


class TRTLLMBackend:
    """GenerationBackend on tensorrt_llm.LLM; `weights_fn` yields the trainer's weights as HF-named tensors."""

    def __init__(
        self,
        model_dir: str,
        options: TRTLLMOptions,
        weights_fn: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
        version: int = 0,
    ):
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig

        self.options, self.weights_fn, self.version = options, weights_fn, version
        self.llm = LLM(
            model=model_dir,
            backend="pytorch",
            orchestrator_type="ray",
            ray_worker_extension_cls=WORKER_EXTENSION,
            tensor_parallel_size=options.tensor_parallel,
            kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=options.kv_cache_memory_fraction),
            max_batch_size=options.max_batch_sequences,
            max_seq_len=options.max_seq_len,
            enable_sleep=True,
        )
        self._asleep = False

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        from tensorrt_llm import SamplingParams as TRTSamplingParams

        self.wake()
        started = time.perf_counter()
        outputs = self.llm.generate(prompts, sampling_params=TRTSamplingParams(**sampling_kwargs(params)))
        completions = [parse_request_output(o, params, self.version) for o in outputs]
        seconds = time.perf_counter() - started
        tokens = sum(len(c.token_ids) for group in completions for c in group)
        return GenerationResult(
            completions, {"tokens": float(tokens), "seconds": seconds, "tokens_per_second": tokens / seconds}
        )

    def update_weights(self, version: int) -> None:
        """Send the trainer's weights over CUDA IPC, bucket by bucket, then finalise (post-load, prefix reset)."""
        if self.weights_fn is not None:
            from tensorrt_llm._torch.utils import get_device_uuid
            from torch.multiprocessing.reductions import reduce_tensor

            uuid = get_device_uuid(torch.cuda.current_device())  # the key its workers look themselves up by
            for bucket in weight_buckets(self.weights_fn(), self.options.refit_bucket_bytes):
                # The device copies must outlive the RPC: the workers open their IPC handles during it.
                live = [(name, t.detach().cuda().contiguous()) for name, t in bucket]
                torch.cuda.synchronize()
                handles = [(name, reduce_tensor(t)) for name, t in live]
                self.llm._collective_rpc("update_weights", args=({uuid: handles},))
                del live
        self.llm._collective_rpc("update_weights", args=(None,))
        self.version = version

    def sleep(self) -> None:
        """Release the KV cache (the trainer needs the memory); weights stay for the next refit."""
        if not self._asleep:
            self.llm._collective_rpc("sleep", args=(list(SLEEP_TAGS),))
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm._collective_rpc("wakeup", args=(list(SLEEP_TAGS),))
            self._asleep = False


def build(cfg: RolloutConfig, ctx: RolloutContext) -> TRTLLMBackend:
    """The registry's constructor: TensorRT-LLM loads `ctx.model_dir`, then takes the trainer's gathered
    HF-named weights on every update (the first refit happens at the first `update_weights`)."""
    if ctx.model_dir is None:
        raise ConfigError("model.hf_config", "rollout.backend=trtllm loads a Hugging Face model folder first")
    options = TRTLLMOptions(
        tensor_parallel=cfg.tensor_parallel,
        kv_cache_memory_fraction=cfg.kv_cache_memory_fraction,
        max_batch_sequences=cfg.max_batch_sequences,
        max_seq_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
    )
    return TRTLLMBackend(ctx.model_dir, options, lambda: ctx.hf_weights().items(), ctx.version)
