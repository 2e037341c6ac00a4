"""Summaries of per-problem results: the JSON report, the terminal table, the pass@k plot, pass-rate profiles."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from questa_nemo.eval.benchmarks import benchmark_title
from questa_nemo.eval.passk import mean_and_stderr, pass_at_k_over_problems
from questa_nemo.eval.store import ProblemResult

Results = Mapping[str, Mapping[str, Sequence[ProblemResult]]]  # model label -> benchmark key -> problems


def summarise(problems: Sequence[ProblemResult]) -> dict[str, Any]:
    """Metrics of one model on one benchmark; pass@k for every k up to the samples per problem."""
    n = min(p.n for p in problems)
    counts = [(p.n, p.correct) for p in problems]
    pass_at = {str(k): pass_at_k_over_problems(counts, k)._asdict() for k in range(1, n + 1)}
    samples = sum(p.n for p in problems)
    return {
        "problems": len(problems),
        "n_samples": n,
        "pass_at_k": pass_at,
        "majority": mean_and_stderr([float(p.majority_correct) for p in problems])._asdict(),
        "mean_tokens": sum(p.mean_tokens * p.n for p in problems) / samples,
        "truncated_fraction": sum(p.truncated for p in problems) / samples,
        "reasons": dict(sum((Counter(p.reasons) for p in problems), Counter())),
        "per_problem": [asdict(p) for p in problems],
    }


def build_report(
    results: Results, checkpoints: Mapping[str, str], settings: Mapping[str, Any], ks: Sequence[int]
) -> dict[str, Any]:
    """The results.json payload: sampling settings, then per model and benchmark the summary and every problem."""
    models = {}
    for label, benches in results.items():
        summaries = {}
        for key, problems in benches.items():
            summaries[key] = {"title": benchmark_title(key)} | summarise(problems)
        models[label] = {"checkpoint": checkpoints.get(label, ""), "benchmarks": summaries}
    kept = {k: v for k, v in settings.items() if k not in ("checkpoint", "benchmark")}
    return {"settings": kept, "ks": list(ks), "models": models}


def format_table(report: Mapping[str, Any], ks: Sequence[int]) -> str:
    """One line per benchmark and model: pass@1 +- its standard error, pass@k for each k, majority vote (%)."""
    header = (
        ["benchmark", "model", "problems", "pass@1"] + [f"pass@{k}" for k in ks if k > 1] + ["maj", "tokens"]
    )
    lines = [header]
    benchmarks = sorted({b for m in report["models"].values() for b in m["benchmarks"]})
    for bench in benchmarks:
        for label, model in report["models"].items():
            s = model["benchmarks"].get(bench)
            if s is None:
                continue
            p1 = s["pass_at_k"]["1"]
            row = [bench, label, str(s["problems"]), f"{100 * p1['mean']:.2f} +- {100 * p1['stderr']:.2f}"]
            for k in ks:
                if k > 1:
                    est = s["pass_at_k"].get(str(k))
                    row.append(f"{100 * est['mean']:.2f}" if est else "-")
            row += [f"{100 * s['majority']['mean']:.2f}", f"{s['mean_tokens']:.0f}"]
            lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def plot_pass_at_k(report: Mapping[str, Any], path: Path) -> None:
    """pass@k against k (log2 axis), one panel per benchmark, one curve per model with a +-1 s.e. band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = sorted({b for m in report["models"].values() for b in m["benchmarks"]})
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4.5 * len(benchmarks), 3.8), squeeze=False)
    for ax, bench in zip(axes[0], benchmarks):
        for label, model in report["models"].items():
            s = model["benchmarks"].get(bench)
            if s is None:
                continue
            ks = sorted(int(k) for k in s["pass_at_k"])
            mean = [100 * s["pass_at_k"][str(k)]["mean"] for k in ks]
            se = [100 * s["pass_at_k"][str(k)]["stderr"] for k in ks]
            ax.plot(ks, mean, marker="o", markersize=3, label=label)
            ax.fill_between(
                ks, [m - e for m, e in zip(mean, se)], [m + e for m, e in zip(mean, se)], alpha=0.2
            )
            ax.set_title(s["title"] or bench)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_pass_rates(path: Path, problems: Sequence[ProblemResult]) -> None:
    """The difficulty filter's input (see conf/eval/profile.yaml): one JSON object per line,
    {"id": str, "pass_rate": float, "n": int, "correct": int}, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for p in problems:
            f.write(json.dumps({"id": p.id, "pass_rate": p.pass_rate, "n": p.n, "correct": p.correct}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
