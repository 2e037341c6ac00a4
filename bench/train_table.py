"""A markdown table of a bench_train.py result: every run with tok/s (mean and median step), MFU, peak memory,
and its ratio to each transformers run of the same length (the first one, usually the issue's baseline, in
the ratio column; the others named in the note column).

    python bench/train_table.py bench/results/train_h100_trainspeed.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(result: dict) -> str:
    runs = result["runs"]
    hf = {}
    for run in runs:
        if run["impl"] == "hf" and run["status"] == "ok":
            hf.setdefault(run["seq"], []).append(run)
    lines = [
        f"{result['card']}, torch {result['torch']}, megatron-core {result['megatron_core']}, "
        f"transformers {result['transformers']}; {result['steps']} steps after {result['warmup']} warm-up",
        "",
        "| run | tok/s (mean) | tok/s (median) | MFU | peak GiB | vs first transformers run | others |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        if run["status"] != "ok":
            lines.append(f"| {run['label']} | {run['status'][:80]} | | | | | |")
            continue
        ratios = [] if run["impl"] == "hf" else [
            f"{run['tokens_per_s'] / b['tokens_per_s']:.3f}x" for b in hf.get(run["seq"], [])
        ]  # fmt: skip
        others = [f"{r} vs {b['label']}" for r, b in zip(ratios[1:], hf.get(run["seq"], [])[1:])]
        median = run.get("tokens_per_s_median")
        cells = [
            run["label"],
            f"{run['tokens_per_s']:,.0f}",
            f"{median:,.0f}" if median else "",
            f"{run['mfu']:.1%}" if run.get("mfu") is not None else "n/a",
            f"{run['peak_mem_gib']:.1f}" if run.get("peak_mem_gib") is not None else "n/a",
            ratios[0] if ratios else "",
            "; ".join(others),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
