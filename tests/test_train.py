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
    # a fresh single-process world: drop what an in-process test's init_distributed left in os.environ
    e = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                          "LOCAL_RANK")}
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
def kill_after_logged_steps(cmd: list[str], arm_dir: Path, steps: int, timeout: float) -> None:
    """Start a training run, SIGKILL it once `arm_dir`'s metrics.jsonl holds `steps` lines; it must not have
    finished by then."""
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = arm_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (arm_dir / "DONE").exists(), "the run finished before it could be killed"


def test_sigkill_resume_reproduces_the_uninterrupted_run(tmp_path):
    arms = "train.arms={hint: ${world.output_dir}/rl/p50}"
    steps = ["train.steps=6", "train.recovery_every=2", "train.save_every=100", arms]
    whole = tmp_path / "whole"
    subprocess.run(train_cmd(whole, *steps), check=True, env=env(), cwd=REPO, capture_output=True, timeout=600)

    cut = tmp_path / "cut"
    kill_after_logged_steps(train_cmd(cut, *steps), cut / "hint", 3, 600)
    subprocess.run(train_cmd(cut, *steps), check=True, env=env(), cwd=REPO, capture_output=True, timeout=600)

    assert metrics(cut / "hint" / "metrics.jsonl") == metrics(whole / "hint" / "metrics.jsonl")
    assert [m["step"] for m in metrics(cut / "hint" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_grpo_steps_raise_reward_on_a_learnable_task():
    """Real tiny Megatron model, real engine, real GRPO step: reward 1 when the first generated token id is even.
    A random model starts near 0.5; ten steps at lr 1e-2 must move it clearly up."""
    import torch

    from questa_nemo.ckpt.load import load_chunks
    from questa_nemo.config import load_config, read_hf_config
    from questa_nemo.model.parallel import destroy_distributed, init_distributed
    from questa_nemo.model.policy import MegatronPolicy
    from questa_nemo.reward.types import Done, RewardResult
    from questa_nemo.rollout import RolloutContext, build_backend
    from questa_nemo.train.grpo import SyncRollouts, grpo_step
    from questa_nemo.train.metrics import PhaseTimer
    from questa_nemo.train.prompts import PromptRow, PromptSource

    cfg = load_config("default", ["optim.lr=1e-2", "rollout.max_new_tokens=4", "train.prompts_per_step=8"])
    hf = read_hf_config(cfg.model.hf_config)
    init_distributed(cfg.model)
    try:
        policy = MegatronPolicy(load_chunks(cfg.model, hf, None), cfg.model, cfg.optim, 10, 4096, hf["vocab_size"])
        backend = build_backend(cfg.rollout, RolloutContext(policy.modules, hf["vocab_size"], hf))
        g = torch.Generator().manual_seed(0)
        rows = [PromptRow(str(i), torch.randint(3, 100, (12,), generator=g).tolist(), "", False, {}) for i in range(64)]
        first_tokens: list[int] = []

        def decode(ids: list[int]) -> str:
            first_tokens.append(ids[0])
            return str(ids[0])

        def even_first(texts, prompt_rows):
            return Done([RewardResult(float(int(t) % 2 == 0), "correct" if int(t) % 2 == 0 else "wrong") for t in texts])

        rollouts = SyncRollouts(cfg, PromptSource(rows, seed=1), backend, even_first, decode, ())
        success = []
        for step in range(1, 11):
            metrics, _ = grpo_step(cfg, step, policy, backend, rollouts, PhaseTimer())
            success.append(metrics["reward/success"])
            assert metrics["actor/skipped_nonfinite"] == 0.0
        assert backend.version == 10
        assert sum(success[-3:]) / 3 > sum(success[:3]) / 3 + 0.15, success
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_embedded_default_runs_its_arms_and_reports(tmp_path):
    """The arms of the embedded default, shortened: every stage runs and the run ends with its reports."""
    run = tmp_path / "run"
    done = subprocess.run(
        train_cmd(run, "train.steps=3", "train.final_eval=true", "train.warmup.check_every=10",
                  "train.warmup.stop_at_pass1=0.5"),
        env=env(), cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    trained = [a for a in ("plain", "questa", "adaptive") if not summary["training"][a].get("skipped")]
    assert {"plain", "questa"} <= set(trained) and set(summary) == {"initial", "training", *trained}
    from questa_nemo.config import AlgoConfig

    if hasattr(AlgoConfig(), "hints"):  # a build with adaptive hints trains every arm
        assert trained == ["plain", "questa", "adaptive"]
    assert set(summary["questa"]["world_hard"]) == {"1", "2"}  # pass@k for k up to eval.n_samples
    assert all(summary["training"][a]["generated_tokens"] > 0 for a in trained)
    for name in ("curves.png", "eval/passk.png", "eval/results.json", "warmup/calibration.json", "questa/DONE",
                 "plain/DONE"):
        assert (run / name).exists(), name
    warmup = json.loads((run / "warmup" / "warmup.json").read_text())
    checks = {int(step): value for step, value in warmup["pass1_checks"].items()}
    assert checks and set(checks) <= {10, 20}  # every check_every=10 steps, the last step excepted
    assert all(set(c) == {"hinted", "no_hint"} and 0 <= c["hinted"] <= 1 for c in checks.values())
    stopped = max(checks) if checks[max(checks)]["hinted"] >= 0.5 else 30
    assert len(warmup["nll"]) == warmup["steps"] == stopped
    hint = metrics(run / "questa" / "metrics.jsonl")
    assert [m["step"] for m in hint] == [1, 2, 3]
    assert all(m["reward/success_hinted"] >= 0 for m in hint)
    assert "reward/success_unhinted" in metrics(run / "plain" / "metrics.jsonl")[0]
    samples = [json.loads(line) for line in (run / "questa" / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in samples} <= {1, 2, 3} and all(r["samples"] and r["prompt"] for r in samples)


def test_warmup_stops_when_asked_and_only_at_its_checks():
    from types import SimpleNamespace

    from questa_nemo.train.warmup import run_warmup

    class CountingPolicy:
        def pack(self, sequences):
            return sequences

        def train_step(self, micro_batches, loss_fn, normaliser):
            return SimpleNamespace(loss=1.0, skipped=False)

    examples = [([1, 2], [3, 4])] * 8
    asked = []

    def done(step):
        asked.append(step)
        return step >= 30

    losses = run_warmup(CountingPolicy(), examples, 100, 4, seed=0, log=lambda m: None, warmup_done=done,
                        check_every=10)
    assert len(losses) == 30 and asked == [10, 20, 30]
    asked.clear()
    assert len(run_warmup(CountingPolicy(), examples, 25, 4, 0, lambda m: None, done, 10)) == 25
    assert asked == [10, 20]


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.warmup.stop_at_pass1=1.5", "train.warmup.stop_at_pass1"),
        ("train.warmup.check_every=0", "train.warmup.check_every"),
        ("train.build_world_data=false", "train.warmup.stop_at_pass1"),
        ("train.warmup.steps=-1", "train.warmup.steps"),
    ],
)
def test_warmup_config_errors_name_the_key(override, key):
    from questa_nemo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("default", [override])


def _dp_worker(run_dir: Path, steps: int) -> list[str]:
    dist = REPO / "tests" / "dist"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            str(dist / "grpo_dp_worker.py"), str(run_dir), str(steps)]  # fmt: skip


@pytest.mark.slow
def test_sigkill_resume_at_dp2_with_filtering_reproduces_the_uninterrupted_run(tmp_path):
    """DP=2 (two gloo ranks, NCCL-strict guard on), dynamic filtering refilling unequally on the ranks: a run
    SIGKILLed after its third step and resumed logs exactly the uninterrupted run's metrics, every rank ends
    at the same prompt-stream position (one shared cursor), and each rank's Python / numpy / torch generators
    end where the uninterrupted run's did (restored from its own state)."""
    sys.path.insert(0, str(REPO / "tests" / "dist"))
    from launch import strict_env

    steps = 6
    whole = tmp_path / "whole"
    done = subprocess.run(_dp_worker(whole, steps), env=strict_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_dp_worker(cut, steps), env=strict_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    log = cut / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    assert not (cut / "DONE").exists(), "the run finished before it could be killed"
    resumed = subprocess.run(_dp_worker(cut, steps), env=strict_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    assert "resumed" in resumed.stdout + resumed.stderr

    ours = metrics(cut / "metrics.jsonl")
    assert ours == metrics(whole / "metrics.jsonl")
    assert [m["step"] for m in ours] == list(range(1, steps + 1))
    assert sum(m["filter/prompt_batches"] for m in ours) > steps, "no step refilled: the test lost its point"
    ends = {(run.name, r): json.loads((run / f"cursor_rank{r}.json").read_text()) for run in (whole, cut)
            for r in (0, 1)}
    assert len({(e["epoch"], e["cursor"]) for e in ends.values()}) == 1, ends  # one shared cursor
    for r in (0, 1):  # each rank's RNG restored from its own state, not rank 0's
        assert ends["cut", r]["rng"] == ends["whole", r]["rng"], ends
    assert ends["whole", 0]["rng"] != ends["whole", 1]["rng"]


ADAPTIVE = [
    "world.hint_ratios=[0,25,50]",
    "train.arms={adaptive: ${world.output_dir}/rl/p0}",
    "algo.hints.mode=adaptive",
    "algo.hints.splits={p0: ${world.output_dir}/rl/p0, p50: ${world.output_dir}/rl/p50, "
    "p25: ${world.output_dir}/rl/p25}",
    "algo.hints.levels.ratio_per_level=25",
    "algo.hints.levels.max=2",
    "algo.hints.levels.initial=1",
    "algo.hints.max_retries=1",
    "algo.hints.unhinted_share=0.25",
    "train.steps=6",
    "train.recovery_every=2",
    "train.save_every=100",
    "train.validation_reliance=true",
]


def run_state(run: Path) -> dict:
    newest = max((run / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    return json.loads((newest / "run_state.json").read_text())


@pytest.mark.slow
def test_sigkill_resume_keeps_hint_levels_and_token_budget_exact(tmp_path):
    """Adaptive hints with retries and mixed groups: a run SIGKILLed after its third step and resumed logs the
    uninterrupted run's metrics (hints/level_*, hints/tokens_used included) and ends with the same per-problem
    levels and token budget; a run given the tokens the whole run had used after step 3 stops there."""
    whole = tmp_path / "whole"
    subprocess.run(train_cmd(whole, *ADAPTIVE), check=True, env=env(), cwd=REPO, capture_output=True, timeout=900)
    cut = tmp_path / "cut"
    kill_after_logged_steps(train_cmd(cut, *ADAPTIVE), cut / "adaptive", 3, 900)
    subprocess.run(train_cmd(cut, *ADAPTIVE), check=True, env=env(), cwd=REPO, capture_output=True, timeout=900)

    ours, theirs = metrics(cut / "adaptive" / "metrics.jsonl"), metrics(whole / "adaptive" / "metrics.jsonl")
    assert ours == theirs
    assert [m["step"] for m in ours] == [1, 2, 3, 4, 5, 6]
    assert all("hints/level_mean" in m and m["hints/tokens_used"] > 0 for m in ours)
    assert sum(m["hints/retry_groups"] for m in ours) > 0, "no retry happened: the test lost its point"
    assert [m["step"] for m in ours if "eval/hint_reliance" in m] == [3, 6]  # train.eval_every=3
    assert all(-1 <= m["eval/hint_reliance"] <= 1 for m in ours if "eval/hint_reliance" in m)
    a, b = run_state(cut / "adaptive"), run_state(whole / "adaptive")
    assert a["step"] == b["step"] == 6
    assert a["hint_levels"] == b["hint_levels"] and a["token_budget"] == b["token_budget"]
    assert b["hint_levels"]["levels"], "no level was recorded"
    assert b["token_budget"]["used"] == theirs[-1]["hints/tokens_used"]

    budget = int(theirs[2]["hints/tokens_used"])
    short = tmp_path / "short"
    subprocess.run(train_cmd(short, *ADAPTIVE, f"train.token_budget={budget}"), check=True, env=env(), cwd=REPO,
                   capture_output=True, timeout=900)
    logged = metrics(short / "adaptive" / "metrics.jsonl")
    done = json.loads((short / "adaptive" / "DONE").read_text())
    assert done["step"] == logged[-1]["step"] < 6
    assert logged[-1]["hints/tokens_used"] >= budget > logged[-2]["hints/tokens_used"]
    assert run_state(short / "adaptive")["step"] == done["step"]


@pytest.mark.slow
def test_dp2_adaptive_hint_levels_agree_on_every_rank(tmp_path):
    """DP=2 through fit and the real collectives (NCCL-strict guard), adaptive hints with retries, mixed groups
    and filtering refills: both ranks end with the same per-problem levels and token budget, which are the
    checkpoint's and the log's."""
    sys.path.insert(0, str(REPO / "tests" / "dist"))
    from launch import strict_env

    run = tmp_path / "adaptive"
    hints = ["algo.hints.mode=adaptive", "algo.hints.splits={p0: x, p25: x, p50: x, p75: x, p100: x}",
             "algo.hints.max_retries=1", "algo.hints.unhinted_share=0.25"]
    done = subprocess.run(_dp_worker(run, 3) + hints, env=strict_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ends = [json.loads((run / f"cursor_rank{r}.json").read_text()) for r in (0, 1)]
    assert ends[0]["hint_levels"] == ends[1]["hint_levels"]
    assert ends[0]["token_budget"] == ends[1]["token_budget"]
    levels = ends[0]["hint_levels"]["levels"]
    assert len(set(levels.values())) > 1, levels  # moved both ways, not only up
    assert run_state(run)["hint_levels"] == ends[0]["hint_levels"]
    logged = metrics(run / "metrics.jsonl")
    assert logged[-1]["hints/tokens_used"] == ends[0]["token_budget"]["used"]
    assert sum(m["hints/retry_groups"] for m in logged) > 0


def test_memory_metrics_report_what_is_held_now_beside_the_peak():
    """A leak over a long run shows in the current values (the peaks move only once it passes them)."""
    from questa_nemo.train.loop import memory_metrics

    m = memory_metrics()
    assert 0 < m["perf/cpu_rss_gib"] <= m["perf/cpu_max_rss_gib"] * 1.01, m
    # A fresh anonymous mapping, every page written: new resident pages whatever the allocator holds already.
    # (A bytearray went through malloc; late in a CI run it reused pages the process held, and RSS did not move.)
    import mmap

    held = mmap.mmap(-1, 256 * 2**20)  # 256 MiB
    for offset in range(0, len(held), mmap.PAGESIZE):
        held[offset] = 1
    grown = memory_metrics()["perf/cpu_rss_gib"]
    held.close()
    assert grown - m["perf/cpu_rss_gib"] > 0.2, (m, grown)
