"""Everything around the TensorRT-LLM engine call, with stand-ins shaped like its objects (it cannot be
installed here): sampling-parameter mapping, result parsing, weight naming + TP resharding + bucketing,
and the backend's call sequence against a fake `tensorrt_llm` module."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from rollout_models import hf_model

from questa_nemo.model.convert import ModelShape, ShardLayout, hf_to_megatron
from questa_nemo.rollout.base import SamplingParams
from questa_nemo.rollout.trtllm import (
    TRTLLMBackend,
    TRTLLMOptions,
    hf_weights_from_shards,
    parse_request_output,
    sampling_kwargs,
    weight_buckets,
)


def test_sampling_kwargs():
    sampled = sampling_kwargs(
        SamplingParams(n=16, temperature=0.6, top_p=0.95, max_new_tokens=99, stop_token_ids=(2, 7), seed=3)
    )
    assert sampled["n"] == 16 and sampled["max_tokens"] == 99 and sampled["seed"] == 3
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.6, 0.95, None)
    assert sampled["stop_token_ids"] == [2, 7] and sampled["end_id"] == -1 and sampled["logprobs"] == 1
    assert sampled["detokenize"] is False and sampled["include_stop_str_in_output"] is True
    greedy = sampling_kwargs(SamplingParams(temperature=0.0, stop_token_ids=(2,), ignore_eos=True))
    assert greedy["top_k"] == 1 and greedy["stop_token_ids"] == [] and greedy["ignore_eos"] is True


def logprob(value: float) -> SimpleNamespace:  # tensorrt_llm.executor.result.Logprob(logprob, rank)
    return SimpleNamespace(logprob=value, rank=1)


def test_parse_request_output():
    output = SimpleNamespace(
        outputs=[
            SimpleNamespace(
                token_ids=[5, 9, 2], logprobs=[{5: logprob(-0.1)}, {9: logprob(-0.2)}, {2: logprob(-0.3)}]
            ),
            SimpleNamespace(token_ids=[4, 4], logprobs=[-1.0, -2.0]),  # older versions: plain floats
        ]
    )
    completions = parse_request_output(output, SamplingParams(n=2, stop_token_ids=(2,)), version=7)
    assert [c.token_ids for c in completions] == [[5, 9, 2], [4, 4]]
    assert completions[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert [c.finish_reason for c in completions] == ["stop", "length"]
    assert {c.version for c in completions} == {7}
    with pytest.raises(ValueError, match="log-probs"):
        parse_request_output(
            SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1, 2], logprobs=None)]), SamplingParams(), 0
        )


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_weights_from_tp2_training_shards_are_the_hf_checkpoint(kind):
    """Training TP=2 shards -> full HF-named tensors (what TensorRT-LLM's HF loader slices to its own TP)."""
    hf = hf_model(kind)
    shape = ModelShape.from_hf(hf.config.to_dict())
    reference = hf.state_dict()
    shards = {
        layout: hf_to_megatron(reference, shape, layout)
        for layout in (ShardLayout(tp_rank=0, tp_size=2), ShardLayout(tp_rank=1, tp_size=2))
    }
    sent = dict(hf_weights_from_shards(shards, shape))
    expected = {n for n in reference if not (shape.tied and n == "lm_head.weight")}
    assert set(sent) == expected
    for name in expected:
        assert torch.equal(sent[name], reference[name]), name


def test_weight_buckets_respect_the_byte_budget_and_order():
    named = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5])]  # float32: 4 bytes each
    buckets = list(weight_buckets(named, bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3", "w4"]]


@pytest.fixture
def fake_trtllm(monkeypatch):
    """A `tensorrt_llm` module whose LLM records its construction, requests and RPCs."""
    calls: dict = {"rpc": []}

    class LLM:
        def __init__(self, **kwargs):
            calls["init"] = kwargs

        def generate(self, prompts, sampling_params):
            calls["generate"] = (prompts, sampling_params)
            n = sampling_params.kwargs["n"]
            return [
                SimpleNamespace(
                    outputs=[SimpleNamespace(token_ids=[len(p), j], logprobs=[-0.5, -0.25]) for j in range(n)]
                )
                for p in prompts
            ]

        def _collective_rpc(self, method, args=()):
            calls["rpc"].append((method, args))

    module = types.ModuleType("tensorrt_llm")
    module.LLM = LLM
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llmapi.KvCacheConfig = lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", module)
    monkeypatch.setitem(sys.modules, "tensorrt_llm.llmapi", llmapi)
    return calls


def test_backend_call_sequence(fake_trtllm):
    backend = TRTLLMBackend("/models/qwen", TRTLLMOptions(tensor_parallel=2, kv_cache_memory_fraction=0.3))
    init = fake_trtllm["init"]
    assert (
        init["model"] == "/models/qwen" and init["tensor_parallel_size"] == 2 and init["enable_sleep"] is True
    )
    assert init["kv_cache_config"].free_gpu_memory_fraction == 0.3
    assert init["ray_worker_extension_cls"] == "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"

    result = backend.generate([[1, 2, 3], [4]], SamplingParams(n=2, max_new_tokens=2))
    assert fake_trtllm["generate"][0] == [[1, 2, 3], [4]]  # one batched request list, token ids in
    assert [[c.token_ids for c in g] for g in result.completions] == [[[3, 0], [3, 1]], [[1, 0], [1, 1]]]

    backend.sleep()
    backend.sleep()  # idempotent
    backend.update_weights(3)  # no weights_fn: only the finalising call
    backend.generate([[1]], SamplingParams(max_new_tokens=2))  # wakes first
    assert fake_trtllm["rpc"] == [
        ("sleep", (["kv_cache"],)),
        ("update_weights", (None,)),
        ("wakeup", (["kv_cache"],)),
    ]
    assert backend.version == 3
