"""TensorRT-LLM's API as read from its source, and a fake `tensorrt_llm` that enforces it.

TensorRT-LLM cannot be installed on our machines. Instead of a stand-in that accepts anything, these are the
signatures our backend calls, taken from NVIDIA/TensorRT-LLM (each block names its file and the commit or
stored version read), and a fake that refuses what the real classes refuse, the way they refuse it:
- LLM(**kwargs): BaseLLM.__init__ raises ValueError("LLM got invalid argument: <key>") for a key that is not
  a TorchLlmArgs field (then pydantic, extra="forbid", validates the values).
- KvCacheConfig / SleepConfig: pydantic StrictBaseModel (extra="forbid"): a ValidationError, which is a
  ValueError (here a ValueError subclass with pydantic's wording).
- SamplingParams: a kw-only dataclass: TypeError for an unknown keyword, ValueError from its _validate.
- LLM.generate / LLM._collective_rpc and the worker methods: plain Python signatures (TypeError on a wrong
  argument); a worker without the RPC'd method raises AttributeError as RayWorkerWrapper.call_worker_method.
- WorkerExtension.update_weights: ValueError("Device UUID ... not found in ipc_handles") for a worker whose
  GPU is missing from the dict; the worker rebuilds each handle as `func(*args)` with args[6] replaced by its
  device id.
- worker sleep/wakeup: ValueError without sleep_config; tags must be ExecutorMemoryType values.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from dataclasses import dataclass, field
from typing import Any

# A version inside questa_nemo.rollout.trtllm.SUPPORTED_TRTLLM (v1.3.0rc24 is the newest release listed on
# github.com/NVIDIA/TensorRT-LLM/releases when this was written).
FAKE_VERSION = "1.3.0rc24"

# tensorrt_llm/llmapi/llm_args.py, commit 0004396720054fd8e205cbf616f21f0b57c6b412: the fields of
# BaseLlmArgs (model ... telemetry_config) then TorchLlmArgs (generation_config ... layer_wise_benchmarks_config).
BASE_LLM_ARGS = frozenset(
    """model tokenizer tokenizer_mode custom_tokenizer post_processor_hook skip_tokenizer_init trust_remote_code
    tensor_parallel_size dtype revision tokenizer_revision model_kwargs pipeline_parallel_size
    context_parallel_size gpus_per_node moe_cluster_parallel_size moe_tensor_parallel_size
    moe_expert_parallel_size enable_attention_dp enable_lm_head_tp_in_adp pp_partition cp_config load_format
    enable_lora lora_config kv_cache_config enable_chunked_prefill guided_decoding_backend
    batched_logits_processor iter_stats_max_iterations request_stats_max_iterations peft_cache_config
    scheduler_config cache_transceiver_config sparse_attention_config kv_cache_compression_config
    speculative_config max_batch_size max_input_len max_seq_len max_beam_width max_num_tokens
    gather_generation_logits num_postprocess_workers postprocess_tokenizer_dir num_serve_frontends
    reasoning_parser decoding_config mpi_session otlp_traces_endpoint backend return_perf_metrics
    perf_metrics_output_dir perf_metrics_max_requests prometheus_metrics_config enable_energy_metrics
    orchestrator_type env_overrides telemetry_config""".split()
)
TORCH_LLM_ARGS = BASE_LLM_ARGS | frozenset(
    """generation_config garbage_collection_gen0_threshold cuda_graph_config encoder_cuda_graph_config
    enable_encoder_decoder_mixed_cuda_graph multimodal_config attention_dp_config disable_overlap_scheduler
    moe_config nvfp4_gemm_config dwdp_config encoder_max_batch_size encoder_max_num_tokens attn_backend
    enable_mla_skip_correction mla_skip_correction_threshold sampler_force_async_worker
    enable_in_graph_sampling enable_speculative_beam_history_d2h enable_early_first_token_response
    enable_low_latency_host_dispatch enable_iter_perf_stats enable_iter_req_stats print_iter_log
    batch_wait_timeout_ms batch_wait_timeout_iters batch_wait_max_tokens_ratio torch_compile_config
    prefill_cuda_graph_backend prefill_capture_num_tokens enable_autotuner use_fine_grained_sync
    enable_layerwise_nvtx_marker enable_min_latency stream_interval force_dynamic_quantization
    allreduce_strategy checkpoint_loader checkpoint_format checkpoint_io_policy mx_config gms_config
    kv_connector_config mm_encoder_only disable_mm_encoder encode_only ray_worker_extension_cls
    ray_placement_config ray_worker_nsight_options sleep_config reorder_policy_config enable_resource_governor
    use_cute_dsl_blockscaling_mm use_cute_dsl_blockscaling_bmm use_cute_dsl_bf16_bmm use_cute_dsl_bf16_gemm
    max_stats_len layer_wise_benchmarks_config""".split()
)
# Same file: removed arguments still accepted on input (TORCH_LLMARGS_REMOVED_ARGS); sampler_type="auto" or
# "TorchSampler" is dropped with a warning, anything else raises ValueError.
REMOVED_LLM_ARGS = frozenset({"sampler_type"})
ORCHESTRATOR_TYPES = (None, "rpc", "ray")  # BaseLlmArgs.orchestrator_type: Optional[Literal["rpc", "ray"]]

# Same file: KvCacheConfig(StrictBaseModel) fields; free_gpu_memory_fraction in [0, 1].
KV_CACHE_CONFIG_FIELDS = frozenset(
    """enable_block_reuse max_tokens max_attention_window sink_token_length free_gpu_memory_fraction
    host_cache_size disk_cache_size disk_cache_path cross_kv_cache_fraction secondary_offload_min_priority
    event_buffer_max_size attention_dp_events_gather_period_ms kv_events_config enable_partial_reuse
    copy_on_partial_reuse use_uvm max_gpu_total_bytes iteration_stats_interval dtype mamba_ssm_cache_dtype
    mamba_ssm_stochastic_rounding mamba_ssm_philox_rounds tokens_per_block mamba_state_cache_interval
    mamba_state_config use_kv_cache_manager_v2 enable_swa_scratch_reuse kv_cache_event_hash_algo
    max_util_for_resume enable_kv_pool_rebalance kv_pool_rebalance_min_sampled_kv_caches
    kv_pool_rebalance_cooldown_secs kv_pool_rebalance_target_ratio_update_interval
    kv_pool_rebalance_ratio_threshold kv_pool_rebalance_moving_average_decay kv_pool_rebalance_check_interval
    disk_prefetch_num_reqs fp8_context_mla_kv_len_cap pool_ratio avg_seq_len block_reuse_config""".split()
)

# Same file: ExecutorMemoryType values, and SleepConfig(StrictBaseModel) with its one field
# restore_modes: dict[ExecutorMemoryType, Literal["NONE", "MEMSET", "CPU", "PINNED"] | RestoreMode].
EXECUTOR_MEMORY_TYPES = frozenset(
    """sampler drafter guided_decoder spec_resource_manager _no_capture_init_kv_cache
    _no_capture_init_extra_resources model_extra executor_extra kv_cache model draft_model model_weights
    draft_model_weights""".split()
)
SLEEP_CONFIG_FIELDS = frozenset({"restore_modes"})
RESTORE_MODES = ("NONE", "MEMSET", "CPU", "PINNED")

# tensorrt_llm/llmapi/llm.py (2026 main; the stored version has no commit attached, search-index file
# 55216765702): the explicit parameters of LLM.__init__ (the rest goes through **kwargs to TorchLlmArgs),
# LLM.generate and _TorchLLM._collective_rpc.
LLM_INIT_PARAMS = (
    "model tokenizer tokenizer_mode skip_tokenizer_init trust_remote_code tensor_parallel_size dtype revision "
    "tokenizer_revision"
).split()
GENERATE_PARAMS = (
    "inputs sampling_params use_tqdm lora_request prompt_adapter_request kv_cache_retention_config "
    "disaggregated_params scheduling_params conversation_params cache_salt priority"
).split()
COLLECTIVE_RPC_PARAMS = "method args kwargs non_block unique_reply_rank target_ranks".split()

# tensorrt_llm/llmapi/rlhf_utils.py, commit 04762f3b82e2410c84ccdfd7901844831147668a: WorkerExtension methods.
# tensorrt_llm/executor/base_worker.py (2026 main, search-index file 55301320707) and
# tensorrt_llm/executor/ray_gpu_worker.py (commit 0acd798d13e5b96916db058233597987eb5b6da4): sleep/wakeup.
WORKER_METHODS = {
    "update_weights": ("ipc_handles",),
    "reset_prefix_cache": (),
    "check_weights_updated": (),
    "sleep": ("sleep_tags",),
    "wakeup": ("wakeup_tags",),
}


class ValidationError(ValueError):
    """pydantic.ValidationError's shape (it subclasses ValueError) for extra="forbid" models."""


def _strict_model(name: str, fields: frozenset[str]) -> type:
    class Model:
        def __init__(self, **kwargs: Any):
            extra = sorted(set(kwargs) - fields)
            if extra:
                lines = "\n".join(f"{key}\n  Extra inputs are not permitted" for key in extra)
                raise ValidationError(f"{len(extra)} validation error(s) for {name}\n{lines}")
            self.__dict__.update(kwargs)

    Model.__name__ = Model.__qualname__ = name
    return Model


_KvCacheConfigBase = _strict_model("KvCacheConfig", KV_CACHE_CONFIG_FIELDS)
_SleepConfigBase = _strict_model("SleepConfig", SLEEP_CONFIG_FIELDS)


class KvCacheConfig(_KvCacheConfigBase):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        fraction = kwargs.get("free_gpu_memory_fraction", 0.9)
        if fraction is not None and not 0 <= fraction <= 1:
            raise ValidationError("kv_cache_config.free_gpu_memory_fraction must be a float between 0 and 1")


class SleepConfig(_SleepConfigBase):
    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        for key, mode in kwargs.get("restore_modes", {}).items():
            if key not in EXECUTOR_MEMORY_TYPES:
                raise ValidationError(f"invalid executor memory type: {key}")
            if mode not in RESTORE_MODES:
                raise ValidationError(
                    f"invalid restore_mode: {mode}. Expected one of: {', '.join(RESTORE_MODES)}"
                )


# tensorrt_llm/sampling_params.py, commit 000a01de66f0eab4ab05640711f0253f50f5209c (v1.0.0rc4; the fields we
# use are unchanged in the llm_args.py version above, which sets the logprobs=0 / real end_id conventions):
# @dataclass(slots=True, kw_only=True) class SamplingParams, its init fields and __post_init__/_validate.
@dataclass(kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    bad: Any = None
    bad_token_ids: list[int] | None = None
    stop: Any = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    embedding_bias: Any = None
    logits_processor: Any = None
    apply_batched_logits_processor: bool = False
    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    top_k: int | None = None
    top_p: float | None = None
    top_p_min: float | None = None
    top_p_reset_ids: int | None = None
    top_p_decay: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    beam_search_diversity_rate: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    length_penalty: float | None = None
    early_stopping: int | None = None
    no_repeat_ngram_size: int | None = None
    min_p: float | None = None
    beam_width_array: list[int] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True
    return_encoder_output: bool = False
    return_perf_metrics: bool = False
    additional_model_outputs: Any = None
    lookahead_config: Any = None
    guided_decoding: Any = None
    ignore_eos: bool = False
    detokenize: bool = True
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        if self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) cannot be less than n ({self.n})")
        greedy = (
            not self.use_beam_search
            and (self.top_k is None or self.top_k == 1)
            and (self.top_p is None or self.top_p == 0.0)
        )
        if self.best_of > 1 and greedy:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns.")


SAMPLING_PARAMS_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass
class Logprob:  # tensorrt_llm/executor/result.py: Logprob(logprob, rank)
    logprob: float
    rank: int | None = None


@dataclass
class FakeEngine:
    """What the fake engine saw: its construction, requests, and each worker's calls."""

    worker_uuids: tuple[str, ...]
    init: dict[str, Any] | None = None
    generate_calls: list[tuple[Any, Any]] = field(default_factory=list)
    rpc: list[tuple[str, tuple]] = field(default_factory=list)
    workers: list[Any] = field(default_factory=list)


class FakeWorker:
    """One engine worker (RayGPUWorker with the WorkerExtension), on the GPU named `uuid`."""

    def __init__(self, uuid: str, device_id: int, llm: Any):
        self.uuid, self.device_id, self.llm = uuid, device_id, llm
        self.loaded: dict[str, Any] = {}
        self.finalised = 0
        self.released: set[str] = set()

    def update_weights(self, ipc_handles: dict | None = None) -> None:
        if ipc_handles is None:
            self.finalised += 1
            return
        if self.uuid not in ipc_handles:
            raise ValueError(f"Device UUID {self.uuid} not found in ipc_handles")
        for param_name, tensor_handle in ipc_handles[self.uuid]:
            func, args = tensor_handle
            list_args = list(args)
            list_args[6] = self.device_id
            self.loaded[param_name] = func(*list_args)

    def reset_prefix_cache(self) -> None:
        pass

    def check_weights_updated(self) -> bool:
        return False

    def _check_sleep(self, tags: list[str]) -> None:
        if self.llm.sleep_config is None:
            raise ValueError("Sleep feature is not enabled, please set sleep_config in the LLM arguments.")
        for tag in tags:
            if tag not in EXECUTOR_MEMORY_TYPES:
                raise ValueError(f"'{tag}' is not a valid ExecutorMemoryType")

    def sleep(self, sleep_tags: list[str]) -> None:
        self._check_sleep(sleep_tags)
        self.released |= set(sleep_tags)

    def wakeup(self, wakeup_tags: list[str]) -> None:
        self._check_sleep(wakeup_tags)
        self.released -= set(wakeup_tags)


def install(
    monkeypatch: Any, worker_uuids: tuple[str, ...] = ("GPU-0",), version: str = FAKE_VERSION
) -> FakeEngine:
    """Put a fake `tensorrt_llm` (and the submodules the backend imports) into sys.modules."""
    engine = FakeEngine(tuple(worker_uuids))

    class LLM:
        def __init__(
            self,
            model: Any,
            tokenizer: Any = None,
            tokenizer_mode: str = "auto",
            skip_tokenizer_init: bool = False,
            trust_remote_code: bool = False,
            tensor_parallel_size: int = 1,
            dtype: str = "auto",
            revision: Any = None,
            tokenizer_revision: Any = None,
            **kwargs: Any,
        ):
            valid = TORCH_LLM_ARGS | REMOVED_LLM_ARGS | {"_mpi_session", "backend"}
            for key in kwargs:
                if key not in valid:
                    raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")
            if kwargs.get("sampler_type", "auto") not in ("auto", "TorchSampler"):
                raise ValueError(
                    f"'sampler_type' was removed and {kwargs['sampler_type']!r} is no longer available"
                )
            if kwargs.get("orchestrator_type") not in ORCHESTRATOR_TYPES:
                raise ValidationError(f"orchestrator_type: {kwargs['orchestrator_type']!r}")
            if (
                kwargs.get("ray_worker_extension_cls") is not None
                and kwargs.get("orchestrator_type") != "ray"
            ):
                raise ValidationError(
                    "ray_worker_extension_cls is only supported with orchestrator_type='ray'"
                )
            for key, cls in (("kv_cache_config", KvCacheConfig), ("sleep_config", SleepConfig)):
                if kwargs.get(key) is not None and not isinstance(kwargs[key], cls):
                    raise ValidationError(f"{key}: expected {cls.__name__}, got {type(kwargs[key]).__name__}")
            if tensor_parallel_size != len(engine.worker_uuids):
                raise AssertionError("the fake was set up with a different number of workers")
            engine.init = dict(model=model, tensor_parallel_size=tensor_parallel_size, **kwargs)
            self.sleep_config = kwargs.get("sleep_config")
            engine.workers = [FakeWorker(u, i, self) for i, u in enumerate(engine.worker_uuids)]

        def generate(
            self,
            inputs: Any,
            sampling_params: Any = None,
            use_tqdm: bool = True,
            lora_request: Any = None,
            prompt_adapter_request: Any = None,
            kv_cache_retention_config: Any = None,
            disaggregated_params: Any = None,
            scheduling_params: Any = None,
            conversation_params: Any = None,
            cache_salt: Any = None,
            priority: float = 0.5,
        ) -> list[Any]:
            if not isinstance(sampling_params, SamplingParams):
                raise TypeError("sampling_params must be a tensorrt_llm.SamplingParams")
            released = set().union(*(w.released for w in engine.workers))
            if released:
                raise RuntimeError(f"generate while memory is released: {sorted(released)}")
            engine.generate_calls.append((inputs, sampling_params))
            outputs = []
            for prompt in inputs:  # token j of choice c: len(prompt) + c, log-prob -(j + 1) / 4
                choices = []
                for c in range(sampling_params.n):
                    tokens = [len(prompt) + c, sampling_params.end_id or 0][: sampling_params.max_tokens]
                    logprobs = [{t: Logprob(-(j + 1) / 4, 1)} for j, t in enumerate(tokens)]
                    choices.append(types.SimpleNamespace(token_ids=tokens, logprobs=logprobs))
                outputs.append(types.SimpleNamespace(outputs=choices))
            return outputs

        def _collective_rpc(
            self,
            method: str,
            args: tuple = (),
            kwargs: dict | None = None,
            non_block: bool = False,
            unique_reply_rank: int | None = None,
            target_ranks: Any = None,
        ) -> list[Any]:
            engine.rpc.append((method, args))
            results = []
            for worker in engine.workers:
                if method not in WORKER_METHODS:
                    raise AttributeError(f"The RayGPUWorker has no method called '{method}'.")
                results.append(getattr(worker, method)(*args, **(kwargs or {})))
            return results

    module = types.ModuleType("tensorrt_llm")
    module.__version__ = version
    module.LLM = LLM
    module.SamplingParams = SamplingParams
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = KvCacheConfig
    llmapi.SamplingParams = SamplingParams
    llm_args = types.ModuleType("tensorrt_llm.llmapi.llm_args")
    llm_args.SleepConfig = SleepConfig
    llm_args.KvCacheConfig = KvCacheConfig
    llm_args.TorchLlmArgs = type("TorchLlmArgs", (), {"model_fields": dict.fromkeys(TORCH_LLM_ARGS)})
    torch_pkg = types.ModuleType("tensorrt_llm._torch")
    utils = types.ModuleType("tensorrt_llm._torch.utils")
    utils.get_device_uuid = lambda index: engine.worker_uuids[index]
    for name, mod in {
        "tensorrt_llm": module,
        "tensorrt_llm.llmapi": llmapi,
        "tensorrt_llm.llmapi.llm_args": llm_args,
        "tensorrt_llm._torch": torch_pkg,
        "tensorrt_llm._torch.utils": utils,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return engine
