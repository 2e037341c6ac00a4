"""TP=2 and PP=2 train steps (two torchrun processes, gloo) match TP=1: loss, grad norm, updated weights."""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "dist"))
warnings.filterwarnings("ignore", category=UserWarning)

from policy_common import hf_weights, merged_weights, run_worker, write_hf_folder  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("hf"))


def train_result(tmp_path_factory, hf_folder, tp: int, pp: int, dp: int = 1, vp: int | None = None):
    out = tmp_path_factory.mktemp(f"train_tp{tp}_pp{pp}_dp{dp}_vp{vp}")
    flags = [f"--vp={vp}"] if vp else []
    run_worker(
        tp * pp * dp, "train", f"--tp={tp}", f"--pp={pp}", f"--out={out}", f"--hf-folder={hf_folder}", *flags
    )
    stats = json.loads((out / "stats.json").read_text())
    logprobs = load_file(str(out / "logprobs.safetensors")) if dp == 1 else {}
    return stats, merged_weights(out), logprobs


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hf_folder):
    return train_result(tmp_path_factory, hf_folder, tp=1, pp=1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "tp,pp,dp,vp",
    [(2, 1, 1, None), (1, 2, 1, None), (1, 1, 2, None), (1, 2, 1, 2)],
    ids=["tp2", "pp2", "dp2", "pp2_vp2"],
)
def test_parallel_step_matches_tp1(tmp_path_factory, hf_folder, reference, tp, pp, dp, vp):
    """Same loss, grad norm and updated weights (and proximal log-probs) as one process on the whole batch.

    pp2 runs 1F1B, pp2_vp2 the interleaved schedule (two chunks of one layer per stage).
    dp2: each replica packs half of the sequences; the normaliser counts the whole batch's loss tokens.
    """
    ref_stats, ref_weights, ref_logprobs = reference
    stats, weights, logprobs = train_result(tmp_path_factory, hf_folder, tp, pp, dp, vp)
    assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-4)
    assert weights.keys() == ref_weights.keys()
    initial = hf_weights()
    for name, ref in ref_weights.items():
        assert not torch.equal(ref, initial[name]), f"{name} did not move"
        torch.testing.assert_close(weights[name], ref, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    for key, value in logprobs.items():
        torch.testing.assert_close(value, ref_logprobs[key], rtol=1e-4, atol=1e-5)
