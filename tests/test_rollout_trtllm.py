"""The TensorRT-LLM backend against a fake `tensorrt_llm` that enforces the signatures read from TensorRT-LLM's
source (tests/trtllm_api.py): sampling-parameter mapping, result parsing, weight naming + TP resharding +
bucketing, the version check, the engine's construction and RPCs, and refit at rollout TP = 2 with every
rank's IPC handles delivered to the worker on its GPU (two ranks as threads with an all-gather)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
import trtllm_api
from rollout_models import hf_model

from questa_nemo.config import Config, ConfigError, RolloutConfig, validate
from questa_nemo.model.convert import ModelShape, ShardLayout, hf_to_megatron, megatron_to_hf
from questa_nemo.rollout import trtllm
from questa_nemo.rollout.base import SamplingParams
from questa_nemo.rollout.trtllm import (
    TRTLLMBackend,
    TRTLLMOptions,
    check_trtllm_version,
    parse_request_output,
    sampling_kwargs,
    weight_buckets,
)

GPU = threading.local()  # the device UUID of the "rank" running in this thread


@pytest.fixture
def fake_rank(monkeypatch):
    """Device UUIDs and CUDA IPC sharing without a GPU: a rank's handle says which GPU made it, and the
    worker's rebuild (func(*args), args[6] = its device id, as TensorRT-LLM does) returns (that GPU, tensor)."""

    def rebuild(uuid, name, tensor, _a, _b, _c, device_id):
        return uuid, tensor.clone()

    def share(bucket):
        return [], [(name, (rebuild, (GPU.uuid, name, t, 0, 0, 0, None))) for name, t in bucket]

    GPU.uuid = "GPU-0"
    monkeypatch.setattr(trtllm, "_device_uuid", lambda: GPU.uuid)
    monkeypatch.setattr(trtllm, "_share_bucket", share)


def thread_gathers(n: int):
    """One all-gather callable per rank, for n ranks running as threads."""
    slots: list = [None] * n
    barrier = threading.Barrier(n, timeout=20)

    def make(rank):
        def gather(obj):
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return gather

    return [make(r) for r in range(n)]


def run_ranks(fns):
    """Run fns[r]() in thread r; re-raise the first failure."""
    errors, results = [], [None] * len(fns)

    def target(r):
        try:
            results[r] = fns[r]()
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_sampling_kwargs_follow_torch_sampler_conventions():
    sampled = sampling_kwargs(
        SamplingParams(n=16, temperature=0.6, top_p=0.95, max_new_tokens=99, stop_token_ids=(2, 7), seed=3)
    )
    assert sampled["n"] == 16 and sampled["max_tokens"] == 99 and sampled["seed"] == 3
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (0.6, 0.95, None)
    assert sampled["logprobs"] == 0  # the sampled token's log-prob (TorchSampler)
    assert sampled["end_id"] == 2 and sampled["pad_id"] == 2  # a real end id
    assert sampled["stop_token_ids"] == [2, 7] and sampled["detokenize"] is False
    greedy = sampling_kwargs(SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(2,), ignore_eos=True))
    assert greedy["top_k"] == 1 and greedy["stop_token_ids"] == [] and greedy["ignore_eos"] is True
    assert "end_id" not in greedy  # ignore_eos: TensorRT-LLM takes the tokenizer's EOS, never hit
    for params in (SamplingParams(n=4, max_new_tokens=8, stop_token_ids=(5,)), SamplingParams(temperature=0.0, max_new_tokens=8)):
        kwargs = sampling_kwargs(params)
        assert set(kwargs) <= trtllm_api.SAMPLING_PARAMS_FIELDS
        trtllm_api.SamplingParams(**kwargs)  # the dataclass and its _validate accept them


def test_parse_request_output():
    logprob = trtllm_api.Logprob
    output = SimpleNamespace(
        outputs=[
            SimpleNamespace(
                token_ids=[5, 9, 2], logprobs=[{5: logprob(-0.1)}, {9: logprob(-0.2)}, {2: logprob(-0.3)}]
            ),
            SimpleNamespace(token_ids=[4, 4], logprobs=[-1.0, -2.0]),  # plain floats are read too
        ]
    )
    completions = parse_request_output(output, SamplingParams(n=2, max_new_tokens=3, stop_token_ids=(2,)), version=7)
    assert [c.token_ids for c in completions] == [[5, 9, 2], [4, 4]]
    assert completions[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])
    assert [c.finish_reason for c in completions] == ["stop", "length"]
    assert {c.version for c in completions} == {7}
    with pytest.raises(ValueError, match="log-probs"):
        no_logprobs = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1, 2], logprobs=None)])
        parse_request_output(no_logprobs, SamplingParams(max_new_tokens=2), 0)


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
    sent = megatron_to_hf(shards, shape)  # what the refit sends
    expected = {n for n in reference if not (shape.tied and n == "lm_head.weight")}
    assert set(sent) == expected
    for name in expected:
        assert torch.equal(sent[name], reference[name]), name


def test_weight_buckets_respect_the_byte_budget_and_order():
    named = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 5])]  # float32: 4 bytes each
    buckets = list(weight_buckets(named, bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3", "w4"]]


def test_version_check_names_the_supported_range(monkeypatch, fake_rank):
    for ok in ("1.3.0rc0", "1.3.0rc24", "1.3.2"):
        check_trtllm_version(ok)
    for bad in ("1.2.1", "1.0.0", "1.4.0", "1.4.0rc1", "not-a-version"):
        with pytest.raises(ImportError, match=r">=1\.3\.0rc0,<1\.4"):
            check_trtllm_version(bad)
    trtllm_api.install(monkeypatch, version="1.2.1")
    with pytest.raises(ImportError, match="TensorRT-LLM 1.2.1 is outside"):
        TRTLLMBackend("/models/qwen", TRTLLMOptions())
    trtllm_api.install(monkeypatch)
    import sys

    args = sys.modules["tensorrt_llm.llmapi.llm_args"].TorchLlmArgs
    monkeypatch.setattr(args, "model_fields", {k: None for k in args.model_fields if k != "sleep_config"})
    with pytest.raises(ImportError, match="sleep_config"):
        TRTLLMBackend("/models/qwen", TRTLLMOptions())


def test_backend_calls_pass_the_signature_checking_fake(monkeypatch, fake_rank):
    engine = trtllm_api.install(monkeypatch)
    cfg = RolloutConfig(backend="trtllm", kv_cache_memory_fraction=0.3, max_prompt_tokens=4096)
    weights = [("a", torch.ones(4)), ("b", torch.arange(3.0)), ("c", torch.zeros(8))]
    backend = TRTLLMBackend("/models/qwen", TRTLLMOptions.from_config(cfg), lambda: iter(weights))
    init = engine.init
    assert init["model"] == "/models/qwen" and init["tensor_parallel_size"] == 1
    assert init["orchestrator_type"] == "ray" and init["ray_worker_extension_cls"] == trtllm.WORKER_EXTENSION
    assert init["max_input_len"] == 4096 and init["max_seq_len"] == 4096 + cfg.max_new_tokens
    assert init["kv_cache_config"].free_gpu_memory_fraction == 0.3
    assert init["sleep_config"].restore_modes == {"kv_cache": "NONE"}

    result = backend.generate([[1, 2, 3], [4]], SamplingParams(n=2, max_new_tokens=2, stop_token_ids=(9,)))
    prompts, sp = engine.generate_calls[0]
    assert prompts == [[1, 2, 3], [4]] and sp.logprobs == 0 and sp.end_id == 9
    assert [[c.token_ids for c in g] for g in result.completions] == [[[3, 9], [4, 9]], [[1, 9], [2, 9]]]
    assert result.completions[0][0].logprobs == [-0.25, -0.5]

    backend.sleep()
    backend.sleep()  # idempotent
    assert engine.workers[0].released == {"kv_cache"}
    backend.update_weights(3)  # weights stay resident: the refit needs no wake-up
    backend.generate([[1]], SamplingParams(max_new_tokens=2))  # wakes first
    assert [m for m, _ in engine.rpc] == ["sleep", "update_weights", "update_weights", "wakeup"]
    worker = engine.workers[0]
    assert worker.finalised == 1 and set(worker.loaded) == {"a", "b", "c"}
    for name, tensor in weights:
        assert worker.loaded[name][0] == "GPU-0" and torch.equal(worker.loaded[name][1], tensor)
    assert backend.version == 3


def test_wrong_keywords_fail_like_tensorrt_llm(monkeypatch):
    engine = trtllm_api.install(monkeypatch)
    import tensorrt_llm
    from tensorrt_llm.llmapi import KvCacheConfig
    from tensorrt_llm.llmapi.llm_args import SleepConfig

    with pytest.raises(ValueError, match="LLM got invalid argument: enable_sleep"):  # the old backend's flag
        tensorrt_llm.LLM(model="m", orchestrator_type="ray", enable_sleep=True)
    with pytest.raises(ValueError, match="invalid argument: placement_groups"):  # now in ray_placement_config
        tensorrt_llm.LLM(model="m", placement_groups=[])
    with pytest.raises(ValueError, match="TRTLLMSampler"):
        tensorrt_llm.LLM(model="m", sampler_type="TRTLLMSampler")
    with pytest.raises(ValueError, match="ray_worker_extension_cls"):
        tensorrt_llm.LLM(model="m", ray_worker_extension_cls=trtllm.WORKER_EXTENSION)
    with pytest.raises(TypeError, match="logprob"):
        tensorrt_llm.SamplingParams(logprob=0)
    with pytest.raises(ValueError, match="Greedy decoding"):
        tensorrt_llm.SamplingParams(top_k=1, n=2)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        KvCacheConfig(free_gpu_memory=0.5)
    with pytest.raises(ValueError, match="invalid executor memory type"):
        SleepConfig(restore_modes={"weights": "NONE"})
    with pytest.raises(ValueError, match="invalid restore_mode"):
        SleepConfig(restore_modes={"kv_cache": "DISCARD"})

    llm = tensorrt_llm.LLM(model="m")  # no sleep_config, no Ray extension
    with pytest.raises(TypeError):
        llm.generate([[1]], sampling=tensorrt_llm.SamplingParams())
    with pytest.raises(AttributeError, match="no method called 'wake_up'"):
        llm._collective_rpc("wake_up", args=(["kv_cache"],))
    with pytest.raises(ValueError, match="set sleep_config"):
        llm._collective_rpc("sleep", args=(["kv_cache"],))
    with pytest.raises(TypeError):
        llm._collective_rpc("update_weights", args=({}, None))
    with pytest.raises(
        ValueError, match="Device UUID GPU-0 not found"
    ):  # the TP > 1 failure of the old refit
        llm._collective_rpc("update_weights", args=({"GPU-other": []},))
    assert engine.rpc[-1][0] == "update_weights"


def test_refit_at_rollout_tp2_sends_every_ranks_handles_to_its_worker(monkeypatch, fake_rank):
    uuids = ("GPU-a", "GPU-b")
    engine = trtllm_api.install(monkeypatch, worker_uuids=uuids)
    options = TRTLLMOptions(tensor_parallel=2, refit_bucket_bytes=32)  # float32: 24 + 16 bytes, two buckets
    gathers = thread_gathers(2)

    def rank(r):
        GPU.uuid = uuids[r]
        weights = [("a", torch.full((6,), float(r))), ("b", torch.full((4,), 10.0 + r))]  # r marks the copy
        backend = TRTLLMBackend("/models/qwen", options, lambda: iter(weights), gather=gathers[r])
        result = backend.generate([[1, 2]], SamplingParams(max_new_tokens=1))
        backend.sleep()
        backend.update_weights(5)
        return backend, result

    (b0, res0), (b1, res1) = run_ranks([lambda: rank(0), lambda: rank(1)])
    assert (b0.leader, b1.leader) == (True, False) and b1.llm is None
    assert len(engine.generate_calls) == 1  # one engine, on the first rank
    assert [c.token_ids for c in res1.completions[0]] == [c.token_ids for c in res0.completions[0]] == [[2]]
    assert [m for m, _ in engine.rpc] == ["sleep", "update_weights", "update_weights", "update_weights"]
    for r, worker in enumerate(engine.workers):
        assert worker.uuid == uuids[r] and worker.finalised == 1
        assert {name: origin for name, (origin, _) in worker.loaded.items()} == {"a": uuids[r], "b": uuids[r]}
        assert torch.equal(worker.loaded["a"][1], torch.full((6,), float(r)))  # its own rank's copy
    assert b0.version == b1.version == 5


def test_an_engine_worker_without_a_sender_is_refused_before_the_engine_starts(monkeypatch, fake_rank):
    engine = trtllm_api.install(monkeypatch, worker_uuids=("GPU-a", "GPU-b"))
    with pytest.raises(RuntimeError, match=r"1 trainer rank\(s\) .* rollout.tensor_parallel=2"):
        TRTLLMBackend("/models/qwen", TRTLLMOptions(tensor_parallel=2))  # no gather: a group of one
    assert engine.init is None
    gathers = thread_gathers(2)

    def rank(r):
        GPU.uuid = "GPU-a"  # both ranks on one GPU
        return TRTLLMBackend("/models/qwen", TRTLLMOptions(tensor_parallel=2), gather=gathers[r])

    with pytest.raises(RuntimeError, match="share a GPU"):
        run_ranks([lambda: rank(0), lambda: rank(1)])


def test_release_weights_refits_before_generating(monkeypatch, fake_rank):
    engine = trtllm_api.install(monkeypatch)
    options = TRTLLMOptions(release_weights=True)
    backend = TRTLLMBackend("/models/qwen", options, lambda: iter([("a", torch.ones(2))]))
    assert engine.init["sleep_config"].restore_modes == {"kv_cache": "NONE", "model_weights": "NONE"}
    backend.sleep()
    assert engine.workers[0].released == {"kv_cache", "model_weights"}
    with pytest.raises(RuntimeError, match="update_weights must run first"):
        backend.generate([[1]], SamplingParams(max_new_tokens=1))
    backend.update_weights(1)
    assert engine.workers[0].released == set()
    assert [(m, a) for m, a in engine.rpc if m != "update_weights"] == [
        ("sleep", (["kv_cache", "model_weights"],)),
        ("wakeup", (["model_weights"],)),
        ("wakeup", (["kv_cache"],)),
    ]
    backend.generate([[1]], SamplingParams(max_new_tokens=1))


def test_config_ties_engine_tp_to_the_replica_and_maps_the_prompt_limit():
    cfg = Config()
    cfg.rollout.backend = "trtllm"
    cfg.rollout.tensor_parallel = 2
    with pytest.raises(ConfigError, match="rollout.tensor_parallel"):
        validate(cfg)
    cfg.rollout.max_prompt_tokens = 2048
    options = TRTLLMOptions.from_config(cfg.rollout)
    assert options.max_input_len == 2048 and options.refit_bucket_bytes == 1024 << 20


@pytest.mark.slow
def test_refit_through_the_model_parallel_all_gather():
    """The same refit with two real processes and model.parallel.model_parallel_all_gather_object (gloo)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    from launch import torchrun

    out = torchrun("trtllm_refit_worker.py")
    assert out.count("trtllm refit ok") == 2, out[-3000:]


def _open_like_a_trtllm_worker(handles, device_id, out):
    """What WorkerExtension.update_weights does with one rank's list (rlhf_utils.py): func(*args) with
    args[6] replaced by the worker's device id; reports each tensor's sum."""
    sums = {}
    for name, (func, args) in handles:
        list_args = list(args)
        list_args[6] = device_id
        sums[name] = float(func(*list_args).double().sum())
    out.put(sums)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_shared_bucket_opens_in_another_process_like_tensorrt_llm_does():
    """The real _share_bucket (no fake): another process rebuilds its handles the way TensorRT-LLM's
    worker does and sees the same values."""
    import torch.multiprocessing as mp

    bucket = [("a", torch.arange(1000, dtype=torch.bfloat16)), ("b", torch.randn(64, 32))]
    live, handles = trtllm._share_bucket(bucket)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_open_like_a_trtllm_worker, args=(handles, torch.cuda.current_device(), out))
    child.start()
    sums = out.get(timeout=120)
    child.join(60)
    assert child.exitcode == 0
    for name, tensor in bucket:
        assert sums[name] == pytest.approx(float(tensor.double().sum()), rel=1e-6), name
    del live


def test_a_failure_on_one_rank_is_raised_on_every_rank_instead_of_a_hang(monkeypatch, fake_rank):
    uuids = ("GPU-a", "GPU-b")
    trtllm_api.install(monkeypatch, worker_uuids=uuids)
    options = TRTLLMOptions(tensor_parallel=2)

    def ranks(body):
        gathers = thread_gathers(2)

        def rank(r):
            GPU.uuid = uuids[r]
            weights = [("a", torch.ones(2)), ("b", torch.ones(3))][: 2 - r]  # rank 1 forgets a tensor
            backend = TRTLLMBackend("/models/qwen", options, lambda: iter(weights), gather=gathers[r])
            try:
                body(backend)
            except RuntimeError as e:
                return str(e)
            return "no error"

        return run_ranks([lambda: rank(0), lambda: rank(1)])

    messages = ranks(lambda b: b.update_weights(1))
    assert all("send different weights in bucket 0 (tensors per rank: [2, 1])" in m for m in messages)

    def broken_engine(backend):
        if backend.leader:
            backend.llm.generate = lambda *a, **k: (_ for _ in ()).throw(
                RuntimeError("CUDA error: out of memory")
            )
        backend.generate([[1]], SamplingParams(max_new_tokens=1))

    leader, other = ranks(broken_engine)
    assert leader == "CUDA error: out of memory"
    assert other == "trtllm: the replica's first rank failed: RuntimeError: CUDA error: out of memory"


def test_doctor_reports_a_tensorrt_llm_outside_the_supported_range(monkeypatch):
    from questa_nemo import doctor

    one_gpu = doctor.Gpus(("NVIDIA H100 80GB HBM3",), bf16=True, nodes=1)
    doctor.import_error.cache_clear()  # other tests cached "tensorrt_llm does not import"
    try:
        trtllm_api.install(monkeypatch, version="1.2.1")
        row = doctor.rollout_availability("trtllm", one_gpu)
        assert (
            not row.ok and "TensorRT-LLM 1.2.1 is outside the supported range >=1.3.0rc0,<1.4" in row.reason
        )
        trtllm_api.install(monkeypatch)
        assert doctor.rollout_availability("trtllm", one_gpu).ok
    finally:
        doctor.import_error.cache_clear()  # the fake leaves sys.modules with the test


def test_the_registry_builds_it_from_the_rollout_config(monkeypatch, fake_rank):
    from questa_nemo.rollout import RolloutContext, build_backend

    engine = trtllm_api.install(monkeypatch)
    cfg = RolloutConfig(
        backend="trtllm", max_prompt_tokens=2048, max_new_tokens=1000, trtllm_release_weights=True
    )
    ctx = RolloutContext([torch.nn.Linear(1, 1)], vocab_size=96)
    with pytest.raises(ConfigError, match="Hugging Face model folder"):
        build_backend(cfg, ctx)
    backend = build_backend(cfg, RolloutContext([torch.nn.Linear(1, 1)], vocab_size=96, model_dir="/models/qwen"))
    assert isinstance(backend, TRTLLMBackend) and backend.options.release_weights
    assert (engine.init["max_input_len"], engine.init["max_seq_len"]) == (2048, 3048)
