"""Memory a training step under activation recompute carries into the next step (docs/benchmarks.md (σ)).

A tensor allocated in one step and freed only in the next raises the peak of every step by its size: the
peak's moment (the end of backward) sees both. torch's memory history records the Python frames of every
allocation and every free; this runs a warm step, then two recorded steps as bench_train runs them (forward,
backward, fused AdamW, gradients set to None, the loss dropped), and sums the memory allocated in the first
and freed in the second, by where it was freed and where it was allocated.

What it found (one H100, megatron-core 0.19.2): with torch's checkpoint (`model.recompute_impl: torch`) each
layer's recompute left 0.64 GiB, 17.95 GiB at 32K tokens, freed by the next forward where megatron's
TransformerLayer replaces `mlp_norm_manager`. model/recompute.py now drops it (`clear=1`, the default;
`clear=0` runs without, for comparison).

GPU:  python bench/ckpt_leftovers.py --out bench/results/ckpt_leftovers_h100.json
CPU smoke test (nothing is recorded on a CPU): python bench/ckpt_leftovers.py --device cpu --tiny --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import bench_train  # noqa: E402
from bench.bench_train import frame_site, largest_sites  # noqa: E402

RUNS = [
    "32768/mcore:recompute=full",
    "32768/mcore:recompute=full,ckpt=torch,clear=0",
    "32768/mcore:recompute=full,ckpt=torch,clear=1",
    "32768/mcore:recompute=full,keepattn=1,clear=0",
    "32768/mcore:recompute=full,keepattn=1,clear=1",
]
def carried(traces: list[dict], mark: int) -> tuple[int, list[dict]]:
    """Bytes allocated before trace index `mark` (the first step) and freed after it (the second), and the
    largest of them by (free site, allocation site)."""
    live: dict[int, tuple[int, int, list]] = {}
    sized = []
    for i, event in enumerate(traces):
        if event["action"] == "alloc":
            live[event["addr"]] = (i, event["size"], event.get("frames") or [])
        elif event["action"] == "free_requested" and event["addr"] in live:
            at, size, frames = live.pop(event["addr"])
            if at < mark <= i:
                sized.append(((frame_site(event.get("frames") or [], 4), frame_site(frames, 4)), size))
    top = [{"freed_at": freed, "allocated_at": allocated, "gib": size / 2**30, "blocks": n}
           for (freed, allocated), size, n in largest_sites(sized, 8)]
    return sum(size for _, size in sized), top


def measure(spec: str, hf: dict, device: str, seq: int | None) -> dict:
    from questa_nemo.model import recompute

    text, _, clear = spec.partition(",clear=") if ",clear=" in spec else (spec, "", "1")
    run = bench_train.parse_run(text)
    if seq is not None:
        run.seq = seq
    recompute.DROP_STOPPED_STASH = clear == "1"
    model, loss_fn = bench_train.build_mcore(hf, run, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device == "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, hf["vocab_size"], (1, run.seq), device=device, generator=g)
    adv = torch.ones(1, run.seq, device=device)

    def step() -> None:
        loss_fn(ids, ids.roll(-1, dims=1), adv).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, optimizer state
    out: dict = {"run": spec, "seq": run.seq, "carried_gib": None, "carried_sites": []}
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                                 max_entries=10**7)
        try:
            step()
            dev = torch.cuda.current_device()
            mark = len(torch.cuda.memory._snapshot()["device_traces"][dev])
            step()
            traces = torch.cuda.memory._snapshot()["device_traces"][dev]
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        total, out["carried_sites"] = carried(traces, mark)
        out["carried_gib"] = total / 2**30
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        step()
    return out  # the model and optimizer go with this frame; main frees the device after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model shape and 256 tokens (CPU smoke test)")
    parser.add_argument("--runs", nargs="*", default=RUNS, help="bench_train runs, optionally with ,clear=0|1")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from questa_nemo.atomic import write_text_atomic
    from questa_nemo.config import ModelConfig
    from questa_nemo.model.parallel import destroy_distributed, init_distributed

    init_distributed(ModelConfig())
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    hf = bench_train.TINY if args.tiny else bench_train.QWEN25_15B
    results = []
    for spec in args.runs:
        results.append(measure(spec, hf, args.device, 256 if args.tiny else None))
        bench_train.free_device(args.device)
        r = results[-1]
        if r["carried_gib"] is not None:
            top = r["carried_sites"][0]["freed_at"] if r["carried_sites"] else "-"
            print(f"{spec:50s} carried into the next step {r['carried_gib']:6.2f} GiB, peak {r['peak_gib']:5.1f}"
                  f" GiB (largest freed at {top})", flush=True)
        write_text_atomic(args.out, json.dumps({"card": card, "torch": torch.__version__,
                                                "python": sys.version.split()[0], "runs": results}, indent=2))
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
