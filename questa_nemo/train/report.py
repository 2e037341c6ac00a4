"""The end of a run: every arm's final weights (and the starting weights) evaluated without hints, the pass@k
table and plot, the training curves of all arms in one PNG, and summary.json with the headline numbers."""

from __future__ import annotations

import json
from pathlib import Path

from questa_nemo.ckpt.runs import latest_checkpoint
from questa_nemo.eval.benchmarks import benchmark_key, load_benchmark
from questa_nemo.eval.run import evaluate_all, write_report
from questa_nemo.train.metrics import read_metrics
from questa_nemo.train.validation import answer_extractor, eval_scorer

CURVES = (("reward/success", "training success rate (hinted prompts in the hint arm)"),
          ("eval/pass@1", "validation pass@1, no hint"))


def plot_curves(run_dirs: dict[str, Path], path: Path) -> None:
    """One panel per curve in CURVES, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(6 * len(CURVES), 4))
    for ax, (key, title) in zip(axes, CURVES):
        for arm, run_dir in run_dirs.items():
            points = [(m["step"], m[key]) for m in read_metrics(run_dir) if isinstance(m.get(key), int | float)]
            if points:
                ax.plot(*zip(*points), label=arm or "grpo", marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def final_report(s, init: str | None, arms: list, resources) -> dict:
    """Evaluate `init` (None: not) and every trained arm (train.arms.Arm) without hints; write summary.json
    (train.arms.summary_name): per model and benchmark pass@k with standard errors, and under "training" per
    arm its generated tokens, steps, zero-signal share and budget (or why it was skipped)."""
    from questa_nemo.eval.backend import backend_for_checkpoint
    from questa_nemo.train.arms import summary_name, training_record

    cfg = s.cfg
    run_dirs = {arm.name: s.run_dir / arm.name if arm.name else s.run_dir for arm in arms if not arm.skipped}
    checkpoints, labels = [], []
    if init is not None:
        checkpoints.append(init)
        labels.append("initial")
    for arm, run_dir in run_dirs.items():
        final = latest_checkpoint(run_dir)
        if final is not None:
            checkpoints.append(str(final))
            labels.append(arm or "grpo")
    benchmarks = [(benchmark_key(b), b.path, load_benchmark(b)) for b in cfg.eval.benchmarks]

    def backend_for(cfg_, checkpoint: str):
        return backend_for_checkpoint(cfg_, checkpoint, s.hf)

    def context_of(cfg_, checkpoint: str) -> int:  # every arm is the session's model: one context
        return int(s.hf.get("max_position_embeddings", 4096))

    results = evaluate_all(cfg, checkpoints, labels, benchmarks, s.tokenizer, eval_scorer(s, resources),
                           answer_extractor(s), backend_for, context_of)
    if not s.is_main:
        return {}
    write_report(cfg, results, dict(zip(labels, checkpoints)))
    report = json.loads((Path(cfg.eval.output_dir) / "results.json").read_text())
    summary = {
        label: {
            key: {k: bench["pass_at_k"][k] for k in bench["pass_at_k"]}
            for key, bench in model["benchmarks"].items()
        }
        for label, model in report["models"].items()
    }
    if arms and arms[0].name:
        summary["training"] = {arm.name: training_record(s.run_dir / arm.name, arm) for arm in arms}
    name = summary_name(cfg)
    curves = s.run_dir / name.replace("summary", "curves").replace(".json", ".png")
    (s.run_dir / name).write_text(json.dumps(summary, indent=1) + "\n")
    if run_dirs:
        plot_curves(run_dirs, curves)
    s.log(f"[report] {s.run_dir / name}, {curves}, {Path(cfg.eval.output_dir) / 'passk.png'}")
    return summary
