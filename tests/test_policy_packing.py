"""Packing sequences into THD micro-batches: budget, layout, padding, and the way back."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from questa_nemo.model.packing import TokenSequence, assign_first_fit_decreasing, pack, unpack


def make_sequence(length: int, offset: int = 0, prompt: int = 1) -> TokenSequence:
    ids = torch.arange(offset, offset + length)
    mask = torch.zeros(length)
    mask[prompt:] = 1.0
    return TokenSequence(
        token_ids=ids,
        loss_mask=mask,
        advantages=ids.float() * 0.5,
        behaviour_logprobs=-ids.float(),
    )


def test_first_fit_decreasing_by_hand():
    # lengths 5, 4, 3, 3, 1 into budget 8: [5, 3] [4, 3, 1]
    bins = assign_first_fit_decreasing([3, 5, 1, 4, 3], token_budget=8)
    assert bins == [[1, 0], [3, 4, 2]]


def test_sequence_over_budget_is_named():
    with pytest.raises(ValueError, match="sequence 1 has 9 tokens.*micro_batch_tokens=8"):
        assign_first_fit_decreasing([3, 9], token_budget=8)


def test_layout_of_one_row():
    seqs = [make_sequence(3, offset=10), make_sequence(2, offset=20)]
    (mb,) = pack(seqs, token_budget=8, pad_multiple=4)
    # longest first: seq 0 (3 tokens) then seq 1 (2 tokens), padded to 8
    assert mb.sequence_ids == [0, 1]
    assert mb.tokens.tolist() == [[10, 11, 12, 20, 21, 0, 0, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert mb.labels.tolist() == [[11, 12, 0, 21, 0, 0, 0, 0]]
    assert mb.loss_mask.tolist() == [[0, 1, 1, 0, 1, 0, 0, 0]]
    assert mb.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert mb.max_seqlen == 3
    assert mb.num_real_tokens == 5
    assert mb.segment_starts.tolist() == [True, False, False, True, False, True, False, False]
    assert mb.proximal_logprobs is None


def test_rows_share_length_and_pad_to_min_count():
    seqs = [make_sequence(6), make_sequence(5), make_sequence(2)]
    mbs = pack(seqs, token_budget=8, min_micro_batches=3)
    assert len(mbs) == 3
    assert {mb.tokens.shape for mb in mbs} == {torch.Size([1, 8])}
    assert mbs[2].sequence_ids == [] and mbs[2].loss_mask.sum() == 0
    assert mbs[2].cu_seqlens.tolist() == [0, 8]


def test_mixed_proximal_is_an_error():
    a, b = make_sequence(3), make_sequence(3)
    a.proximal_logprobs = torch.zeros(3)
    with pytest.raises(ValueError, match="proximal_logprobs"):
        pack([a, b], token_budget=8)


def test_wrong_field_shape_is_named():
    a = make_sequence(3)
    a.advantages = torch.zeros(4)
    with pytest.raises(ValueError, match="sequence 0 field advantages"):
        pack([a], token_budget=8)


@settings(max_examples=50, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 16), min_size=1, max_size=20),
    budget=st.integers(16, 40),
    pad=st.sampled_from([1, 2, 8]),
)
def test_pack_unpack_round_trip(lengths, budget, pad):
    seqs = [make_sequence(n, offset=100 * i) for i, n in enumerate(lengths)]
    mbs = pack(seqs, token_budget=budget, pad_multiple=pad)
    for mb in mbs:
        assert mb.num_real_tokens <= budget
        assert mb.tokens.size(1) % pad == 0
        assert mb.tokens.size(1) < budget + pad
    back = unpack([mb.advantages for mb in mbs], mbs, len(seqs))
    for s, b in zip(seqs, back):
        assert torch.equal(s.advantages, b)
    back_ids = unpack([mb.tokens for mb in mbs], mbs, len(seqs))
    assert all(torch.equal(s.token_ids, b) for s, b in zip(seqs, back_ids))
