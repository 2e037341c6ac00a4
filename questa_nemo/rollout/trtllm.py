"""TensorRT-LLM rollout (production clusters): its LLM API, weight refit from the trainer, release/resume.

NOT RUN: TensorRT-LLM cannot be installed on our machines, so this backend has never driven a real engine.
Its calls are checked in CI against signatures taken from TensorRT-LLM's source (tests/trtllm_api.py, which
names the upstream file and commit of each); expect to debug its first real run on a cluster.

Supported: TensorRT-LLM >= 1.3.0rc0 and < 1.4 with `SleepConfig` (NVIDIA/TensorRT-LLM PR #11889 replaced the
`enable_sleep` flag by `sleep_config`); `check_trtllm` refuses anything else with the range in the message.
The calls, as read from TensorRT-LLM's main branch in 2026:
- tensorrt_llm/llmapi/llm_args.py (commit 0004396720054fd8e205cbf616f21f0b57c6b412): `LLM(**kwargs)` feeds
  TorchLlmArgs, a pydantic model that forbids unknown fields (and BaseLLM raises "LLM got invalid argument"
  before that). Used: model, tensor_parallel_size, orchestrator_type="ray", ray_worker_extension_cls,
  kv_cache_config=KvCacheConfig(free_gpu_memory_fraction), max_batch_size,
  max_input_len (default 1024: our prompts reach rollout.max_prompt_tokens), max_seq_len,
  sleep_config=SleepConfig(restore_modes={ExecutorMemoryType value: "NONE" | "MEMSET" | "CPU" | "PINNED"}).
  TorchSampler is the only sampler; the same file says its conventions are `logprobs=0` for the sampled
  token's log-prob and a real `end_id`.
- tensorrt_llm/sampling_params.py: SamplingParams is a kw-only dataclass (n, max_tokens, temperature,
  top_p, top_k, seed, end_id, pad_id, stop_token_ids, include_stop_str_in_output, ignore_eos, logprobs,
  detokenize); `output.outputs[i].token_ids` / `.logprobs` (a list of {token_id: Logprob(logprob, rank)}).
- tensorrt_llm/llmapi/rlhf_utils.py (commit 04762f3b82e2410c84ccdfd7901844831147668a):
  `WorkerExtension.update_weights(ipc_handles)`, reached through `llm._collective_rpc("update_weights",
  args=(handles,))`. Every engine worker looks up `handles[get_device_uuid(its device)]` and raises
  ValueError when its UUID is missing; a final call with None runs post-load processing and resets the
  prefix cache.
- tensorrt_llm/executor (worker `sleep(sleep_tags)` / `wakeup(wakeup_tags)`, the methods AsyncLLM's
  `release(tags)` / `resume(tags)` call): tags are ExecutorMemoryType values; they need `sleep_config`.

Refit at any rollout TP: the engine's workers sit on the GPUs of one data-parallel replica of the trainer
(its model-parallel group, TP x PP ranks). Every rank of that group copies each bucket of full HF-named
tensors onto its own GPU and makes CUDA IPC handles; the handles are all-gathered over the group (a callable
the caller hands in: `model.parallel.model_parallel_all_gather_object`), keyed by each rank's device UUID,
and the group's first rank, which owns the engine, sends the merged dict, so every worker finds the copy on
its own GPU. TensorRT-LLM's HF loader slices the full tensors for its own TP, so the exchange format is
unsharded (`model.convert.megatron_to_hf`). Generation runs on the first rank; the others receive its
completions through the same gather.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from questa_nemo.config import ConfigError, RolloutConfig
from questa_nemo.rollout.base import Completion, GenerationResult, RolloutContext, SamplingParams

WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
SUPPORTED_TRTLLM = ("1.3.0rc0", "1.4")  # [lowest supported, first unsupported)
KV_CACHE_TAG = "kv_cache"  # ExecutorMemoryType.KV_CACHE
WEIGHTS_TAG = "model_weights"  # ExecutorMemoryType.MODEL_WEIGHTS_MAIN (PR #11889)

Gather = Callable[[Any], list[Any]]


def _alone(obj: Any) -> list[Any]:
    """The gather of a group of one process."""
    return [obj]


_ROLLOUT = RolloutConfig()  # the schema's defaults: the only place they are written (config.py)


@dataclass(frozen=True)
class TRTLLMOptions:
    """The engine's knobs, each defaulting to what the schema's `rollout` section gives (`from_config`)."""

    tensor_parallel: int = _ROLLOUT.tensor_parallel  # engine TP: the size of the group `gather` spans (TP x PP)
    kv_cache_memory_fraction: float = _ROLLOUT.kv_cache_memory_fraction  # free_gpu_memory_fraction
    max_batch_sequences: int = _ROLLOUT.max_batch_sequences  # LLM(max_batch_size=...)
    max_input_len: int = _ROLLOUT.max_prompt_tokens  # longest prompt (TensorRT-LLM's default is 1024)
    max_seq_len: int = _ROLLOUT.max_prompt_tokens + _ROLLOUT.max_new_tokens  # prompt + completion
    refit_bucket_bytes: int = _ROLLOUT.trtllm_refit_bucket_mb << 20  # weights sent per update_weights call
    release_weights: bool = _ROLLOUT.trtllm_release_weights  # sleep() also drops the weights (refit refills)

    @classmethod
    def from_config(cls, cfg: RolloutConfig) -> TRTLLMOptions:
        """From a `rollout` config section."""
        return cls(
            tensor_parallel=cfg.tensor_parallel,
            kv_cache_memory_fraction=cfg.kv_cache_memory_fraction,
            max_batch_sequences=cfg.max_batch_sequences,
            max_input_len=cfg.max_prompt_tokens,
            max_seq_len=cfg.max_prompt_tokens + cfg.max_new_tokens,
            refit_bucket_bytes=cfg.trtllm_refit_bucket_mb << 20,
            release_weights=cfg.trtllm_release_weights,
        )


def check_trtllm_version(version: str) -> None:
    """Raise ImportError unless `version` is in SUPPORTED_TRTLLM."""
    from packaging.version import InvalidVersion, Version

    low, high = SUPPORTED_TRTLLM
    try:
        v = Version(version)
        ok = Version(low) <= v and Version(v.base_version) < Version(high)  # 1.4.0rc1 is 1.4 already
    except InvalidVersion:
        ok = False
    if not ok:
        raise ImportError(
            f"TensorRT-LLM {version} is outside the supported range >={low},<{high} "
            "(rollout.backend=trtllm is written against that API: SleepConfig, TorchSampler)"
        )


def check_trtllm(module: Any) -> None:
    """The installed tensorrt_llm is in the supported range and has the API this backend calls."""
    check_trtllm_version(str(getattr(module, "__version__", "unknown")))
    from tensorrt_llm.llmapi.llm_args import TorchLlmArgs

    if "sleep_config" not in TorchLlmArgs.model_fields:
        raise ImportError(
            f"TensorRT-LLM {module.__version__} has no TorchLlmArgs.sleep_config (added by "
            f"NVIDIA/TensorRT-LLM PR #11889); use a newer build in >={SUPPORTED_TRTLLM[0]},<{SUPPORTED_TRTLLM[1]}"
        )


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Our SamplingParams -> keyword arguments of tensorrt_llm.SamplingParams (TorchSampler conventions).

    Greedy is top_k=1 at temperature 1 (so log-probs are of the raw logits, as our contract says).
    logprobs=0 returns the sampled token's log-prob only; detokenize=False keeps everything in token ids.
    The first stop token is the end id (a real one, as TorchSampler wants) and all of them stop; with no
    stop tokens end_id stays None and TensorRT-LLM takes the tokenizer's EOS. ignore_eos runs to
    max_new_tokens.
    """
    greedy = params.temperature == 0
    stops = [] if params.ignore_eos else [int(t) for t in params.stop_token_ids]
    kwargs: dict[str, Any] = {
        "n": params.n,
        "max_tokens": params.max_new_tokens,
        "temperature": 1.0 if greedy else params.temperature,
        "top_p": 1.0 if greedy else params.top_p,
        "top_k": 1 if greedy else None,
        "seed": params.seed,
        "stop_token_ids": stops,
        "include_stop_str_in_output": True,
        "ignore_eos": params.ignore_eos,
        "logprobs": 0,
        "detokenize": False,
    }
    if stops:
        kwargs["end_id"] = stops[0]
        kwargs["pad_id"] = stops[0]
    return kwargs


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
                f"trtllm: {len(logprobs)} log-probs for {len(tokens)} tokens (was logprobs=0 set?)"
            )
        stopped = bool(tokens) and not params.ignore_eos and tokens[-1] in params.stop_token_ids
        reason = "stop" if stopped else "length"
        completions.append(
            Completion(tokens, [_chosen_logprob(e, t) for e, t in zip(logprobs, tokens)], reason, version)
        )
    return completions


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


def merge_handles(gathered: list[tuple[str, Any]], tensor_parallel: int) -> dict[str, Any]:
    """Every rank's (device UUID, handles) -> {UUID: handles}, checked against the engine's worker count.

    Each engine worker raises for a missing UUID; two ranks on one GPU would leave a worker without a
    sender elsewhere. Both are reported here with the numbers, before anything reaches the engine.
    """
    merged = dict(gathered)
    uuids = [uuid for uuid, _ in gathered]
    if len(merged) != len(uuids):
        raise RuntimeError(f"trtllm refit: several trainer ranks share a GPU ({sorted(uuids)})")
    if len(merged) != tensor_parallel:
        raise RuntimeError(
            f"trtllm refit: {len(merged)} trainer rank(s) sent weights for an engine with "
            f"rollout.tensor_parallel={tensor_parallel} workers; every worker needs the rank on its own GPU "
            "(rollout.tensor_parallel must equal model.tensor_parallel x model.pipeline_parallel)"
        )
    return merged


def _device_uuid() -> str:
    """This process's GPU, as TensorRT-LLM's workers name theirs."""
    from tensorrt_llm._torch.utils import get_device_uuid

    return str(get_device_uuid(torch.cuda.current_device()))


def _share_bucket(bucket: list[tuple[str, torch.Tensor]]) -> tuple[list[torch.Tensor], list[tuple[str, Any]]]:
    """Copies of a bucket on this GPU and their CUDA IPC handles. The copies must stay alive until every
    worker has opened its handles (the end of the update_weights RPC)."""
    from torch.multiprocessing.reductions import reduce_tensor

    live = [t.detach().to(torch.cuda.current_device()).contiguous() for _, t in bucket]
    torch.cuda.synchronize()
    return live, [(name, reduce_tensor(t)) for (name, _), t in zip(bucket, live)]


class TRTLLMBackend:
    """GenerationBackend on tensorrt_llm.LLM, one engine per data-parallel replica of the trainer.

    Every rank of the replica's model-parallel group constructs it together (the constructor gathers once);
    the group's first rank starts the engine. `weights_fn` yields the trainer's weights as full HF-named
    tensors on every rank; `gather(obj)` returns every group rank's obj in group order (default: a group of
    one process).
    """

    def __init__(
        self,
        model_dir: str,
        options: TRTLLMOptions,
        weights_fn: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None,
        *,
        gather: Gather | None = None,
        version: int = 0,
    ):
        import tensorrt_llm

        check_trtllm(tensorrt_llm)
        self.options, self.weights_fn, self.version = options, weights_fn, version
        self.gather = gather or _alone
        self.uuid = _device_uuid()
        uuids = self.gather(self.uuid)
        merge_handles([(u, None) for u in uuids], options.tensor_parallel)  # fail before the engine starts
        self.leader = uuids.index(self.uuid) == 0
        self.llm = self._on_leader(lambda: self._start_engine(model_dir))
        self._asleep = False

    def _on_leader(self, fn: Callable[[], Any], share: bool = False) -> Any:
        """Run fn on the first rank; every rank waits for it and gets its value when `share` (else only the
        first rank does). A failure there is raised on every rank: the others would otherwise wait in
        their next gather for ever."""
        value, error, failure = None, None, None
        if self.leader:
            try:
                value = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                failure, error = e, f"{type(e).__name__}: {e}"
        shared, error = self.gather((value if share else None, error))[0]
        if failure is not None:
            raise failure
        if error is not None:
            raise RuntimeError(f"trtllm: the replica's first rank failed: {error}")
        return shared if share else value

    def _start_engine(self, model_dir: str) -> Any:
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig
        from tensorrt_llm.llmapi.llm_args import SleepConfig

        o = self.options
        restore = {KV_CACHE_TAG: "NONE"} | ({WEIGHTS_TAG: "NONE"} if o.release_weights else {})
        return LLM(
            model=model_dir,
            orchestrator_type="ray",
            ray_worker_extension_cls=WORKER_EXTENSION,
            tensor_parallel_size=o.tensor_parallel,
            kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=o.kv_cache_memory_fraction),
            max_batch_size=o.max_batch_sequences,
            max_input_len=o.max_input_len,
            max_seq_len=o.max_seq_len,
            sleep_config=SleepConfig(restore_modes=restore),
        )

    def _tags(self) -> list[str]:
        return [KV_CACHE_TAG, WEIGHTS_TAG] if self.options.release_weights else [KV_CACHE_TAG]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        """Every group rank calls this with the same prompts; the first rank decodes, all get the result."""
        if not prompts:
            return GenerationResult([], {"tokens": 0.0, "seconds": 0.0})

        def decode() -> GenerationResult:
            from tensorrt_llm import SamplingParams as TRTSamplingParams

            self.wake()
            started = time.perf_counter()
            outputs = self.llm.generate(
                prompts, sampling_params=TRTSamplingParams(**sampling_kwargs(params)), use_tqdm=False
            )
            completions = [parse_request_output(o, params, self.version) for o in outputs]
            seconds = time.perf_counter() - started
            tokens = sum(len(c.token_ids) for group in completions for c in group)
            stats = {"tokens": float(tokens), "seconds": seconds, "tokens_per_second": tokens / seconds}
            return GenerationResult(completions, stats)

        return self._on_leader(decode, share=True)

    def update_weights(self, version: int) -> None:
        """Every group rank sends its GPU's copy of each bucket; the first rank hands the engine every
        rank's handles keyed by device UUID, then finalises (post-load processing, prefix-cache reset).

        The ranks must yield the same names in the same order (they compare each bucket's names, and all
        raise together when they differ, rather than losing step in the gathers)."""
        tp = self.options.tensor_parallel
        if self.options.release_weights and self._asleep:
            self._on_leader(lambda: self.llm._collective_rpc("wakeup", args=([WEIGHTS_TAG],)))  # empty pages
        named = self.weights_fn() if self.weights_fn is not None else ()
        buckets = weight_buckets(named, self.options.refit_bucket_bytes)
        for index in itertools.count():
            bucket = next(buckets, None)
            live, handles = _share_bucket(bucket) if bucket else ([], None)
            names = [name for name, _ in bucket] if bucket else None
            gathered = self.gather((self.uuid, names, handles))
            if all(g[1] is None for g in gathered):
                break
            if any(g[1] != gathered[0][1] for g in gathered):
                counts = [len(g[1]) if g[1] is not None else "none" for g in gathered]
                raise RuntimeError(
                    f"trtllm refit: the replica's ranks send different weights in bucket {index} "
                    f"(tensors per rank: {counts}); every rank must yield the same HF-named tensors"
                )
            merged = merge_handles([(uuid, h) for uuid, _, h in gathered], tp)
            # the barrier in _on_leader keeps every rank's copies alive until the workers have opened them
            self._on_leader(lambda merged=merged: self.llm._collective_rpc("update_weights", args=(merged,)))
            del live

        def finalise() -> None:
            self.llm._collective_rpc("update_weights", args=(None,))
            if self.options.release_weights and self._asleep:
                self.llm._collective_rpc("wakeup", args=([KV_CACHE_TAG],))
                self._asleep = False

        self._on_leader(finalise)
        self.version = version

    def sleep(self) -> None:
        """Release the KV cache (and the weights with release_weights) while the trainer runs."""
        if self.leader and not self._asleep:
            self.llm._collective_rpc("sleep", args=(self._tags(),))
            self._asleep = True

    def wake(self) -> None:
        if self.leader and self._asleep:
            if self.options.release_weights:
                raise RuntimeError("trtllm: weights were released by sleep(); update_weights must run first")
            self.llm._collective_rpc("wakeup", args=([KV_CACHE_TAG],))
            self._asleep = False


def build(cfg: RolloutConfig, ctx: RolloutContext) -> TRTLLMBackend:
    """The registry's constructor: TensorRT-LLM loads `ctx.model_dir`, then takes the trainer's gathered
    HF-named weights on every update (the first refit happens at the first `update_weights`)."""
    if ctx.model_dir is None:
        raise ConfigError("model.hf_config", "rollout.backend=trtllm loads a Hugging Face model folder first")
    gather = None
    if ctx.model_parallel > 1:  # one engine per replica: its ranks exchange handles and results
        from questa_nemo.model.parallel import model_parallel_all_gather_object as gather
    return TRTLLMBackend(ctx.model_dir, TRTLLMOptions.from_config(cfg), lambda: ctx.hf_weights().items(),
                         gather=gather, version=ctx.version)


def check_environment() -> None:
    """For doctor: raise ImportError unless the installed TensorRT-LLM is one this backend supports."""
    import tensorrt_llm

    check_trtllm(tensorrt_llm)
