"""The memory roofline of a rollout: the fastest a decode could go if every step only read what it must.

A decode step of a dense model must read every weight it multiplies by (the layers and the output head; the
embedding is a gather of B rows, left out) and, for each live sequence, the keys and values of its context. At a
card's peak memory bandwidth that bounds the step's time from below; summed over the steps of a rollout whose
sequences stop at their own lengths, it bounds the rollout's output tokens/s from above. Prefill, the sampler's
logits, activations and launch gaps are left out, so the bound is loose in our favour: a measured fraction of it
understates nothing.

Two bounds: `per_sequence` reads each sequence's prompt keys on its own (what a paged kernel without prefix
sharing does from HBM); `shared_prompt` reads a prompt's keys once a step for all its samples (a cascade kernel,
or L2 serving the repeats). The fixed row of issue 21 (256 x (1K + 2K), H100): ~47,000 tok/s per sequence.

    python bench/roofline.py bench/results/rollout_{paged_h100_run1,fixed_newsampler_h100,fused_h100}.json \
        bench/results/rollout_{fused_sampler,tile_rule,norms,fixed_norms,recipe_norms}_h100.json \
        > bench/results/rollout_roofline_h100.json
"""

from __future__ import annotations

import heapq
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from shapes import row_draw

# Peak HBM bandwidth (bytes/s) by the name torch.cuda.get_device_name() gives; the first match wins, so the
# more specific names come first. From NVIDIA's data sheets.
PEAK_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),  # H100 SXM (80GB HBM3)
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
)


def card_bandwidth(device_name: str) -> float | None:
    """Peak memory bandwidth of the card torch names `device_name` (bytes/s), None for a card not listed."""
    for key, bandwidth in PEAK_BANDWIDTH:
        if key.lower() in device_name.lower():
            return bandwidth
    return None


@dataclass(frozen=True)
class DecodeBytes:
    weights: int  # bytes a step reads from weights (layers + output head)
    kv_per_position: int  # bytes of keys and values one position holds over all layers


def decode_bytes(hf: dict, bytes_per_value: int = 2) -> DecodeBytes:
    """What a decode step of the Llama / Qwen2-shaped model `hf` (a config.json dict) reads, in bf16 by default."""
    h, inter, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    bias = q + 2 * kv if hf.get("model_type") == "qwen2" else 0  # Qwen2: q / k / v biases
    per_layer = h * (q + 2 * kv) + bias + q * h + 3 * h * inter + 2 * h  # qkv, o, SwiGLU, two norms
    params = layers * per_layer + h + hf["vocab_size"] * h  # + final norm + output head
    return DecodeBytes(params * bytes_per_value, layers * 2 * kv * bytes_per_value)


def _admitted(lengths: list[list[int]], slots: int) -> list[list[int]]:
    """The step each sequence starts decoding at when at most `slots` decode at once and they are admitted in
    draw order (prompt by prompt, sample by sample), each into the first slot that frees: a sequence of n
    tokens started at step a decodes steps a .. a + n - 1, and its slot takes the next one at step a + n."""
    free = [0] * slots  # the step each slot is free from (a heap)
    starts = []
    for row in lengths:
        starts.append([])
        for n in row:
            a = heapq.heappop(free)
            starts[-1].append(a)
            heapq.heappush(free, a + n)
    return starts


def step_reads(
    lengths: list[list[int]], prompt_len: int, b: DecodeBytes, slots: int | None = None, shared: bool = False
) -> list[tuple[int, int]]:
    """(live sequences, bytes read) of each decode step of a rollout whose sequences decode `lengths`
    [prompt][sample] tokens after prompts of `prompt_len`: every step reads the weights; a live sequence at its
    k-th step (0-based) reads prompt_len + k + 1 positions of keys and values (the new one included), its
    prompt's part once a step per prompt with a live sample when `shared`. slots: at most this many decode at
    once (_admitted's schedule); None: all from step 0."""
    flat = [n for row in lengths for n in row]
    starts = _admitted(lengths, slots or max(len(flat), 1))
    steps = max(a + n for row, srow in zip(lengths, starts) for n, a in zip(row, srow))
    count, start_sum, prompts = [0] * (steps + 1), [0] * (steps + 1), [0] * (steps + 1)
    for row, srow in zip(lengths, starts):
        spans = sorted((a, a + n) for n, a in zip(row, srow) if n > 0)
        for a, e in spans:  # difference arrays: live count and the sum of live start steps
            count[a] += 1
            count[e] -= 1
            start_sum[a] += a
            start_sum[e] -= a
        merged: list[list[int]] = []  # the steps at least one sample of this prompt is live
        for a, e in spans:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([a, e])
        for a, e in merged:
            prompts[a] += 1
            prompts[e] -= 1
    out, live, sums, live_prompts = [], 0, 0, 0
    for s in range(steps):
        live, sums, live_prompts = live + count[s], sums + start_sum[s], live_prompts + prompts[s]
        generated = (s + 1) * live - sums  # sum over live sequences of (s - start + 1)
        read_prompts = live_prompts if shared else live
        out.append((live, b.weights + b.kv_per_position * (generated + prompt_len * read_prompts)))
    return out


def _summed(reads: list[tuple[int, int]], tokens: int, bandwidth: float) -> dict:
    """The bound of step_reads' steps: seconds at `bandwidth` bytes/s and output tokens/s."""
    total = sum(r for _, r in reads)
    seconds = total / bandwidth
    return {"seconds": seconds, "tokens_per_second": tokens / seconds, "bytes": total, "steps": len(reads)}


def rollout_roofline(
    lengths: list[list[int]],
    prompt_len: int,
    hf: dict,
    bandwidth: float,
    shared_prompt: bool = False,
    slots: int | None = None,
) -> dict:
    """The bound for completions of `lengths` [prompt][sample] tokens after prompts of `prompt_len` tokens:
    seconds of decode and output tokens/s at `bandwidth` bytes/s, summed over step_reads' steps. slots: at most
    this many sequences decode at once (an engine's max_batch_sequences), later ones admitted in draw order
    as slots free; None: all decode from step 0."""
    reads = step_reads(lengths, prompt_len, decode_bytes(hf), slots, shared_prompt)
    return _summed(reads, sum(map(sum, lengths)), bandwidth)


LIVE_BUCKETS = (8, 32, 128)  # by_live's upper edges; the last bucket takes the rest


def _split_by_live(reads: list[tuple[int, int]], bandwidth: float) -> dict:
    """step_reads' steps in buckets of live sequences: each bucket's steps, output tokens and floor seconds.
    Every step has a live sequence (a slot that frees takes the next one at once), so none is left out."""
    edges = [0, *LIVE_BUCKETS]
    names = [f"{lo + 1}-{hi}" for lo, hi in zip(edges, edges[1:])] + [f"{edges[-1] + 1}+"]
    out = {name: {"steps": 0, "tokens": 0, "floor_seconds": 0.0} for name in names}
    for live, read in reads:
        bucket = out[names[sum(live > e for e in LIVE_BUCKETS)]]
        bucket["steps"] += 1
        bucket["tokens"] += live
        bucket["floor_seconds"] += read / bandwidth
    return out


def by_live(
    lengths: list[list[int]], prompt_len: int, hf: dict, bandwidth: float, slots: int | None = None
) -> dict:
    """The per-sequence bound split by how many sequences a step decodes ("1-8", "9-32", "33-128", "129+"):
    each bucket's steps, output tokens and floor in seconds. Where a rollout's time goes at its tail: steps
    of a few sequences are bound by the weights alone."""
    return _split_by_live(step_reads(lengths, prompt_len, decode_bytes(hf), slots), bandwidth)


def row_bounds(
    lengths: list[list[int]], prompt_len: int, hf: dict, device_name: str, slots: int | None = None
) -> dict | None:
    """Both bounds of a benchmark row on the card `device_name` (None where its bandwidth is not listed), at
    most `slots` sequences at once when the row has more (rollout_roofline), and the per-sequence one split by
    live sequences (by_live)."""
    bandwidth = card_bandwidth(device_name)
    if bandwidth is None:
        return None
    out = {"bandwidth_tb_s": bandwidth / 1e12}
    if slots is not None and slots < sum(map(len, lengths)):
        out["slots"] = slots
    tokens, b = sum(map(sum, lengths)), decode_bytes(hf)
    per_sequence = step_reads(lengths, prompt_len, b, out.get("slots"))  # read once: the bound and its split
    for key, reads in (
        ("per_sequence", per_sequence),
        ("shared_prompt", step_reads(lengths, prompt_len, b, out.get("slots"), shared=True)),
    ):
        bound = _summed(reads, tokens, bandwidth)
        out[key] = {"seconds": bound["seconds"], "tokens_per_second": bound["tokens_per_second"]}
    out["per_sequence_by_live"] = _split_by_live(per_sequence, bandwidth)
    return out


def fractions(row: dict, bounds: dict) -> dict:
    """Each engine's tokens_per_second in `row` as a fraction of both bounds."""
    out = {}
    for engine, stats in row.items():
        if isinstance(stats, dict) and "tokens_per_second" in stats:
            out[engine] = {k: stats["tokens_per_second"] / bounds[k]["tokens_per_second"]
                           for k in ("per_sequence", "shared_prompt")}  # fmt: skip
    return out


def row_lengths(result: dict, name: str) -> list[list[int]] | None:
    """The completion lengths [prompt][sample] bench_rollout.py decoded in row `name` of its JSON `result`,
    rebuilt from its arguments (the draws are seeded); None for a row it did not run."""
    args, row = result["args"], result.get(name)
    if not isinstance(row, dict) or "sequences" not in row:
        return None
    n, seqs = args["samples"], row["sequences"]
    if name in ("fixed", "fixed_hf"):
        new = args["new_tokens"] if name == "fixed" else args["hf_new_tokens"]
        return [[new] * n for _ in range(seqs // n)]
    longest = args["realistic_max"] if name == "realistic" else args["recipe_max"]
    return row_draw(name, seqs, n, args["length_mean"], args["length_sigma"], longest)


def report(path: str) -> dict:
    """Every row of a bench_rollout.py JSON against its bounds on the card the JSON names."""
    result = json.loads(Path(path).read_text())
    out = {"file": path, "device": result["device"]}
    for name in ("fixed_hf", "fixed", "realistic", "recipe"):
        lengths = row_lengths(result, name)
        if lengths is None:
            continue
        slots = result[name].get("max_batch_sequences")
        bounds = row_bounds(lengths, result[name]["prompt_len"], result["model"], result["device"], slots)
        if bounds is not None:
            out[name] = {"bound": bounds, "fraction": fractions(result[name], bounds)}
    return out


if __name__ == "__main__":  # bench/ is sys.path[0] when run as a script (shapes above)
    print(json.dumps([report(file) for file in sys.argv[1:]], indent=1))
