"""Token sampling (rollout/sampling.py) and the static-shape bucketing (rollout/graphs.py)."""

from __future__ import annotations

import torch

from questa_nemo.rollout.graphs import ATTEND_LEN_BUCKET, attend_bucket, batch_bucket
from questa_nemo.rollout.sampling import sample_tokens, top_p_filter


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25]])
    # sorted: 0.5, 0.25, 0.15, 0.1 -> mass before each: 0, 0.5, 0.75, 0.9
    assert torch.equal(top_p_filter(probs, 0.7), torch.tensor([[0.0, 0.5, 0.0, 0.25]]))
    assert torch.equal(top_p_filter(probs, 0.75), torch.tensor([[0.0, 0.5, 0.0, 0.25]]))
    assert torch.equal(top_p_filter(probs, 0.3), torch.tensor([[0.0, 0.5, 0.0, 0.0]]))  # top token survives
    assert torch.equal(top_p_filter(probs, 1.0), probs)


def test_greedy_takes_argmax_and_its_raw_logprob():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 0.5]])
    tokens, logprobs = sample_tokens(logits, None, temperature=0.0, top_p=1.0)
    assert tokens.tolist() == [1, 0]
    assert torch.allclose(logprobs, logits.log_softmax(-1)[[0, 1], [1, 0]])


def test_inverse_cdf_samples_the_tempered_distribution():
    logits = torch.tensor([1.0, 0.0, -1.0, 0.5]).repeat(40000, 1)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample_tokens(logits, u, temperature=0.5, top_p=1.0)
    expected = (logits[0] / 0.5).softmax(-1)
    freq = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    assert (freq - expected).abs().max() < 0.01
    assert torch.allclose(logprobs, expected.log()[tokens])  # log-prob at temperature, not at 1


def test_inverse_cdf_by_hand_and_at_the_ends():
    """probs [0.1, 0.0, 0.6, 0.3]: cumulative [0.1, 0.1, 0.7, 1.0]; u below 0.1 -> 0, up to 0.7 -> 2, above ->
    3; the zero-probability token 1 is never picked, not even at u = 0.1 exactly; u at its largest value
    (1 - 2**-24, what uniform_draws gives for an all-ones hash) stays inside the vocabulary and on a token of non-zero probability."""
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.clamp_min(1e-30).log().repeat(6, 1)
    logits[:, 1] = -float("inf")
    from questa_nemo.rollout.sampling import uniform_draws

    top_u = uniform_draws(torch.tensor([0]), torch.tensor([0]))  # any value; the largest is below
    assert 0 < top_u.item() < 1 and ((2.0**23 - 1 + 0.5) * 2.0**-23) == 1 - 2.0**-24
    assert torch.tensor(1 - 2.0**-24, dtype=torch.float32).item() < 1.0  # representable, not rounded to 1
    u = torch.tensor([0.0, 0.05, 0.1, 0.5, 0.7001, 1 - 2.0**-24])
    tokens, _ = sample_tokens(logits, u, temperature=1.0, top_p=1.0)
    assert tokens.tolist() == [0, 0, 2, 2, 3, 3]
    # the last token of non-zero probability is the last of the vocabulary's non-zero ones, even after top-p
    tail = torch.tensor([[2.0, 1.0, -30.0, -30.0]])
    top, _ = sample_tokens(tail, torch.tensor([1 - 2.0**-24]), temperature=1.0, top_p=0.5)
    assert top.tolist() == [0]  # top-p 0.5 keeps token 0 only: u near 1 still picks it


def test_top_p_never_samples_the_tail_but_reports_untruncated_logprob():
    logits = torch.tensor([3.0, 2.9, -5.0, -5.0]).repeat(5000, 1)
    u = torch.rand(5000, generator=torch.Generator().manual_seed(1))
    tokens, logprobs = sample_tokens(logits, u, temperature=1.0, top_p=0.9)
    assert set(tokens.tolist()) == {0, 1}
    assert torch.allclose(logprobs, logits[0].log_softmax(-1)[tokens])


def test_buckets():
    assert [batch_bucket(n, 512) for n in (1, 8, 9, 100, 256, 300)] == [8, 8, 16, 128, 256, 512]
    assert batch_bucket(300, 300) == 300  # capped at the slot count
    assert attend_bucket(0, 4096) == ATTEND_LEN_BUCKET
    assert attend_bucket(ATTEND_LEN_BUCKET - 1, 4096) == ATTEND_LEN_BUCKET
    assert attend_bucket(ATTEND_LEN_BUCKET, 4096) == 2 * ATTEND_LEN_BUCKET
    assert attend_bucket(4095, 4096) == 4096


def test_rollout_yamls_load_and_validate():
    from pathlib import Path

    from omegaconf import OmegaConf

    from questa_nemo.config import to_config, validate

    folder = Path(__file__).resolve().parents[1] / "conf" / "rollout"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert names == ["hf", "megatron", "trtllm"]
    for name in names:
        cfg = to_config({"rollout": OmegaConf.load(folder / f"{name}.yaml")})
        validate(cfg)
        assert cfg.rollout.backend == name


def test_per_sequence_uniforms_sample_the_tempered_distribution():
    """The counter-based uniforms (rollout/sampling.py) through the inverse CDF: token frequencies over 40000
    sequences, and over 40000 positions of one sequence, match softmax(logits / T)."""
    from questa_nemo.rollout.sampling import sequence_key, uniform_draws

    logits = torch.tensor([1.0, 0.0, -1.0, 0.5, -3.0, 2.0]).repeat(40000, 1)
    expected = (logits[0] / 0.7).softmax(-1)
    many = torch.tensor([sequence_key(9, i, 0) for i in range(40000)])
    one = torch.full((40000,), sequence_key(9, 0, 0))
    for keys, positions in ((many, torch.zeros(40000, dtype=torch.long)), (one, torch.arange(40000))):
        tokens, _ = sample_tokens(logits, uniform_draws(keys, positions), temperature=0.7, top_p=1.0)
        freq = torch.bincount(tokens, minlength=6).float() / tokens.numel()
        assert (freq - expected).abs().max() < 0.01, (freq, expected)


def test_temperature_one_skips_the_division_with_the_same_bits():
    """At T = 1 the sampler skips logits / T (x / 1.0 == x exactly): tokens and log-probs as the divided path."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 300, generator=g) * 4
    u = torch.rand(6, generator=g)
    divided = (logits / 1.0).log_softmax(-1)
    for top_p in (1.0, 0.8):
        tokens, logprobs = sample_tokens(logits, u, temperature=1.0, top_p=top_p)
        assert torch.equal(logprobs, divided.gather(-1, tokens[:, None])[:, 0])
        probs = divided.exp()
        if top_p < 1:
            probs = top_p_filter(probs, top_p)
        cdf = probs.cumsum(-1)
        expected = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]
        assert torch.equal(tokens, expected)
