"""MegatronPolicy in one process (TP=1, gloo): log-probs and gradients against Hugging Face, the loss going
down on a fixed batch, the non-finite guard, and the lr warm-up."""

import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
warnings.filterwarnings("ignore", category=UserWarning)

from policy_common import OPTIM, TINY_HF, build_policy, fixed_sequences, hf_weights, nan_loss, nll_loss  # noqa: E402

from questa_nemo.model.packing import unpack  # noqa: E402
from questa_nemo.model.parallel import destroy_distributed  # noqa: E402


@pytest.fixture
def policy():
    pol = build_policy()
    yield pol
    destroy_distributed()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**{k: v for k, v in TINY_HF.items() if k != "architectures"})
    config._attn_implementation = "eager"
    model = Qwen2ForCausalLM(config)
    model.load_state_dict(hf_weights())
    return model.float()


def hf_token_logprobs(model, sequences):
    """Per sequence [L]: log p(token i | tokens < i) from HF, run one sequence at a time (0 at i = 0)."""
    out = []
    for s in sequences:
        logits = model(s.token_ids[None]).logits[0].float()  # [L, V]
        picked = torch.log_softmax(logits[:-1], -1).gather(1, s.token_ids[1:, None]).squeeze(1)
        out.append(torch.cat([torch.zeros(1), picked]))
    return out


def weights(pol) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in pol.modules[0].state_dict().items()
        if not k.endswith("_extra_state")
    }


def test_logprobs_match_hf_sequence_by_sequence(policy, hf_model):
    """Packing keeps sequences apart (attention, RoPE positions) and log-probs land on the right tokens."""
    sequences = fixed_sequences()
    micro_batches = policy.pack(sequences)
    assert len(micro_batches) > 1 and any(len(mb.sequence_ids) > 1 for mb in micro_batches)
    result = policy.logprobs(micro_batches)
    ours = unpack(result.logprobs, micro_batches, len(sequences))
    with torch.no_grad():
        theirs = hf_token_logprobs(hf_model, sequences)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    entropy = unpack(result.entropy, micro_batches, len(sequences))
    assert all(float(e[0]) == 0.0 and bool((e[1:] > 0).all()) for e in entropy)


def test_train_step_matches_hf_gradient_and_lowers_loss(policy, hf_model):
    sequences = fixed_sequences()
    micro_batches = policy.pack(sequences)
    tokens = sum(float(s.loss_mask.sum()) for s in sequences)
    # HF reference: token-mean NLL over the whole batch, and its gradient norm (before clipping)
    hf_model.zero_grad()
    hf_lp = hf_token_logprobs(hf_model, sequences)
    hf_loss = -sum((lp * s.loss_mask).sum() for lp, s in zip(hf_lp, sequences)) / tokens
    hf_loss.backward()
    hf_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in hf_model.parameters()]))

    first = policy.train_step(micro_batches, nll_loss, tokens)
    assert first.loss == pytest.approx(float(hf_loss), rel=1e-5)
    assert first.grad_norm == pytest.approx(float(hf_norm), rel=1e-4)
    assert first.metrics["tokens"] == tokens and not first.skipped and first.lr == OPTIM.lr
    losses = [first.loss] + [policy.train_step(micro_batches, nll_loss, tokens).loss for _ in range(3)]
    assert losses[-1] < losses[0] - 0.3, losses


def test_non_finite_step_is_skipped_and_leaves_weights_bit_identical(policy):
    sequences = fixed_sequences()
    micro_batches = policy.pack(sequences)
    tokens = sum(float(s.loss_mask.sum()) for s in sequences)
    policy.train_step(micro_batches, nll_loss, tokens)  # Adam state exists from here on
    before = weights(policy)
    optimizer_before = {k: v.clone() for k, v in policy.optimizer.state_dict()["state"][0].items()}
    lr_steps_before = policy.scheduler.num_steps

    stats = policy.train_step(micro_batches, nan_loss, tokens)
    assert stats.skipped and stats.skipped_total == 1
    assert not torch.isfinite(torch.tensor(stats.grad_norm))
    after = weights(policy)
    assert all(torch.equal(before[k], after[k]) for k in before)
    optimizer_after = policy.optimizer.state_dict()["state"][0]
    assert all(torch.equal(v, optimizer_after[k]) for k, v in optimizer_before.items())
    assert policy.scheduler.num_steps == lr_steps_before

    # the NaN gradients are gone: the next step is exactly the step that would have followed the first
    resumed = policy.train_step(micro_batches, nll_loss, tokens)
    assert not resumed.skipped and resumed.skipped_total == 1
    destroy_distributed()
    fresh = build_policy()
    fresh.train_step(micro_batches, nll_loss, tokens)
    expected = fresh.train_step(micro_batches, nll_loss, tokens)
    assert resumed.grad_norm == expected.grad_norm
    assert all(torch.equal(v, weights(fresh)[k]) for k, v in weights(policy).items())


def test_warmup_then_constant_lr_and_skips_do_not_advance_it():
    pol = build_policy(optim=dataclasses.replace(OPTIM, warmup_ratio=0.25), total_steps=8)  # 2 warm-up steps
    try:
        sequences = fixed_sequences(count=3)
        micro_batches = pol.pack(sequences)
        lrs = []
        for loss_fn in (nll_loss, nan_loss, nll_loss, nll_loss):
            stats = pol.train_step(micro_batches, loss_fn, 10.0)
            lrs.append((stats.skipped, stats.lr))
        assert lrs == [(False, OPTIM.lr / 2), (True, OPTIM.lr / 2), (False, OPTIM.lr), (False, OPTIM.lr)]
    finally:
        destroy_distributed()


def test_padding_is_the_last_sequences_padded_extent_and_is_never_attended():
    from questa_nemo.model.packing import TokenSequence, pack
    from questa_nemo.model.policy import _packed_params

    def seq(n):
        zeros = torch.zeros(n)
        return TokenSequence(torch.arange(n), torch.ones(n), zeros, zeros.clone())

    full, mostly_padding, padding_only = pack([seq(6), seq(5), seq(2)], token_budget=8, min_micro_batches=3)
    assert mostly_padding.cu_seqlens.tolist() == [0, 5, 8]  # 5 tokens, then a padding segment of 3
    params = _packed_params(mostly_padding, torch.device("cpu"))
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 5]  # attended: the sequence
    assert params.cu_seqlens_q_padded.tolist() == [0, 8]  # laid out: the sequence and its padding
    assert params.max_seqlen_q == 8
    params = _packed_params(full, torch.device("cpu"))
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_q_padded.tolist() == [0, 6, 8]
    assert _packed_params(padding_only, torch.device("cpu")).cu_seqlens_q.tolist() == [0, 8]


def test_step_loss_is_the_normalised_sum_whatever_the_callback_names_its_stats(policy):
    """A callback may report a stat called "loss" (policy_loss does: the unnormalised token sum); the step's
    loss stays sum(loss) / normaliser (it once had that stat added to it)."""
    sequences = fixed_sequences()
    micro_batches = policy.pack(sequences)
    tokens = sum(float(s.loss_mask.sum()) for s in sequences)

    def loss_with_a_loss_stat(logprobs, entropy, mb):
        loss, stats = nll_loss(logprobs, entropy, mb)
        return loss, {**stats, "loss": loss.detach()}

    expected = policy.logprobs(micro_batches)
    nll = -sum(float((lp * mb.loss_mask).sum()) for lp, mb in zip(expected.logprobs, micro_batches))
    step = policy.train_step(micro_batches, loss_with_a_loss_stat, tokens)
    assert step.loss == pytest.approx(nll / tokens, rel=1e-5)
    assert step.metrics["loss"] == pytest.approx(nll, rel=1e-5)


def test_segment_plans_only_for_sdpa_core_attention(policy):
    """The policy builds SDPA core attention's per-micro-batch plan only when its model has that attention."""
    from policy_common import TINY_HF

    from questa_nemo.config import ModelConfig
    from questa_nemo.model.megatron import build_model
    from questa_nemo.model.policy import needs_segment_plans

    assert policy.segment_plans
    local = build_model(TINY_HF, ModelConfig(params_dtype="fp32", attention="local", recompute="none"))
    assert not needs_segment_plans([local])
