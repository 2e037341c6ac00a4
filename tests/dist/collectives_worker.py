"""torchrun worker (2 ranks, DP=2): model/parallel.py's loop collectives, and the NCCL-strict guard.

Launched by tests/test_collectives.py through tests/dist/launch.py (QUESTA_NCCL_STRICT=1). Checks that
- Reduce sums, maxes, agrees and gathers over the DP group (and a dedicated gloo copy of it), results on the
  caller's device, inputs untouched;
- the guard rejects a CPU tensor handed straight to torch.distributed by code outside the model layer (the
  bug of issue 17: the loop reduced CPU tensors over an NCCL group), naming the caller, and lets through
  what parallel.py placed and what runs inside `model_tensors()`;
- filtering takes the first kept groups of both ranks in global order, and both ranks draw the same batches.
Exits non-zero on any failure; prints OK.
"""

from __future__ import annotations

import torch

from questa_nemo.algo.filtering import Share, fill_step
from questa_nemo.config import ModelConfig
from questa_nemo.model.parallel import (
    dp_reduce,
    init_distributed,
    install_nccl_strict_guard,
    loop_collectives,
    model_tensors,
    world_reduce,
)
from questa_nemo.train.loop import capture_rng


def main() -> None:
    info = init_distributed(ModelConfig(params_dtype="fp32"))
    assert info.dp_size == 2, info
    assert not install_nccl_strict_guard(), "init_distributed should have installed the guard (QUESTA_NCCL_STRICT=1)"
    rank = info.rank

    # Reduce: results on the caller's device, input untouched
    for reduce in (dp_reduce(), dp_reduce(dedicated=True), world_reduce()):
        x = torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64)
        assert torch.equal(reduce(x), torch.tensor([3.0, 10.0], dtype=torch.float64)), reduce(x)
        assert torch.equal(reduce.max(x), torch.tensor([2.0, 10.0], dtype=torch.float64))
        assert torch.equal(reduce.min(x), torch.tensor([1.0, 0.0], dtype=torch.float64))
        assert torch.equal(x, torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64))
        assert reduce.any(rank == 1) and not reduce.any(False)
        assert reduce.gather_objects({"rank": rank}) == [{"rank": 0}, {"rank": 1}]

    # the guard: a CPU tensor straight to an NCCL-backed collective fails, naming this file
    try:
        torch.distributed.all_reduce(torch.ones(2))
    except RuntimeError as e:
        assert "NCCL-strict" in str(e) and "collectives_worker.py" in str(e), e
    else:
        raise AssertionError("the NCCL-strict guard let a CPU tensor through")
    with model_tensors():  # model tensors (on the GPU in a real run) pass
        t = torch.ones(2)
        torch.distributed.all_reduce(t)
        assert torch.equal(t, torch.full((2,), 2.0))

    # filtering: the step takes the first kept groups of both ranks in global order; rank 0 keeps its group of
    # every batch and rank 1 only in the third, so a target of 2 is met after two batches, both held by rank 0,
    # and both ranks drew both batches (one shared cursor)
    comm = loop_collectives()
    draws = []

    def draw():
        draws.append(len(draws) + 1)
        return [("r0", len(draws), [1.0, 0.0])] if rank == 0 else [("r1", len(draws), [1.0, 1.0 * (len(draws) != 3)])]

    share = Share(rank, 2, 2, comm.rollouts.sum)
    filled = fill_step(draw, lambda g: g[2], 2, 4, 0.05, 0.95, share=share)
    assert filled.full and filled.prompt_batches == 2 and draws == [1, 2], (filled, draws)
    assert [g[:2] for g in filled.groups] == ([("r0", 1), ("r0", 2)] if rank == 0 else []), filled
    filled = fill_step(draw, lambda g: g[2], 4, 4, 0.05, 0.95, share=share)  # batches 3..5: both keep in 3
    assert filled.full and filled.prompt_batches == 3 and filled.surplus == 0, filled
    assert [g[:2] for g in filled.groups] == ([("r0", 3), ("r0", 4), ("r0", 5)] if rank == 0 else [("r1", 3)])

    # each rank's RNG state is its own (the checkpoint keeps one file per rank)
    torch.manual_seed(100 + rank)
    states = world_reduce().gather_objects(capture_rng().torch_rng)
    assert states[0] != states[1]
    print("OK", flush=True)


if __name__ == "__main__":
    main()
