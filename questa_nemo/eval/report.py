"""Summaries of per-problem results: the JSON report, the terminal table, the pass@k plot, pass-rate profiles."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from questa_nemo.atomic import atomic_path, write_text_atomic
from questa_nemo.eval.benchmarks import benchmark_title
from questa_nemo.eval.passk import (
    mean_and_std,
    mean_and_stderr,
    paired_difference,
    pass_at_k_over_problems,
    pass_at_k_over_seeds,
)
from questa_nemo.eval.store import ProblemResult, pooled

# model label -> benchmark key -> problems, or seed -> problems (one run per seed; eval/run.py's Results)
Results = Mapping[str, Mapping[str, Sequence[ProblemResult] | Mapping[int, Sequence[ProblemResult]]]]


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
        "prompts_cut": sum(p.prompt_cut > 0 for p in problems),  # prompts shortened to fit the context
        "reasons": dict(sum((Counter(p.reasons) for p in problems), Counter())),
        "per_problem": [asdict(p) for p in problems],
    }


def summarise_seeds(runs: Mapping[int, Sequence[ProblemResult]]) -> dict[str, Any]:
    """One run: summarise(). Several seeds: each seed's summary under per_seed, and under over_seeds the mean
    and sample std over seeds of pass@k (every k up to the samples per seed) and of the majority vote; the
    top-level pass_at_k is then over all seeds' samples pooled per problem (k up to seeds x samples)."""
    if len(runs) == 1:
        seed, problems = next(iter(runs.items()))
        return summarise(problems) | {"seeds": [seed]}
    per_seed = {str(seed): summarise(problems) for seed, problems in runs.items()}
    n = min(s["n_samples"] for s in per_seed.values())
    counts = [[(p.n, p.correct) for p in problems] for problems in runs.values()]
    over = {
        "pass_at_k": {str(k): pass_at_k_over_seeds(counts, k)._asdict() for k in range(1, n + 1)},
        "majority": mean_and_std([s["majority"]["mean"] for s in per_seed.values()])._asdict(),
    }
    whole = summarise(pooled(dict(runs)))
    for s in per_seed.values():
        del s["per_problem"]  # in the per-seed result files; the pooled list stays below
    return whole | {"seeds": [int(s) for s in per_seed], "over_seeds": over, "per_seed": per_seed}


def paired_against_first(results: Results) -> dict[str, Any]:
    """Benchmark key -> pass@1 of every later model minus the first (the base, as the models were given), on the
    problems both answered: the mean per-problem difference and its paired standard error over problems (a
    problem hard for one is hard for the other, so this error is smaller than the two models' errors together).
    Several seeds count as one run per problem, their samples pooled. Empty for one model."""
    labels = list(results)
    out: dict[str, Any] = {}
    if len(labels) < 2:
        return out

    def by_id(runs: Sequence[ProblemResult] | Mapping[int, Sequence[ProblemResult]]) -> dict[str, ProblemResult]:
        problems = pooled(dict(runs)) if isinstance(runs, Mapping) else runs
        return {p.id: p for p in problems}

    base = labels[0]
    for key, base_runs in results[base].items():
        ref = by_id(base_runs)
        rows = {}
        for label in labels[1:]:
            if key not in results[label]:
                continue
            other = by_id(results[label][key])
            ids = [i for i in ref if i in other]
            if ids:
                est = paired_difference([(other[i].n, other[i].correct) for i in ids],
                                        [(ref[i].n, ref[i].correct) for i in ids], 1)
                rows[label] = {"problems": len(ids), **est._asdict()}
        if rows:
            out[key] = {"against": base, "pass@1": rows}
    return out


def build_report(
    results: Results, checkpoints: Mapping[str, str], settings: Mapping[str, Any], ks: Sequence[int]
) -> dict[str, Any]:
    """The results.json payload: sampling settings (with the preset), then per model and benchmark the summary."""
    models = {}
    for label, benches in results.items():
        summaries = {}
        for key, runs in benches.items():
            summary = summarise_seeds(runs) if isinstance(runs, Mapping) else summarise(runs)
            summaries[key] = {"title": benchmark_title(key)} | summary
        models[label] = {"checkpoint": checkpoints.get(label, ""), "benchmarks": summaries}
    kept = {k: v for k, v in settings.items() if k not in ("checkpoint", "benchmark")}
    report = {"preset": settings.get("preset", "custom"), "settings": kept, "ks": list(ks), "models": models}
    paired = paired_against_first(results)
    return report | ({"paired": paired} if paired else {})


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
            over = s.get("over_seeds")
            if over:  # mean +- sample std over seeds, as the leaderboard reports
                p1 = over["pass_at_k"]["1"]
                cell = f"{100 * p1['mean']:.2f} +- {100 * p1['std']:.2f} sd, {p1['seeds']} seeds"
            else:  # mean +- standard error over problems
                p1 = s["pass_at_k"]["1"]
                cell = f"{100 * p1['mean']:.2f} +- {100 * p1['stderr']:.2f}"
            row = [bench, label, str(s["problems"]), cell]
            for k in ks:
                if k > 1:
                    est = (over or s)["pass_at_k"].get(str(k))
                    row.append(f"{100 * est['mean']:.2f}" if est else "-")
            row += [f"{100 * s['majority']['mean']:.2f}", f"{s['mean_tokens']:.0f}"]
            lines.append(row)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    for bench, block in sorted(report.get("paired", {}).items()):
        gaps = ", ".join(f"{label} {100 * e['mean']:+.2f} +- {100 * e['stderr']:.2f}"
                         for label, e in block["pass@1"].items())
        table += f"\n{bench}: pass@1 minus {block['against']}'s, paired over problems: {gaps}"
    settings = report.get("settings", {})
    differs = settings.get("preset_deviations") or {}
    title = f"preset: {report.get('preset', 'custom')}" + (f" (differs: {differs})" if differs else "")
    return table + "\n" + title


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_pass_rates(path: Path, problems: Sequence[ProblemResult]) -> None:
    """The difficulty filter's input (see conf/eval/profile.yaml): one JSON object per line,
    {"id": str, "pass_rate": float, "n": int, "correct": int}, written atomically."""
    lines = (json.dumps({"id": p.id, "pass_rate": p.pass_rate, "n": p.n, "correct": p.correct}) for p in problems)
    write_text_atomic(path, "".join(line + "\n" for line in lines))
