"""torchrun worker: TensorRT-LLM refit at rollout TP = 2 through the real all-gather over megatron's
model-parallel group (gloo, 2 CPU processes), against the signature-checking fake engine (tests/trtllm_api.py).

Launched by tests/test_rollout_trtllm.py. Rank r stands for the GPU "GPU-r"; the fake engine's worker r sits on
that GPU and must load rank r's copy of every tensor. Exits non-zero on any mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))  # tests/: trtllm_api
import trtllm_api  # noqa: E402

from questa_nemo.config import ModelConfig  # noqa: E402
from questa_nemo.model.parallel import (  # noqa: E402
    destroy_distributed,
    init_distributed,
    model_parallel_all_gather_object,
)
from questa_nemo.rollout import trtllm  # noqa: E402
from questa_nemo.rollout.base import SamplingParams  # noqa: E402


class _Modules:
    """monkeypatch.setitem's shape, writing for good (this process ends after the check)."""

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value


def rebuild(uuid, name, tensor, _a, _b, _c, device_id):
    """A handle's rebuild function: module level, so it pickles through the all-gather like torch's own."""
    return uuid, tensor.clone()


def main() -> None:
    info = init_distributed(ModelConfig(params_dtype="fp32", tensor_parallel=2))
    uuids = ("GPU-0", "GPU-1")
    engine = trtllm_api.install(_Modules, worker_uuids=uuids)
    me = uuids[info.rank]

    trtllm._device_uuid = lambda: me
    trtllm._share_bucket = lambda bucket: ([], [(n, (rebuild, (me, n, t, 0, 0, 0, None))) for n, t in bucket])

    weights = [("a", torch.full((6,), float(info.rank))), ("b", torch.full((4,), 10.0 + info.rank))]
    options = trtllm.TRTLLMOptions(tensor_parallel=2, refit_bucket_bytes=32)
    backend = trtllm.TRTLLMBackend(
        "/models/tiny", options, lambda: iter(weights), gather=model_parallel_all_gather_object
    )
    assert backend.leader == (info.rank == 0), (info.rank, backend.leader)
    result = backend.generate([[1, 2, 3]], SamplingParams(n=2, max_new_tokens=1))
    assert [c.token_ids for c in result.completions[0]] == [[3], [4]], result.completions
    backend.sleep()
    backend.update_weights(1)
    if info.rank == 0:
        assert [m for m, _ in engine.rpc] == ["sleep"] + ["update_weights"] * 3, engine.rpc
        for r, worker in enumerate(engine.workers):
            assert {n: origin for n, (origin, _) in worker.loaded.items()} == {"a": uuids[r], "b": uuids[r]}
            assert torch.equal(worker.loaded["b"][1], torch.full((4,), 10.0 + r))
            assert worker.finalised == 1
    else:
        assert backend.llm is None and engine.init is None
    print(f"rank {info.rank}: trtllm refit ok")
    destroy_distributed()


if __name__ == "__main__":
    main()
