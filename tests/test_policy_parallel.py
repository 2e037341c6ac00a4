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

from policy_common import TINY_HF, build_policy, hf_weights, merged_weights, run_worker, write_hf_folder  # noqa: E402

from questa_nemo.model.checkpoint import load_model_checkpoint  # noqa: E402
from questa_nemo.model.convert import ModelShape, ShardLayout, megatron_to_hf  # noqa: E402
from questa_nemo.model.parallel import destroy_distributed  # noqa: E402


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_hf_folder(tmp_path_factory.mktemp("hf"))


def train_result(tmp_path_factory, hf_folder, tp: int, pp: int, dp: int = 1, vp: int | None = None):
    """Stats, merged updated weights, proximal log-probs (dp = 1 only) and the output folder of one run."""
    out = tmp_path_factory.mktemp(f"train_tp{tp}_pp{pp}_dp{dp}_vp{vp}")
    flags = [f"--vp={vp}"] if vp else []
    if dp > 1:  # also a checkpoint, written by both replicas (fully parallel save)
        flags.append(f"--ckpt={out / 'ckpt'}")
    run_worker(
        tp * pp * dp, "train", f"--tp={tp}", f"--pp={pp}", f"--out={out}", f"--hf-folder={hf_folder}", *flags
    )
    stats = json.loads((out / "stats.json").read_text())
    logprobs = load_file(str(out / "logprobs.safetensors")) if dp == 1 else {}
    return stats, merged_weights(out), logprobs, out


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
    dp2: each replica packs half of the sequences; the normaliser counts the whole batch's loss tokens;
    it also checks the checkpoint both replicas wrote.
    """
    ref_stats, ref_weights, ref_logprobs, _ = reference
    stats, weights, logprobs, out = train_result(tmp_path_factory, hf_folder, tp, pp, dp, vp)
    assert stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)
    assert stats["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-4)
    assert weights.keys() == ref_weights.keys()
    initial = hf_weights()
    for name, ref in ref_weights.items():
        assert not torch.equal(ref, initial[name]), f"{name} did not move"
        torch.testing.assert_close(weights[name], ref, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    for key, value in logprobs.items():
        torch.testing.assert_close(value, ref_logprobs[key], rtol=1e-4, atol=1e-5)
    if dp > 1:
        assert_dp_checkpoint_loads_in_one_process(out)


def assert_dp_checkpoint_loads_in_one_process(out: Path) -> None:
    """The fully parallel save split the shards over both DP ranks (gloo); one process reads them all back."""
    ckpt = out / "ckpt"
    writers = {p.name.split("_")[2] for p in (ckpt / "model").glob("__*_*.distcp")}
    assert writers == {"0", "1"}, f"shards written by ranks {writers} only"
    policy = build_policy(weights={k: torch.zeros_like(v) for k, v in hf_weights().items()})
    try:
        load_model_checkpoint(policy.model_chunks, ckpt)
        sd = {k: v for k, v in policy.modules[0].state_dict().items() if not k.endswith("_extra_state")}
        loaded = megatron_to_hf({ShardLayout(): sd}, ModelShape.from_hf(TINY_HF))
        for name, value in merged_weights(out).items():
            assert torch.equal(loaded[name], value), name
    finally:
        destroy_distributed()
