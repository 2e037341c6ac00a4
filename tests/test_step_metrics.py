"""One metrics path (issue 18): the loss's own stats (LossStats.metrics) and the filter's (FilterCounts.metrics)
reach the step's logged metrics as they are, merged over micro-batches and DP ranks once, nothing dropped."""

from __future__ import annotations

import math
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
from test_step_data import config, fixture_groups

from questa_nemo.algo.filtering import FilledStep, FilterCounts
from questa_nemo.algo.loss import LossStats, PolicyLossConfig, policy_loss
from questa_nemo.model.packing import pack
from questa_nemo.model.parallel import Reduce
from questa_nemo.model.policy import merge_stats
from questa_nemo.train.grpo import build_step_data, grpo_step, step_metrics
from questa_nemo.train.metrics import PhaseTimer


def two_stats() -> tuple[LossStats, LossStats]:
    z = torch.zeros(1, 2)
    mask = torch.tensor([[True, True]])
    cfg = PolicyLossConfig(kl_coef=0.1)
    _, a = policy_loss(z, torch.ones(1, 2), mask, torch.tensor([[-1.0, 0.0]]), 2, cfg, z, z - 0.5, z + 0.3)
    _, b = policy_loss(z, -torch.ones(1, 2), mask, torch.tensor([[0.5, -2.0]]), 2, cfg, z, z + 0.2, z + 0.1)
    return a, b


def as_dict(stats: LossStats) -> dict[str, torch.Tensor]:
    return {f.name: getattr(stats, f.name) for f in fields(stats)}


def test_merge_stats_of_two_ranks_is_the_loss_stats_sum_with_the_max_kept():
    a, b = two_stats()
    merged = merge_stats([as_dict(a), as_dict(b)])  # what the policy does over micro-batches and over ranks
    assert set(merged) == {f.name for f in fields(LossStats)}
    assert merged["behave_weight_max"] == pytest.approx(math.exp(2.0))  # maxed, not summed
    assert merged["tokens"] == 4.0
    assert LossStats.from_sums(merged).metrics() == pytest.approx((a + b).metrics())


def test_from_sums_of_nothing_is_zero_stats():
    m = LossStats.from_sums({}).metrics()
    assert m["loss_tokens"] == 0.0 and all(v == 0.0 for v in m.values())


class FakePolicy:
    """Packs several micro-batches, gives proximal log-probs above the behaviour ones (weights > 1, growing along
    the row), current ones below them, entropy 0.5 per token, and merges the
    callback's stats with merge_stats as MegatronPolicy does; keeps each micro-batch's LossStats for checking."""

    def __init__(self):
        self.parts: list[LossStats] = []

    def eval(self):
        pass

    def pack(self, sequences):
        self.sequences = sequences
        return pack(sequences, 6)

    def logprobs(self, micro_batches, temperature=1.0):
        return SimpleNamespace(logprobs=[mb.behaviour_logprobs + 0.1 * torch.arange(mb.tokens.shape[1])[None, :]
                                         for mb in micro_batches])

    def train_step(self, micro_batches, loss_fn, normaliser, temperature=1.0):
        outputs = []
        for mb in micro_batches:
            logprobs = mb.behaviour_logprobs - 0.05 * torch.arange(mb.tokens.shape[1])[None, :]
            loss, stats = loss_fn(logprobs, torch.full_like(logprobs, 0.5), mb)
            outputs.append((float(loss), {k: v.detach() for k, v in stats.items()}))
            self.parts.append(LossStats(**stats))
        return SimpleNamespace(loss=sum(x for x, _ in outputs) / normaliser, grad_norm=1.0, lr=1e-6,
                               skipped=False, skipped_total=0, num_micro_batches=len(micro_batches),
                               metrics=merge_stats(s for _, s in outputs))


class FakeRollouts:
    def __init__(self, filled):
        self.filled = filled

    def next(self, step):
        return self.filled


def test_every_loss_and_filter_stat_reaches_the_logged_metrics_at_dp1():
    cfg = config()
    counts = FilterCounts(kept=3, all_correct=1, too_hard=2)
    filled = FilledStep(fixture_groups(), counts, prompt_batches=2, surplus=1, full=True)
    policy = FakePolicy()
    backend = SimpleNamespace(version=7, update_weights=lambda v: None)
    metrics, _ = grpo_step(cfg, 1, policy, backend, FakeRollouts(filled), PhaseTimer())
    assert len(policy.parts) >= 2, "the fixture should span several micro-batches"
    total = policy.parts[0]
    for part in policy.parts[1:]:
        total = total + part
    expected = total.metrics()
    assert expected["loss_tokens"] > 0 and expected["behave_weight_max"] > 1.0
    assert expected["behave_weight_max"] == max(float(p.behave_weight_max) for p in policy.parts)
    for name, value in expected.items():  # every LossStats stat, under actor/, with the merged value
        assert metrics[f"actor/{name}"] == pytest.approx(value), name
    for name, value in counts.metrics().items():
        assert metrics[f"filter/{name}"] == value, name
    assert metrics["filter/kept_groups"] == 2.0  # the groups trained on (the fixture's two)
    # names logged before the one path, kept
    for name in ("loss", "grad_norm", "lr", "clip_fraction", "capped_fraction", "entropy", "behave_kl",
                 "loss_tokens", "micro_batches", "skipped_nonfinite", "skipped_nonfinite_total"):
        assert f"actor/{name}" in metrics, name


class RecordedReduce(Reduce):
    """Two DP ranks in one process (the HalfReduce pattern of tests/test_hint_wiring.py): the k-th `sum`/`max`
    adds/maxes the other rank's k-th contribution, recorded by running that rank first."""

    def __init__(self, other: RecordedReduce | None = None):
        super().__init__()
        self.other, self.mine = other, []

    def _combine(self, x, op):
        self.mine.append(x.clone())
        return x if self.other is None else op(x, self.other.mine[len(self.mine) - 1])

    def sum(self, x):
        return self._combine(x, torch.add)

    def max(self, x):
        return self._combine(x, torch.maximum)

    def gather_objects(self, obj):
        self.mine.append(obj)
        return [obj] if self.other is None else [obj, self.other.mine[len(self.mine) - 1]]


def test_filter_stats_are_summed_over_two_dp_ranks():
    cfg = config()
    groups = fixture_groups()
    rank1 = FilledStep(groups[1:], FilterCounts(kept=2, all_wrong=1), 2, 0, True)
    rank0 = FilledStep(groups[:1], FilterCounts(kept=1, all_correct=1, too_easy=1), 2, 0, True)
    first = RecordedReduce()
    alone = step_metrics(build_step_data(cfg, rank1.groups, 7), rank1, first)
    both = step_metrics(build_step_data(cfg, rank0.groups, 7), rank0, RecordedReduce(first))
    assert alone["filter/passed_groups"] == 2.0
    summed = (rank0.counts + rank1.counts).metrics()
    for name, value in summed.items():
        assert both[f"filter/{name}"] == value, name
    assert both["filter/kept_groups"] == 2.0


def test_sample_log_holds_the_first_groups_as_text_and_a_resume_drops_what_it_redoes(tmp_path):
    import json

    from questa_nemo.train.metrics import SampleLogger

    def decode(ids):
        return " ".join(map(str, ids))

    log = SampleLogger(tmp_path, limit=1)
    for step in (1, 2, 3):
        log.log(step, fixture_groups(), decode)
    log.log(4, [], decode)  # a step that kept nothing writes nothing
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]  # one group a step: limit=1
    first = lines[0]
    assert (first["id"], first["prompt"], first["answer"]) == ("p0", "1 2 3", "\\boxed{1}")
    assert first["samples"] == [
        {"text": "A", "reward": 1.0, "reason": "correct", "tokens": 2, "finish": "stop", "hinted": True},
        {"text": "B", "reward": 0.0, "reason": "wrong", "tokens": 1, "finish": "length", "hinted": True},
    ]
    SampleLogger(tmp_path, limit=2, resume_step=2).log(3, fixture_groups(), decode)  # resumed after step 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # the old step 3 dropped, the redone one written with two groups
