"""The same GRPO run at DP = 1 and DP = 2 (torchrun, gloo on CPU, NCCL-strict guard on): the same sampled
tokens, rewards and filtering, and after 3 steps the same weights within reduction-order noise.

What makes it hold: sampling noise keyed per sequence (seed, prompt position in the whole batch, sample,
completion position; rollout/sampling.py) under one seed for all ranks, and dynamic filtering that takes the
first kept groups in the batch's global order (algo/filtering.py `fill_step` with a `Share`). The run is
tests/dist/grpo_dp_worker.py: the tiny embedded-default model from random weights, reward 1 when the first
sampled token is even, 8 prompts x 4 samples per step, filtering on (groups that are all right or all wrong are
dropped and refilled from further prompt batches: the test checks that happened).

Tolerances. Rollouts, rewards and filter counts must be equal. The update differs only in float32 reduction
order (the gradient is summed over two ranks' micro-batches instead of one rank's; advantage moments and the
loss normaliser are all-reduced): grad norms agree to 1e-5 relative. Weights: Adam turns a gradient's
relative rounding error into an absolute weight error of about lr x that error per step (more where a
gradient is near zero), so the bound is absolute, 2e-5 = lr / 500 (lr = 1e-2; measured max 4.3e-6 after 3
steps). Any real divergence (another sampled token, another kept group) moves weights by O(lr) per step and
fails it. The losses themselves are ~1e-8 here (advantages have batch mean zero), so they are compared
absolutely, to 1e-7.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from questa_nemo.algo.loss import LossStats

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from launch import torchrun  # noqa: E402

STEPS = 3
EXACT = ("reward/", "filter/", "rollout/length", "rollout/truncated")


def run(run_dir: Path, nproc: int) -> tuple[list[dict], dict[str, list[str]], dict[str, torch.Tensor]]:
    torchrun("grpo_dp_worker.py", str(run_dir), str(STEPS), nproc=nproc, timeout=300)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples: dict[str, list[str]] = {}
    for r in range(nproc):
        part = json.loads((run_dir / f"samples_rank{r}.json").read_text())
        assert not samples.keys() & part.keys(), "a prompt was sampled on two ranks"
        samples.update(part)
    return metrics, samples, torch.load(run_dir / "weights.pt", weights_only=True)


def test_dp2_samples_and_trains_what_dp1_does(tmp_path):
    one, two = run(tmp_path / "dp1", 1), run(tmp_path / "dp2", 2)
    (m1, s1, w1), (m2, s2, w2) = one, two
    assert s2 == s1  # every prompt's group: the same completion tokens, sample by sample
    assert len({t for texts in s1.values() for t in texts}) > 16, "hardly sampled anything different"
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == list(range(1, STEPS + 1))
    assert sum(m["filter/prompt_batches"] for m in m1) > STEPS, "no step refilled: filtering was not exercised"
    assert sum(m["filter/dropped_all_correct"] + m["filter/dropped_all_wrong"] for m in m1) > 0
    for a, b in zip(m1, m2):
        for key, value in a.items():
            if key.startswith(EXACT):
                assert b[key] == value, (a["step"], key)
        assert b["actor/grad_norm"] == pytest.approx(a["actor/grad_norm"], rel=1e-5)
        assert b["actor/entropy"] == pytest.approx(a["actor/entropy"], rel=1e-5)
        assert b["actor/loss"] == pytest.approx(a["actor/loss"], abs=1e-7)
        for key in LossStats.from_sums({}).metrics():  # every loss stat, merged over two ranks as over one
            assert b[f"actor/{key}"] == pytest.approx(a[f"actor/{key}"], rel=1e-5, abs=1e-7), (a["step"], key)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=2e-5, msg=name)
