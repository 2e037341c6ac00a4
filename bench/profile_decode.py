"""Where a paged decode step's time goes: the Qwen2.5-1.5B shape (random weights) built as bench_rollout.py builds
it, a batch filled to a given context, then

(a) the whole CUDA-graphed decode step (CUDA events over many replays),
(b) one eager step under torch.profiler: device time by kernel kind (attention, matmul, sampling = every kernel
    after the last matmul (lm_head, .float(), uniforms, sampler), kv_write (index_put; with fused_decode the
    RoPE + append kernel), norm, elementwise, other), in ms
    and as % of the kernel sum; graph_gap_ms = (a) - kernel sum (what launches and idle time cost in the graph),
(c) the attention kernel alone (one layer) over launch settings and block sizes, with achieved GB/s against the
    key/value bytes it must read (`logical`: every sequence's own length) and the distinct bytes (`unique`:
    prompt blocks shared by the samples of a prompt counted once, what HBM must deliver if L2 dedups them),
(d) the sampler alone at B x vocab (top_p = 1 and < 1).

Cases: `fixed` (every sequence at --context positions: mid-way of the 1K + 2K row) and `realistic` (1K prompt +
lengths drawn as bench_rollout's realistic row: lognormal mean 1K, longest 8K). Prompts are shared: --batch
sequences are batch / samples prompts x samples, each prompt's full blocks shared by its samples (paged.py's
share_prefix, as the engine does), so the prompt part of the KV is read `samples` times a step.

Variants (--variants): `main` is the engine at EngineOptions(fused_decode=False, fused_sampler=False,
merge_tile=False) (the earlier step: torch RoPE, index_put into the pool, auto split launch, the loop merge,
torch's sampler), `new` the defaults (see rollout/paged_triton.py; the fused sampler and the tile merge
included), `cascade` new with cascade attention, `ts` new with torch's sampler (rollout/sampling.py; the
sampler table (d) times both alone too), `loop` new with the loop merge of the splits (merge_tile=False:
paged_triton._merge_kernel; the sweep (c) times both merges at the engine's split length too), `fn` new with
the residual adds, norms and SwiGLU as Triton kernels (EngineOptions.fused_norms), `sk` fn with the skinny
matmul (skinny_gemm), `i8` / `f8` new with int8 / float8 projections (weights8, up to 16 sequences), `pd`,
`skpd`, `i8pd`, `f8pd` new, sk, i8 and f8 with the step's Triton kernels as programmatic dependent launches
(pdl). All run side by side in
one process on one card.

    . bench/gpu_setup.sh && python bench/profile_decode.py --out $OUT/profile_decode.json   # ~3 min, one H100
    TRITON_INTERPRET=1 python bench/profile_decode.py --device cpu --tiny                  # smoke (tests/)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rollout import build_policy, device_ready, engine, hf_config, versions, write_json  # noqa: E402
from shapes import row_draw  # noqa: E402

from questa_nemo.rollout.graphs import StepKey  # noqa: E402
from questa_nemo.rollout.paged import CASCADE_ITEMS, blocks_for, prompt_groups, split_positions  # noqa: E402
from questa_nemo.rollout.sampling import sample_tokens, uniform_draws  # noqa: E402

VARIANTS = {  # -> bench_rollout's ENGINES
    "main": "paged_main", "new": "paged", "cascade": "paged_cascade", "ts": "paged_ts", "loop": "paged_loop",
    "fn": "paged_fn", "sk": "paged_fnsk", "i8": "paged_i8", "f8": "paged_fp8", "pd": "paged_pdl",
    "skpd": "paged_skpd", "i8pd": "paged_i8pd", "f8pd": "paged_fp8pd",
}  # fmt: skip
KINDS = ("attention", "matmul", "sampling", "kv_write", "norm", "elementwise", "other")
_MATMUL = ("gemm", "gemv", "nvjet", "xmma", "cutlass", "cublas", "wgmma", "matmul", "addmm", "linear", "skinny")
_ATTENTION = ("_split_kernel", "_merge_kernel", "_merge_tile_kernel", "_prefix_kernel", "attention", "fmha", "flash")


def kernel_kind(name: str) -> str:
    low = name.lower()
    if any(s in low for s in _ATTENTION):
        return "attention"
    if any(s in low for s in _MATMUL):
        return "matmul"
    if "index_put" in low or "indexput" in low or "scatter" in low or "_rope_append" in low:
        return "kv_write"
    if "norm" in low:
        return "norm"
    if any(s in low for s in ("elementwise", "vectorized", "unrolled", "cat", "copy", "mul", "add", "silu", "swiglu")):
        return "elementwise"
    return "other"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int, warmup: int = 3) -> float:
    """Mean milliseconds of fn() over reps calls (CUDA events on GPU, wall clock on CPU)."""
    for _ in range(warmup if torch.cuda.is_available() else 1):
        fn()
    sync()
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        sync()
        return start.elapsed_time(end) / reps
    tic = time.perf_counter()
    for _ in range(reps):
        fn()
    return 1000 * (time.perf_counter() - tic) / reps


def case_contexts(args, name: str) -> list[int]:
    """Sequence lengths (positions attended, the new token's included) of the batch's sequences."""
    if name == "fixed":
        return [args.context] * args.batch
    drawn = row_draw("realistic", args.batch, args.batch, args.length_mean, 1.2, args.realistic_max)[0]  # one group
    return [args.prompt_len + n for n in drawn]


def fill(backend, contexts: list[int], args, margin: int):
    """The backend's runner with slots 0..B-1 live at `contexts`: prompt blocks shared by the `samples` slots of
    each prompt, every slot owning blocks to its context + margin, the pool random, positions = context - 1."""
    b, bs = len(contexts), args.block_size
    max_len = -(-(max(contexts) + margin) // 256) * 256
    need = sum(blocks_for(c + margin, bs) for c in contexts) + 2
    backend.options = dataclasses.replace(backend.options, kv_blocks=need)
    backend.sleep()
    runner = backend._ensure_runner(max_len, b)
    cache = runner.cache
    cache.use_kernel = cache.use_kernel or args.cpu_kernel  # CPU: the Triton path under TRITON_INTERPRET=1
    g = torch.Generator(device=cache.k.device).manual_seed(0)
    for pool in (cache.k, cache.v):  # random keys/values (HBM traffic does not depend on them)
        pool.normal_(generator=g)
    prompt = min(args.prompt_len, min(contexts)) - 1  # positions a prompt's admission writes
    for lead in range(0, b, args.samples):
        cache.ensure(lead, prompt)
        for s in range(lead + 1, min(lead + args.samples, b)):
            cache.share_prefix(lead, s, prompt)
    for i, c in enumerate(contexts):
        if not cache.ensure(i, c + margin):
            raise RuntimeError(f"profile: pool short for slot {i}")
    cache.sync()
    device = runner.tokens.device
    runner.tokens[:b] = torch.randint(0, backend.vocab_size, (b,), device=device, generator=g)
    runner.positions[:b] = torch.tensor(contexts, device=device) - 1
    runner.noise_key[:b] = torch.arange(1, b + 1, device=device)
    runner.noise_start[:b] = args.prompt_len - 1
    return runner


def step_timing(runner, key: StepKey, contexts, reps: int) -> dict:
    """(a): graph replays (eager steps on CPU), positions restored before timing."""
    start = runner.positions.clone()
    runner.step(key)  # capture
    runner.positions.copy_(start)
    ms = timed(lambda: runner.step(key), reps, warmup=2)
    runner.positions.copy_(start)
    return {"ms": ms, "tokens_per_second": len(contexts) / ms * 1e3, "replays": reps}


def step_profile(runner, key: StepKey) -> dict:
    """(b): one eager step under torch.profiler, device time by kernel kind."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    start = runner.positions.clone()
    runner._step(key)  # warm (eager path, libraries initialised)
    runner.positions.copy_(start)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        runner._step(key)
        sync()
    runner.positions.copy_(start)
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    if not events:  # CPU: the top-level ops stand in for kernels
        events = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
    events.sort(key=lambda e: e.time_range.start)
    kinds = [kernel_kind(e.name) for e in events]
    last_mm = max((i for i, k in enumerate(kinds) if k == "matmul"), default=len(kinds))
    kinds = [k if i <= last_mm else "sampling" for i, k in enumerate(kinds)]
    out = {k: {"ms": 0.0, "kernels": 0} for k in KINDS}
    top: dict[str, float] = {}
    for e, k in zip(events, kinds):
        us = e.time_range.elapsed_us()
        out[k]["ms"] += us / 1e3
        out[k]["kernels"] += 1
        top[e.name] = top.get(e.name, 0.0) + us / 1e3
    total = sum(v["ms"] for v in out.values())
    for v in out.values():
        v["pct"] = 100 * v["ms"] / max(total, 1e-9)
    heaviest = sorted(top.items(), key=lambda kv: -kv[1])[:15]
    return {"kinds": out, "kernel_sum_ms": total, "kernels": len(events),
            "top_kernels_ms": {name[:90]: ms for name, ms in heaviest}}  # fmt: skip


def attention_sweep(args, contexts: list[int], dtype, device, quick: bool) -> list[dict]:
    """(c): one layer's paged attention over launch settings and block sizes, shared prompt blocks as in the
    engine (and unshared once, at the default settings, to show what L2 reuse of the shared blocks buys)."""
    from questa_nemo.rollout.paged_triton import Cascade, paged_decode_attention

    b = len(contexts)
    groups, per_group, dim = args.groups, args.per_group, args.head_dim
    per_token = 2 * groups * dim * torch.finfo(dtype).bits // 8  # k and v bytes of one position
    logical = per_token * sum(contexts)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 4
    rows: list[dict] = []
    q = torch.randn(b, groups, per_group, dim, device=device, dtype=dtype)
    positions = torch.tensor(contexts, device=device) - 1
    for bs in args.sweep_block_sizes:
        prompt_blocks = (args.prompt_len - 1) // bs  # full prompt blocks, shared
        tables = {}
        for shared in (True, False):
            rows_t, nxt = [], 1  # block 0 is the trash block
            for i, c in enumerate(contexts):
                n = blocks_for(c, bs)
                head = rows_t[i - i % args.samples][: min(prompt_blocks, n)] if shared and i % args.samples else []
                rows_t.append(head + list(range(nxt, nxt + n - len(head))))
                nxt += n - len(head)
            table = torch.zeros(b, max(len(r) for r in rows_t), dtype=torch.int32)
            for i, r in enumerate(rows_t):
                table[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
            tables[shared] = (table.to(device), nxt)
            if shared:  # cascade groups of this table, as the engine derives them
                refs = [0] * nxt
                for r in rows_t:
                    for blk in r:
                        refs[blk] += 1
                host = prompt_groups(rows_t, refs)
                cascade = Cascade(*(torch.tensor(t, dtype=torch.int32, device=device) for t in host), CASCADE_ITEMS)
        unique_blocks = tables[True][1] - 1
        num_blocks = max(n for _, n in tables.values())
        pool = torch.randn(2, num_blocks, groups, bs, dim, device=device, dtype=dtype)
        unique = unique_blocks * bs * per_token
        main_default = {"splits": None, "num_warps": 4, "num_stages": None, "split_len": None, "merge_tile": False}
        settings = [main_default] + [{**main_default, "splits": n} for n in (1, 2, 4, 8)]
        settings += [{**main_default, "split_len": n} for n in (256, 512, 1024, 2048) if n % bs == 0]
        new_split = split_positions(b, groups, sms, bs)  # the engine's fused_decode default
        settings += [{**main_default, "split_len": n, "cascade": True} for n in sorted({new_split, 512, 1024})]
        # both merges at the engine's launches (the loop merge is main_default's): auto splits, fixed, cascade
        settings += [{**main_default, "split_len": new_split}]
        settings += [{**main_default, **c, "merge_tile": True}
                     for c in ({}, {"split_len": new_split}, {"split_len": new_split, "cascade": True})]  # fmt: skip
        if not quick and bs == args.block_size:  # warps x stages at the engine's block size only (compiles)
            for base in ({"splits": 1}, {"split_len": 1024 if 1024 % bs == 0 else None}):
                settings += [{**main_default, **base, "num_warps": w, "num_stages": st}
                             for w in (4, 8) for st in (1, 2, 3, 4)]  # fmt: skip
        seen = set()
        for shared in (True, False):
            table = tables[shared][0]
            for cfg in settings if shared else settings[:1]:
                tag = (shared, *cfg.items())
                if tag in seen:
                    continue
                seen.add(tag)

                launch = {**cfg, "cascade": cascade if cfg.get("cascade") else None}

                def fn(c=launch, t=table, kp=pool[0], vp=pool[1]):
                    return paged_decode_attention(q, kp, vp, t, positions, sms, **c)

                row = {"block_size": bs, **cfg, "shared_prompts": shared}
                row.setdefault("cascade", False)
                try:
                    ms = timed(fn, args.attn_reps)
                    if cfg["merge_tile"]:  # the same launch merged by the loop kernel: same maths, other order
                        loop = paged_decode_attention(q, pool[0], pool[1], table, positions, sms,
                                                      **{**launch, "merge_tile": False})  # fmt: skip
                        row["max_abs_vs_loop_merge"] = (fn().float() - loop.float()).abs().max().item()
                except Exception as e:  # noqa: BLE001  (e.g. out of shared memory: the rest of the sweep runs)
                    rows.append({**row, "error": repr(e)[:200]})
                    continue
                rows.append({**row, "us": ms * 1e3, "logical_gb_per_s": logical / ms / 1e6,
                             "unique_gb_per_s": (unique if shared else logical) / ms / 1e6})  # fmt: skip
    return rows


def sampler_timing(args, vocab: int, device) -> list[dict]:
    """(d): uniform_draws + sample_tokens on float32 logits [B, vocab] (what the step hands the sampler)."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for b in args.sampler_batches:
        logits = torch.randn(b, vocab, device=device, generator=g) * 3
        keys = torch.arange(1, b + 1, device=device)
        positions = torch.arange(b, device=device)
        for temperature, top_p in ((1.0, 1.0), (1.0, 0.95), (0.7, 1.0), (0.0, 1.0)):

            def fn(t=temperature, p=top_p, x=logits, k=keys, at=positions):
                u = uniform_draws(k, at) if t > 0 else None
                return sample_tokens(x, u, t, p)

            ms = timed(fn, args.sampler_reps)
            rows.append({"batch": b, "vocab": vocab, "temperature": temperature, "top_p": top_p, "ms": ms})
        if device == "cuda" or args.cpu_kernel:  # CPU: Triton under its interpreter, as the step (--cpu-kernel)
            from questa_nemo.rollout.sampling_triton import fused_sample

            half = logits.to(torch.bfloat16)  # the lm_head's own output: what the fused sampler reads

            def fused(x=half, k=keys, at=positions):
                return fused_sample(x, uniform_draws(k, at), 1.0)

            ms = timed(fused, args.sampler_reps)
            rows.append({"batch": b, "vocab": vocab, "temperature": 1.0, "top_p": 1.0, "ms": ms, "fused": True})
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--samples", type=int, default=16, help="samples per prompt (they share prompt blocks)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--context", type=int, default=2048, help="fixed case: positions of every sequence")
    p.add_argument("--length-mean", type=float, default=1024.0)
    p.add_argument("--realistic-max", type=int, default=8192)
    p.add_argument("--cases", default="fixed,realistic")
    p.add_argument(
        "--variants", default="main,new,cascade,ts,loop,fn",
        help="comma list: main (fused_decode and fused_sampler off), new (the defaults), cascade (new + "
        "cascade), ts (new with torch's sampler instead of the fused one), loop (new with the loop merge), fn "
        "(new with fused_norms), sk (fn with skinny_gemm), i8 / f8 (new with weights8 int8 / fp8: 8-bit "
        "projections), pd (new with pdl: dependent launches), skpd (sk with pdl), i8pd / f8pd (i8 / f8 with pdl)",
    )
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--kv-fraction", type=float, default=0.6)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--sweep-block-sizes", default="16,32,64,128")
    p.add_argument("--quick-sweep", action="store_true", help="splits only (no warps x stages)")
    p.add_argument("--attn-reps", type=int, default=20)
    p.add_argument("--sampler-batches", default="8,256,512")  # 8: the tail of a rollout
    p.add_argument("--sampler-reps", type=int, default=20)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--cpu-kernel", action="store_true", help="CPU: the step runs the Triton kernels (interpreter)")
    p.add_argument("--out", default="profile_decode.json")
    args = p.parse_args(argv)
    args.sweep_block_sizes = [int(x) for x in args.sweep_block_sizes.split(",") if x]
    args.sampler_batches = [int(x) for x in args.sampler_batches.split(",") if x]
    return args


def print_tables(result: dict) -> None:
    for case, per in result["cases"].items():
        print(f"\n== {case}: batch {per['batch']}, mean context {per['mean_context']:.0f}, "
              f"max {per['max_context']}")  # fmt: skip
        for variant, r in per["variants"].items():
            if "error" in r:
                print(f"  [{variant}] error: {r['error']}")
                continue
            a, prof = r["graph_step"], r["eager_profile"]
            print(f"  [{variant}] graphed step {a['ms']:.3f} ms ({a['tokens_per_second']:.0f} tok/s, "
                  f"{r.get('step_speedup_vs_main', 1.0):.2f}x main); eager "
                  f"kernels {prof['kernels']}, kernel sum {prof['kernel_sum_ms']:.3f} ms, graph gap "
                  f"{r['graph_gap_ms']:.3f} ms")  # fmt: skip
            for k, v in prof["kinds"].items():
                print(f"      {k:12s} {v['ms']:8.3f} ms {v['pct']:5.1f}%  {v['kernels']:4d} kernels")
            for name, ms in list(prof["top_kernels_ms"].items())[:8]:
                print(f"        {ms:8.3f} ms  {name}")
        rows = [r for r in per.get("attention_sweep", []) if "us" in r]
        if rows:
            print("  attention, one layer:  bs splits split_len warps stages shared casc tile      us  logical GB/s  "
                  "unique GB/s")
            defaults = [r for r in rows if r["splits"] is None and r["split_len"] is None and r["num_stages"] is None]
            for r in sorted(rows, key=lambda r: r["us"])[:12] + defaults:
                print(f"  {'':20s}{r['block_size']:4d} {str(r['splits']):>6s} {str(r['split_len']):>9s} "
                      f"{r['num_warps']:5d} {str(r['num_stages']):>6s} {str(r['shared_prompts']):>6s} "
                      f"{'yes' if r['cascade'] else 'no':>4s} {'yes' if r['merge_tile'] else 'no':>4s} "
                      f"{r['us']:7.1f} {r['logical_gb_per_s']:12.0f} {r['unique_gb_per_s']:12.0f}")  # fmt: skip
            same = ("block_size", "splits", "split_len", "num_warps", "num_stages", "shared_prompts", "cascade")
            for r in (r for r in rows if r["merge_tile"]):  # each tile merge against the loop merge's launch
                loop = next((x for x in rows if not x["merge_tile"] and all(x[k] == r[k] for k in same)), None)
                print(f"  merge bs {r['block_size']} splits {r['splits']} split_len {r['split_len']} cascade "
                      f"{r['cascade']}: loop {loop['us'] if loop else float('nan'):.1f} us, tile {r['us']:.1f} us, "
                      f"max |tile - loop| {r.get('max_abs_vs_loop_merge', float('nan')):.2e}")  # fmt: skip
    for r in result.get("sampler", []):
        print(f"sampler B={r['batch']} V={r['vocab']} T={r['temperature']} top_p={r['top_p']}: {r['ms']:.3f} ms")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not device_ready(args.device, "profile_decode"):
        return 2
    started = time.perf_counter()
    hf = hf_config(args.tiny)
    vocab = hf["vocab_size"]
    policy, _ = build_policy(hf, "bf16" if args.device == "cuda" else "fp32")
    dtype = next(policy.parameters()).dtype
    args.groups = hf["num_key_value_heads"]
    args.per_group = hf["num_attention_heads"] // args.groups
    args.head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    result: dict = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        **versions(),
        "weights": "random (the Qwen2.5-1.5B shape)" if not args.tiny else "random (tiny)",
        "model": {k: hf.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "intermediate_size", "vocab_size")},
        "args": {k: v for k, v in vars(args).items()},
        "cases": {},
    }  # fmt: skip
    args.no_graphs = args.no_graphs or args.device == "cpu"
    backends = {}
    for variant in args.variants.split(","):
        backends[variant] = engine(policy, vocab, args, VARIANTS[variant])
    key = StepKey(args.batch, 0, 1.0, 1.0)
    for case in args.cases.split(","):
        contexts = case_contexts(args, case)
        per: dict = {"batch": args.batch, "mean_context": sum(contexts) / len(contexts),
                     "max_context": max(contexts), "variants": {}}  # fmt: skip
        for variant, backend in backends.items():
            try:
                runner = fill(backend, contexts, args, margin=2 * args.replays + 16)
                k = key._replace(attend_len=runner.cache.max_len)
                a = step_timing(runner, k, contexts, args.replays)
                prof = step_profile(runner, k)
            except Exception as e:  # noqa: BLE001  (one variant failing on the GPU keeps the others' numbers)
                backend.sleep()
                per["variants"][variant] = {"error": repr(e)[:500]}
                print(f"{case} {variant}: error {e!r}", flush=True)
                continue
            per["variants"][variant] = {
                "graph_step": a, "eager_profile": prof, "graph_gap_ms": a["ms"] - prof["kernel_sum_ms"],
                "launch": {k: v if isinstance(v, (int, float, str)) else v is not None
                           for k, v in runner.cache.launch_settings(args.batch).items()},
            }  # fmt: skip
            backend.sleep()
            print(f"{case} {variant}: step {a['ms']:.3f} ms", flush=True)
        base = per["variants"].get("main", {}).get("graph_step")
        for r in per["variants"].values():
            if base and "graph_step" in r:
                r["step_speedup_vs_main"] = base["ms"] / r["graph_step"]["ms"]
        if importlib.util.find_spec("triton") is not None:
            per["attention_sweep"] = attention_sweep(args, contexts, dtype, args.device, args.quick_sweep)
        result["cases"][case] = per
        write_json(args.out, result)
    result["sampler"] = sampler_timing(args, vocab, args.device)
    result["seconds"] = time.perf_counter() - started
    write_json(args.out, result)
    print_tables(result)
    print(f"\nwrote {args.out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
