"""The Megatron rollout backend on CPU against transformers on the same tiny converted models."""

from __future__ import annotations

import pytest
import torch
from rollout_models import VOCAB, assert_step_is_capture_safe, full_forward_logprobs, hf_model, megatron_twin

from questa_nemo.config import ConfigError, RolloutConfig
from questa_nemo.rollout import RolloutContext, build_backend, sampling_params
from questa_nemo.rollout.base import SamplingParams
from questa_nemo.rollout.hf import HFBackend
from questa_nemo.rollout.megatron_engine import EngineOptions, MegatronBackend

PROMPTS = [[5, 17, 3, 44, 9], [7], [60, 2, 2, 81, 13, 13, 40, 1, 90, 33, 8, 27]]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request):
    hf = hf_model(request.param)
    return hf, megatron_twin(hf)


def ours(model, **options) -> MegatronBackend:
    return MegatronBackend(model, VOCAB, EngineOptions(**{"max_batch_sequences": 16, **options}))


def tokens(result) -> list[list[list[int]]]:
    return [[c.token_ids for c in group] for group in result.completions]


@pytest.mark.parametrize("hf_batch", [2, 6], ids=["one_prompt_per_call", "left_padded_batch"])
def test_greedy_equals_transformers(pair, hf_batch):
    hf, model = pair
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=24)
    got = ours(model).generate(PROMPTS, params)
    ref = HFBackend(hf, batch_sequences=hf_batch).generate(PROMPTS, params)
    assert tokens(got) == tokens(ref)
    diff = max(
        (torch.tensor(a.logprobs) - torch.tensor(b.logprobs)).abs().max().item()
        for ga, gb in zip(got.completions, ref.completions)
        for a, b in zip(ga, gb)
    )
    print(f"greedy log-prob max |megatron - transformers| = {diff:.2e}")
    assert diff < 1e-4
    assert all(c.finish_reason == "length" and len(c.token_ids) == 24 for g in got.completions for c in g)


def test_sampled_reproducible_under_seed(pair):
    _, model = pair
    backend = ours(model)
    params = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=11)
    first, again = backend.generate(PROMPTS, params), backend.generate(PROMPTS, params)
    other = backend.generate(
        PROMPTS, SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=16, seed=12)
    )
    assert tokens(first) == tokens(again)
    assert tokens(first) != tokens(other)
    samples = tokens(first)[0]
    assert len({tuple(s) for s in samples}) > 1  # the n samples of a prompt differ


def test_samples_are_keyed_per_sequence_not_per_slot(pair):
    """A sequence's sampled tokens depend on (seed, prompt key, sample, position) only: the same prompt keyed
    the same gives the same completions alone, in another order, or with fewer slots (more waves,
    compaction), and eager decoding with a step-by-step harvest agrees too. What makes DP = 2 sample what
    DP = 1 samples."""
    _, model = pair
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
    whole = tokens(ours(model).generate(PROMPTS, params))
    assert len({tuple(s) for g in whole for s in g}) > 3  # really sampled
    for i, prompt in enumerate(PROMPTS):
        alone = ours(model).generate([prompt], SamplingParams(**{**params.__dict__, "prompt_keys": (i,)}))
        assert tokens(alone)[0] == whole[i], i
    order = [2, 0, 1]
    swapped = ours(model, max_batch_sequences=2, harvest_every=1).generate(
        [PROMPTS[i] for i in order], SamplingParams(**{**params.__dict__, "prompt_keys": tuple(order)})
    )
    assert tokens(swapped) == [whole[i] for i in order]
    other_key = ours(model).generate([PROMPTS[0]], SamplingParams(**{**params.__dict__, "prompt_keys": (5,)}))
    assert tokens(other_key)[0] != whole[0]


def test_uniforms_are_a_pure_function_of_key_and_position():
    from questa_nemo.rollout.sampling import mix32, sequence_key, uniform_draws

    keys = torch.tensor([sequence_key(3, p, s) for p in range(64) for s in range(64)])
    positions = torch.arange(keys.numel()) % 5
    u = uniform_draws(keys, positions)
    # row by row, in any batch order, equals the batch
    for b in (0, 7, 4095):
        assert torch.equal(uniform_draws(keys[b : b + 1], positions[b : b + 1])[0], u[b])
    perm = torch.randperm(keys.numel(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform_draws(keys[perm], positions[perm]), u[perm])
    # the int64 tensor hash equals the Python-int one (no overflow anywhere)
    assert mix32(torch.tensor([0xFFFFFFFF, 12345])).tolist() == [mix32(0xFFFFFFFF), mix32(12345)]
    # uniform on (0, 1): mean 1/2, deciles even, never 0 or 1
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    deciles = torch.bincount((u * 10).long(), minlength=10).float() / u.numel()
    assert (deciles - 0.1).abs().max() < 0.015


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9), (0.0, 1.0)])
def test_logprobs_match_full_forward(pair, temperature, top_p):
    _, model = pair
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, max_new_tokens=20, seed=5)
    result = ours(model).generate(PROMPTS, params)
    diff = max(
        (full_forward_logprobs(model, PROMPTS[i], c.token_ids, temperature) - torch.tensor(c.logprobs))
        .abs()
        .max()
        for i, group in enumerate(result.completions)
        for c in group
    ).item()
    print(f"T={temperature} top_p={top_p}: log-prob max |engine - full forward| = {diff:.2e}")
    assert diff < 1e-4


def test_weight_update_is_seen_by_next_rollout(pair):
    hf, model = pair
    backend = ours(model)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    before = backend.generate(PROMPTS, params)
    assert {c.version for g in before.completions for c in g} == {0}
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        with torch.no_grad():  # an optimizer step: in place, same storage
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        backend.update_weights(1)
        after = backend.generate(PROMPTS, params)
        assert backend.version == 1
        assert {c.version for g in after.completions for c in g} == {1}
        assert tokens(after) != tokens(before)
        # still exact against a full forward of the updated weights
        c = after.completions[0][0]
        assert torch.allclose(
            full_forward_logprobs(model, PROMPTS[0], c.token_ids, 0.0), torch.tensor(c.logprobs), atol=1e-4
        )
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


def test_rebound_parameters_are_followed(pair):
    """A trainer that moves its parameters into new storage (e.g. DDP buffers) is followed on update."""
    _, model = pair
    backend = ours(model)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    before = tokens(backend.generate(PROMPTS, params))
    head = model.decoder.final_layernorm.weight
    old = head.data
    try:
        head.data = -old.clone()
        backend.update_weights(2)
        assert tokens(backend.generate(PROMPTS, params)) != before
    finally:
        head.data = old


def test_stop_tokens_end_sequences(pair):
    _, model = pair
    backend = ours(model)
    free = backend.generate(PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=16))
    stop = free.completions[0][0].token_ids[3]
    stopped = backend.generate(
        PROMPTS, SamplingParams(n=1, temperature=0.0, max_new_tokens=16, stop_token_ids=(stop,))
    )
    first = stopped.completions[0][0]
    cut = free.completions[0][0].token_ids.index(stop) + 1
    assert first.token_ids == free.completions[0][0].token_ids[:cut]
    assert first.finish_reason == "stop" and len(first.logprobs) == cut
    ignored = backend.generate(
        PROMPTS,
        SamplingParams(n=1, temperature=0.0, max_new_tokens=16, stop_token_ids=(stop,), ignore_eos=True),
    )
    assert tokens(ignored) == tokens(free)


def test_slot_refill_and_chunked_prefill_agree(pair):
    """Fewer slots than sequences (slots refilled mid-run, a prompt's samples spread over refills) and tiny
    prefill chunks change nothing: the same greedy tokens."""
    _, model = pair
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    wide = ours(model).generate(PROMPTS, params)
    narrow = ours(model, max_batch_sequences=3, prefill_chunk_tokens=4).generate(PROMPTS, params)
    assert narrow.stats["slots"] == 3 and narrow.stats["decode_steps"] == 20
    assert tokens(narrow) == tokens(wide)


def test_finished_slots_are_refilled_with_varied_lengths(pair):
    """Sequences stopping at different steps free their slots for waiting ones; every result is still
    exactly what a single-slot run produces (no cross-talk through reused cache slots)."""
    _, model = pair
    stops = (3, 50, 77)
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=40, stop_token_ids=stops, seed=2)
    many = MegatronBackend(model, VOCAB, EngineOptions(max_batch_sequences=2)).generate(PROMPTS, params)
    assert many.stats["slots"] == 2
    assert {c.finish_reason for g in many.completions for c in g} == {"stop", "length"}
    for i, group in enumerate(many.completions):
        for c in group:
            expected = full_forward_logprobs(model, PROMPTS[i], c.token_ids, 1.0)
            assert torch.allclose(expected, torch.tensor(c.logprobs), atol=1e-4)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in stops and not set(stops) & set(c.token_ids[:-1])
            else:
                assert len(c.token_ids) == 40 and not set(stops) & set(c.token_ids)


def test_sleep_frees_and_generation_resumes(pair):
    _, model = pair
    backend = ours(model)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    before = tokens(backend.generate(PROMPTS, params))
    backend.sleep()
    assert backend._runner is None
    assert tokens(backend.generate(PROMPTS, params)) == before


def test_empty_prompt_is_rejected(pair):
    _, model = pair
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        ours(model).generate([[1], []], SamplingParams(max_new_tokens=4))


def test_hf_backend_reproducible_and_self_consistent():
    hf = hf_model("qwen2")
    backend = HFBackend(hf, batch_sequences=3)
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=10, seed=4)
    a, b = backend.generate(PROMPTS[:2], params), backend.generate(PROMPTS[:2], params)
    assert tokens(a) == tokens(b)
    c = a.completions[0][0]
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[0] + c.token_ids])).logits[0, len(PROMPTS[0]) - 1 : -1] / 0.8
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
    assert torch.allclose(expected, torch.tensor(c.logprobs), atol=1e-5)


def test_build_backend_by_config(pair):
    """Both backends through the registry's one signature; hf is loaded with the megatron model's weights."""
    hf, model = pair
    ctx = RolloutContext([model], VOCAB, hf.config.to_dict())
    cfg = RolloutConfig(backend="megatron", max_batch_sequences=8)
    megatron = build_backend(cfg, ctx)
    assert isinstance(megatron, MegatronBackend) and megatron.shares_trainer_weights
    reference = build_backend(RolloutConfig(backend="hf", max_batch_sequences=8), ctx)
    assert isinstance(reference, HFBackend)
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    assert tokens(reference.generate(PROMPTS, params)) == tokens(megatron.generate(PROMPTS, params))
    with pytest.raises(ConfigError, match="rollout.backend"):
        build_backend(RolloutConfig(backend="vllm"), ctx)
    params = sampling_params(RolloutConfig(n_samples=4, temperature=0.6), stop_token_ids=(2,), seed=9)
    assert (params.n, params.temperature, params.stop_token_ids, params.seed) == (4, 0.6, (2,), 9)


def test_decode_step_is_capture_safe(pair, monkeypatch):
    """What CUDA-graph capture needs, checked on CPU: the step never reads a tensor value on the host
    (.item / .tolist / bool / nonzero) and replaying it from restored buffers reproduces it exactly."""
    from questa_nemo.rollout.graphs import DecodeRunner, StepKey

    _, model = pair
    backend = ours(model)
    backend.generate(PROMPTS, SamplingParams(n=1, max_new_tokens=4))  # fills the cache
    runner: DecodeRunner = backend._runner

    for key in (StepKey(8, 256, 0.0, 1.0), StepKey(8, 256, 0.8, 1.0), StepKey(8, 256, 1.0, 0.9)):
        runner.noise_key.copy_(torch.arange(runner.noise_key.numel()) * 977 + 5)  # per sequence, as the engine
        assert_step_is_capture_safe(runner, key, monkeypatch)


def test_long_tail_compacts_live_slots(pair):
    """With the queue empty and most sequences stopped, live ones move to the lowest slots and the batch
    shrinks; their caches move with them, so every log-prob still matches a full forward."""
    _, model = pair
    stops = (3, 50, 77, 12, 64)
    params = SamplingParams(n=6, temperature=1.0, max_new_tokens=40, stop_token_ids=stops, seed=8)
    result = ours(model, max_batch_sequences=32, harvest_every=4).generate(PROMPTS, params)
    assert result.stats["slots"] == 18 and result.stats["compactions"] >= 1  # 18 -> 16 -> 8
    lengths = sorted(len(c.token_ids) for g in result.completions for c in g)
    assert lengths[0] < 40 and lengths[-1] > 20
    for i, group in enumerate(result.completions):
        for c in group:
            expected = full_forward_logprobs(model, PROMPTS[i], c.token_ids, 1.0)
            assert torch.allclose(expected, torch.tensor(c.logprobs), atol=1e-4)
