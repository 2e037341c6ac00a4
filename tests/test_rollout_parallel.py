"""Rollout for sharded policies (torchrun, 2 CPU processes, gloo): at TP=2 and PP=2 the megatron engine (on a
gathered replica) and the hf backend, both built through the registry, give TP=1's tokens - greedy and
sampled - and log-probs, before and after a train step and its refit; every rank of the group gets the same."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from launch import torchrun  # noqa: E402
from rollout_worker import write_scaled_hf_folder  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_scaled_hf_folder(tmp_path_factory.mktemp("hf_scaled"))


def run(tmp_path_factory, hf_folder, tp: int, pp: int) -> list[dict]:
    out = tmp_path_factory.mktemp(f"rollout_tp{tp}_pp{pp}")
    torchrun("rollout_worker.py", f"--tp={tp}", f"--pp={pp}", f"--out={out}", f"--hf-folder={hf_folder}",
             nproc=tp * pp, timeout=300)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(tp * pp)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hf_folder):
    return run(tmp_path_factory, hf_folder, 1, 1)[0]


def test_single_rank_refit_and_backends_agree(reference):
    megatron, hf = reference["megatron"], reference["hf"]
    assert megatron["shares_trainer_weights"] and not hf["shares_trainer_weights"]
    for phase, version in (("before", [0]), ("after", [1])):
        assert megatron[phase]["greedy_versions"] == megatron[phase]["sampled_versions"] == version
        assert hf[phase]["greedy"] == megatron[phase]["greedy"], phase  # hf took the trainer's weights
    before, after = megatron["before"]["greedy_logprobs"], megatron["after"]["greedy_logprobs"]
    assert before != after, "the train step did not reach the rollout"


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_sharded_rollouts_equal_tp1(tmp_path_factory, hf_folder, reference, tp, pp):
    ranks = run(tmp_path_factory, hf_folder, tp, pp)
    assert all(r == ranks[0] for r in ranks), "ranks of one model-parallel group generated different rollouts"
    got = ranks[0]
    assert not got["megatron"]["shares_trainer_weights"]  # a gathered replica
    for backend in ("megatron", "hf"):
        for phase in ("before", "after"):
            ours, ref = got[backend][phase], reference[backend][phase]
            assert ours["greedy"] == ref["greedy"], (backend, phase)
            assert ours["sampled"] == ref["sampled"], (backend, phase)
            assert ours["sampled_versions"] == ref["sampled_versions"]
            for key in ("greedy_logprobs", "sampled_logprobs"):
                for a, b in zip(ours[key], ref[key]):
                    # before: the same weights bit for bit; after: one train step at TP/PP=2 (weights within
                    # the 1e-4 relative of tests/test_policy_parallel.py)
                    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)
