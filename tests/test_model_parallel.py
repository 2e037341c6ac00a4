"""Converted Megatron models match transformers at TP=2, PP=2 and PP=2 x VP=2 (torchrun, 2 CPU processes, gloo).

Each run also checks the layer placement of every pipeline chunk and the chunked log-prob head
(`final_hidden_states` -> `chunked_logprobs`) against the gathered logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import torchrun  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize(
    "kinds,parallel,last_stage_ranks",
    [
        (["qwen2", "llama"], ["--tp", "2"], 2),
        (["qwen2", "llama"], ["--pp", "2"], 1),  # llama: tied embeddings across stages
        (["qwen2"], ["--pp", "2", "--vp", "2"], 1),
    ],
    ids=["tp2", "pp2", "pp2vp2"],
)
def test_logits_and_logprob_head_match_transformers(kinds, parallel, last_stage_ranks):
    out = torchrun("parity_worker.py", "--kinds", *kinds, *parallel)
    for kind in kinds:
        assert out.count(f"{kind} logits match") == last_stage_ranks, out[-3000:]
    assert out.count("chunked log-prob head matches") == last_stage_ranks * len(kinds)
