"""Asynchronous rollouts (train/async_rollouts.py) and the snapshot engine they sample from
(rollout/snapshot.py).

The scheduling tests use a scripted backend (fast, exact control of versions); the others run the real tiny
world model (data/world/config.json, random weights) through grpo_step on CPU, with a toy reward (the first
generated token is even) so advantages are non-zero and the weights really move between steps."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch

from questa_nemo.config import load_config
from questa_nemo.reward.types import CORRECT, WRONG, Done, RewardResult
from questa_nemo.rollout.base import Completion, GenerationResult, SamplingParams
from questa_nemo.train.async_rollouts import AsyncRollouts, RolloutProducerError, StaleRolloutError
from questa_nemo.train.grpo import SyncRollouts
from questa_nemo.train.prompts import PromptRow, PromptSource

warnings.filterwarnings("ignore", category=UserWarning)

REPO = Path(__file__).resolve().parents[1]
WORLD_HF = json.loads((REPO / "data" / "world" / "config.json").read_text())
VOCAB = WORLD_HF["vocab_size"]


def config(max_staleness: int):
    return load_config(
        "default",
        [
            f"rollout.max_staleness={max_staleness}",
            "rollout.n_samples=4",
            "rollout.max_new_tokens=6",
            "rollout.max_batch_sequences=16",
            "train.prompts_per_step=4",
            "train.steps=12",
            "train.micro_batch_tokens=256",
            "algo.filter_enabled=false",
            "optim.lr=3e-2",
        ],
    )


def prompt_source(count: int = 24, seed: int = 1) -> PromptSource:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        ids = torch.randint(2, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append(PromptRow(f"p{i}", ids, "", hinted=i % 2 == 0, meta={}))
    return PromptSource(rows, seed)


def decode(ids: list[int]) -> str:
    return " ".join(map(str, ids))


def first_token_even(texts: list[str], rows: list[PromptRow]) -> Done:
    """A toy reward the model can move towards: 1 when the first generated token is even."""
    return Done(
        [
            RewardResult(1.0, CORRECT) if t and int(t.split()[0]) % 2 == 0 else RewardResult(0.0, WRONG)
            for t in texts
        ]
    )


class ScriptedBackend:
    """Tags each completion with the version it holds; its tokens are a function of prompt and seed."""

    def __init__(self):
        self.version = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> GenerationResult:
        out = [
            [
                Completion([(sum(p) + params.seed + s) % VOCAB], [-0.5], "stop", self.version)
                for s in range(params.n)
            ]
            for p in prompts
        ]
        return GenerationResult(out)

    def update_weights(self, version: int) -> None:
        self.version = version


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the producer"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------- scheduling
def test_producer_runs_ahead_by_the_bound_and_no_further():
    backend = ScriptedBackend()
    with AsyncRollouts(
        config(2), prompt_source(), backend, first_token_even, decode, (), first_step=1
    ) as rollouts:
        wait_for(lambda: set(rollouts._ready) == {1, 2, 3})
        time.sleep(0.3)
        assert set(rollouts._ready) == {1, 2, 3}, "step 4 started before step 1's weights were published"
        for step in range(1, 7):
            filled = rollouts.next(step)
            staleness = [backend.version - c.version for g in filled.groups for c in g.completions]
            assert max(staleness) <= 2
            if step == 3:
                assert max(staleness) == 2  # sampled by version 0 before the trainer made versions 1 and 2
            backend.update_weights(backend.version + 1)


def test_skipped_steps_do_not_stall_the_producer():
    """A non-finite step publishes no new version; the bound counts steps, so the producer keeps going."""
    backend = ScriptedBackend()
    with AsyncRollouts(
        config(1), prompt_source(), backend, first_token_even, decode, (), first_step=5
    ) as rollouts:
        for step in range(5, 10):
            assert len(rollouts.next(step).groups) == 4


def test_a_sample_staler_than_the_bound_is_refused():
    backend = ScriptedBackend()
    with AsyncRollouts(
        config(1), prompt_source(), backend, first_token_even, decode, (), first_step=1
    ) as rollouts:
        wait_for(lambda: 2 in rollouts._ready)
        rollouts.next(1)
        backend.update_weights(2)  # two versions in one step: step 2's version-0 samples are now 2 behind
        with pytest.raises(StaleRolloutError, match="max_staleness=1"):
            rollouts.next(2)


def test_source_state_follows_the_trained_steps_like_the_sync_path():
    """What a checkpoint stores: the stream position after the last step handed out, not after the queue."""
    sync = SyncRollouts(config(0), prompt_source(), ScriptedBackend(), first_token_even, decode, ())
    backend = ScriptedBackend()
    with AsyncRollouts(config(3), prompt_source(), backend, first_token_even, decode, ()) as rollouts:
        assert rollouts.source_state() == sync.source_state()
        for step in range(1, 8):
            wait_for(lambda: len(rollouts._ready) >= 3)  # the producer has drawn steps step..step+2 (or +3)
            a, b = rollouts.next(step), sync.next(step)
            assert rollouts.source_state() == sync.source_state()
            assert [g.prompt.id for g in a.groups] == [g.prompt.id for g in b.groups]
            assert [c.token_ids for g in a.groups for c in g.completions] == [
                c.token_ids for g in b.groups for c in g.completions
            ]


def test_resume_from_source_state_neither_loses_nor_repeats_prompts():
    """Stopped after step 3 with steps 4..6 queued: a run resumed from the checkpointed state draws the same
    prompts for steps 4..6 as the uninterrupted run (the queued rollouts are regenerated, not skipped)."""

    def prompt_ids(rollouts, steps):
        return [[g.prompt.id for g in rollouts.next(step).groups] for step in steps]

    with AsyncRollouts(config(3), prompt_source(), ScriptedBackend(), first_token_even, decode, ()) as whole:
        uninterrupted = prompt_ids(whole, range(1, 7))
    with AsyncRollouts(config(3), prompt_source(), ScriptedBackend(), first_token_even, decode, ()) as cut:
        before = prompt_ids(cut, range(1, 4))
        wait_for(lambda: len(cut._ready) == 3)
        state = cut.source_state()
    source = prompt_source()
    source.load_state_dict(state)
    with AsyncRollouts(
        config(3), source, ScriptedBackend(), first_token_even, decode, (), first_step=4
    ) as resumed:
        after = prompt_ids(resumed, range(4, 7))
    assert before + after == uninterrupted


def test_a_producer_error_reaches_the_trainer():
    calls = []

    def failing_scorer(texts, rows):
        calls.append(len(texts))
        if len(calls) == 2:
            raise ValueError("reward worker exploded")
        return first_token_even(texts, rows)

    rollouts = AsyncRollouts(config(2), prompt_source(), ScriptedBackend(), failing_scorer, decode, ())
    try:
        rollouts.next(1)
        with pytest.raises(RolloutProducerError, match="step 2") as caught:
            rollouts.next(2)
        assert isinstance(caught.value.__cause__, ValueError)
    finally:
        rollouts.close()
    assert not rollouts._thread.is_alive()


# ---------------------------------------------------------------------------- the real tiny model
@pytest.fixture
def world_model():
    """A bare world-sized GPTModel (random weights) under megatron DDP, as the trainer holds it."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from questa_nemo.ckpt.load import load_chunks
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    cfg = config(2)
    init_distributed(cfg.model)
    torch.manual_seed(0)
    model = load_chunks(cfg.model, WORLD_HF, None)[0]
    DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    yield model
    destroy_distributed()


def greedy(backend, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    return [group[0].token_ids for group in backend.generate(prompts, params).completions]


def test_snapshot_ignores_trainer_updates_until_published(world_model):
    from questa_nemo.rollout import RolloutContext, build_backend
    from questa_nemo.rollout.snapshot import build_async_backend

    cfg = config(2)
    snapshot = build_async_backend(cfg.rollout, RolloutContext([world_model], VOCAB))
    trainer_params = {p.data_ptr() for p in world_model.parameters()}
    assert not trainer_params & {p.data_ptr() for p in snapshot.shadow[0].parameters()}
    prompts = [row.prompt_ids for row in prompt_source(4).rows]
    before = greedy(snapshot, prompts)
    with torch.no_grad():  # an optimizer step on the trainer's tensors, in place
        for p in world_model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    live = build_backend(cfg.rollout, RolloutContext([world_model], VOCAB))
    after = greedy(live, prompts)
    assert after != before, "the perturbation did not change the greedy outputs; the test proves nothing"
    assert greedy(snapshot, prompts) == before
    snapshot.update_weights(1)
    assert greedy(snapshot, prompts) == after
    result = snapshot.generate(prompts, SamplingParams(n=2, max_new_tokens=4, seed=3))
    assert {c.version for group in result.completions for c in group} == {1}


def train(max_staleness: int, use_async: bool, steps: int, fill_queue_first: bool = False) -> list[dict]:
    """`steps` GRPO steps of a fresh policy (same seed every call); per step: the sampled tokens, their
    versions, the trainer's version when it trained on them, and the step's metrics."""
    from questa_nemo.ckpt.load import load_chunks
    from questa_nemo.model.parallel import destroy_distributed, init_distributed
    from questa_nemo.model.policy import MegatronPolicy
    from questa_nemo.rollout import RolloutContext, build_backend
    from questa_nemo.rollout.snapshot import build_async_backend
    from questa_nemo.train.grpo import grpo_step
    from questa_nemo.train.metrics import PhaseTimer

    cfg = config(max_staleness)
    init_distributed(cfg.model)
    torch.manual_seed(0)
    policy = MegatronPolicy(
        load_chunks(cfg.model, WORLD_HF, None),
        cfg.model,
        cfg.optim,
        steps,
        cfg.train.micro_batch_tokens,
        VOCAB,
    )
    if use_async:
        backend = build_async_backend(cfg.rollout, RolloutContext(policy.modules, VOCAB))
        rollouts = AsyncRollouts(cfg, prompt_source(), backend, first_token_even, decode, ())
    else:
        backend = build_backend(cfg.rollout, RolloutContext(policy.modules, VOCAB))
        rollouts = SyncRollouts(cfg, prompt_source(), backend, first_token_even, decode, ())
    records = []
    try:
        if fill_queue_first:
            wait_for(lambda: len(rollouts._ready) == max_staleness + 1, timeout=120)
        for step in range(1, steps + 1):
            trainer_version = backend.version
            metrics, data = grpo_step(cfg, step, policy, backend, rollouts, PhaseTimer())
            completions = [c for g in data.groups for c in g.completions]
            records.append(
                dict(
                    tokens=[c.token_ids for c in completions],
                    logprobs=[c.logprobs for c in completions],
                    versions=[c.version for c in completions],
                    trainer_version=trainer_version,
                    metrics=metrics,
                )
            )
    finally:
        if use_async:
            rollouts.close()
        destroy_distributed()
    return records


def test_async_samples_lag_by_at_most_the_bound_on_the_real_model():
    records = train(max_staleness=2, use_async=True, steps=4, fill_queue_first=True)
    for step, r in enumerate(records, start=1):
        real = max(r["trainer_version"] - v for v in r["versions"])
        assert r["metrics"]["rollout/staleness_max"] == real <= 2, (step, real)
        assert r["metrics"]["actor/skipped_nonfinite"] == 0.0
    # steps 1..3 were sampled by version 0 before any training; at step 3 the trainer holds version 2
    assert [r["versions"][0] for r in records[:3]] == [0, 0, 0]
    assert records[2]["metrics"]["rollout/staleness_max"] == 2.0


def test_async_with_bound_zero_samples_what_the_sync_path_samples():
    sync = train(max_staleness=0, use_async=False, steps=3)
    asynchronous = train(max_staleness=0, use_async=True, steps=3)
    assert all(r["metrics"]["actor/loss"] != 0.0 for r in sync), "no learning signal: the comparison is empty"
    for step, (s, a) in enumerate(zip(sync, asynchronous), start=1):
        assert a["tokens"] == s["tokens"], f"step {step}: async (bound 0) sampled other tokens than sync"
        assert set(a["versions"]) == {step - 1} == set(s["versions"])
        for x, y in zip(a["logprobs"], s["logprobs"]):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y))
        assert a["metrics"]["actor/loss"] == pytest.approx(s["metrics"]["actor/loss"], rel=1e-5)


def test_bench_cpu_smoke(tmp_path):
    """bench/bench_async.py (the GPU comparison the lead runs) works end to end in its CPU mode."""
    import os
    import subprocess
    import sys

    out = tmp_path / "async.json"
    small = ["--prompts", "4", "--samples", "2", "--prompt-tokens", "8", "--new-tokens", "8"]
    cmd = [
        sys.executable,
        "bench/bench_async.py",
        "--device",
        "cpu",
        "--tiny",
        "--steps",
        "3",
        *small,
        "--micro-batch-tokens",
        "256",
        "--recompute",
        "none",
        "--staleness",
        "2",
        "--out",
        str(out),
    ]
    # a fresh world of one: not the rendezvous variables an in-process test of this session left behind
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    sync, ahead = result["modes"]
    assert "error" not in sync and "error" not in ahead, result["modes"]
    assert [s["staleness_max"] for s in sync["steps"]] == [0.0, 0.0, 0.0]
    assert max(s["staleness_max"] for s in ahead["steps"]) <= 2.0
    assert "speedup_vs_sync" in ahead


def test_producer_stream_is_a_no_op_on_cpu_and_samples_the_same(world_model):
    """rollout.producer_stream (a CUDA stream for the producer's decoding) changes only where the kernels queue:
    on CPU there is no stream and the samples are those of the plain snapshot engine."""
    from questa_nemo.rollout import RolloutContext
    from questa_nemo.rollout.snapshot import build_async_backend

    cfg = config(2)
    cfg.rollout.producer_stream = True
    streamed = build_async_backend(cfg.rollout, RolloutContext([world_model], VOCAB))
    plain = build_async_backend(config(2).rollout, RolloutContext([world_model], VOCAB))
    assert streamed._stream is None and streamed._updated is None
    prompts = [row.prompt_ids for row in prompt_source(4).rows]
    params = SamplingParams(n=2, max_new_tokens=6, seed=5)
    tokens = [[c.token_ids for c in g] for g in streamed.generate(prompts, params).completions]
    assert tokens == [[c.token_ids for c in g] for g in plain.generate(prompts, params).completions]
    streamed.update_weights(1)
    assert streamed.version == 1 and streamed._updated is None
