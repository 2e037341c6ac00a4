"""Policy loss against hand-computed values (algo/loss.py): PPO clip, clip-higher, decoupled cap, KL, aggregation."""

import math

import pytest
import torch

from questa_nemo.algo.loss import LossStats, PolicyLossConfig, kl_penalty, policy_loss, step_normaliser

LOG = math.log
# One sequence, five tokens, the last one padding. Ratios current/proximal 1.5, 1.5, .5, .5.
ADV = torch.tensor([[1.0, -1.0, 1.0, -1.0, 0.0]])
MASK = torch.tensor([[True, True, True, True, False]])
OLD = torch.zeros(1, 5)


def current(ratios):
    return torch.tensor([[LOG(r) for r in ratios]], requires_grad=True)


def test_symmetric_clip_by_hand():
    # per token: max(-A r, -A clip(r, .8, 1.2)) = -1.2, 1.5, -0.5, 0.8 -> sum 0.6 over 4 tokens
    logp = current([1.5, 1.5, 0.5, 0.5, 1.0])
    loss, stats = policy_loss(logp, ADV, MASK, OLD, normaliser=4, cfg=PolicyLossConfig(clip_eps=0.2))
    assert loss.item() == pytest.approx(0.15, rel=1e-6)
    m = stats.metrics()
    assert m["clip_fraction"] == 0.5 and m["loss_tokens"] == 4
    assert m["ratio_mean"] == pytest.approx(1.0)
    assert m["capped_fraction"] == 0.0 and m["behave_weight_mean"] == pytest.approx(1.0)
    loss.backward()
    # clipped tokens get no gradient; unclipped ones d/dlogp (-A r) / 4
    assert logp.grad[0].tolist() == pytest.approx([0.0, 1.5 / 4, -0.5 / 4, 0.0, 0.0])


def test_clip_higher_raises_only_the_upper_bound():
    logp = current([1.5, 1.5, 0.5, 0.5, 1.0])
    cfg = PolicyLossConfig(clip_eps=0.2, clip_eps_high=0.6)
    loss, stats = policy_loss(logp, ADV, MASK, OLD, normaliser=4, cfg=cfg)
    # token 0 is no longer clipped (1.5 <= 1.6): -1.5 + 1.5 - 0.5 + 0.8 = 0.3
    assert loss.item() == pytest.approx(0.075, rel=1e-6)
    assert stats.metrics()["clip_fraction"] == 0.25


def test_decoupled_weight_and_cap_is_a_mask_not_a_clamp():
    # current = proximal (ratio 1), behaviour weights exp(prox - behave) = 2, .5, 6, 1
    prox = torch.zeros(1, 5)
    behave = torch.tensor([[-LOG(2), -LOG(0.5), -LOG(6), 0.0, 123.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, 0.0]])
    logp = prox.clone().requires_grad_(True)
    cfg = PolicyLossConfig(behave_imp_weight_cap=5.0)
    loss, stats = policy_loss(logp, adv, MASK, behave, normaliser=4, cfg=cfg, proximal_logprobs=prox)
    # -2 - .5 + 0 (token over the cap is dropped, a clamp would give -5) + 1, over all 4 tokens
    assert loss.item() == pytest.approx(-1.5 / 4, rel=1e-6)
    m = stats.metrics()
    assert m["capped_fraction"] == 0.25
    assert m["behave_weight_max"] == pytest.approx(6.0)
    assert m["behave_weight_mean"] == pytest.approx((2 + 0.5 + 1) / 3)
    w = torch.tensor([2.0, 0.5, 6.0, 1.0])
    assert m["behave_kl_k1"] == pytest.approx(float((-w.log()).mean()), rel=1e-5)
    assert m["behave_kl"] == pytest.approx(float((w - 1 - w.log()).mean()), rel=1e-5)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-2 / 4, -0.5 / 4, 0.0, 1 / 4, 0.0])


def test_without_proximal_it_is_plain_ppo_and_the_cap_never_applies():
    logp = current([1.5, 1.5, 0.5, 0.5, 1.0])
    behave = torch.tensor([[-5.0, 0.0, 0.0, 0.0, 0.0]])  # would be weight e^5 if it were the proximal policy
    ratios_vs_behave = torch.tensor([[1.5 * math.e**5, 1.5, 0.5, 0.5, 1.0]]).log()
    plain, stats = policy_loss(logp, ADV, MASK, behave, 4, PolicyLossConfig(), proximal_logprobs=None)
    again, _ = policy_loss(ratios_vs_behave, ADV, MASK, torch.zeros(1, 5), 4, PolicyLossConfig())
    assert plain.item() == pytest.approx(again.item())
    assert stats.metrics()["capped_fraction"] == 0.0


def test_masked_tokens_with_garbage_give_finite_loss_and_zero_grad():
    logp = torch.tensor([[0.0, float("-inf")]], requires_grad=True)
    behave = torch.tensor([[0.0, float("nan")]])
    mask = torch.tensor([[True, False]])
    loss, _ = policy_loss(logp, torch.tensor([[1.0, 0.0]]), mask, behave, 1, PolicyLossConfig())
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1].item() == 0.0


def test_micro_batches_with_step_normaliser_sum_to_full_batch_token_mean():
    torch.manual_seed(0)
    n, t = 6, 7
    mask = torch.rand(n, t) > 0.3
    adv, behave = torch.randn(n, t), -torch.rand(n, t)
    prox = behave + 0.1 * torch.randn(n, t)
    logp = (prox + 0.3 * torch.randn(n, t)).requires_grad_(True)
    cfg = PolicyLossConfig(clip_eps=0.2, behave_imp_weight_cap=5.0)

    full, full_stats = policy_loss(logp, adv, mask, behave, step_normaliser(mask, "token"), cfg, prox)
    (full_grad,) = torch.autograd.grad(full, logp)

    total = step_normaliser(mask[:2], "token") + step_normaliser(mask[2:], "token")
    parts = [
        policy_loss(logp[s], adv[s], mask[s], behave[s], total, cfg, prox[s])
        for s in (slice(0, 2), slice(2, n))
    ]
    summed = parts[0][0] + parts[1][0]
    (split_grad,) = torch.autograd.grad(summed, logp)
    assert summed.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(split_grad, full_grad, atol=1e-7)
    merged: LossStats = parts[0][1] + parts[1][1]
    assert merged.metrics() == pytest.approx(full_stats.metrics())
    # and it is the plain token mean of the per-token losses
    assert full.item() == pytest.approx(full_stats.metrics()["loss_token_mean"], rel=1e-6)


def test_sequence_and_sequence_sum_aggregation():
    # seq 0 has 3 tokens of loss -A = -1 each (ratio 1), seq 1 one token of loss -3
    adv = torch.tensor([[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    logp = torch.zeros(2, 3)
    assert step_normaliser(mask, "token") == 4
    assert step_normaliser(mask, "sequence") == 2
    assert step_normaliser(mask, "sequence_sum", sequence_constant=10) == 20
    seq, _ = policy_loss(logp, adv, mask, logp, 2, PolicyLossConfig(agg="sequence"))
    assert seq.item() == pytest.approx((-1 + -3) / 2)
    drgrpo, _ = policy_loss(logp, adv, mask, logp, 20, PolicyLossConfig(agg="sequence_sum"))
    assert drgrpo.item() == pytest.approx(-6 / 20)
    with pytest.raises(ValueError, match="loss_agg"):
        step_normaliser(mask, "mean")


def test_kl_estimators_and_kl_is_free_when_off():
    logp, ref = torch.tensor([[0.0]]), torch.tensor([[LOG(0.5)]])
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(LOG(2))
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - LOG(0.5) - 1)
    mask = torch.tensor([[True]])
    adv = torch.tensor([[0.0]])
    off, _ = policy_loss(logp, adv, mask, logp, 1, PolicyLossConfig(kl_coef=0.0), ref_logprobs=None)
    assert off.item() == 0.0
    on, stats = policy_loss(
        logp, adv, mask, logp, 1, PolicyLossConfig(kl_coef=0.1, kl_type="k1"), ref_logprobs=ref
    )
    assert on.item() == pytest.approx(0.1 * LOG(2))
    assert stats.metrics()["ref_kl"] == pytest.approx(LOG(2))
    with pytest.raises(ValueError, match="reference log-probs"):
        policy_loss(logp, adv, mask, logp, 1, PolicyLossConfig(kl_coef=0.1))


def test_gradient_step_moves_probability_toward_positive_advantage():
    logits = torch.zeros(4, requires_grad=True)  # a 4-way policy; token 2 was sampled twice
    opt = torch.optim.SGD([logits], lr=0.5)
    for _ in range(3):
        logp = torch.log_softmax(logits, -1)[torch.tensor([[2, 1]])]
        adv = torch.tensor([[1.0, -1.0]])
        loss, _ = policy_loss(
            logp, adv, torch.ones(1, 2, dtype=torch.bool), logp.detach(), 2, PolicyLossConfig()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    probs = logits.softmax(-1)
    assert probs[2] > 0.25 > probs[1]


def test_entropy_is_averaged_and_normaliser_must_be_positive():
    mask = torch.tensor([[True, True, False]])
    z = torch.zeros(1, 3)
    _, stats = policy_loss(z, z, mask, z, 2, PolicyLossConfig(), entropy=torch.tensor([[1.0, 3.0, 100.0]]))
    assert stats.metrics()["entropy"] == 2.0
    with pytest.raises(ValueError, match="normaliser"):
        policy_loss(z, z, mask, z, 0, PolicyLossConfig())


def test_nan_padding_in_every_input_stays_out_of_loss_stats_and_grad():
    nan = float("nan")
    mask = torch.tensor([[True, False]])
    logp = torch.tensor([[-0.5, nan]], requires_grad=True)
    others = torch.tensor([[-0.4, nan]])
    cfg = PolicyLossConfig(kl_coef=0.1, kl_type="k3")
    loss, stats = policy_loss(
        logp, torch.tensor([[1.0, nan]]), mask, others, 1, cfg, others, others, torch.tensor([[0.3, nan]])
    )
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
    assert all(math.isfinite(v) for v in stats.metrics().values())
    assert stats.metrics()["entropy"] == pytest.approx(0.3)
