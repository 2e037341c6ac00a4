"""The small world: arithmetic, fixed-width text, step hints through the pipeline, warm-up, the committed
tokenizer and policy config, and the world reward."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace

import datasets
import pytest

from questa_nemo.config import WorldConfig
from questa_nemo.data import hints, world
from questa_nemo.data.world_assets import (
    CHAT_TEMPLATE,
    EOS,
    asset_dir,
    build_tokenizer,
    policy_config,
    write_assets,
)
from questa_nemo.reward.world import count_ops, world_reward, world_rewards

CFG = WorldConfig()
datasets.disable_progress_bars()


def random_problems(count: int, seed: int = 0) -> list[world.WorldProblem]:
    rng = random.Random(seed)
    return [world.sample_problem(rng, rng.randint(1, CFG.max_ops)) for _ in range(count)]


# ------------------------------------------------------------------------------------------- problems
def test_solution_arithmetic_is_right():
    for problem in random_problems(300):
        value = problem.start
        lines = problem.solution().split("\n")
        assert len(lines) == len(problem.ops) + 1
        for (op, operand), line in zip(problem.ops, lines):
            value = {"+": value + operand, "-": value - operand, "*": value * operand}[op] % 100
            assert line == f"{value:02d}"
        assert problem.answer() == f"{value:02d}"
        assert lines[-1] == "\\boxed{" + problem.answer() + "}"


def test_hand_worked_example():
    problem = world.WorldProblem(start=7, ops=(("+", 3), ("*", 7), ("-", 2), ("*", 9)))
    assert problem.text(8) == "07 +3 *7 -2 *9 __ __ __ __ __"
    assert problem.solution() == "10\n70\n68\n12\n\\boxed{12}"  # 68 * 9 = 612
    assert count_ops(problem.text(8)) == 4


def test_problems_and_prompts_are_fixed_width():
    fmt = world.prompt_format(CFG)
    widths = set()
    for problem in random_problems(200):
        text, solution = problem.text(CFG.max_ops), problem.solution()
        assert len(text) == 2 + 3 * (CFG.max_ops + 1)
        for ratio in (0, 25, 50, 75):
            prompt, _ = hints.render_prompt(text, solution[: hints.hint_end(solution, ratio, "step")], fmt)
            widths.add(len(prompt))
    assert widths == {2 + 3 * (CFG.max_ops + 1) + 1 + 3 * (CFG.max_ops - 1)}


def test_operation_and_hint_of_each_step_sit_at_one_distance_from_its_line():
    """What makes the world learnable by a RoPE model: for every step i, the operation of step i and the hint
    slot's copy of line i lie the same number of characters before line i (the line before: 3 characters)."""
    fmt = world.prompt_format(CFG)
    problem = world.WorldProblem(start=7, ops=(("+", 3), ("*", 7), ("-", 2), ("*", 9), ("+", 1), ("-", 8)))
    solution = problem.solution()
    problem_text = problem.text(CFG.max_ops)
    prompt, _ = hints.render_prompt(problem_text, solution[: hints.hint_end(solution, 100 * 5 / 7, "step")], fmt)
    text = prompt + "?" + solution  # "?": the world chat template's generation prompt
    slot = len(problem_text) + 1  # the hint slot, after "|"
    op_distance, hint_distance = set(), set()
    for i, (op, operand) in enumerate(problem.ops):
        line = len(prompt) + 1 + 3 * i
        operator = 2 + 3 * i + 1  # slot i is " " + operator + operand, after the two-digit start
        assert text[operator : operator + 2] == f"{op}{operand}"
        assert text[line : line + 3] == f"{problem.results[i]:02d}\n"
        op_distance.add(line - operator)
        if i < 5:  # the hinted lines
            assert text[slot + 3 * i : slot + 3 * i + 3] == text[line : line + 3]
            hint_distance.add(line - (slot + 3 * i))
    assert len(op_distance) == 1 and len(hint_distance) == 1


def test_a_50_percent_step_hint_is_the_first_half_of_the_lines():
    for problem in random_problems(200, seed=1):
        n, solution = len(problem.ops), problem.solution()
        hint = solution[: hints.hint_end(solution, 50, "step")]
        assert hint == "".join(line + "\n" for line in solution.split("\n")[: (n + 1) // 2])


def test_sequences_stay_under_100_characters():
    tokenizer = build_tokenizer()
    fmt = world.prompt_format(CFG)
    longest = world.WorldProblem(start=1, ops=(("+", 1),) * CFG.max_ops)
    prompt, _ = hints.render_prompt(longest.text(CFG.max_ops), "", fmt)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    n_tokens = len(tokenizer(text + longest.solution() + EOS)["input_ids"])
    assert n_tokens == 52 + 35


# ------------------------------------------------------------------------------------------- sets
def small_config(tmp_path) -> WorldConfig:
    return replace(
        CFG,
        output_dir=str(tmp_path / "world"),
        warmup_examples=400,
        rl_problems=120,
        eval_problems=40,
        calib_problems_per_length=5,
    )


def test_write_world_builds_every_set_through_the_pipeline(tmp_path):
    cfg = small_config(tmp_path)
    out = world.write_world(cfg)
    rl = datasets.load_from_disk(str(out["rl"] / "p50"))["train"].to_list()
    bare = datasets.load_from_disk(str(out["rl"] / "p0"))["train"].to_list()
    evaluation = datasets.load_from_disk(str(out["eval"] / "p0"))["train"].to_list()
    calib = datasets.load_from_disk(str(out["calib"] / "p0"))["train"].to_list()
    hinted_calib = datasets.load_from_disk(str(out["calib"] / "p50"))["train"].to_list()
    assert [r["source_id"] for r in hinted_calib] == [r["source_id"] for r in calib]
    assert all(r["hint"] for r in hinted_calib if count_ops(r["prompt"]) >= 2)
    assert (len(rl), len(bare), len(evaluation), len(calib)) == (120, 120, 40, 5 * CFG.max_ops)
    raw = {
        json.loads(x)["uuid"]: json.loads(x)
        for x in (out["rl"].parent / "raw" / "rl.jsonl").read_text().splitlines()
    }
    for row, plain in zip(rl, bare):
        n = count_ops(row["prompt"])
        assert CFG.hard_min_ops <= n <= CFG.max_ops
        solution = raw[row["source_id"]]["generations"][0]
        assert row["hint"] == "".join(line + "\n" for line in solution.split("\n")[: (n + 1) // 2])
        assert row["prompt"].startswith(raw[row["source_id"]]["problem"] + "|" + row["hint"])
        assert plain["hint"] == "" and plain["prompt"].endswith("|" + "_" * 21)
        assert world_reward(solution, row["answer"], n).reward == 1.0
    assert Counter(count_ops(r["prompt"]) for r in calib) == {n: 5 for n in range(1, CFG.max_ops + 1)}
    held_out = {r["prompt"].split("|")[0] for r in evaluation}
    assert not held_out & {r["prompt"].split("|")[0] for r in rl}
    warmup = [json.loads(x) for x in out["warmup"].read_text().splitlines()]
    assert len(warmup) == 400 and not held_out & {w["prompt"].split("|")[0] for w in warmup}
    again = world.write_world(cfg)  # seeded: the same sets again
    assert datasets.load_from_disk(str(again["rl"] / "p50"))["train"].to_list() == rl


def test_warmup_examples_follow_the_length_weights_and_hint_share():
    examples = world.warmup_examples(4000, CFG, hint_fraction=0.4)
    lengths = Counter(e.n_ops for e in examples)
    assert lengths[1] > lengths[4] > lengths[8] > 0
    assert abs(lengths[1] / lengths[8] - 0.85**-7) < 1.5
    hinted = [e for e in examples if e.hint_steps]
    assert 0.3 < len(hinted) / len([e for e in examples if e.n_ops >= 2]) < 0.5
    for e in examples:
        lines = e.completion.split("\n")
        assert len(lines) == e.n_ops + 1 and 0 <= e.hint_steps <= max(0, e.n_ops - 1)
        slot = e.prompt.split("|")[1]
        assert slot == "".join(x + "\n" for x in lines[: e.hint_steps]).ljust(21, "_")


def test_world_main_reads_its_config(tmp_path, capsys):
    overrides = [
        f"++world.output_dir={tmp_path / 'w'}",
        "++world.warmup_examples=10",
        "++world.rl_problems=10",
        "++world.eval_problems=10",
        "++world.calib_problems_per_length=1",
        "++world.hint_ratios=[50,25]",
    ]
    assert world.main("data_openr1", overrides) == 0
    assert (tmp_path / "w" / "rl" / "p25" / "dataset_dict.json").is_file()
    assert "warmup" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- assets
def test_committed_assets_match_the_generator(tmp_path):
    """What matters of each file, so a newer transformers that adds bookkeeping keys does not fail this."""
    write_assets(tmp_path)
    committed = asset_dir()

    def read(root, name):
        return json.loads((root / name).read_text())

    assert read(tmp_path, "config.json") == read(committed, "config.json")
    new, old = read(tmp_path, "tokenizer/tokenizer.json"), read(committed, "tokenizer/tokenizer.json")
    assert new["model"]["vocab"] == old["model"]["vocab"]
    assert [(t["id"], t["content"]) for t in new["added_tokens"]] == [
        (t["id"], t["content"]) for t in old["added_tokens"]
    ]
    assert (new["pre_tokenizer"], new["decoder"]) == (old["pre_tokenizer"], old["decoder"])
    new, old = (
        read(tmp_path, "tokenizer/tokenizer_config.json"),
        read(committed, "tokenizer/tokenizer_config.json"),
    )
    for key in (
        "chat_template",
        "eos_token",
        "pad_token",
        "unk_token",
        "tokenizer_class",
        "model_max_length",
    ):
        assert new[key] == old[key], key


def test_tokenizer_round_trips_and_renders_the_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(asset_dir() / "tokenizer"))
    assert tokenizer.eos_token == EOS and tokenizer.chat_template == CHAT_TEMPLATE
    for problem in random_problems(50, seed=2):
        text = problem.text(8) + "|_\n?" + problem.solution()
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text) and tokenizer.decode(ids) == text
    messages = [{"role": "user", "content": "07 +3 __|___"}]
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "07 +3 __|___?"
    )
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": "10"}], tokenize=False)
    assert full == "07 +3 __|___?10" + EOS
    assert tokenizer(EOS)["input_ids"] == [tokenizer.eos_token_id]
    config = json.loads((asset_dir() / "config.json").read_text())
    assert config["vocab_size"] % 8 == 0 and len(tokenizer) <= config["vocab_size"] < len(tokenizer) + 8
    assert config["eos_token_id"] == tokenizer.eos_token_id


def test_policy_config_builds_a_034m_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**policy_config(99)))
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.30e6 < n_params < 0.38e6


# ------------------------------------------------------------------------------------------- reward
@pytest.mark.parametrize(
    "completion, reward, reason",
    [
        ("10\n70\n68\n12\n\\boxed{12}", 1.0, "correct"),
        ("10\n70\n68\n12\n\\boxed{12}<|endoftext|>", 1.0, "correct"),
        ("11\n70\n68\n13\n\\boxed{12}\n", 1.0, "correct"),  # only the final answer is checked
        ("10\n70\n68\n12\n\\boxed{13}", 0.0, "wrong"),
        ("10\n70\n68\n12", 0.0, "no_answer"),
        ("", 0.0, "no_answer"),
        ("10\n70\n68\n\\boxed{12}", 0.0, "bad_format"),  # one step short
        ("10\n70\n68\n12\n12\n\\boxed{12}", 0.0, "bad_format"),  # one step too many
        ("10\nseventy\n68\n12\n\\boxed{12}", 0.0, "bad_format"),
        ("10\n70\n68\n12\n\\boxed{12} and more", 0.0, "bad_format"),
    ],
)
def test_world_reward_cases(completion, reward, reason):
    result = world_reward(completion, "\\boxed{12}", 4)
    assert (result.reward, result.reason) == (reward, reason)
    assert world_reward(completion, "12", 4) == result


def test_world_reward_rejects_a_bad_reference_and_scores_batches():
    assert world_reward("01\n\\boxed{1}", "x", 1).reason == "parse_error"
    results = world_rewards(
        ["05\n\\boxed{05}", "05\n\\boxed{5}", "06\n\\boxed{6}"], ["05", "\\boxed{05}", "05"], [1, 1, 1]
    )
    assert [r.reason for r in results] == ["correct", "correct", "wrong"]
    with pytest.raises(ValueError):
        world_rewards(["a"], [], [1])


def test_build_reward_chooses_the_world_reward_which_reads_each_problems_step_count():
    """reward.build.build_reward is the one chooser (train, validation and eval call it): reward.kind=world gives
    the exact check, reading n from each problem's text."""
    import contextlib

    from questa_nemo.config import RewardConfig
    from questa_nemo.reward.build import build_reward
    from questa_nemo.reward.world import WorldReward

    problem = world.WorldProblem(5, (("+", 3), ("*", 2)))
    with contextlib.ExitStack() as resources:
        reward = build_reward(RewardConfig(kind="world"), resources)
        assert isinstance(reward, WorldReward)
        handle = reward.submit([problem.solution()] * 2, [problem.answer()] * 2, [problem.text(8), "3 +1|"])
    assert [r.reason for r in handle.result()] == ["correct", "bad_format"]  # the second problem has 1 step
    with pytest.raises(ValueError, match="not a world problem"):
        reward.submit(["x"], ["1"], ["no numbers"])
