"""The glue from scored groups to training sequences, against hand-computed values.

build_step_data (train/grpo.py): rewards -> overlong handling -> shaping -> advantages -> one TokenSequence
per completion, prompt tokens masked out at their offset; segments: a packed row back to one row per sequence;
normaliser_for: the loss normaliser of each aggregation; align_to_tokens (model/policy.py): a next-token value
moved onto the token it predicts, which is what makes the prompt-offset mask line up with the log-probs.

The fixture, two groups of G = 2 (trainer at version 7):

    group 0 (hinted), prompt [1, 2, 3]:  A = [4, 5] correct, stop, v7    B = [6] wrong, length (truncated), v6
    group 1,          prompt [7]:        C = [8, 9, 10] wrong, stop, v7  D = [11, 12] correct, stop, v5
"""

from __future__ import annotations

import math

import pytest
import torch

from questa_nemo.algo.loss import loss_config_from
from questa_nemo.config import Config
from questa_nemo.model.packing import TokenSequence, pack
from questa_nemo.reward.types import RewardResult
from questa_nemo.rollout.base import Completion
from questa_nemo.train.grpo import Group, build_step_data, normaliser_for, segments
from questa_nemo.train.prompts import PromptRow

EPS = 1e-5


def fixture_groups() -> list[Group]:
    def completion(ids, logprobs, finish, version):
        return Completion(token_ids=ids, logprobs=logprobs, finish_reason=finish, version=version)

    def result(ok):
        return RewardResult(reward=1.0 if ok else 0.0, reason="correct" if ok else "wrong")

    g0 = Group(
        prompt=PromptRow(id="p0", prompt_ids=[1, 2, 3], answer="\\boxed{1}", hinted=True, meta={}),
        completions=[completion([4, 5], [-0.1, -0.2], "stop", 7), completion([6], [-0.3], "length", 6)],
        results=[result(True), result(False)],
        texts=["A", "B"],
    )
    g1 = Group(
        prompt=PromptRow(id="p1", prompt_ids=[7], answer="\\boxed{2}", hinted=False, meta={}),
        completions=[
            completion([8, 9, 10], [-0.4, -0.5, -0.6], "stop", 7),
            completion([11, 12], [-0.7, -0.8], "stop", 5),
        ],
        results=[result(False), result(True)],
        texts=["C", "D"],
    )
    return [g0, g1]


def config(**algo) -> Config:
    cfg = Config()  # the reference recipe's defaults: reward 5 x correctness, batch-token normalisation
    for key, value in algo.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def expect(seq: TokenSequence, ids, loss_mask, advantages, behaviour):
    assert seq.token_ids.tolist() == ids
    assert seq.token_ids.dtype == torch.long
    torch.testing.assert_close(seq.loss_mask, torch.tensor(loss_mask, dtype=torch.float32))
    torch.testing.assert_close(seq.advantages, torch.tensor(advantages, dtype=torch.float32))
    torch.testing.assert_close(seq.behaviour_logprobs, torch.tensor(behaviour, dtype=torch.float32))
    assert seq.proximal_logprobs is None


def test_reference_recipe_sequences_by_hand():
    """Shaped rewards 5, 0, 0, 5 spread over 2, 1, 3, 2 completion tokens: four 5s and four 0s, mean 2.5 and
    population std 2.5, so a token of a correct completion gets 2.5 / (2.5 + eps) and one of a wrong
    completion minus that; prompt tokens get mask 0, advantage 0 and behaviour log-prob 0."""
    data = build_step_data(config(), fixture_groups(), trainer_version=7)
    a = 2.5 / (2.5 + EPS)
    z = 0.0
    expect(data.sequences[0], [1, 2, 3, 4, 5], [0, 0, 0, 1, 1], [z, z, z, a, a], [z, z, z, -0.1, -0.2])
    expect(data.sequences[1], [1, 2, 3, 6], [0, 0, 0, 1], [z, z, z, -a], [z, z, z, -0.3])
    expect(data.sequences[2], [7, 8, 9, 10], [0, 1, 1, 1], [z, -a, -a, -a], [z, -0.4, -0.5, -0.6])
    expect(data.sequences[3], [7, 11, 12], [0, 1, 1], [z, a, a], [z, -0.7, -0.8])
    assert data.correct.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert data.truncated.tolist() == [False, True, False, False]
    assert data.hinted.tolist() == [True, True, False, False]
    assert data.completion_lengths.tolist() == [2, 1, 3, 2]
    assert data.stale.tolist() == [0, 1, 0, 2]
    assert data.groups[1].texts == ["C", "D"]


def test_reference_advantages_use_the_all_reduced_moments():
    """Another DP rank holding 8 completion tokens of reward 0 (count 8, sum 0, sum of squares 0) makes the
    global moments count 16, sum 20, sum of squares 100: mean 1.25, variance 100/16 - 1.25^2 = 4.6875,
    so a token worth 5 gets 3.75 / sqrt(4.6875) = sqrt(3) and one worth 0 gets -1.25 / sqrt(4.6875)
    = -1/sqrt(3)."""
    other_rank = torch.tensor([8.0, 0.0, 0.0], dtype=torch.float64)
    data = build_step_data(config(), fixture_groups(), trainer_version=7, all_reduce=lambda x: x + other_rank)
    std = math.sqrt(4.6875)
    up, down = 3.75 / (std + EPS), -1.25 / (std + EPS)
    assert up == pytest.approx(math.sqrt(3), rel=1e-5) and down == pytest.approx(-1 / math.sqrt(3), rel=1e-5)
    torch.testing.assert_close(data.sequences[0].advantages[3:], torch.tensor([up, up]))
    torch.testing.assert_close(data.sequences[2].advantages[1:], torch.tensor([down, down, down]))


def test_grpo_with_overlong_mask_by_hand():
    """Group-normalised GRPO, reward x 1, truncated completions masked: group 0's rewards (1, 0) have mean 0.5
    and unbiased std sqrt(0.5), so A gets 0.5 / (sqrt(0.5) + eps); B still counts in that baseline (a real
    attempt) but its token leaves the loss (mask 0, advantage 0). Group 1 (0, 1) mirrors it: C negative, D
    positive."""
    cfg = config(algo__advantage="grpo", reward__scaling=1.0, reward__overlong="mask")
    data = build_step_data(cfg, fixture_groups(), trainer_version=7)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    z = 0.0
    expect(data.sequences[0], [1, 2, 3, 4, 5], [0, 0, 0, 1, 1], [z, z, z, a, a], [z, z, z, -0.1, -0.2])
    expect(data.sequences[1], [1, 2, 3, 6], [0, 0, 0, 0], [z, z, z, z], [z, z, z, -0.3])
    expect(data.sequences[2], [7, 8, 9, 10], [0, 1, 1, 1], [z, -a, -a, -a], [z, -0.4, -0.5, -0.6])
    expect(data.sequences[3], [7, 11, 12], [0, 1, 1], [z, a, a], [z, -0.7, -0.8])
    assert data.correct.tolist() == [1.0, 0.0, 0.0, 1.0]  # raw correctness, whatever the overlong mode


def test_overlong_penalty_replaces_the_reward_before_shaping():
    """Penalty -1 for the truncated B, then x 5: shaped rewards 5, -5, 0, 5 over tokens (5, 5), (-5),
    (0, 0, 0), (5, 5): sum 15, sum of squares 125, count 8: mean 1.875, variance 125/8 - 1.875^2
    = 12.109375."""
    cfg = config(reward__overlong="penalty", reward__overlong_penalty=-1.0)
    data = build_step_data(cfg, fixture_groups(), trainer_version=7)
    mean, std = 1.875, math.sqrt(12.109375)
    norm = [(5 - mean) / (std + EPS), (-5 - mean) / (std + EPS), (0 - mean) / (std + EPS)]
    torch.testing.assert_close(data.sequences[0].advantages[3:], torch.tensor([norm[0]] * 2))
    torch.testing.assert_close(data.sequences[1].advantages[3:], torch.tensor([norm[1]]))
    torch.testing.assert_close(data.sequences[2].advantages[1:], torch.tensor([norm[2]] * 3))
    assert data.sequences[1].loss_mask.tolist() == [0, 0, 0, 1]  # penalised, still trained on


def test_no_groups_gives_an_empty_step():
    data = build_step_data(config(), [], trainer_version=3)
    assert data.sequences == [] and data.correct.numel() == 0 and data.stale.numel() == 0


@pytest.mark.parametrize(
    ("agg", "overlong", "expected"),
    [
        ("token", "none", 8.0),  # 2 + 1 + 3 + 2 completion tokens
        ("sequence", "none", 4.0),  # sequences with at least one token in the loss
        ("sequence_sum", "none", 4 * 24000.0),  # Dr. GRPO: sequences x max_new_tokens
        ("token", "mask", 7.0),  # B's one token masked out
        ("sequence", "mask", 3.0),
        ("sequence_sum", "mask", 3 * 24000.0),
    ],
)
def test_normaliser_for_by_hand(agg, overlong, expected):
    cfg = config(algo__loss_agg=agg, reward__overlong=overlong)
    data = build_step_data(cfg, fixture_groups(), trainer_version=7)
    assert normaliser_for(data, loss_config_from(cfg.algo), max_new_tokens=24000) == expected


def test_segments_cuts_a_packed_row_into_padded_rows():
    """Sequences of 5, 4, 4 and 3 tokens packed into one 16-token row plus 4 tokens of padding: each
    segment comes back as a row, zero past its end, in the row's order; the padding segment is left out."""
    data = build_step_data(config(), fixture_groups(), trainer_version=7)
    (mb,) = pack(data.sequences, token_budget=64, pad_multiple=20)
    assert mb.tokens.shape == (1, 20) and mb.cu_seqlens.tolist() == [0, 5, 9, 13, 16, 20]
    order = mb.sequence_ids  # first-fit-decreasing: the longest first
    assert order == [0, 1, 2, 3]
    tokens = segments(mb.tokens, mb)
    assert tokens.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 6, 0], [7, 8, 9, 10, 0], [7, 11, 12, 0, 0]]
    mask = segments(mb.loss_mask, mb)
    assert mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 1, 0], [0, 1, 1, 0, 0]]


def test_segments_keeps_the_graph_and_drops_padding_gradients():
    row = torch.arange(1.0, 9.0).reshape(1, 8).requires_grad_()
    data = [TokenSequence(torch.tensor([1, 2, 3]), torch.zeros(3), torch.zeros(3), torch.zeros(3))] * 2
    (mb,) = pack(data, token_budget=8, pad_multiple=8)  # 3 + 3 tokens, then 2 of padding
    out = segments(row, mb)
    assert out.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    out.sum().backward()
    assert row.grad.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]


def test_segments_of_an_all_padding_micro_batch_is_empty_but_differentiable():
    data = [TokenSequence(torch.tensor([1, 2]), torch.zeros(2), torch.zeros(2), torch.zeros(2))]
    _, empty = pack(data, token_budget=8, pad_multiple=4, min_micro_batches=2)
    assert empty.sequence_ids == []
    row = torch.ones(1, 4, requires_grad=True)
    out = segments(row, empty)
    assert out.shape == (1, 0) and out.grad_fn is not None


def test_prompt_offset_lines_up_with_the_shifted_log_probs():
    """The model's value at position i is about token i + 1 (its label). align_to_tokens moves it onto token
    i + 1 and zeroes each segment's first token, which has no prediction. With the labels themselves as the
    "values", every position must then hold its own token, except segment starts; and the loss mask is 0 at
    every segment start, so no completion token is scored by a prediction from another sequence."""
    from questa_nemo.model.policy import align_to_tokens

    data = build_step_data(config(), fixture_groups(), trainer_version=7)
    (mb,) = pack(data.sequences, token_budget=64, pad_multiple=20)
    aligned = align_to_tokens(mb.labels.float(), mb.segment_starts)
    starts = mb.segment_starts
    assert starts.nonzero().flatten().tolist() == [0, 5, 9, 13, 16]
    expected = torch.where(starts, torch.zeros_like(mb.tokens[0]), mb.tokens[0]).float()
    assert aligned[0, :16].tolist() == expected[:16].tolist()  # the real sequences
    assert aligned[0, 17:].tolist() == [0.0, 0.0, 0.0]  # padding: token ids 0 there
    scored = mb.loss_mask[0] > 0
    assert not (scored & starts).any()
    assert aligned[0][scored].tolist() == mb.tokens[0][scored].float().tolist()
    # and the behaviour log-probs of the scored tokens are the rollout's, in order
    assert mb.behaviour_logprobs[0][scored].tolist() == pytest.approx(
        [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8]
    )


def test_groups_of_unequal_size_are_refused():
    """Group ids come from advantages.group_ids_for (G adjacent samples a group), which refuses a step whose
    completions do not split into groups of the first group's size rather than mislabel them."""
    groups = fixture_groups()
    groups[1].completions, groups[1].results = groups[1].completions[:1], groups[1].results[:1]
    with pytest.raises(ValueError, match="do not split into groups of 2"):
        build_step_data(config(), groups, trainer_version=7)
