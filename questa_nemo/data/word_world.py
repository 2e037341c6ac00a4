"""A small math world for a real instruct LM: multi-step arithmetic WORD problems, in OpenR1's row shape.

A problem is a person, a count of some item and n events that change it (buy, give away, double, ...). Its
worked solution has exactly one line per event, the last one boxing the answer:

    problem   "Mia has 12 marbles. She buys 7 more marbles. Then she gives away 4 marbles. ... How many
               marbles does Mia have now? Solve it step by step and put the final answer in \\boxed{}."
    solution  "Step 1: She buys 7 more, so 12 + 7 = 19.\\nStep 2: She gives away 4, so 19 - 4 = 15. The answer
               is \\boxed{15}."

Difficulty is n. The rows go through the same build pipeline as real data (questa_nemo/data/build.py) with
step cuts, so a 50% hint is the first floor(n / 2) solution lines, in the reference prompt format
(problem + "\\n\\n## Hint." + hint). Answers are small positive integers: the math reward's integer fast path
scores them without a worker. Sets are sized and ranged by the `world` config section (WorldConfig), read here
as: max_ops = most steps, hard_min_ops..max_ops = the hard range RL trains and evaluates on, and every count
stays in 1..modulus - 1.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from questa_nemo.config import DataConfig, WorldConfig
from questa_nemo.data.world import (
    WarmupExample,
    distinct_problems,
    draw_warmup_examples,
    hard_lengths,
    write_sets,
)

NAMES = (
    ("Mia", "she", "her"),
    ("Leo", "he", "his"),
    ("Ava", "she", "her"),
    ("Sam", "he", "his"),
    ("Zoe", "she", "her"),
    ("Ben", "he", "his"),
    ("Lily", "she", "her"),
    ("Omar", "he", "his"),
)
ITEMS = ("marbles", "apples", "stickers", "coins", "books", "pencils", "cookies", "stamps")
START_RANGE = (2, 20)  # the first count
OPERAND_RANGE = (2, 9)  # added or taken away in one step
FACTORS = (2, 3)  # "doubles", "triples"
# The reference's "## Hint." plus a line break: the hint's first line then reads like a solution line.
HINT_PREFIX = "## Hint.\n"
INSTRUCTION = "Solve it step by step and put the final answer in \\boxed{}."

# What one event says in the problem and in its solution line, per operator; {n} is the operand.
EVENTS = {
    "+": (
        ("{Sub} buys {n} more {item}.", "{Sub} buys {n} more"),
        ("{Sub} finds {n} more {item}.", "{Sub} finds {n} more"),
        ("A friend gives {obj} {n} {item}.", "{Sub} gets {n} more"),
    ),
    "-": (
        ("{Sub} gives away {n} {item}.", "{Sub} gives away {n}"),
        ("{Sub} loses {n} {item}.", "{Sub} loses {n}"),
        ("{Sub} uses {n} {item}.", "{Sub} uses {n}"),
    ),
    "*": (("Then the number of {item} {sub} has {verb}.", "The number {verb}"),),
}
VERBS = {2: "doubles", 3: "triples"}
SYMBOLS = {"+": "+", "-": "-", "*": "×"}


@dataclass(frozen=True)
class Event:
    op: str  # "+" | "-" | "*"
    operand: int
    phrase: int  # index into EVENTS[op]


def apply_event(value: int, e: Event) -> int:
    return value + e.operand if e.op == "+" else value - e.operand if e.op == "-" else value * e.operand


@dataclass(frozen=True)
class WordProblem:
    name: int  # index into NAMES
    item: int  # index into ITEMS
    start: int
    events: tuple[Event, ...]

    @property
    def results(self) -> tuple[int, ...]:
        """The count after each event.  # [n_steps]"""
        values, value = [], self.start
        for e in self.events:
            value = apply_event(value, e)
            values.append(value)
        return tuple(values)

    def _words(self, e: Event) -> dict[str, str]:
        name, sub, obj = NAMES[self.name]
        return {
            "Sub": sub.capitalize(),
            "sub": sub,
            "obj": obj if obj != "his" else "him",
            "name": name,
            "item": ITEMS[self.item],
            "n": str(e.operand),
            "verb": VERBS.get(e.operand, ""),
        }

    def text(self) -> str:
        name, _, _ = NAMES[self.name]
        item = ITEMS[self.item]
        sentences = [EVENTS[e.op][e.phrase][0].format(**self._words(e)) for e in self.events]
        question = f"How many {item} does {name} have now? {INSTRUCTION}"
        return " ".join([f"{name} has {self.start} {item}.", *sentences, question])

    def answer(self) -> str:
        return str(self.results[-1])

    def solution(self) -> str:
        """One line per event; the last one ends with the boxed answer."""
        lines, before = [], self.start
        for i, (e, after) in enumerate(zip(self.events, self.results), start=1):
            said = EVENTS[e.op][e.phrase][1].format(**self._words(e))
            lines.append(f"Step {i}: {said}, so {before} {SYMBOLS[e.op]} {e.operand} = {after}.")
            before = after
        lines[-1] += f" The answer is \\boxed{{{self.answer()}}}."
        return "\n".join(lines)


def count_steps(text: str) -> int:
    """n of a word problem or of a prompt built from one: its event sentences, between the opening count and
    the question (names and items carry no full stops)."""
    body = text.split(" How many ", 1)[0]
    if body == text:
        raise ValueError(f"not a word problem: {text[:40]!r}")
    return body.count(".") - 1


def data_config(
    inputs: list[str], output_dir: str, ratios: list[float], seed: int, jsonl_only: bool = False
) -> DataConfig:
    """The build settings for word-world prompts: step cuts, the reference prompt format, the boxed answer;
    `jsonl_only`: no DatasetDict folders (where `datasets` is not installed)."""
    return DataConfig(
        inputs=inputs,
        input_format="openr1",
        output_dir=output_dir,
        hint_ratios=list(ratios),
        cut_mode="step",
        hint_prefix=HINT_PREFIX,
        answer_leak="keep",  # sample_problem keeps the answer out of every earlier number: none occur
        seed=seed,
        id_with_ratio=False,  # one id per problem in every ratio's split (algo.hints.splits match on it)
        # JSONL: readable where `datasets` is not installed (GPU images)
        output_formats=["jsonl"] if jsonl_only else ["hf_disk", "jsonl"],
    )


# ------------------------------------------------------------------------------------------ sampling
def _event(rng: random.Random, value: int, modulus: int) -> Event:
    """An event that keeps the count in 1..modulus - 1."""
    ops = ["+"] if value + OPERAND_RANGE[0] < modulus else []
    if value - OPERAND_RANGE[0] >= 1:
        ops.append("-")
    if value * FACTORS[0] < modulus:
        ops.append("*")
    op = rng.choice(ops)
    if op == "+":
        operand = rng.randint(OPERAND_RANGE[0], min(OPERAND_RANGE[1], modulus - 1 - value))
    elif op == "-":
        operand = rng.randint(OPERAND_RANGE[0], min(OPERAND_RANGE[1], value - 1))
    else:
        operand = rng.choice([f for f in FACTORS if value * f < modulus])
    return Event(op, operand, rng.randrange(len(EVENTS[op])))


def sample_problem(rng: random.Random, n_steps: int, modulus: int = 100) -> WordProblem:
    """A problem of n_steps events whose answer is none of its other numbers (start, operands, intermediate
    counts), so a partial-solution hint never states it."""
    if modulus <= START_RANGE[1] + OPERAND_RANGE[1]:
        raise ValueError(
            f"world.modulus={modulus}: counts need room above {START_RANGE[1] + OPERAND_RANGE[1]}"
        )
    while True:
        start = rng.randint(*START_RANGE)
        events, value = [], start
        for _ in range(n_steps):
            event = _event(rng, value, modulus)
            events.append(event)
            value = apply_event(value, event)
        problem = WordProblem(rng.randrange(len(NAMES)), rng.randrange(len(ITEMS)), start, tuple(events))
        earlier = {start, *problem.results[:-1], *(e.operand for e in events)}
        if problem.results[-1] not in earlier:
            return problem


def problem_set(
    name: str, lengths: Iterable[int], cfg: WorldConfig, exclude: Collection[str] = ()
) -> list[WordProblem]:
    """Distinct problems, one per entry of `lengths`, none of whose text is in `exclude` (held-out sets).
    Seeded by (cfg.seed, name): the same call gives the same set."""
    return distinct_problems(
        random.Random(f"{cfg.seed}:word:{name}"),
        lengths,
        lambda rng, n: sample_problem(rng, n, cfg.modulus),
        lambda problem: problem.text(),
        exclude,
        name,
    )


def openr1_rows(problems: list[WordProblem], name: str) -> list[dict]:
    """The rows the build pipeline reads (OpenR1's shape, one generation, judged correct)."""
    return [
        {
            "uuid": f"word-{name}-{i:06d}",
            "problem": p.text(),
            "answer": p.answer(),
            "generations": [p.solution()],
            "correctness_math_verify": [True],
            "n_steps": len(p.events),
        }
        for i, p in enumerate(problems)
    ]


def warmup_examples(
    count: int, cfg: WorldConfig, hint_fraction: float, exclude: Collection[str] = ()
) -> list[WarmupExample]:
    """Supervised examples that teach the solution format (the instruct model ignores it at first), drawn as
    the small world's are (data.world.draw_warmup_examples: mostly short chains, a share `hint_fraction`
    hinted), in the prompt format of the RL sets."""
    from questa_nemo.data.build import prompt_format

    def sample(rng: random.Random, n: int) -> tuple[str, str]:
        problem = sample_problem(rng, n, cfg.modulus)
        return problem.text(), problem.solution()

    rng = random.Random(f"{cfg.seed}:word:warmup")
    fmt = prompt_format(data_config([], "", [0.0], cfg.seed))
    return draw_warmup_examples(rng, count, cfg.warmup_ops, hint_fraction, exclude, sample, fmt)


def write_word_world(cfg: WorldConfig, hint_fraction: float = 0.4, jsonl_only: bool = False) -> dict[str, Path]:
    """Write the word world's sets under cfg.output_dir; returns name -> folder.

    raw/{rl,eval,calib}.jsonl   OpenR1-shaped rows (the pipeline's inputs)
    rl/p<ratio>/                RL prompts of the hard range, one DatasetDict per cfg.hint_ratios
    eval/p0/                    held-out hard problems, no hint
    calib/p<ratio>/             calib_problems_per_length per n = 1..max_ops, without a hint (p0: the difficulty
                                profile) and with each hint ratio of the RL sets (what the warm-up's stop checks)
    warmup.jsonl                supervised warm-up examples (WarmupExample fields)
    """
    eval_set = problem_set("eval", hard_lengths(cfg.eval_problems, cfg, "eval"), cfg)
    held_out = {p.text() for p in eval_set}
    calib_lengths = [n for n in range(1, cfg.max_ops + 1) for _ in range(cfg.calib_problems_per_length)]
    sets = {
        "eval": eval_set,
        "calib": problem_set("calib", calib_lengths, cfg, held_out),
        "rl": problem_set("rl", hard_lengths(cfg.rl_problems, cfg, "rl"), cfg, held_out),
    }
    return write_sets(
        cfg, sets, openr1_rows,
        lambda inputs, output, ratios: data_config(inputs, output, ratios, cfg.seed, jsonl_only),
        warmup_examples(cfg.warmup_examples, cfg, hint_fraction, held_out),
    )


def main(config_name: str = "smollm2_world", overrides: list[str] | None = None, positional=None) -> int:
    """`python -m questa_nemo.data.word_world [--config-name NAME] [key=value ...]`: write the word world's
    data sets under world.output_dir (run before `questa-nemo train --config-name smollm2_world`). Without
    `datasets` installed only the JSONL copies are written (what the recipe's paths name)."""
    try:
        import datasets
    except ImportError:
        datasets = None

    from questa_nemo.config import ConfigError, load_config

    if positional:
        raise ConfigError("word_world", f"takes no positional arguments, got {positional}")
    if datasets is not None:
        datasets.disable_progress_bars()
    cfg = load_config(config_name, overrides)
    w = cfg.world
    w.validate()
    if w.modulus <= START_RANGE[1] + OPERAND_RANGE[1]:
        raise ConfigError("world.modulus", f"must exceed {START_RANGE[1] + OPERAND_RANGE[1]}")
    for name, path in write_word_world(w, cfg.train.warmup.hint_fraction, jsonl_only=datasets is None).items():
        print(f"{name:>5}: {path}")
    return 0


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m questa_nemo.data.word_world", description=main.__doc__)
    parser.add_argument("--config-name", "-c", default="smollm2_world")
    parser.add_argument("overrides", nargs="*", help="key=value")
    ns = parser.parse_args()
    sys.exit(main(ns.config_name, ns.overrides))
