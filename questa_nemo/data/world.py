"""The embedded default's small world: chains of arithmetic mod 100, in OpenR1's row shape.

A problem is a start value and n <= N operations from {+, -, *} with operands 1..9, all mod 100. Its solution is
one line per step holding that step's result, zero-padded to two digits, then the result boxed:

    problem  "07 +3 *7 -2 __ __ __ __ __ __"   start, n ops, " __" up to N + 1 slots (one spare)
    solution "10\n70\n68\n\\boxed{68}"          n result lines + the boxed answer

Rows go through the same build pipeline as real data (cut_mode=step: a solution has n + 1 lines, so a "50%
hint" is its first floor((n + 1) / 2) result lines), with a prompt format that keeps every prompt the same
width: problem + "|" + hint slot padded with "_" to (N - 1) lines. The chat template of the world tokenizer adds
"?" as the generation prompt; the model then writes the full solution (hinted lines copied) and <|endoftext|>.
For N = 8 the longest sequence is 52 prompt + 35 completion tokens (characters).

Why this format (docs/world.md has the prototypes' lessons: fixed-width prompts, hints inside the
prompt, one spare op slot): an operation slot is as wide as a result line (3 characters), so the operation of
step i, the hinted copy of line i and the line before it each sit at one fixed distance from where line i is
written, whatever i is. A RoPE model then learns one relative lookup for every step. With 2-character slots the
distance changed with i and the tiny model learned far slower: on the same budget (1,400 warm-up steps of the
3-layer model, plain PyTorch) greedy exact match at n = 8 was 0.00 with 2-character slots and 0.47 with these.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from questa_nemo.atomic import atomic_path
from questa_nemo.config import DataConfig, WorldConfig
from questa_nemo.data import hints

OPERATORS = ("+", "-", "*")
OPERANDS = tuple(range(1, 10))
EMPTY_SLOT = " __"  # an operation slot is " " + operator + operand: as wide as a result line "dd\n"
SEPARATOR = "|"  # between the problem and the hint slot
LENGTH_DECAY = 0.85  # warm-up draws chain length n with weight LENGTH_DECAY ** (n - 1)
P = TypeVar("P")  # a problem type of one of the worlds


@dataclass(frozen=True)
class WorldProblem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (operator, operand), applied left to right
    modulus: int = 100

    @property
    def results(self) -> tuple[int, ...]:
        """The value after each step.  # [n_ops]"""
        values, value = [], self.start
        for op, operand in self.ops:
            if op == "+":
                value = (value + operand) % self.modulus
            elif op == "-":
                value = (value - operand) % self.modulus
            else:
                value = (value * operand) % self.modulus
            values.append(value)
        return tuple(values)

    @property
    def width(self) -> int:  # digits of every number
        return len(str(self.modulus - 1))

    def text(self, max_ops: int) -> str:
        """Fixed-width problem: start and max_ops + 1 operation slots."""
        if len(self.ops) > max_ops:
            raise ValueError(f"{len(self.ops)} operations do not fit max_ops={max_ops}")
        ops = "".join(f" {op}{operand}" for op, operand in self.ops)
        return f"{self.start:0{self.width}d}" + ops + EMPTY_SLOT * (max_ops + 1 - len(self.ops))

    def answer(self) -> str:
        return f"{self.results[-1]:0{self.width}d}"

    def solution(self) -> str:
        """One line per step, then the last result boxed."""
        return "".join(f"{r:0{self.width}d}\n" for r in self.results) + "\\boxed{" + self.answer() + "}"


def prompt_format(cfg: WorldConfig) -> hints.PromptFormat:
    """problem | hint slot wide enough for N - 1 hinted steps; every hint is shown, however short."""
    width = len(str(cfg.modulus - 1)) + 1  # digits + newline
    return hints.PromptFormat(
        separator=SEPARATOR, hint_prefix="", min_hint_chars=0, hint_slot_chars=(cfg.max_ops - 1) * width
    )


def data_config(cfg: WorldConfig, inputs: list[str], output_dir: str, ratios: list[float]) -> DataConfig:
    """The build settings that give world prompts: step cuts, the fixed-width format, the reference answer."""
    fmt = prompt_format(cfg)
    return DataConfig(
        inputs=inputs,
        input_format="openr1",
        output_dir=output_dir,
        hint_ratios=list(ratios),
        cut_mode="step",
        min_hint_chars=fmt.min_hint_chars,
        prompt_separator=fmt.separator,
        hint_prefix=fmt.hint_prefix,
        hint_slot_chars=fmt.hint_slot_chars,
        answer_leak="keep",  # two-digit results repeat by chance; counted, never acted on
        seed=cfg.seed,
        id_with_ratio=False,  # one id per problem in every ratio's split (algo.hints.splits match on it)
    )


# ------------------------------------------------------------------------------------------ sampling
def sample_problem(rng: random.Random, n_ops: int, modulus: int = 100) -> WorldProblem:
    ops = tuple((rng.choice(OPERATORS), rng.choice(OPERANDS)) for _ in range(n_ops))
    return WorldProblem(start=rng.randrange(modulus), ops=ops, modulus=modulus)


def distinct_problems(
    rng: random.Random,
    lengths: Iterable[int],
    sample: Callable[[random.Random, int], P],
    text: Callable[[P], str],
    exclude: Collection[str],
    name: str,
) -> list[P]:
    """One problem per entry of `lengths` (its number of steps), no two with the same text and none whose text
    is in `exclude` (held-out sets). Shared by the small world and the word world."""
    seen = set(exclude)
    problems = []
    for n in lengths:
        for _ in range(1000):
            problem = sample(rng, n)
            if text(problem) not in seen:
                break
        else:
            raise ValueError(f"world.{name}: cannot draw that many distinct problems with {n} steps")
        seen.add(text(problem))
        problems.append(problem)
    return problems


def problem_set(
    name: str, lengths: Iterable[int], cfg: WorldConfig, exclude: Collection[str] = ()
) -> list[WorldProblem]:
    """Distinct problems, one per entry of `lengths`, none of whose text is in `exclude` (held-out sets).
    Seeded by (cfg.seed, name): the same call gives the same set."""
    return distinct_problems(
        random.Random(f"{cfg.seed}:{name}"),
        lengths,
        lambda rng, n: sample_problem(rng, n, cfg.modulus),
        lambda problem: problem.text(cfg.max_ops),
        exclude,
        name,
    )


def hard_lengths(count: int, cfg: WorldConfig, name: str) -> list[int]:
    """Chain lengths drawn uniformly from the hard range hard_min_ops..max_ops."""
    rng = random.Random(f"{cfg.seed}:{name}:lengths")
    return [rng.randint(cfg.hard_min_ops, cfg.max_ops) for _ in range(count)]


def openr1_rows(problems: list[WorldProblem], name: str, cfg: WorldConfig) -> list[dict]:
    """The rows the build pipeline reads (OpenR1's shape, one generation, judged correct)."""
    return [
        {
            "uuid": f"world-{name}-{i:06d}",
            "problem": p.text(cfg.max_ops),
            "answer": p.answer(),
            "generations": [p.solution()],
            "correctness_math_verify": [True],
            "n_ops": len(p.ops),
        }
        for i, p in enumerate(problems)
    ]


@dataclass(frozen=True)
class WarmupExample:
    """One supervised example: the user message, the full solution the model must write after it."""

    prompt: str  # user message content (apply the world chat template with add_generation_prompt=True)
    completion: str  # the full solution, hinted lines included; append <|endoftext|>
    n_ops: int
    hint_steps: int


def warmup_examples(
    count: int, cfg: WorldConfig, hint_fraction: float = 0.4, exclude: Collection[str] = ()
) -> list[WarmupExample]:
    """The small world's warm-up examples (draw_warmup_examples), in its hint-slot prompt format."""

    def sample(rng: random.Random, n: int) -> tuple[str, str]:
        problem = sample_problem(rng, n, cfg.modulus)
        return problem.text(cfg.max_ops), problem.solution()

    rng = random.Random(f"{cfg.seed}:warmup")
    return draw_warmup_examples(rng, count, cfg.warmup_ops, hint_fraction, exclude, sample, prompt_format(cfg))


def draw_warmup_examples(
    rng: random.Random,
    count: int,
    max_ops: int,
    hint_fraction: float,
    exclude: Collection[str],
    sample: Callable[[random.Random, int], tuple[str, str]],
    fmt: hints.PromptFormat,
) -> list[WarmupExample]:
    """Chain length n drawn with weight 0.85^(n - 1) over 1..max_ops; a share `hint_fraction` carries a hint of
    k ~ U[1, n - 1] steps (n >= 2), cut by the same step cut as the RL sets. `sample(rng, n)` gives a problem's
    (text, solution); texts in `exclude` (held-out sets) are drawn again."""
    lengths = list(range(1, max_ops + 1))
    weights = [LENGTH_DECAY ** (n - 1) for n in lengths]
    examples: list[WarmupExample] = []
    while len(examples) < count:
        n = rng.choices(lengths, weights)[0]
        text, solution = sample(rng, n)
        hinted = n >= 2 and rng.random() < hint_fraction
        k = rng.randint(1, n - 1) if hinted else 0
        if text in exclude:
            continue
        end = hints.unit_cut(solution, hints.step_boundaries(solution), k)
        prompt, _ = hints.render_prompt(text, solution[:end], fmt)
        examples.append(WarmupExample(prompt=prompt, completion=solution, n_ops=n, hint_steps=k))
    return examples


# ------------------------------------------------------------------------------------------ writing
def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_world(cfg: WorldConfig, hint_fraction: float = 0.4) -> dict[str, Path]:
    """Write the world's sets under cfg.output_dir; returns name -> folder (or file).

    raw/{rl,eval,calib}.jsonl   OpenR1-shaped rows (the pipeline's inputs)
    rl/p<ratio>/                RL prompts of the hard range, one DatasetDict per cfg.hint_ratios
    eval/p0/                    held-out hard problems, no hint
    calib/p<ratio>/             calib_problems_per_length per n = 1..max_ops, without a hint (p0: the calibration
                                table) and with each hint ratio of the RL sets (what the warm-up's stop checks)
    warmup.jsonl                supervised warm-up examples (WarmupExample fields)
    """
    eval_set = problem_set("eval", hard_lengths(cfg.eval_problems, cfg, "eval"), cfg)
    held_out = {p.text(cfg.max_ops) for p in eval_set}
    calib_lengths = [n for n in range(1, cfg.max_ops + 1) for _ in range(cfg.calib_problems_per_length)]
    sets = {
        "eval": eval_set,
        "calib": problem_set("calib", calib_lengths, cfg, held_out),
        "rl": problem_set("rl", hard_lengths(cfg.rl_problems, cfg, "rl"), cfg, held_out),
    }
    return write_sets(
        cfg, sets, lambda problems, name: openr1_rows(problems, name, cfg),
        lambda inputs, output, ratios: data_config(cfg, inputs, output, ratios),
        warmup_examples(cfg.warmup_examples, cfg, hint_fraction, held_out),
    )


def write_sets(
    cfg: WorldConfig,
    sets: dict[str, list],
    raw_rows: Callable[[list, str], Iterable[dict]],
    data_config_of: Callable[[list[str], str, list[float]], DataConfig],
    warmup: list[WarmupExample],
) -> dict[str, Path]:
    """Write a world's problem sets ({eval, calib, rl}: problems) under cfg.output_dir: raw/<set>.jsonl
    (`raw_rows(problems, set)`), then `questa-nemo data build` of each at its hint ratios
    (`data_config_of(inputs, output_dir, ratios)`), and warmup.jsonl. Returns name -> folder (or file)."""
    from questa_nemo.data.build import build

    out = Path(cfg.output_dir)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, problems in sets.items():
        raw = out / "raw" / f"{name}.jsonl"
        write_jsonl(raw, raw_rows(problems, name))
        ratios = {"eval": [0.0], "calib": [0.0, *(r for r in cfg.hint_ratios if r > 0)], "rl": cfg.hint_ratios}
        build(data_config_of([str(raw)], str(out / name), ratios[name]))
        written[name] = out / name
    write_jsonl(out / "warmup.jsonl", (asdict(e) for e in warmup))
    written["warmup"] = out / "warmup.jsonl"
    return written


def main(config_name: str = "default", overrides: list[str] | None = None, positional=None) -> int:
    """`questa-nemo world [key=value ...]`: write the small world's data sets under world.output_dir."""
    import datasets

    from questa_nemo.config import ConfigError, load_config

    datasets.disable_progress_bars()
    cfg = load_config(config_name, overrides)
    w = cfg.world
    w.validate()
    if w.modulus < 2:
        raise ConfigError("world.modulus", "must be >= 2")
    for name, path in write_world(w, cfg.train.warmup.hint_fraction).items():
        print(f"{name:>7}: {path}")
    return 0
