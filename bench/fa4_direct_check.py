"""model/flash4.py's direct forward (FA4's compiled kernel called with the arguments FA4 passed it, without its
Python) against FA4's own forward on the policy's attention shape: outputs bit for bit, and the host time a
call takes to issue (no sync; median of --calls). docs/benchmarks.md (φ) says why it exists.

  python bench/fa4_direct_check.py --out bench/results/fa4_direct_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from questa_nemo.model import flash4


def host_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    fwd = flash4._kernels().fwd  # FA4's _flash_attn_fwd; _direct_forward is called below whatever FAST_FORWARD says
    rows = []
    scale = 128**-0.5
    for seq in args.seqs:
        g = torch.Generator(device="cuda").manual_seed(seq)
        # megatron's [s, b, h, d] seen as [b, s, h, d], as fa4_dense hands them (b = 1)
        q, k, v = (torch.randn(seq, 1, h, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(0, 1)
                   for h in (12, 2, 2))  # fmt: skip
        want_out, want_lse = fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True)[:2]
        flash4._direct.clear()
        first = flash4._direct_forward(fwd, q, k, v, scale)  # recorded through FA4's path
        replayed = flash4._direct_forward(fwd, q, k, v, scale)  # the kernel called directly
        recorded = next(iter(flash4._direct.values()))
        q2 = torch.randn_like(q)  # other values, same layout: the direct call against FA4's on them
        direct_other = flash4._direct_forward(fwd, q2, k, v, scale)
        fa4_other = fwd(q2, k, v, softmax_scale=scale, causal=True, return_lse=True)[:2]
        row = {
            "seq": seq,
            "replayable": recorded is not None and len(flash4._direct) == 1,  # q2 took the same recording
            "first_equal": all(torch.equal(a, b) for a, b in zip(first, (want_out, want_lse))),
            "direct_equal": all(torch.equal(a, b) for a, b in zip(replayed, (want_out, want_lse))),
            "direct_equal_other_inputs": all(torch.equal(a, b) for a, b in zip(direct_other, fa4_other)),
            "host_ms_fa4": host_ms(lambda q=q, k=k, v=v: fwd(q, k, v, softmax_scale=scale, causal=True, return_lse=True),
                                   args.calls),
            "host_ms_direct": host_ms(lambda q=q, k=k, v=v: flash4._direct_forward(fwd, q, k, v, scale), args.calls),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    checks = ("replayable", "first_equal", "direct_equal", "direct_equal_other_inputs")
    passed = all(row[c] for row in rows for c in checks)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "passed": passed, "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print("PASS" if passed else "FAIL: the direct forward is not FA4's bit for bit (or was not replayed)")
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
