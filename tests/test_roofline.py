"""bench/roofline.py: the memory roofline a rollout row is measured against."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import roofline  # noqa: E402
from shapes import QWEN25_1P5B  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"


def test_the_cards_bandwidth_by_the_name_torch_gives():
    assert roofline.card_bandwidth(H100) == 3.35e12
    assert roofline.card_bandwidth("NVIDIA H100 PCIe") == 2.0e12  # not the SXM figure
    assert roofline.card_bandwidth("NVIDIA H200") == 4.8e12
    assert roofline.card_bandwidth("cpu") is None


def test_the_bytes_a_qwen25_1p5b_decode_step_reads():
    b = roofline.decode_bytes(QWEN25_1P5B)
    assert b.kv_per_position == 28 * 2 * 2 * 128 * 2  # layers x (k, v) x kv heads x head dim x bf16
    # 1.31 B layer parameters + the 151,936 x 1,536 output head, in bf16: the issue's "~3.1 GB of weights"
    assert 3.05e9 < b.weights < 3.12e9


def test_the_fixed_row_of_issue_21_is_bound_near_47k_on_an_h100():
    """256 x (1K prompt + 2K new tokens): the issue's own estimate is ~5.4 ms a step, ~47K tok/s."""
    lengths = [[2048] * 16 for _ in range(16)]
    bound = roofline.rollout_roofline(lengths, 1024, QWEN25_1P5B, 3.35e12)
    assert bound["steps"] == 2048 and 46_000 < bound["tokens_per_second"] < 48_500
    assert 5.2 < 1000 * bound["seconds"] / 2048 < 5.6
    shared = roofline.rollout_roofline(lengths, 1024, QWEN25_1P5B, 3.35e12, shared_prompt=True)
    assert shared["tokens_per_second"] > bound["tokens_per_second"]  # 16 samples read their prompt once


def test_sequences_stop_at_their_own_lengths():
    hf = {**QWEN25_1P5B}
    b = roofline.decode_bytes(hf)
    bound = roofline.rollout_roofline([[1, 3]], 10, hf, 1.0)  # one prompt, two samples of 1 and 3 tokens
    # step 0: both read 10 + 1 positions; steps 1, 2: the second alone reads 12, 13
    assert bound["bytes"] == 3 * b.weights + b.kv_per_position * (2 * 11 + 12 + 13)
    assert bound["steps"] == 3 and bound["tokens_per_second"] == 4 / bound["seconds"]
    shared = roofline.rollout_roofline([[1, 3]], 10, hf, 1.0, shared_prompt=True)
    assert shared["bytes"] == bound["bytes"] - 10 * b.kv_per_position  # the prompt once at step 0
    alone = roofline.rollout_roofline([[1], [3]], 10, hf, 1.0, shared_prompt=True)
    assert alone["bytes"] == bound["bytes"]  # one sample a prompt: nothing to share


def test_a_measured_json_against_its_bounds():
    """The rows of a checked-in H100 result rebuilt from its arguments: the realistic draw has the mean the
    run recorded (to a token of 484,019: torch 2.11's float rounding there, 2.13's here), and the fused sampler's fixed row is ~81% of its per-sequence bound."""
    path = BENCH / "results" / "rollout_fused_sampler_h100.json"
    result = json.loads(path.read_text())
    lengths = roofline.row_lengths(result, "realistic")
    flat = [n for row in lengths for n in row]
    assert sum(flat) / len(flat) == pytest.approx(result["realistic"]["drawn_lengths"]["mean"], abs=2 / 512)
    assert max(flat) == result["realistic"]["drawn_lengths"]["max"]
    report = roofline.report(str(path))
    assert report["fixed"]["fraction"]["paged_fs"]["per_sequence"] == pytest.approx(0.806, abs=0.005)
    realistic = report["realistic"]
    assert 27_000 < realistic["bound"]["per_sequence"]["tokens_per_second"] < 28_500
    assert realistic["bound"]["shared_prompt"]["tokens_per_second"] > 33_000
    assert roofline.row_lengths(result, "recipe") is None  # a row that run skipped


def test_a_cpu_row_has_no_bound():
    assert roofline.row_bounds([[4, 4]], 8, QWEN25_1P5B, "cpu") is None


def test_a_row_with_more_sequences_than_slots_admits_them_as_slots_free():
    hf = {**QWEN25_1P5B}
    b = roofline.decode_bytes(hf)
    # one prompt, samples of 2, 1, 3 tokens, 2 slots: the third starts at step 1, where the 1-token one freed
    bound = roofline.rollout_roofline([[2, 1, 3]], 10, hf, 1.0, slots=2)
    # step 0: 11 + 11; step 1: 12 (first) + 11 (third); steps 2, 3: the third alone reads 12, 13
    assert bound["steps"] == 4 and bound["bytes"] == 4 * b.weights + b.kv_per_position * (22 + 23 + 12 + 13)
    shared = roofline.rollout_roofline([[2, 1, 3]], 10, hf, 1.0, shared_prompt=True, slots=2)
    # the prompt once a step over 4 steps instead of 6 sequence-steps
    assert shared["bytes"] == bound["bytes"] - 2 * 10 * b.kv_per_position
    for lengths in ([[2, 1, 3]], [[5, 1], [3, 3]]):  # slots for every sequence: the unslotted bound
        for flag in (False, True):
            assert roofline.rollout_roofline(lengths, 7, hf, 1.0, flag, slots=8) == roofline.rollout_roofline(
                lengths, 7, hf, 1.0, flag
            )


def test_fewer_slots_lower_the_bound_of_the_realistic_row():
    from shapes import row_draw

    lengths = row_draw("realistic", 512, 16, 1024.0, 1.2, 8192)
    every = roofline.rollout_roofline(lengths, 1024, QWEN25_1P5B, 3.35e12)
    half = roofline.rollout_roofline(lengths, 1024, QWEN25_1P5B, 3.35e12, slots=256)
    assert half["tokens_per_second"] < every["tokens_per_second"] and half["steps"] >= every["steps"]
    bounds = roofline.row_bounds(lengths, 1024, QWEN25_1P5B, H100, slots=256)
    assert bounds["slots"] == 256
    assert bounds["per_sequence"]["tokens_per_second"] == pytest.approx(half["tokens_per_second"])
    assert "slots" not in roofline.row_bounds(lengths, 1024, QWEN25_1P5B, H100, slots=512)


def test_the_bound_split_by_live_sequences():
    hf = {**QWEN25_1P5B}
    split = roofline.by_live([[2, 1, 3]], 10, hf, 1.0, slots=2)  # live 2, 2, 1, 1 over 4 steps
    assert split["1-8"]["steps"] == 4 and split["1-8"]["tokens"] == 6
    assert split["1-8"]["floor_seconds"] == roofline.rollout_roofline([[2, 1, 3]], 10, hf, 1.0, slots=2)["bytes"]
    assert split["129+"] == {"steps": 0, "tokens": 0, "floor_seconds": 0.0}


def test_the_realistic_rows_tail_alone_takes_most_of_its_goal():
    """Issue 21's realistic goal, 25,000 tok/s on the 512-sequence row, leaves 19.4 s for 484,020 tokens; the
    steps decoding 32 or fewer sequences (5,260 of 8,192) are bound to 8.0 s by the weights and their keys."""
    from shapes import row_draw

    lengths = row_draw("realistic", 512, 16, 1024.0, 1.2, 8192)
    split = roofline.by_live(lengths, 1024, QWEN25_1P5B, 3.35e12)
    whole = roofline.rollout_roofline(lengths, 1024, QWEN25_1P5B, 3.35e12)
    assert sum(b["steps"] for b in split.values()) == whole["steps"] == 8192
    assert sum(b["floor_seconds"] for b in split.values()) == pytest.approx(whole["seconds"])
    tail = [split["1-8"], split["9-32"]]
    assert sum(b["steps"] for b in tail) == 5260
    assert 7.9 < sum(b["floor_seconds"] for b in tail) < 8.1
    assert 19.3 < sum(sum(row) for row in lengths) / 25_000 < 19.5
