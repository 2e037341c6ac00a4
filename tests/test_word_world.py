"""The word world (questa_nemo/data/word_world.py), its recipe (conf/smollm2_world.yaml) and runner
(bench/smollm2_arms.sh): arithmetic and formats, hinted prompts through the data pipeline and SmolLM2's chat
template, and a CPU smoke run of the recipe on the real SmolLM2 weights."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from smollm2_fixtures import smollm2  # noqa: F401

from questa_nemo.config import ConfigError, RewardConfig, WorldConfig, load_config
from questa_nemo.data import word_world as ww

REPO = Path(__file__).resolve().parents[1]
_LINE = re.compile(r"^Step (\d+): .+, so (\d+) ([+\-×]) (\d+) = (\d+)\.( The answer is \\boxed\{(\d+)\}\.)?$")
APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


def _small(tmp_path: Path, **kw) -> WorldConfig:
    base = dict(
        max_ops=5,
        hard_min_ops=3,
        rl_problems=40,
        eval_problems=10,
        calib_problems_per_length=2,
        warmup_examples=50,
        output_dir=str(tmp_path / "data"),
    )
    return WorldConfig(**{**base, **kw})


@pytest.mark.parametrize("n_steps", [1, 2, 3, 5, 8])
def test_solution_lines_recompute_the_answer_within_range(n_steps):
    rng = random.Random(n_steps)
    for _ in range(200):
        p = ww.sample_problem(rng, n_steps, modulus=100)
        lines = p.solution().split("\n")
        assert len(lines) == n_steps == len(p.events)
        value = p.start
        for i, line in enumerate(lines, start=1):
            m = _LINE.match(line)
            assert m, line
            assert int(m.group(1)) == i and int(m.group(2)) == value
            value = APPLY[m.group(3)](value, int(m.group(4)))
            assert int(m.group(5)) == value and 1 <= value <= 99
            assert (m.group(7) is not None) == (i == n_steps)  # only the last line boxes the answer
        assert m.group(7) == p.answer() == str(value)
        earlier = {p.start, *p.results[:-1], *(e.operand for e in p.events)}
        assert value not in earlier  # a hint can never state the answer
        assert p.text().startswith(f"{ww.NAMES[p.name][0]} has {p.start} ") and p.text().endswith(
            ww.INSTRUCTION
        )
        story = p.text().removesuffix(ww.INSTRUCTION)
        stated = [str(p.start)] + [str(e.operand) for e in p.events if e.op != "*"]
        assert re.findall(r"\d+", story) == stated  # products are said in words: "doubles", "triples"
        assert len(re.findall(r"doubles|triples", story)) == sum(e.op == "*" for e in p.events)


def test_count_steps_reads_problems_and_their_prompts():
    rng = random.Random(5)
    for n in (1, 2, 4, 6, 8):
        p = ww.sample_problem(rng, n)
        hint = "\n".join(p.solution().split("\n")[: n // 2])
        assert ww.count_steps(p.text()) == n == ww.count_steps(p.text() + "\n\n" + ww.HINT_PREFIX + hint)
    with pytest.raises(ValueError, match="not a word problem"):
        ww.count_steps("07 +3 *7 -2 __")


def test_warmup_examples_teach_the_format_in_the_rl_prompt_format(tmp_path):
    cfg = _small(tmp_path, max_ops=6)
    examples = ww.warmup_examples(400, cfg, hint_fraction=0.4)
    assert examples == ww.warmup_examples(400, cfg, hint_fraction=0.4)  # seeded
    counts = [sum(e.n_ops == n for e in examples) for n in range(1, 7)]
    assert all(c > 0 for c in counts) and counts[0] > counts[-1]  # short chains most often
    hinted = [e for e in examples if e.hint_steps]
    assert 0.25 < len(hinted) / sum(e.n_ops >= 2 for e in examples) < 0.55
    for e in examples:
        problem, sep, hint = e.prompt.partition("\n\n")
        assert sep and ww.count_steps(problem) == e.n_ops == len(e.completion.split("\n"))
        lines = e.completion.split("\n")
        assert e.completion.endswith("}.") and "\\boxed{" in lines[-1]
        if e.hint_steps:
            assert 1 <= e.hint_steps < e.n_ops
            assert hint == ww.HINT_PREFIX + "\n".join(lines[: e.hint_steps]) + "\n"  # as the RL sets cut it
        else:
            assert hint == ""
    held_out = {examples[0].prompt.partition("\n\n")[0]}
    assert not held_out & {e.prompt.partition("\n\n")[0] for e in ww.warmup_examples(400, cfg, 0.4, held_out)}


def test_warmup_max_ops_keeps_whole_hard_chains_out_of_the_warmup(tmp_path):
    cfg = _small(tmp_path, max_ops=6, hard_min_ops=4, warmup_max_ops=3)
    examples = ww.warmup_examples(300, cfg, hint_fraction=0.4)
    assert {e.n_ops for e in examples} == {1, 2, 3}  # no chain of the hard range 4..6, hinted or not
    assert examples[:50] != ww.warmup_examples(50, _small(tmp_path, max_ops=6, hard_min_ops=4), 0.4)
    _small(tmp_path, max_ops=6, hard_min_ops=4, warmup_max_ops=6).validate()
    for bad in (0, 7):
        with pytest.raises(ConfigError, match="world.warmup_max_ops"):
            _small(tmp_path, max_ops=6, warmup_max_ops=bad).validate()
    with pytest.raises(ConfigError, match="world.hard_min_ops"):
        _small(tmp_path, max_ops=6, hard_min_ops=7).validate()


def test_problem_sets_are_seeded_distinct_and_exclude_held_out(tmp_path):
    cfg = _small(tmp_path)
    a = ww.problem_set("rl", [3] * 50, cfg)
    assert a == ww.problem_set("rl", [3] * 50, cfg)
    assert len({p.text() for p in a}) == 50
    held_out = {p.text() for p in a[:25]}
    b = ww.problem_set("other", [3] * 50, cfg, exclude=held_out)
    assert not held_out & {p.text() for p in b}
    with pytest.raises(ValueError, match="modulus"):
        ww.sample_problem(random.Random(0), 3, modulus=20)


def test_written_sets_have_step_cut_hints_and_reference_prompts(tmp_path):
    import datasets

    from questa_nemo.reward.extract import extract_answer, reference_answer

    cfg = _small(tmp_path)
    written = ww.write_word_world(cfg)
    raw = {r["uuid"]: r for r in map(json.loads, (Path(cfg.output_dir) / "raw" / "rl.jsonl").open())}
    hinted = datasets.load_from_disk(str(written["rl"] / "p50"))["train"].to_list()
    plain = datasets.load_from_disk(str(written["rl"] / "p0"))["train"].to_list()
    assert len(hinted) == len(plain) == cfg.rl_problems
    for h, p in zip(hinted, plain):
        source = raw[h["source_id"]]
        n = source["n_steps"]
        assert cfg.hard_min_ops <= n <= cfg.max_ops
        lines = source["generations"][0].split("\n")
        expected_hint = "\n".join(lines[: n // 2]) + "\n"  # the first floor(n/2) lines, cut at a line start
        assert h["hint"] == expected_hint
        assert h["prompt"] == source["problem"] + "\n\n" + ww.HINT_PREFIX + expected_hint
        assert p["prompt"] == source["problem"] + "\n\n" and p["hint"] == ""
        assert h["answer"] == p["answer"] == "\\boxed{" + source["answer"] + "}"
        assert (
            extract_answer(source["generations"][0], 100).answer == reference_answer(h["answer"], 100).answer
        )
    manifest = json.loads((written["rl"] / "manifest.json").read_text())
    assert manifest["ratios"]["p50"]["answer_leaks"] == 0
    evals = datasets.load_from_disk(str(written["eval"] / "p0"))["train"]["prompt"]
    assert len(evals) == cfg.eval_problems and not set(evals) & {p["prompt"] for p in plain}
    calib = [json.loads(line)["n_steps"] for line in (Path(cfg.output_dir) / "raw" / "calib.jsonl").open()]
    assert sorted(calib) == sorted(list(range(1, cfg.max_ops + 1)) * cfg.calib_problems_per_length)
    hinted_calib = datasets.load_from_disk(str(written["calib"] / "p50"))["train"]["prompt"]
    assert [ww.count_steps(p) for p in hinted_calib] == calib and all("## Hint." in p for p in hinted_calib[2:])
    warmup = [json.loads(line) for line in written["warmup"].open()]
    assert len(warmup) == cfg.warmup_examples and set(warmup[0]) == {"prompt", "completion", "n_ops", "hint_steps"}
    assert not set(evals) & {w["prompt"] for w in warmup}


def test_math_reward_scores_the_worked_solution_and_rejects_a_wrong_one():
    from questa_nemo.reward.math import MathReward

    problem = ww.sample_problem(random.Random(3), 4)
    wrong = problem.solution().replace(
        "\\boxed{" + problem.answer() + "}", "\\boxed{" + problem.answer() + "0}"
    )
    with MathReward(RewardConfig(num_workers=1)) as reward:
        results = reward.submit(
            [problem.solution(), wrong], ["\\boxed{" + problem.answer() + "}"] * 2
        ).result()
    assert [r.reward for r in results] == [1.0, 0.0]


def test_recipe_config_has_three_equal_budget_arms_and_hint_free_passk(smollm2):  # noqa: F811
    from questa_nemo.train.arms import plan_arms

    cfg = load_config(
        "smollm2_world", [f"model.hf_config={smollm2.hf_dir}", f"model.checkpoint={smollm2.hf_dir}"]
    )
    assert list(cfg.train.arms) == ["plain", "questa", "adaptive"]
    assert cfg.train.arms["plain"]["dataset"].endswith("rl/p0/train.jsonl")
    assert cfg.train.arms["questa"]["dataset"].endswith("rl/p50/train.jsonl")
    assert len({arm["token_budget"] for arm in cfg.train.arms.values()}) == 1
    splits = cfg.train.arms["adaptive"]["hints"]["splits"]
    assert sorted(splits, key=float) == ["0", "25", "50", "75", "100"]
    assert all(path.endswith(f"rl/p{r}/train.jsonl") for r, path in splits.items())  # JSONL: no `datasets`
    assert [a.name for a in plan_arms(cfg)] == ["plain", "questa", "adaptive"]
    assert cfg.world.hint_ratios[0] == 50 and sorted(cfg.world.hint_ratios) == [0, 25, 50, 75, 100]
    assert not cfg.train.build_world_data and (cfg.world.hard_min_ops, cfg.world.max_ops) == (8, 10)
    assert (cfg.reward.kind, cfg.algo.advantage, cfg.model.params_dtype) == ("math", "grpo", "bf16")
    assert cfg.rollout.backend == "megatron" and cfg.rollout.cuda_graphs
    assert max(cfg.eval.ks) <= cfg.eval.n_samples and 8 in cfg.eval.ks
    assert cfg.eval.benchmarks[0].path.endswith("eval/p0/train.jsonl")
    assert cfg.rollout.n_samples * cfg.train.prompts_per_step <= cfg.rollout.max_batch_sequences


def test_hinted_prompts_fit_smollm2_chat_template(smollm2, tmp_path):  # noqa: F811
    import datasets

    from questa_nemo.train.prompts import read_rows, tokenize_rows

    cfg = _small(tmp_path)
    written = ww.write_word_world(cfg)
    rows = read_rows(str(written["rl"] / "p50"))
    prompts, too_long = tokenize_rows(rows, smollm2.tokenizer, 256, "p50")
    assert too_long == 0 and len(prompts) == cfg.rl_problems and all(p.hinted for p in prompts)
    for row, prompt in zip(rows, prompts):
        text = smollm2.tokenizer.decode(prompt.prompt_ids)
        assert text.endswith("<|im_start|>assistant\n")
        assert "<|im_start|>user\n" + row["prompt"] + "<|im_end|>" in text  # the hint's lines survive intact
    plain = tokenize_rows(
        datasets.load_from_disk(str(written["rl"] / "p0"))["train"].to_list(), smollm2.tokenizer, 256, "p0"
    )[0]
    assert not any(p.hinted for p in plain)
    assert all(len(p.prompt_ids) < len(h.prompt_ids) for p, h in zip(plain, prompts))


def test_runner_rejects_a_gguf_whose_hash_differs(tmp_path):
    (tmp_path / "a").write_bytes(b"GGUF" + b"\0" * 10)
    (tmp_path / "b").write_bytes(b"\1" * 10)
    joined = tmp_path / "joined" / "smollm2.gguf"
    done = subprocess.run(
        [
            "bash",
            str(REPO / "bench" / "smollm2_arms.sh"),
            str(joined),
            str(tmp_path / "a"),
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "expected" in done.stderr
    assert joined.read_bytes() == b"GGUF" + b"\0" * 10 + b"\1" * 10  # the halves, joined in order


def test_device_wait_brings_back_the_detached_runs_output_as_one_archive(tmp_path):
    import tarfile

    run_out, out = tmp_path / "run_out", tmp_path / "out"
    (run_out / "eval").mkdir(parents=True)
    out.mkdir()
    (run_out / "run.log").write_text("[hint] 50 steps\n\n[report] done\n")
    (run_out / "eval" / "passk.png").write_bytes(b"png")
    wait = ["bash", str(REPO / "bench" / "device_wait.sh"), str(run_out), "1"]
    env = {**os.environ, "OUT": str(out)}
    running = subprocess.run(wait, capture_output=True, text=True, timeout=60, env=env)
    assert running.returncode == 0 and "still running" in running.stdout and "[report] done" in running.stdout
    (run_out / "done").touch()
    ended = subprocess.run(wait, capture_output=True, text=True, timeout=60, env=env)
    assert "the run has ended" in ended.stdout
    with tarfile.open(out / "results.tar.gz") as tar:
        assert {"./run.log", "./eval/passk.png", "./done"} <= set(tar.getnames())


@pytest.mark.slow
def test_recipe_smoke_on_real_smollm2_weights(smollm2, tmp_path):  # noqa: F811
    """2 warm-up steps (the stop by calibration checked after the first), 1 GRPO step per arm with tiny sizes on
    CPU, then the hint-free final evaluation: every output is written."""
    run = tmp_path / "run"
    common = [
        f"model.hf_config={smollm2.hf_dir}",
        f"model.checkpoint={smollm2.hf_dir}",
        f"train.run_dir={run}",
        "world.rl_problems=8",
        "world.eval_problems=2",
        "world.calib_problems_per_length=1",
        "world.warmup_examples=8",
        "train.warmup.steps=2",
        "train.warmup.batch_size=2",
        "train.warmup.check_every=1",
        "model.params_dtype=fp32",
        "model.fusions=false",
        "rollout.cuda_graphs=false",
        "train.steps=1",
        "train.save_every=1",
        "train.prompts_per_step=2",
        "rollout.n_samples=2",
        "rollout.max_new_tokens=8",
        "train.validation_samples=1",
        "train.validation_problems=1",
        "train.log_tensorboard=false",
        "train.progress_bar=false",
        "reward.num_workers=1",
        "train.micro_batch_tokens=2048",
        "eval.n_samples=2",
        "eval.ks=[1,2]",
        "eval.max_new_tokens=8",
        "eval.problems_per_batch=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for module, args in (("questa_nemo.data.word_world", []), ("questa_nemo.cli", ["train"])):
        cmd = [sys.executable, "-m", module, *args, "--config-name", "smollm2_world", *common]
        done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    warmup = json.loads((run / "warmup" / "warmup.json").read_text())
    assert warmup["steps"] == 2 and set(warmup["pass1_checks"]["1"]) == {"hinted", "no_hint"}
    assert set(json.loads((run / "warmup" / "calibration.json").read_text())) == {str(n) for n in range(1, 11)}
    summary = json.loads((run / "summary.json").read_text())
    trained = [a for a in ("plain", "questa", "adaptive") if not summary["training"][a].get("skipped")]
    assert {"plain", "questa"} <= set(trained) and set(summary) == {"initial", "training", *trained}
    for label in ("initial", *trained):
        assert set(summary[label]["word_hard"]) == {"1", "2"}
    for arm in trained:
        assert summary["training"][arm]["generated_tokens"] > 0
        steps = [json.loads(line) for line in (run / arm / "metrics.jsonl").open()]
        assert [s["step"] for s in steps] == [1] and "reward/success" in steps[0]
        assert (run / arm / "DONE").exists()
    assert (run / "curves.png").stat().st_size > 0 and (run / "eval" / "passk.png").stat().st_size > 0
