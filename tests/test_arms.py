"""Issue 20's equal-compute arms: train.arms entries (a path, or {dataset, hints, token_budget}), each arm's own
config copy with its algo.hints merged over the run's, the selection train.run_arms, what an arm's metrics say
it spent, and the hint-ratio splits the arms draw on (same problems in every split)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import pytest

from questa_nemo.config import ArmSpec, ConfigError, arm_spec, load_config
from questa_nemo.train.arms import arm_config, merged_hints, plan_arms, summary_name, training_record


def test_arm_spec_takes_a_path_or_a_mapping():
    assert arm_spec("plain", "data/rl/p0") == ArmSpec("plain", "data/rl/p0")
    spec = arm_spec("adaptive", {"dataset": "p0", "hints": {"mode": "adaptive", "max_retries": 1},
                                 "token_budget": 1000})
    assert spec == ArmSpec("adaptive", "p0", {"mode": "adaptive", "max_retries": 1}, 1000)


@pytest.mark.parametrize(
    "value, key",
    [
        ({"hints": {}}, "train.arms.a.dataset"),
        ({"dataset": ""}, "train.arms.a.dataset"),
        ({"dataset": "p0", "token_budget": 0}, "train.arms.a.token_budget"),
        ({"dataset": "p0", "token_budget": 1.5}, "train.arms.a.token_budget"),
        ({"dataset": "p0", "hints": "adaptive"}, "train.arms.a.hints"),
        ({"dataset": "p0", "budget": 10}, "train.arms.a.budget"),
        ("", "train.arms.a"),
        (3, "train.arms.a"),
    ],
)
def test_arm_spec_errors_name_the_key(value, key):
    with pytest.raises(ConfigError) as e:
        arm_spec("a", value)
    assert e.value.key == key


def test_arm_names_must_be_folder_safe():
    with pytest.raises(ConfigError, match=r"train\.arms\.a/b"):
        arm_spec("a/b", "p0")


# A stand-in with the contract's names (notes/HINTS_CONTRACT.md), so the merge is tested whatever this build's
# schema holds; the real schema's merge is the same call.
@dataclass
class Levels:
    min: int = 0
    max: int = 4
    initial: int = 2


@dataclass
class Schedule:
    kind: str = "constant"
    boundaries: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


@dataclass
class Hints:
    mode: str = "fixed"
    splits: dict[str, str] = field(default_factory=dict)
    levels: Levels = field(default_factory=Levels)
    max_retries: int = 0
    schedule: Schedule = field(default_factory=Schedule)

    def validate(self, key="algo.hints"):
        if self.max_retries < 0:
            raise ConfigError(f"{key}.max_retries", "must be >= 0")


def test_hints_merge_over_the_runs_keeping_what_the_arm_does_not_set():
    base = Hints(levels=Levels(max=3))
    questa = merged_hints(base, {"schedule": {"kind": "stages", "boundaries": [0.5, 1.0], "ratios": [50, 25]},
                                 "splits": {"50": "p50", "25": "p25"}}, "train.arms.questa.hints")
    assert questa.schedule == Schedule("stages", [0.5, 1.0], [50.0, 25.0])
    assert questa.levels == Levels(max=3) and questa.mode == "fixed" and questa.splits == {"50": "p50", "25": "p25"}
    adaptive = merged_hints(base, {"mode": "adaptive", "levels": {"initial": 1}}, "train.arms.adaptive.hints")
    assert adaptive.levels == Levels(max=3, initial=1) and adaptive.mode == "adaptive"
    assert base == Hints(levels=Levels(max=3))  # the run's own hints are untouched


@pytest.mark.parametrize(
    "partial, key",
    [
        ({"bogus": 1}, "train.arms.x.hints.bogus"),
        ({"levels": {"max": "many"}}, "train.arms.x.hints.levels.max"),
        ({"max_retries": -1}, "train.arms.x.hints.max_retries"),
    ],
)
def test_hints_merge_errors_name_the_arm_and_key(partial, key):
    with pytest.raises(ConfigError) as e:
        merged_hints(Hints(), partial, "train.arms.x.hints")
    assert e.value.key == key


def _cfg(*overrides):
    return load_config("default", list(overrides))


def test_each_arm_gets_its_own_config_copy():
    cfg = _cfg()
    cfg.algo.hints = Hints()  # as in a build with the schema (monkeypatched on this copy only)
    if "token_budget" not in cfg.train.__dataclass_fields__:
        object.__setattr__(cfg.train, "token_budget", None)
    arm = arm_config(cfg, ArmSpec("adaptive", "p0", {"mode": "adaptive", "max_retries": 1}, 500))
    assert arm.cfg is not cfg and arm.cfg.algo.hints.mode == "adaptive" and arm.cfg.algo.hints.max_retries == 1
    assert cfg.algo.hints == Hints() and arm.skipped is None
    if "token_budget" in type(cfg.train).__dataclass_fields__:
        assert arm.cfg.train.token_budget == 500 and cfg.train.token_budget is None


def test_without_the_hints_schema_fixed_arms_run_and_others_are_skipped():
    cfg = _cfg()
    if hasattr(cfg.algo, "hints"):
        del cfg.algo.hints  # what a build before algo.hints sees (this instance only)
        if hasattr(cfg.algo, "hints"):
            pytest.skip("algo.hints is a class attribute here")
    questa = arm_config(cfg, ArmSpec("questa", "p50", {"schedule": {"kind": "stages"}, "splits": {"50": "p50"}}))
    assert questa.skipped is None and "dropped" in questa.notes[0] and questa.dataset == "p50"
    adaptive = arm_config(cfg, ArmSpec("adaptive", "p0", {"mode": "adaptive"}))
    assert adaptive.skipped and "algo.hints" in adaptive.skipped


def test_the_embedded_default_plans_three_arms_from_the_same_warm_up():
    cfg = _cfg()
    arms = plan_arms(cfg)
    assert [a.name for a in arms] == ["plain", "questa", "adaptive"]
    assert arms[0].dataset.endswith("rl/p0") and arms[1].dataset.endswith("rl/p50")
    budgets = {json.dumps(cfg.train.arms[a.name]["token_budget"]) for a in arms}
    assert len(budgets) == 1, "every arm has the same generated-token budget"
    assert cfg.world.hint_ratios[0] == 50 and sorted(cfg.world.hint_ratios) == [0, 25, 50, 75]
    for a in arms:
        assert a.cfg.train.run_dir == cfg.train.run_dir and a.cfg.eval == cfg.eval  # evaluated alike, no hints
    assert plan_arms(_cfg("train.run_arms=[questa]"))[0].name == "questa"
    assert plan_arms(_cfg("train.run_arms=[]")) == []
    assert summary_name(cfg) == "summary.json"
    assert summary_name(_cfg("train.run_arms=[questa]")) == "summary_questa.json"
    assert summary_name(_cfg("train.run_arms=[]")) == "summary_initial.json"


@pytest.mark.parametrize(
    "override, key",
    [("train.run_arms=[nope]", "train.run_arms"), ("train.arms.plain={token_budget: 5}", "train.arms.plain.dataset")],
)
def test_arm_config_errors_name_the_key_at_load(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(override)


def test_training_record_counts_generated_tokens_and_zero_signal(tmp_path):
    cfg = _cfg()
    arm = plan_arms(cfg)[0]
    rows = [
        {"step": 1, "perf/rollout_tokens_per_s": 100.0, "time/rollout_s": 2.0},
        {"step": 2, "perf/rollout_tokens_per_s": 50.0, "time/rollout_s": 3.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = training_record(tmp_path, arm)
    assert rec["generated_tokens"] == 350 and rec["steps"] == 2 and rec["zero_signal_share"] is None
    rows = [{"step": 1, "hints/tokens_used": 300, "hints/zero_signal_share": 0.5},
            {"step": 2, "hints/tokens_used": 640, "hints/zero_signal_share": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = training_record(tmp_path, arm)
    assert rec["generated_tokens"] == 640 and rec["zero_signal_share"] == 0.375
    assert training_record(tmp_path / "none", arm)["steps"] == 0


def test_small_world_writes_every_hint_ratio_over_the_same_problems(tmp_path):
    from questa_nemo.config import WorldConfig
    from questa_nemo.data.world import write_world
    from questa_nemo.eval.benchmarks import read_records

    cfg = WorldConfig(output_dir=str(tmp_path), warmup_examples=4, rl_problems=12, eval_problems=2,
                      calib_problems_per_length=1, hint_ratios=[50.0, 0.0, 25.0, 75.0])
    write_world(cfg)
    splits = {r: read_records(tmp_path / "rl" / f"p{r}", "train") for r in (0, 25, 50, 75)}
    ids = {r: [row["id"] for row in rows] for r, rows in splits.items()}
    assert len(ids[0]) == 12 and len(set(ids[0])) == 12 and all(v == ids[0] for v in ids.values())
    for rows in splits.values():
        assert [row["id"] for row in rows] == [row["source_id"] for row in rows]  # the same id in every split
    hint_chars = {r: sum(len(row["hint"]) for row in rows) for r, rows in splits.items()}
    assert hint_chars[0] == 0 < hint_chars[25] < hint_chars[50] < hint_chars[75]


def test_word_world_writes_every_hint_ratio_as_jsonl_over_the_same_problems(tmp_path):
    from questa_nemo.config import WorldConfig
    from questa_nemo.data.word_world import write_word_world

    cfg = WorldConfig(output_dir=str(tmp_path), max_ops=10, hard_min_ops=8, modulus=1000, warmup_examples=4,
                      rl_problems=10, eval_problems=2, calib_problems_per_length=1,
                      hint_ratios=[50.0, 0.0, 25.0, 75.0, 100.0])
    write_word_world(cfg, jsonl_only=True)  # what a machine without `datasets` writes
    splits = {}
    for r in (0, 25, 50, 75, 100):
        folder = tmp_path / "rl" / f"p{r}"
        assert sorted(p.name for p in folder.iterdir()) == ["test.jsonl", "train.jsonl"]  # no DatasetDict
        splits[r] = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    ids = {r: [row["id"] for row in rows] for r, rows in splits.items()}
    assert len(ids[0]) == 10 and all(v == ids[0] for v in ids.values())
    lines = {r: [row["hint"].count("Step ") for row in rows] for r, rows in splits.items()}
    for i in range(len(splits[100])):
        n = lines[100][i]
        assert 8 <= n <= 10 and lines[50][i] == n // 2 and lines[0][i] == 0  # 50%: the first floor(n/2) lines
        assert lines[25][i] <= lines[50][i] <= lines[75][i] <= n


def test_arms_summary_reads_seeds_into_mean_and_stderr(tmp_path):
    """bench/arms_summary.py on two hand-made seeds of the embedded default's layout (the trainer's summary.json
    and each arm's metrics): per-model pass@k over seeds with the standard error of the mean, tokens per arm."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    for seed, (p_plain, p_questa) in {1: (0.10, 0.20), 2: (0.20, 0.40)}.items():
        d = tmp_path / f"seed{seed}"
        summary = {label: {"world_hard": {"1": {"mean": p, "stderr": 0.01}, "8": {"mean": 2 * p, "stderr": 0.02}}}
                   for label, p in (("initial", 0.05), ("plain", p_plain), ("questa", p_questa))}
        (d / "warmup").mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "warmup" / "warmup.json").write_text(json.dumps({"steps": 10, "kept_step": 10, "nll": [],
                                                             "pass1_checks": {"10": {"hinted": 0.2, "no_hint": 0.05}}}))
        # per-problem results of the evaluation (3 problems, 4 samples): questa ahead of plain by 1, 2, 0 correct
        for label, correct in (("initial", (0, 0, 0)), ("plain", (1, 0, 2)), ("questa", (seed + 1, 2, 2))):
            (d / "eval" / label).mkdir(parents=True)
            (d / "eval" / label / "world_hard.jsonl").write_text("".join(
                json.dumps({"id": str(i), "n": 4, "correct": c}) + "\n" for i, c in enumerate(correct)))
        for arm, tokens in (("plain", 1000), ("questa", 990)):
            (d / arm).mkdir()
            (d / arm / "metrics.jsonl").write_text(json.dumps({"step": 1, "hints/tokens_used": tokens,
                                                               "hints/zero_signal_share": 0.5}) + "\n")
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, str(repo / "bench" / "arms_summary.py"), str(tmp_path), str(out),
                           "--config", "default", "--ks", "1,8", "--seeds", "1,2"],
                          capture_output=True, text=True, timeout=120, cwd=repo)
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(out.read_text())["over_seeds"]
    assert table["questa"]["pass@1"]["mean"] == pytest.approx(0.30)
    assert table["questa"]["pass@1"]["stderr"] == pytest.approx(0.10)  # sd 0.1414 / sqrt(2)
    assert table["plain"]["generated_tokens"]["mean"] == 1000 and table["plain"]["zero_signal_share"]["mean"] == 0.5
    assert table["adaptive"].get("pass@1") is None and "| questa | 30.0 +- 10.0 |" in done.stdout
    # paired over problems: seed 1 gaps 1/4, 2/4, 0 -> mean 0.25, stderr 0.25/sqrt(3); seed 2 gaps 2/4, 2/4, 0
    paired = json.loads(out.read_text())["paired"]
    s1, s2 = paired["questa - plain"]["pass@1"]["per_seed"]
    assert (s1["seed"], s1["problems"], s1["mean"]) == (1, 3, pytest.approx(0.25))
    assert s1["stderr"] == pytest.approx(0.25 / math.sqrt(3)) and s2["mean"] == pytest.approx(1 / 3)
    assert paired["questa - plain"]["pass@1"]["over_seeds"]["mean"] == pytest.approx((0.25 + 1 / 3) / 2)
    assert "plain - initial" in paired and "adaptive - plain" not in paired  # adaptive has no results here
    assert "questa - plain: +25.00 +- 14.43, +33.33 +- 16.67" in done.stdout


def test_smollm2_arms_runner_rejects_a_gguf_whose_hash_differs(tmp_path):
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + b"\0" * 10)
    done = subprocess.run(["bash", str(repo / "bench" / "smollm2_arms.sh"), str(tmp_path / "x.gguf")],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "OUT": str(tmp_path / "o")})
    assert done.returncode == 1 and "expected" in done.stderr
