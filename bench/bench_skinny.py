"""The decode step's projections at a rollout's tail: cuBLAS (F.linear) against Triton's skinny matmul
(model/triton_kernels.skinny_linear, EngineOptions.skinny_gemm), side by side on the same weights.

At 8 sequences the decode step's matmuls took 1.50 ms on an H100 against a 0.92 ms weight-read floor
(docs/benchmarks.md (μ)): cuBLAS's kernels for the attention's small projections (qkv 6 MB, the output 4.5 MB
a layer) ran at about 30% of the bandwidth, the MLP's at about 70%. Each shape of the Qwen2.5-1.5B decode step is timed as
the step runs it: one CUDA graph over 28 distinct weight copies (so L2 serves none), replayed; the output head
(467 MB) once a replay. Rows: 1, 8, 16, 32 sequences, `skinny_config`'s tiles, and at 8 rows a sweep of tiles
(the best is reported beside the heuristic's). Every output is checked against float32 maths on the same
bf16 inputs (cuBLAS's error beside ours). The layers' four projections also run with int8 and float8 weights
(EngineOptions.weights8: model/weights8.quantize_rows, skinny_linear with `scale`; half the bytes), checked
against float32 maths on the dequantized weight; the step's `int8_ms` / `fp8_ms` are theirs plus cuBLAS's
output head. The Triton paths are also timed with every launch a programmatic dependent launch
(EngineOptions.pdl: a copy's programs placed while the previous copy's last ones run), `skinny_pdl_ms` and the
8-bit columns' `pdl_ms`.

Usage (GPU): python3 bench/bench_skinny.py --out skinny.json [--rows 1,8,16,32] [--no-sweep] [--sweep-seconds S]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from roofline import card_bandwidth  # noqa: E402

from questa_nemo.model import triton_kernels as tk  # noqa: E402
from questa_nemo.model.weights8 import FORMATS, dequantize_rows, quantize_rows  # noqa: E402

# name -> (out features, in features, bias, copies): Qwen2.5-1.5B's decode-step projections
SHAPES = {
    "qkv": (2048, 1536, True, 28),
    "proj": (1536, 1536, False, 28),
    "fc1": (17920, 1536, False, 28),
    "fc2": (1536, 8960, False, 28),
    "lm_head": (151936, 1536, False, 1),
}


def graph_ms(fn, replays: int) -> float:
    """Milliseconds a replay of `fn` captured in a CUDA graph (after a warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def sweep_configs(n: int, k: int) -> list[dict]:
    out = []
    for bn, bk, split, stages in itertools.product((16, 32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (3, 4)):
        if (split > 1 and k // split < bk) or bn * bk > 128 * 128:
            continue
        out.append({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "num_warps": 4,
                    "num_stages": stages})  # fmt: skip
    random.Random(n * k).shuffle(out)  # a time-bounded sweep covers the grid evenly
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,16,32")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--sweep-seconds", type=float, default=20.0, help="sweep time per shape (at 8 rows)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    peak = card_bandwidth(props.name)
    g = torch.Generator(device=dev).manual_seed(0)
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "triton": __import__("triton").__version__, "peak_bytes_per_s": peak, "shapes": {}}  # fmt: skip
    rows_list = [int(r) for r in args.rows.split(",")]
    columns = ["cublas", "skinny", "best", "skinny_pdl", *FORMATS, *(f"{f}_pdl" for f in FORMATS)]
    step = {r: {f"{c}_ms": 0.0 for c in columns} for r in rows_list}
    for name, (n, k, has_bias, copies) in SHAPES.items():
        weights = [
            torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) / k**0.5 for _ in range(copies)
        ]
        biases = [torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g) if has_bias else None
                  for _ in range(copies)]  # fmt: skip
        eight = {} if name == "lm_head" else {f: [quantize_rows(w, f) for w in weights] for f in FORMATS}  # head: bf16
        shape = {"n": n, "k": k, "copies": copies, "weight_bytes": n * k * 2 * copies, "rows": {}}
        for rows in rows_list:
            x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16, generator=g)
            ref = F.linear(x.float(), weights[0].float(), None if biases[0] is None else biases[0].float())
            err_cublas = (F.linear(x, weights[0], biases[0]).float() - ref).abs().max().item()
            first = tk.skinny_linear(x, weights[0], biases[0])
            err_skinny = (first.float() - ref).abs().max().item()
            deterministic = torch.equal(first, tk.skinny_linear(x, weights[0], biases[0]))

            def run(linear, cfg=None, x=x, weights=weights, biases=biases):
                return lambda: [linear(x, w, b) if cfg is None else tk.skinny_linear(x, w, b, config=cfg)
                                for w, b in zip(weights, biases)]  # fmt: skip

            cublas = graph_ms(run(F.linear), args.replays)
            skinny = graph_ms(run(tk.skinny_linear), args.replays)
            pdl = partial(tk.skinny_linear, pdl=True)  # consecutive copies as programmatic dependent launches
            skinny_pdl = graph_ms(run(pdl), args.replays)
            row = {"cublas_ms": cublas, "skinny_ms": skinny, "speedup": cublas / skinny,
                   "skinny_pdl_ms": skinny_pdl, "config": tk.skinny_config(rows, n, k, props.multi_processor_count),
                   "max_abs_err": {"cublas": err_cublas, "skinny": err_skinny}, "deterministic": deterministic}  # fmt: skip
            if peak:
                row["bandwidth_pct"] = {
                    "cublas": 100 * shape["weight_bytes"] / (cublas * 1e-3) / peak,
                    "skinny": 100 * shape["weight_bytes"] / (skinny * 1e-3) / peak,
                }
            for fmt, copies8 in eight.items():
                q, scale = copies8[0]
                bias0 = None if biases[0] is None else biases[0].float()
                got = tk.skinny_linear(x, q, biases[0], scale=scale).float()

                def run8(pdl: bool, x=x, copies8=copies8, biases=biases):
                    return lambda: [tk.skinny_linear(x, q, b, scale=s, pdl=pdl) for (q, s), b in zip(copies8, biases)]

                ms8, pdl_ms8 = graph_ms(run8(False), args.replays), graph_ms(run8(True), args.replays)
                row[fmt] = {
                    "ms": ms8, "pdl_ms": pdl_ms8, "speedup_vs_cublas": cublas / ms8,
                    "max_abs_err_vs_dequantized": (got - F.linear(x.float(), dequantize_rows(q, scale), bias0))
                    .abs().max().item(),
                    "rel_err_vs_bf16_weights": ((got - ref).norm() / ref.norm()).item(),  # what 8 bits change
                }  # fmt: skip
                if peak:
                    row[fmt]["bandwidth_pct"] = 100 * shape["weight_bytes"] / 2 / (ms8 * 1e-3) / peak
            best = (skinny, row["config"])
            if rows == 8 and not args.no_sweep:
                tried, sweep_end = 0, time.monotonic() + args.sweep_seconds
                for cfg in sweep_configs(n, k):
                    if time.monotonic() > sweep_end:
                        row["sweep_cut_short"] = True
                        break
                    try:
                        ms = graph_ms(run(None, cfg), max(args.replays // 5, 5))
                    except Exception as e:  # noqa: BLE001  (a tile too large for shared memory)
                        row.setdefault("sweep_errors", []).append(f"{cfg}: {type(e).__name__}")
                        continue
                    tried += 1
                    if ms < best[0]:
                        best = (ms, cfg)
                if tried and best[1] is not row["config"]:
                    best = (graph_ms(run(None, best[1]), args.replays), best[1])  # re-timed at full replays
                row["sweep"] = {"tried": tried, "best_ms": best[0], "best_config": best[1]}
            shape["rows"][rows] = row
            step[rows]["cublas_ms"] += cublas  # a graph replay is one decode step's share of this projection
            step[rows]["skinny_ms"] += skinny
            step[rows]["best_ms"] += best[0]
            step[rows]["skinny_pdl_ms"] += skinny_pdl
            for fmt in FORMATS:  # the head: cuBLAS
                step[rows][f"{fmt}_ms"] += row[fmt]["ms"] if fmt in row else cublas
                step[rows][f"{fmt}_pdl_ms"] += row[fmt]["pdl_ms"] if fmt in row else cublas
            print(name, rows, json.dumps({k2: row[k2] for k2 in ("cublas_ms", "skinny_ms", "speedup")}),
                  "best", round(best[0], 4), best[1], *(f"{f} {row[f]['ms']:.4f}" for f in FORMATS if f in row),
                  flush=True)  # fmt: skip
        result["shapes"][name] = shape
        del weights, biases, eight
        torch.cuda.empty_cache()
    result["decode_step_matmuls"] = step  # ms a step: 28 layers x 4 projections + the head
    if peak:
        floor = sum(n * k * 2 * c for n, k, _, c in SHAPES.values()) / peak * 1e3
        result["weight_floor_ms"] = floor
        head = SHAPES["lm_head"]
        result["weight_floor_8bit_ms"] = (floor + head[0] * head[1] * 2 / peak * 1e3) / 2  # projections at 1 byte
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("decode_step_matmuls", json.dumps(step), "floor_ms", result.get("weight_floor_ms"), flush=True)


if __name__ == "__main__":
    main()
