"""One JSON + markdown table (+ curves PNG) of issue 20's equal-compute arms over seeds.

    python bench/arms_summary.py RUN OUT.json --config NAME --benchmark KEY --seeds 1,2 [key=value ...]

RUN/seed<S>/ is one seed's run folder (its warm-up, its arms in <arm>/). Per seed the no-hint pass@k (with
standard errors over problems) of the RL start ("initial") and of every arm come from RUN/seed<S>/eval_<label>/
results.json (one `questa-nemo eval` per model: bench/smollm2_arms.sh) or else from
RUN/seed<S>/summary.json (the trainer's final report: bench/embedded_arms.sh). Per arm its generated tokens,
steps and zero-signal share come from its metrics (train.arms.training_record). Over seeds: the mean and the
standard error of the mean (sample sd / sqrt(n)) of each number. Where the per-problem results are there
(RUN/seed<S>/eval/<label>/<benchmark>.jsonl or eval_*/<label>/...), "paired" holds every arm minus the RL start
and every later arm minus an earlier one: per seed the mean per-problem difference with its paired standard
error over problems (eval.passk.paired_difference), over seeds the mean and standard error of those means.
Overrides rebuild the arms' configs as the runs had them (train.arms of --config).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from questa_nemo.config import load_config  # noqa: E402
from questa_nemo.eval.passk import paired_difference  # noqa: E402
from questa_nemo.train.arms import plan_arms, training_record  # noqa: E402
from questa_nemo.train.metrics import read_metrics  # noqa: E402


def over_seeds(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "stderr": sd / math.sqrt(n) if sd is not None else None, "n": n, "values": values}


def passk_blocks(seed_dir: Path, benchmark: str) -> dict[str, dict]:
    """label -> {k: {mean, stderr}} on `benchmark`, from eval_<label>/results.json (one `questa-nemo eval` per
    model) or else the trainer's summary.json."""
    found = sorted(seed_dir.glob("eval_*/results.json"))
    if found:
        out = {}
        for results in found:
            for label, m in json.loads(results.read_text())["models"].items():
                if benchmark in m["benchmarks"]:
                    out[label] = m["benchmarks"][benchmark]["pass_at_k"]
        return out
    summary = seed_dir / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        return {label: block[benchmark] for label, block in s.items() if label != "training" and benchmark in block}
    return {}


def problem_counts(seed_dir: Path, label: str, benchmark: str) -> dict[str, tuple[int, int]] | None:
    """problem id -> (samples, correct) of one model on `benchmark`, from the evaluation's per-problem file."""
    for path in [seed_dir / "eval" / label / f"{benchmark}.jsonl",
                 *sorted(seed_dir.glob(f"eval_*/{label}/{benchmark}.jsonl"))]:
        if path.exists():
            rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            return {str(r["id"]): (int(r["n"]), int(r["correct"])) for r in rows}
    return None


def paired_table(run: Path, seeds: list[str], labels: list[str], benchmark: str, ks: list[str]) -> dict:
    """"A - B" -> pass@k -> {per_seed: [{seed, mean, stderr}], over_seeds}, for every arm minus "initial" and
    every later arm minus an earlier one, on the problems both evaluated."""
    out: dict[str, dict] = {}
    counts = {(seed, label): problem_counts(run / f"seed{seed}", label, benchmark) for seed in seeds for label in labels}
    pairs = [(a, "initial") for a in labels[1:]] + [(labels[j], labels[i]) for i in range(1, len(labels))
                                                    for j in range(i + 1, len(labels))]
    for a, b in pairs:
        for k in ks:
            rows = []
            for seed in seeds:
                ca, cb = counts[seed, a], counts[seed, b]
                if not ca or not cb:
                    continue
                ids = sorted(set(ca) & set(cb))
                if not ids or min(min(ca[i][0], cb[i][0]) for i in ids) < int(k):  # pass@k needs k samples
                    continue
                est = paired_difference([ca[i] for i in ids], [cb[i] for i in ids], int(k))
                rows.append({"seed": int(seed), "problems": len(ids), "mean": est.mean, "stderr": est.stderr})
            if rows:
                out.setdefault(f"{a} - {b}", {})[f"pass@{k}"] = {
                    "per_seed": rows, "over_seeds": over_seeds([r["mean"] for r in rows])}
    return out


def warmup_record(seed_dir: Path) -> dict:
    out = {}
    w = seed_dir / "warmup" / "warmup.json"
    if w.exists():
        record = json.loads(w.read_text())
        checks = {int(k): v for k, v in record.get("pass1_checks", {}).items()}
        kept = record.get("kept_step", record["steps"])
        out = {"steps_trained": record["steps"], "kept_step": kept, "kept_check": checks.get(kept), "checks": checks}
    c = seed_dir / "warmup" / "calibration.json"
    if c.exists():
        out["calibration_no_hint_pass1_by_length"] = json.loads(c.read_text())
    return out


def stage_minutes(seed_dir: Path, arms: list[str]) -> dict[str, float] | None:
    """Wall minutes of each stage of one run from the files that mark its end (mtimes), for single-process runs
    (the stages one after the other); None where the marks are out of order (arms run as concurrent processes,
    each rewriting config.yaml, as bench/smollm2_arms.sh does)."""
    marks = [("start", seed_dir / "config.yaml"), ("warm-up", seed_dir / "warmup" / "warmup.json"),
             ("calibration", seed_dir / "warmup" / "calibration.json"),
             *((arm, seed_dir / arm / "DONE") for arm in arms), ("final eval", seed_dir / "summary.json")]
    times = [(name, path.stat().st_mtime) for name, path in marks if path.exists()]
    if any(t < prev for (_, t), (_, prev) in zip(times[1:], times)):
        return None
    return {name: round((t - prev) / 60, 2) for (name, t), (_, prev) in zip(times[1:], times)}


def plot(run: Path, seeds: list[str], arms: list[str], path: Path) -> None:
    """Validation pass@1 (no hint) and training success against generated tokens, one line per arm x seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    colours = {}
    for seed in seeds:
        for arm in arms:
            rows = read_metrics(run / f"seed{seed}" / arm)
            if not rows:
                continue
            tokens, total = [], 0.0
            for m in rows:
                total = m.get("hints/tokens_used") or (
                    total + m.get("perf/rollout_tokens_per_s", 0.0) * m.get("time/rollout_s", 0.0))
                tokens.append(total)
            colour = colours.setdefault(arm, f"C{len(colours)}")
            for ax, key in zip(axes, ("eval/pass@1", "reward/success")):
                pts = [(t, m[key]) for t, m in zip(tokens, rows) if isinstance(m.get(key), int | float)]
                if pts:
                    ax.plot(*zip(*pts), color=colour, alpha=0.8, label=f"{arm} s{seed}",
                            marker="." if key.startswith("eval") else None)
    for ax, title in zip(axes, ("validation pass@1, no hint", "training success (as sampled, hints included)")):
        ax.set_title(title)
        ax.set_xlabel("generated tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_over_seeds(seeds_out: list[dict], label: str) -> dict:
    """Generated tokens, zero-signal share and steps of arm `label` over the seeds where it was evaluated: an
    arm whose process died (no evaluation) is listed under `not_evaluated_seeds`, not averaged in (a crashed
    arm's few tokens would make the arms look unequal in compute when the evaluated ones were equal)."""
    done = [r for r in seeds_out if "pass@1" in r["models"].get(label, {})]
    out: dict = {}
    for key in ("generated_tokens", "zero_signal_share", "steps"):
        vals = [r["training"][label].get(key) for r in done]
        vals = [v for v in vals if isinstance(v, int | float)]
        out[key] = over_seeds(vals) if vals else None
    missing = [r["seed"] for r in seeds_out if r not in done]
    if missing:
        out["not_evaluated_seeds"] = missing
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--config", default="default")
    p.add_argument("--benchmark", default="world_hard")
    p.add_argument("--seeds", required=True, help="comma-separated, e.g. 1,2")
    p.add_argument("--ks", default="1,8,16")
    p.add_argument("--plan", help="arms_plan.txt of bench/smollm2_arms.sh (recorded)")
    p.add_argument("--curves")
    args, overrides = p.parse_known_args()
    run, ks = Path(args.run), args.ks.split(",")
    args.seeds = [x for x in args.seeds.replace(" ", ",").split(",") if x]
    cfg = load_config(args.config, [o for o in overrides if "=" in o] + [f"train.run_dir={run}/seed{args.seeds[0]}"])
    arms = plan_arms(cfg)
    names = [a.name for a in arms]
    seeds_out = []
    for seed in args.seeds:
        d = run / f"seed{seed}"
        blocks = passk_blocks(d, args.benchmark)
        row = {"seed": int(seed), "warmup": warmup_record(d), "models": {}, "training": {},
               "stage_minutes": stage_minutes(d, names)}
        if (d / "wall_s").exists():
            row["wall_s"] = float((d / "wall_s").read_text())
        for label, block in blocks.items():
            row["models"][label] = {f"pass@{k}": block[k] for k in ks if k in block}
        for arm in arms:
            row["training"][arm.name] = training_record(d / arm.name, arm)
        seeds_out.append(row)
    table: dict[str, dict] = {}
    for label in ["initial", *names]:
        entry: dict = {}
        for k in ks:
            vals = [r["models"][label][f"pass@{k}"]["mean"] for r in seeds_out
                    if f"pass@{k}" in r["models"].get(label, {})]
            if vals:
                entry[f"pass@{k}"] = over_seeds(vals)
        if label != "initial":
            entry.update(training_over_seeds(seeds_out, label))
            skipped = {r["training"][label].get("skipped") for r in seeds_out} - {None}
            if skipped:
                entry["skipped"] = sorted(skipped)
        table[label] = entry
    result = {"benchmark": args.benchmark, "config": args.config, "overrides": overrides,
              "rl_start_no_hint_pass@8": table["initial"].get("pass@8"), "over_seeds": table,
              "paired": paired_table(run, args.seeds, ["initial", *names], args.benchmark, ks), "seeds": seeds_out}
    if args.plan and Path(args.plan).exists():
        result["arms_plan"] = Path(args.plan).read_text().splitlines()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.curves:
        plot(run, args.seeds, names, Path(args.curves))

    def cell(e):
        if not e:
            return "-"
        se = f" +- {100 * e['stderr']:.1f}" if e["stderr"] is not None else ""
        return f"{100 * e['mean']:.1f}{se}"

    print(f"{args.out}: {len(args.seeds)} seeds; mean +- stderr over seeds (%), no-hint {args.benchmark}\n")
    print("| model | " + " | ".join(f"pass@{k}" for k in ks) + " | generated tokens | zero-signal share |")
    print("| --- | " + " | ".join("---" for _ in ks) + " | --- | --- |")
    for label, e in table.items():
        tok = e.get("generated_tokens")
        zs = e.get("zero_signal_share")
        extra = (f"{tok['mean']:.3g}" if tok else "-", f"{zs['mean']:.2f}" if zs else "-")
        if e.get("skipped"):
            extra = ("skipped", "; ".join(e["skipped"])[:80])
        print(f"| {label} | " + " | ".join(cell(e.get(f"pass@{k}")) for k in ks) + f" | {extra[0]} | {extra[1]} |")
    print("\nper seed (pass@1 / pass@8 of each model, %):")
    for r in seeds_out:
        kc = (r["warmup"].get("kept_check") or {})
        cells = ", ".join(f"{label} {100 * m['pass@1']['mean']:.1f}/{100 * m.get('pass@8', m['pass@1'])['mean']:.1f}"
                          for label, m in r["models"].items() if "pass@1" in m)
        print(f"seed {r['seed']}: warm-up kept step {r['warmup'].get('kept_step')} {kc}; {cells}")
    if result["paired"]:
        print("\npaired over problems, pass@1 (points of %): per seed difference +- paired stderr; over seeds")
        for pair, block in result["paired"].items():
            if "pass@1" in block:
                b = block["pass@1"]
                per = ", ".join(f"{100 * r['mean']:+.2f} +- {100 * r['stderr']:.2f}" for r in b["per_seed"])
                print(f"{pair}: {per}; {cell(b['over_seeds'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
