"""Checkpoints: exact resume, atomic writes that survive a failing writer, and loading at another TP."""

import json
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "dist"))
warnings.filterwarnings("ignore", category=UserWarning)

from megatron.core import dist_checkpointing  # noqa: E402
from policy_common import (  # noqa: E402
    TINY_HF,
    build_policy,
    fixed_sequences,
    merged_weights,
    nll_loss,
    run_worker,
    write_hf_folder,
)

from questa_nemo.ckpt.runs import folder_bytes  # noqa: E402
from questa_nemo.model import checkpoint  # noqa: E402
from questa_nemo.model.checkpoint import (  # noqa: E402
    CheckpointDiskFull,
    is_complete,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from questa_nemo.model.convert import ModelShape, ShardLayout, megatron_to_hf  # noqa: E402
from questa_nemo.model.packing import unpack  # noqa: E402
from questa_nemo.model.parallel import destroy_distributed  # noqa: E402


def batch(policy):
    sequences = fixed_sequences()
    return policy.pack(sequences), sum(float(s.loss_mask.sum()) for s in sequences)


def hf_view(policy) -> dict[str, torch.Tensor]:
    sd = {
        k: v.detach().clone()
        for k, v in policy.modules[0].state_dict().items()
        if not k.endswith("_extra_state")
    }
    return megatron_to_hf({ShardLayout(): sd}, ModelShape.from_hf(TINY_HF))


@pytest.fixture
def policy():
    pol = build_policy()
    yield pol
    destroy_distributed()


def test_resume_reproduces_the_next_step_exactly(policy, tmp_path):
    micro_batches, tokens = batch(policy)
    policy.train_step(micro_batches, nll_loss, tokens)
    path = save_checkpoint(policy, tmp_path / "step_1", step=1, hf_config=TINY_HF)
    expected = policy.train_step(micro_batches, nll_loss, tokens)
    expected_weights = hf_view(policy)
    assert is_complete(path) and json.loads((path / "config.json").read_text()) == TINY_HF
    assert not list(tmp_path.glob("*.tmp-*"))

    destroy_distributed()
    resumed = build_policy()
    meta = load_checkpoint(resumed, path)
    assert meta.step == 1 and meta.optimizer_restored and meta.rng_restored
    got = resumed.train_step(micro_batches, nll_loss, tokens)
    assert (got.loss, got.grad_norm, got.lr) == (expected.loss, expected.grad_norm, expected.lr)
    assert all(torch.equal(v, expected_weights[k]) for k, v in hf_view(resumed).items())


def test_failing_writer_leaves_previous_checkpoint_loadable(policy, tmp_path, monkeypatch):
    micro_batches, tokens = batch(policy)
    policy.train_step(micro_batches, nll_loss, tokens)
    first = save_checkpoint(policy, tmp_path / "step_1", step=1)
    saved_weights = hf_view(policy)
    policy.train_step(micro_batches, nll_loss, tokens)

    real_save = dist_checkpointing.save
    calls = []

    def save_then_fail(state_dict, directory, **kwargs):
        calls.append(directory)
        if len(calls) == 2:  # the model is on disk, the optimizer is half written
            (Path(directory) / "partial.distcp").write_bytes(b"\0" * 100)
            raise OSError("disk full (simulated)")
        return real_save(state_dict, directory, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", save_then_fail)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(policy, tmp_path / "step_2", step=2)
    calls.clear()
    with pytest.raises(OSError, match="simulated"):  # overwriting an existing checkpoint fails the same way
        save_checkpoint(policy, first, step=1)
    monkeypatch.setattr(dist_checkpointing, "save", real_save)

    assert not (tmp_path / "step_2").exists() and not list(tmp_path.glob("*.tmp-*"))
    assert is_complete(first) and read_metadata(first).step == 1
    destroy_distributed()
    restored = build_policy()
    load_checkpoint(restored, first)
    assert all(torch.equal(v, saved_weights[k]) for k, v in hf_view(restored).items())


def test_checkpoint_larger_than_the_free_space_is_refused_before_writing(policy, tmp_path, monkeypatch):
    micro_batches, tokens = batch(policy)
    policy.train_step(micro_batches, nll_loss, tokens)
    needs = []
    real_check = checkpoint._check_disk
    monkeypatch.setattr(checkpoint, "_check_disk", lambda *a: needs.append(real_check(*a)) or needs[-1])
    first = save_checkpoint(policy, tmp_path / "step_1", step=1)
    # the estimate counts the model and the optimizer state: its tensor bytes are what the two folders hold,
    # within their headers and metadata
    tensor_bytes = (needs[0] - checkpoint._DISK_SLACK) / checkpoint._DISK_OVERHEAD
    written = folder_bytes(first / "model") + folder_bytes(first / "optimizer")
    assert 0.8 * written <= tensor_bytes <= written, (tensor_bytes, written)

    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: needs[0] - 1)
    with pytest.raises(CheckpointDiskFull, match=r"not enough disk space for checkpoint .*step_2: it needs about"):
        save_checkpoint(policy, tmp_path / "step_2", step=2)
    assert not (tmp_path / "step_2").exists() and not list(tmp_path.glob("*.tmp-*"))
    assert is_complete(first) and read_metadata(first).step == 1


def test_disk_full_is_recognised_in_what_megatron_raises():
    from torch.distributed.checkpoint.api import CheckpointException

    short = RuntimeError("Worker failure: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert checkpoint._disk_filled(CheckpointException("write", {0: (short, traceback.StackSummary())}))
    assert checkpoint._disk_filled(OSError(28, "No space left on device"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(122, "Disk quota exceeded")
    assert checkpoint._disk_filled(wrapped)
    assert not checkpoint._disk_filled(RuntimeError("Worker failure: CUDA error"))
    assert not checkpoint._disk_filled(OSError(13, "Permission denied"))
    # megatron-core 0.17+ (thread writers) drops the errno: free space below the save's need decides
    threads = RuntimeError("Worker failure: An error is caught while starting worker 0, error: <class 'OSError'>")
    failed = CheckpointException("write", {0: (threads, traceback.StackSummary())})
    assert not checkpoint._disk_filled(failed)
    assert checkpoint._ran_out_of_space(failed, free=10, need=100)
    assert not checkpoint._ran_out_of_space(failed, free=100, need=100)  # room left: some other OSError
    assert not checkpoint._ran_out_of_space(RuntimeError("Worker failure: CUDA error"), free=0, need=100)
    assert checkpoint._ran_out_of_space(short, free=10**12, need=1)


def test_directory_without_marker_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step_3" / "model").mkdir(parents=True)
    assert not is_complete(tmp_path / "step_3")
    with pytest.raises(FileNotFoundError, match="step_3: not a complete checkpoint"):
        read_metadata(tmp_path / "step_3")


@pytest.mark.slow
def test_saved_at_tp2_loads_at_tp1(tmp_path):
    """Weights and optimizer state reshard: the TP=1 run continues exactly where the TP=2 run went on."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    hf_folder = write_hf_folder(tmp_path / "hf")
    run_worker(2, "save", "--tp=2", f"--out={out}", f"--ckpt={ckpt}", f"--hf-folder={hf_folder}")
    meta = read_metadata(ckpt)
    assert (meta.tensor_parallel, meta.world_size) == (2, 2)
    tp2_next = json.loads((out / "stats.json").read_text())
    tp2_logprobs = load_file(str(out / "saved_logprobs.safetensors"))

    policy = build_policy(weights={k: torch.zeros_like(v) for k, v in merged_weights(out).items()})
    try:
        meta = load_checkpoint(policy, ckpt)
        assert meta.optimizer_restored and not meta.rng_restored  # RNG states are per rank
        micro_batches, tokens = batch(policy)
        result = policy.logprobs(micro_batches)
        for i, (lp, ent) in enumerate(zip(result.logprobs, result.entropy)):
            torch.testing.assert_close(lp, tp2_logprobs[f"logprobs{i}"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ent, tp2_logprobs[f"entropy{i}"], rtol=1e-5, atol=1e-5)
        step = policy.train_step(micro_batches, nll_loss, tokens)
        assert step.loss == pytest.approx(tp2_next["loss"], rel=1e-5)
        assert step.grad_norm == pytest.approx(tp2_next["grad_norm"], rel=1e-4)
        tp2_weights = merged_weights(out)
        for name, value in hf_view(policy).items():
            torch.testing.assert_close(value, tp2_weights[name], rtol=1e-4, atol=1e-5, msg=name)
        assert len(unpack(result.logprobs, micro_batches, 7)) == 7
    finally:
        destroy_distributed()
