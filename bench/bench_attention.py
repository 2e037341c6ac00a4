"""Causal attention kernels for the policy's shape: torch SDPA backends, GQA handling and input layouts.

The training step of the 1.5B policy spends a large share of its time in attention at 8K-32K tokens; this
measures each SDPA backend on exactly the tensors our core-attention module hands it, forward and
forward + backward, so the module's choice of backend and layout rests on numbers. FLOPs count causal
attention as half of the dense 4 x s^2 x heads x head_dim (forward) and backward as twice the forward
(the MFU convention, though flash backward recomputes the scores).

Cases: backend (flash | cudnn | efficient | auto | fa4) x kv (gqa: 2 groups passed with enable_gqa | expanded:
groups repeated to the 12 heads) x layout (bhsd: contiguous [b, h, s, d] | sbhd: the permuted view of
megatron's [s, b, h, d]). fa4 is FlashAttention 4 (pip flash-attn-4; model.attention=fa4), called as
model/attention.py's FA4CoreAttention calls it, on the same tensors. With --check, each backend's output and
gradients at the first length against an fp32 reference (the same bf16 inputs in fp32, SDPA's math in fp32),
beside the bf16 cuDNN kernel's own error.

GPU:  python bench/bench_attention.py --out bench/results/attention_h200.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "auto": None,
}


def make_inputs(seq: int, heads: int, groups: int, dim: int, kv: str, layout: str):
    g = torch.Generator(device="cuda").manual_seed(0)

    def tensor(h):
        if layout == "sbhd":  # megatron's layout, viewed as [b, h, s, d]
            x = torch.randn(seq, 1, h, dim, device="cuda", dtype=torch.bfloat16, generator=g)
            return x.permute(1, 2, 0, 3)
        return torch.randn(1, h, seq, dim, device="cuda", dtype=torch.bfloat16, generator=g)

    q, k, v = tensor(heads), tensor(groups), tensor(groups)
    if kv == "expanded":
        k, v = (x.repeat_interleave(heads // groups, dim=1) for x in (k, v))
    return [x.requires_grad_() for x in (q, k, v)]


def time_ms(fn, iters: int) -> float:
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def attend(backend: str, q, k, v):
    """Causal attention of [b, h, s, d] views by `backend` (fa4: through FA4CoreAttention's dense call)."""
    if backend == "fa4":
        from questa_nemo.model.flash4 import fa4_dense

        # [b, h, s, d] -> the [s, b, h, d] views megatron hands core attention, and back
        s_first = [x.permute(2, 0, 1, 3) for x in (q, k, v)]
        return fa4_dense(*s_first, 1.0 / q.size(-1) ** 0.5).permute(1, 2, 0, 3)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


def backend_context(backend: str):
    """SDPA pinned to `backend`'s kernel; auto and fa4 (not an SDPA backend) run unpinned."""
    return sdpa_kernel(BACKENDS[backend]) if BACKENDS.get(backend) else torch.enable_grad()


def unsupported(e: Exception) -> str:
    return f"unsupported: {str(e).splitlines()[0][:200]}"


def errors(seq, heads, groups, dim, backends) -> dict:
    """Max |error| of each backend's output and q / k / v gradients against fp32 attention of the same inputs."""
    q, k, v = make_inputs(seq, heads, groups, dim, "gqa", "sbhd")
    grad = torch.randn_like(q)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    kr, vr = (x.repeat_interleave(heads // groups, dim=1) for x in ref_in[1:])
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(ref_in[0], kr, vr, is_causal=True)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.float())
    out = {}
    for backend in backends:
        try:
            with backend_context(backend):
                o = attend(backend, q, k, v)
                grads = torch.autograd.grad(o, (q, k, v), grad)
        except (RuntimeError, ImportError) as e:
            out[backend] = unsupported(e)
            continue
        row = {"out": (o.float() - ref).abs().max().item()}
        for name, g, r in zip("qkv", grads, ref_grads):
            row[f"grad_{name}"] = (g.float() - r).abs().max().item()
        out[backend] = row
    return out


def measure(seq, heads, groups, dim, backend, kv, layout, iters) -> dict:
    q, k, v = make_inputs(seq, heads, groups, dim, kv, layout)
    grad = torch.randn_like(q)
    ctx = backend_context(backend)

    def forward():
        return attend(backend, q, k, v)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        forward().backward(grad)

    row = {"seq": seq, "backend": backend, "kv": kv, "layout": layout}
    try:
        with ctx:
            with torch.no_grad():
                fwd = time_ms(forward, iters)
            both = time_ms(forward_backward, iters)
    except (RuntimeError, ImportError) as e:  # backend rejects these inputs, or is not installed
        return {**row, "status": unsupported(e)}
    flops_fwd = 2.0 * seq * seq * heads * dim  # causal half of 4 s^2 h d
    return {
        **row,
        "status": "ok",
        "fwd_ms": fwd,
        "fwd_bwd_ms": both,
        "fwd_tflops": flops_fwd / fwd / 1e9,
        "fwd_bwd_tflops": 3 * flops_fwd / both / 1e9,
    }


def fa4_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flash-attn-4")
    except PackageNotFoundError:
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seqs", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--backends", nargs="*", default=[*BACKENDS, "fa4"])
    parser.add_argument("--kv", nargs="*", default=["gqa", "expanded"])
    parser.add_argument("--layouts", nargs="*", default=["bhsd", "sbhd"])
    parser.add_argument("--check", action="store_true", help="errors against fp32 at the first length")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # questa_nemo, for the fa4 backend
    check = errors(args.seqs[0], args.heads, args.groups, args.dim, args.backends) if args.check else {}
    if check:
        print("max |error| against fp32:", json.dumps(check), flush=True)
    rows = []
    for seq, backend, kv, layout in itertools.product(args.seqs, args.backends, args.kv, args.layouts):
        row = measure(seq, args.heads, args.groups, args.dim, backend, kv, layout, args.iters)
        rows.append(row)
        if row["status"] == "ok":
            print(
                f"{seq:6d} {backend:9s} {kv:8s} {layout}: fwd {row['fwd_ms']:7.2f} ms {row['fwd_tflops']:5.0f} TF/s"
                f"  fwd+bwd {row['fwd_bwd_ms']:7.2f} ms {row['fwd_bwd_tflops']:5.0f} TF/s",
                flush=True,
            )
        else:
            print(f"{seq:6d} {backend:9s} {kv:8s} {layout}: {row['status']}", flush=True)
        torch.cuda.empty_cache()
    result = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "shape": {"heads": args.heads, "groups": args.groups, "head_dim": args.dim},
        "fa4": fa4_version(),
        "errors_vs_fp32": check,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
