"""algo.proximal_logprobs=train_forward (no proximal log-prob pass; the update's own forward, detached) against
the default recompute pass, on the tiny world model (random weights) through grpo_step on CPU: the same loss,
loss stats and gradient, on-policy and with stale behaviour log-probs (the importance weights and their cap at
work), the pass really skipped; and refused where it would change the result."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from questa_nemo.config import ConfigError, load_config
from questa_nemo.reward.types import CORRECT, WRONG, Done, RewardResult
from questa_nemo.train.grpo import SyncRollouts
from questa_nemo.train.prompts import PromptRow, PromptSource

warnings.filterwarnings("ignore", category=UserWarning)

REPO = Path(__file__).resolve().parents[1]
WORLD_HF = json.loads((REPO / "data" / "world" / "config.json").read_text())
VOCAB = WORLD_HF["vocab_size"]


def config(proximal: str, *extra: str):
    return load_config(
        "default",
        [
            f"algo.proximal_logprobs={proximal}",
            "rollout.n_samples=4",
            "rollout.max_new_tokens=8",
            "rollout.max_prompt_tokens=16",
            "rollout.max_batch_sequences=16",
            "train.prompts_per_step=4",
            "train.micro_batch_tokens=48",  # several micro-batches a step
            "algo.filter_enabled=false",
            "optim.grad_clip=0",  # the raw gradient stays in the buffers
            "algo.behave_imp_weight_cap=5.0",  # the recipe's cap (the embedded default has none)
            *extra,
        ],
    )


def prompts(count: int = 8) -> PromptSource:
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(count):
        ids = torch.randint(2, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append(PromptRow(f"p{i}", ids, "", hinted=False, meta={}))
    return PromptSource(rows, 1)


def first_token_even(texts: list[str], rows: list[PromptRow]) -> Done:
    return Done([RewardResult(1.0, CORRECT) if int(t.split()[0]) % 2 == 0 else RewardResult(0.0, WRONG)
                 for t in texts])


class Stale:
    """Rollouts whose behaviour log-probs are those of another (older) policy: the engine's plus fixed noise,
    so the behaviour weights exp(proximal - behaviour) spread and some exceed the cap (5)."""

    def __init__(self, inner, scale: float):
        self.inner, self.scale = inner, scale

    def next(self, step):
        filled = self.inner.next(step)
        g = torch.Generator().manual_seed(step)
        for group in filled.groups:
            for c in group.completions:
                noise = torch.randn(len(c.logprobs), generator=g) * self.scale
                c.logprobs = [x - abs(float(n)) for x, n in zip(c.logprobs, noise)]
                c.version -= 1
        return filled


class Counting:
    """The policy, counting its log-prob passes."""

    def __init__(self, inner):
        self.inner, self.passes = inner, 0

    def logprobs(self, *args, **kwargs):
        self.passes += 1
        return self.inner.logprobs(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def fresh_policy(cfg):
    """(policy, backend, rollouts) from the world model under seed 0 (inside init_distributed)."""
    from questa_nemo.ckpt.load import load_chunks
    from questa_nemo.model.policy import MegatronPolicy
    from questa_nemo.rollout import RolloutContext, build_backend

    torch.manual_seed(0)
    policy = MegatronPolicy(load_chunks(cfg.model, WORLD_HF, None), cfg.model, cfg.optim, 4,
                            cfg.train.micro_batch_tokens, VOCAB)
    backend = build_backend(cfg.rollout, RolloutContext(policy.modules, VOCAB))
    rollouts = SyncRollouts(cfg, prompts(), backend, first_token_even, lambda ids: " ".join(map(str, ids)), ())
    return policy, backend, rollouts


def one_step(cfg, stale: float = 0.0) -> dict:
    """One GRPO step of a fresh policy (same seed, same samples every call): metrics, phases, the gradient of
    the update (the grad buffers after it), passes run, and the weights after it."""
    from questa_nemo.model.parallel import destroy_distributed, init_distributed
    from questa_nemo.train.grpo import grpo_step
    from questa_nemo.train.metrics import PhaseTimer

    init_distributed(cfg.model)
    try:
        policy, backend, rollouts = fresh_policy(cfg)
        if stale:
            rollouts = Stale(rollouts, stale)
        counting = Counting(policy)
        timer = PhaseTimer()
        metrics, data = grpo_step(cfg, 1, counting, backend, rollouts, timer)
        params = [p for chunk in policy.model_chunks for p in chunk.parameters()]
        return dict(
            metrics=metrics,
            phases=timer.pop(),
            grads=[p.main_grad.detach().clone() for p in params],
            weights=[p.detach().clone() for p in params],
            passes=counting.passes,
            tokens=[c.token_ids for g in data.groups for c in g.completions],
        )
    finally:
        destroy_distributed()


LOSS_KEYS = ("actor/loss", "actor/loss_token_mean", "actor/behave_kl", "actor/behave_kl_k1",
             "actor/behave_weight_mean", "actor/behave_weight_max", "actor/capped_fraction", "actor/entropy",
             "actor/grad_norm")


@pytest.mark.parametrize("stale", [0.0, 1.5], ids=["on_policy", "stale_behaviour"])
def test_train_forward_gives_the_passes_loss_and_gradient(stale):
    passed = one_step(config("recompute"), stale)
    skipped = one_step(config("train_forward"), stale)
    assert passed["tokens"] == skipped["tokens"]
    assert passed["passes"] == 1 and skipped["passes"] == 0
    assert "time/logprobs_s" in passed["phases"] and "time/logprobs_s" not in skipped["phases"]
    a, b = passed["metrics"], skipped["metrics"]
    assert a["actor/micro_batches"] > 1 and a["actor/loss"] != 0.0, "no learning signal: the test proves nothing"
    if stale:  # the importance weights spread and the cap masks some tokens: the comparison covers both
        assert a["actor/capped_fraction"] > 0 and abs(a["actor/behave_weight_mean"] - 1) > 0.05
    for key in LOSS_KEYS:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert b["actor/ratio_mean"] == 1.0 and b["actor/clip_fraction"] == 0.0
    assert a["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and a["actor/clip_fraction"] == 0.0
    for g, h in zip(passed["grads"], skipped["grads"]):
        torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-7)
    for w, v in zip(passed["weights"], skipped["weights"]):
        torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6)


def test_the_default_recipe_keeps_the_pass():
    assert load_config("default").algo.proximal_logprobs == "recompute"


def test_train_forward_is_refused_with_the_hint_correction():
    with pytest.raises(ConfigError, match="algo.proximal_logprobs"):
        config("train_forward", "algo.hints.unhinted_correction=true", "algo.hints.splits={p0: x, p50: y}")
    with pytest.raises(ConfigError, match="algo.proximal_logprobs"):
        config("detached")


def test_a_second_update_on_the_same_logprobs_would_differ():
    """Why the skip is tied to one optimizer update a step: a second update on the same micro-batches (a PPO
    epoch or minibatch, which the trainer does not run) sees ratio != 1 with the pass's log-probs, exactly 1
    with its own forward: there the two would train differently."""
    from questa_nemo.model.parallel import destroy_distributed, init_distributed
    from questa_nemo.train.grpo import build_step_data, make_loss_fn

    ratios = {}
    for proximal in ("recompute", "train_forward"):
        cfg = config(proximal, "optim.lr=3e-2")
        init_distributed(cfg.model)
        try:
            policy, backend, rollouts = fresh_policy(cfg)
            data = build_step_data(cfg, rollouts.next(1).groups, backend.version)
            micro_batches = policy.pack(data.sequences)
            if proximal == "recompute":
                for mb, lp in zip(micro_batches, policy.logprobs(micro_batches).logprobs):
                    mb.proximal_logprobs = lp
            loss_fn, _ = make_loss_fn(cfg)
            tokens = sum(float(s.loss_mask.sum()) for s in data.sequences)
            stats = [policy.train_step(micro_batches, loss_fn, tokens) for _ in range(2)]
            ratios[proximal] = [s.metrics["ratio"] / s.metrics["tokens"] for s in stats]
        finally:
            destroy_distributed()
    assert ratios["train_forward"] == [1.0, 1.0]
    assert ratios["recompute"][0] == pytest.approx(1.0, abs=1e-6)
    assert abs(ratios["recompute"][1] - 1.0) > 1e-3
