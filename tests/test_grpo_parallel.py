"""Full GRPO steps at TP=2, PP=2 and DP=2 (torchrun, 2 CPU processes, gloo) against one process: generate,
score, filter, advantages, log-probs, update, refit, validation and the final checkpoint, all through
`questa-nemo train` on the tiny world model (4 layers here, so PP=2 splits it).

The reference run warms the model up (supervised) so that rewards are not all zero, then trains 3 GRPO steps;
the parallel runs start from its warm-up checkpoint (loaded at their own TP / PP) and train the same 3 steps.
TP=2, PP=2 and DP=2 must give the reference's rewards exactly (the rollouts are the same tokens) and its losses
and final weights within 1e-4 relative (the reductions are split differently); rollout.backend=hf must train
too. DP=2 samples what one rank samples because the sampling noise is keyed per sequence (prompt position in
the whole batch, sample, completion position) and filtering keeps the first kept groups in that global order.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))

from grpo_common import CLOSE, EXACT, STEPS, WARMUP, final_weights, train, world_model_config  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    hf_config = world_model_config(root / "model")
    run_dir = root / "tp1"
    metrics = train(run_dir, root / "data", hf_config, *WARMUP, nproc=1)
    return root, hf_config, run_dir, metrics


def start_from(reference) -> list[str]:
    _, _, run_dir, _ = reference
    return [f"model.checkpoint={run_dir / 'warmup' / 'checkpoint'}", "train.warmup.steps=0"]


def test_reference_learns_something_to_compare(reference):
    _, _, _, metrics = reference
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert any(m.get("actor/loss", 0.0) != 0.0 for m in metrics), "no step trained: the comparison is empty"
    assert sum(m["filter/kept_groups"] for m in metrics) >= 2, "filtering kept almost nothing: little to compare"
    assert "eval/pass@1" in metrics[1]


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["model.tensor_parallel=2"], ["model.pipeline_parallel=2"], []],
                         ids=["tp2", "pp2", "dp2"])
def test_grpo_steps_match_one_process(reference, layout):
    root, hf_config, ref_dir, ref_metrics = reference
    run_dir = root / (layout[0].split("=")[0].split(".")[1] if layout else "data_parallel")
    metrics = train(run_dir, root / "data", hf_config, *start_from(reference), *layout)
    assert len(metrics) == len(ref_metrics)
    for ours, ref in zip(metrics, ref_metrics):
        for key, value in ref.items():
            if key.startswith(EXACT):
                assert ours[key] == value, (ours["step"], key)
            elif key in CLOSE:
                assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (ours["step"], key)
    ref_weights, weights = final_weights(ref_dir, hf_config), final_weights(run_dir, hf_config)
    assert weights.keys() == ref_weights.keys()
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights[name], ref, rtol=1e-4, atol=1e-6, msg=name)


def test_hf_backend_trains_and_evaluates_from_the_cli(reference):
    """rollout=hf reached from `questa-nemo train` (rollouts, refit, validation) and from eval's checkpoint path."""
    root, hf_config, ref_dir, _ = reference
    metrics = train(root / "hf", root / "data", hf_config, *start_from(reference), "rollout=hf", nproc=1)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert sum(m["filter/kept_groups"] for m in metrics) >= 1 and "eval/pass@1" in metrics[1]
    for m in metrics:
        assert all(not isinstance(v, float) or v == v for k, v in m.items() if k.startswith("actor/")), m

    from questa_nemo.config import load_config
    from questa_nemo.eval.backend import backend_for_checkpoint
    from questa_nemo.model.parallel import destroy_distributed
    from questa_nemo.rollout import SamplingParams
    from questa_nemo.rollout.hf import HFBackend

    cfg = load_config("default", [f"model.hf_config={hf_config}", "rollout=hf"])
    try:
        backend = backend_for_checkpoint(cfg, str(ref_dir / "hint"))
        assert isinstance(backend, HFBackend)
        result = backend.generate([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=4, temperature=0.0))
        a, b = (c.token_ids for c in result.completions[0])
        assert a == b and len(a) == 4  # greedy, no stop tokens given
    finally:
        destroy_distributed()
