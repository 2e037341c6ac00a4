"""Advantage modes against hand-computed values (algo/advantages.py)."""

import math

import pytest
import torch

from questa_nemo.algo.advantages import (
    compute_advantages,
    drgrpo_advantages,
    group_ids_for,
    grpo_advantages,
    reference_advantages,
    shape_rewards,
    token_moments,
)

# Two completions of lengths 3 and 1 (T = 3).
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


def test_shape_rewards_scales_biases_and_clips():
    r = shape_rewards(torch.tensor([0.0, 1.0, 5.0]), scaling=5.0, bias=0.0, clip=20.0)
    assert r.tolist() == [0.0, 5.0, 20.0]
    # the reference adds the bias before scaling: (1 + 1) * 3 = 6
    assert shape_rewards(torch.tensor([1.0]), scaling=3.0, bias=1.0, clip=100.0).item() == 6.0
    assert shape_rewards(torch.tensor([-9.0]), scaling=5.0, bias=0.0, clip=20.0).item() == -20.0


def test_reference_normalises_over_all_tokens_not_sequences():
    # tokens carry 5, 5, 5 and 0: mean 3.75, population var = 3 * 1.5625 + 14.0625 = 18.75 / 4 = 4.6875
    adv = reference_advantages(torch.tensor([5.0, 0.0]), MASK, eps=1e-5)
    std = math.sqrt(4.6875)
    expected_pos = (5 - 3.75) / (std + 1e-5)
    expected_neg = (0 - 3.75) / (std + 1e-5)
    assert adv[0].tolist() == pytest.approx([expected_pos] * 3, rel=1e-6)
    assert adv[1, 0].item() == pytest.approx(expected_neg, rel=1e-6)
    assert adv[1, 1:].tolist() == [0.0, 0.0]  # padding stays zero
    assert adv.dtype == torch.float32


def test_reference_without_normalisation_spreads_the_reward():
    adv = reference_advantages(torch.tensor([5.0, 0.0]), MASK, normalise=False)
    assert adv.tolist() == [[5.0, 5.0, 5.0], [0.0, 0.0, 0.0]]


def test_reference_all_reduce_gives_global_statistics():
    # Two "ranks" each holding one sequence; summing their moments must equal the one-rank batch.
    rewards = torch.tensor([5.0, 0.0])
    full = reference_advantages(rewards, MASK)
    other_rank = token_moments(torch.tensor([[0.0, 0.0, 0.0]]), MASK[1:].float())

    def all_reduce_with_rank_1(local):
        return local + torch.stack(list(other_rank))

    rank0 = reference_advantages(rewards[:1], MASK[:1], all_reduce=all_reduce_with_rank_1)
    assert torch.allclose(rank0, full[:1])


def test_reference_empty_batch_is_zero_not_nan():
    adv = reference_advantages(torch.tensor([1.0]), torch.zeros(1, 4, dtype=torch.bool))
    assert adv.tolist() == [[0.0] * 4]


def test_grpo_group_mean_and_unbiased_std():
    # group 0: rewards 1, 0, 0, 1 -> mean .5, unbiased std sqrt(1/3); group 1: 1, 1, 1, 0 -> mean .75, std .5
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0])
    mask = torch.ones(8, 2, dtype=torch.bool)
    ids = group_ids_for(8, 4)
    adv = grpo_advantages(rewards, mask, ids, eps=0.0)
    s0 = math.sqrt(1 / 3)
    assert adv[:, 0].tolist() == pytest.approx(
        [0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0, 0.5, 0.5, 0.5, -1.5]
    )
    assert torch.equal(adv[:, 0], adv[:, 1])
    no_std = grpo_advantages(rewards, mask, ids, divide_by_std=False)
    assert no_std[:, 0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])


def test_grpo_uniform_group_and_singleton_give_zero():
    adv = grpo_advantages(
        torch.tensor([1.0, 1.0, 3.0]), torch.ones(3, 1, dtype=torch.bool), torch.tensor([7, 7, 9])
    )
    assert adv.flatten().tolist() == [0.0, 0.0, 0.0]


def test_drgrpo_is_group_mean_only():
    rewards = torch.tensor([5.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    adv = drgrpo_advantages(rewards, mask, group_ids_for(4, 4))
    assert adv.tolist() == [[3.75, 3.75], [-1.25, 0.0], [-1.25, -1.25], [0.0, 0.0]]


def test_dispatch_and_group_ids():
    rewards, ids = torch.tensor([5.0, 0.0]), group_ids_for(2, 2)
    assert torch.equal(
        compute_advantages("reference", rewards, MASK, ids), reference_advantages(rewards, MASK)
    )
    assert torch.equal(
        compute_advantages("drgrpo", rewards, MASK, ids), drgrpo_advantages(rewards, MASK, ids)
    )
    with pytest.raises(ValueError, match="algo.advantage"):
        compute_advantages("ppo", rewards, MASK, ids)
    with pytest.raises(ValueError, match="groups of 3"):
        group_ids_for(4, 3)


def _dp_rank(rank, world, init_file, out_dir):
    import torch.distributed as dist

    from questa_nemo.algo.loss import PolicyLossConfig, policy_loss, step_normaliser

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rewards, mask, logp, behave = _dp_batch()
    part = slice(rank * 2, rank * 2 + 2)

    def all_reduce(t):
        dist.all_reduce(t)
        return t

    adv = reference_advantages(rewards[part], mask[part], all_reduce=all_reduce)
    normaliser = all_reduce(torch.tensor(step_normaliser(mask[part], "token"))).item()
    logp_part = logp[part].clone().requires_grad_(True)
    loss, _ = policy_loss(logp_part, adv, mask[part], behave[part], normaliser, PolicyLossConfig())
    loss.backward()
    torch.save({"adv": adv, "loss": loss.detach(), "grad": logp_part.grad}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _dp_batch():
    g = torch.Generator().manual_seed(3)
    rewards = torch.tensor([5.0, 0.0, 0.0, 5.0])
    mask = torch.rand(4, 6, generator=g) > 0.4
    logp = -torch.rand(4, 6, generator=g)
    behave = logp + 0.1 * torch.randn(4, 6, generator=g)
    return rewards, mask, logp, behave


@pytest.mark.slow
def test_two_gloo_ranks_match_the_single_rank_batch(tmp_path):
    """Advantage statistics and the loss normaliser all-reduced over 2 DP ranks equal the whole batch on one."""
    import torch.multiprocessing as mp

    from questa_nemo.algo.loss import PolicyLossConfig, policy_loss, step_normaliser

    mp.spawn(_dp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    rewards, mask, logp, behave = _dp_batch()
    adv = reference_advantages(rewards, mask)
    logp = logp.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, adv, mask, behave, step_normaliser(mask, "token"), PolicyLossConfig())
    loss.backward()
    assert torch.allclose(torch.cat([r["adv"] for r in ranks]), adv, atol=1e-6)
    assert sum(r["loss"].item() for r in ranks) == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(torch.cat([r["grad"] for r in ranks]), logp.grad, atol=1e-7)


@pytest.mark.parametrize("name", ["reference", "grpo", "drgrpo"])
def test_algo_configs_load_and_match_their_mode(name):
    from questa_nemo.algo.loss import loss_config_from
    from questa_nemo.config import load_config

    cfg = load_config("eval_default", [f"+algo={name}"])
    assert cfg.algo.advantage == name
    loss_cfg = loss_config_from(cfg.algo)
    assert loss_cfg.agg == ("sequence_sum" if name == "drgrpo" else "token")
    assert loss_cfg.clip_eps == 0.2 and loss_cfg.behave_imp_weight_cap == 5.0 and loss_cfg.kl_coef == 0.0
