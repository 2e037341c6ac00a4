"""Completions per second of the math reward over one reference step's worth of completions (128 x 16).

Three scorers, side by side in one run on the same 2,048 completions:
  plain    math-verify as its README uses it, in one process: verify(parse(reference), parse(completion)) on
           the whole completion text, with its default signal-based timeouts;
  serial   our pipeline in one process (answer extraction, integer fast path, math-verify on the answer only);
  pool     our MathReward with num_workers worker processes (default: every core).
The completions are synthetic R1-style traces (a long <think> block of LaTeX reasoning, a summary, a final
\\boxed{...}) over integers, fractions, radicals, intervals, sets, expressions; per problem a random share is
right (canonical or an equivalent form), the rest wrong, truncated without an answer, or answered in words.

    python bench/bench_reward.py                      # full size; writes bench/results/reward_<host>.json
    python bench/bench_reward.py --prompts 4 --samples 4 --out-dir /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib.metadata import version
from math import gcd
from pathlib import Path

from shapes import cpu_model  # noqa: E402  (bench/ is the script folder)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from questa_nemo.config import RewardConfig  # noqa: E402
from questa_nemo.reward.math import MathReward, count_reasons, score_in_process  # noqa: E402


@dataclass(frozen=True)
class AnswerKind:
    canonical: str  # the reference answer, as it appears inside \boxed{...}
    equivalents: tuple[str, ...]  # correct ways to write it (the canonical form included or not)
    wrongs: tuple[str, ...]  # plausible wrong answers


def _integer(rng: random.Random) -> AnswerKind:
    n = rng.choice((1, -1, 1, 1)) * rng.randint(0, 5000)
    return AnswerKind(str(n), (str(n), f"{n}.0"), (str(n + rng.randint(1, 30)), str(-n - 1), str(2 * n + 1)))


def _fraction(rng: random.Random) -> AnswerKind:
    q = rng.randint(2, 60)
    p = rng.choice([k for k in range(1, 3 * q) if gcd(k, q) == 1])
    sign = rng.choice(("", "", "-"))
    equivalents = (f"{sign}\\dfrac{{{p}}}{{{q}}}", f"{sign}{p}/{q}", f"{sign}\\frac{{{2 * p}}}{{{2 * q}}}")
    wrongs = (f"{sign}\\frac{{{p + 1}}}{{{q}}}", f"{sign}\\frac{{{q}}}{{{p}}}", f"\\frac{{{p}}}{{{q + 1}}}")
    return AnswerKind(f"{sign}\\frac{{{p}}}{{{q}}}", equivalents, wrongs)


def _radical(rng: random.Random) -> AnswerKind:
    a, b = rng.randint(2, 9), rng.choice((2, 3, 5, 6, 7, 10, 11, 13))
    c = rng.randint(1, 9)
    return (
        AnswerKind(
            f"{a}\\sqrt{{{b}}}",
            (f"\\sqrt{{{a * a * b}}}", f"{a} \\sqrt{{{b}}}"),
            (f"{a + 1}\\sqrt{{{b}}}", f"\\sqrt{{{a * b}}}"),
        )
        if rng.random() < 0.6
        else AnswerKind(
            f"\\frac{{\\sqrt{{{b}}}-{c}}}{{2}}",
            (f"\\dfrac{{-{c}+\\sqrt{{{b}}}}}{{2}}", f"\\frac{{\\sqrt{{{b}}}}}{{2}}-\\frac{{{c}}}{{2}}"),
            (f"\\frac{{\\sqrt{{{b}}}+{c}}}{{2}}",),
        )
    )


def _interval(rng: random.Random) -> AnswerKind:
    lo = rng.randint(-10, 5)
    hi = lo + rng.randint(1, 10)
    left, right = rng.choice("(["), rng.choice(")]")
    flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
    return AnswerKind(
        f"{left}{lo}, {hi}{right}",
        (f"{left}{lo},{hi}{right}",),
        (f"{flip[left]}{lo}, {hi}{right}", f"{left}{lo}, {hi + 1}{right}"),
    )


def _finite_set(rng: random.Random) -> AnswerKind:
    a, b = sorted(rng.sample(range(-9, 20), 2))
    return AnswerKind(f"\\{{{a}, {b}\\}}", (f"\\{{{b}, {a}\\}}",), (f"\\{{{a}, {b + 1}\\}}",))


def _with_pi(rng: random.Random) -> AnswerKind:
    k, m = rng.randint(1, 7), rng.choice((2, 3, 4, 6, 8, 12))
    return AnswerKind(
        f"\\frac{{{k}\\pi}}{{{m}}}",
        (f"\\dfrac{{{k}\\pi}}{{{m}}}", f"{k}\\pi/{m}"),
        (f"\\frac{{{k + 1}\\pi}}{{{m}}}", f"\\frac{{{k}}}{{{m}}}"),
    )


def _polynomial(rng: random.Random) -> AnswerKind:
    a = rng.randint(1, 9)
    return AnswerKind(
        f"x^2 - {a * a}", (f"(x-{a})(x+{a})", f"x^{{2}}-{a * a}"), (f"x^2 + {a * a}", f"(x-{a})^2")
    )


def _decimal(rng: random.Random) -> AnswerKind:
    q = rng.choice((2, 4, 5, 8, 10, 20))
    p = rng.choice([k for k in range(1, 4 * q) if gcd(k, q) == 1])
    return AnswerKind(str(p / q), (f"\\frac{{{p}}}{{{q}}}", f"{p}/{q}"), (str(p / q + 0.1), str(q / p)))


# Integers dominate OpenR1's hard problems; the other kinds share the rest.
KINDS = (
    (_integer,) * 8 + (_fraction,) * 3 + (_radical, _interval, _finite_set, _with_pi, _polynomial, _decimal)
)

_FILLER = (
    "Let me consider the substitution $t = x + \\frac{1}{x}$, so that $t^2 = x^2 + 2 + \\frac{1}{x^2}$. ",
    "Wait, that does not look right. Let me recompute: $3 \\times 17 = 51$, and $51 - 9 = 42$. ",
    "By the AM-GM inequality, $\\frac{a+b}{2} \\geq \\sqrt{ab}$, with equality when $a = b$. ",
    "\\[\n\\sum_{k=1}^{n} k^2 = \\frac{n(n+1)(2n+1)}{6}\n\\]\n",
    "Hmm, so the discriminant is $\\Delta = b^2 - 4ac = 25 - 24 = 1$, hence two real roots. ",
    "Alternatively, maybe I can use coordinates: put $A = (0, 0)$, $B = (4, 0)$ and $C = (1, 3)$. ",
    "So $\\angle ABC = 45^\\circ$ and $\\cos 45^\\circ = \\frac{\\sqrt{2}}{2}$. ",
    "Let me check with $n = 5$: $2^5 - 1 = 31$, which is prime, consistent with the pattern. ",
    "\\[\n\\int_0^1 x^2 \\, dx = \\left[ \\frac{x^3}{3} \\right]_0^1 = \\frac{1}{3}\n\\]\n",
    "But wait, the problem says the numbers are distinct, so the case $a = b$ is excluded. ",
    "Therefore $f(x) = 2x + 3$ satisfies $f(f(x)) = 4x + 9$; let me verify: $2(2x+3)+3 = 4x + 9$. ",
    "Taking this modulo $7$: $10 \\equiv 3 \\pmod{7}$, so $10^k \\equiv 3^k \\pmod{7}$. ",
)


def _reasoning(rng: random.Random, chars: int) -> str:
    parts, size = [], 0
    while size < chars:
        part = rng.choice(_FILLER)
        if rng.random() < 0.15:
            part += "\n\n"
        parts.append(part)
        size += len(part)
    return "".join(parts)


def make_completion(rng: random.Random, kind: AnswerKind, success_rate: float) -> str:
    """One R1-style completion; its final answer is right with probability success_rate."""
    think_chars = min(60_000, int(rng.lognormvariate(9.3, 0.6)))  # median ~11K characters, long tail
    text = "<think>\n" + _reasoning(rng, think_chars)
    roll = rng.random()
    if roll < 0.08:  # truncated at max_new_tokens: no answer at all
        return text
    answer = (
        rng.choice((kind.canonical, *kind.equivalents)) if roll < success_rate else rng.choice(kind.wrongs)
    )
    text += "\n</think>\n\n" + _reasoning(rng, 800)
    if rng.random() < 0.05:
        return text + f"\nThe answer is ${answer}$."
    if rng.random() < 0.1:  # an intermediate result boxed earlier, as R1 sometimes does
        text = text.replace("Let me check", "We get $\\boxed{17}$ here. Let me check", 1)
    return text + f"\n\n**Final Answer**\n\\[\n\\boxed{{{answer}}}\n\\]"


def make_batch(prompts: int, samples: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    completions, references = [], []
    for _ in range(prompts):
        kind = rng.choice(KINDS)(rng)
        success_rate = rng.random()
        for _ in range(samples):
            completions.append(make_completion(rng, kind, success_rate))
            references.append("\\boxed{" + kind.canonical + "}")
    return completions, references


def plain_math_verify(completions: list[str], references: list[str]) -> list[float]:
    """The baseline: math-verify on the whole text, one completion after another, defaults throughout."""
    from math_verify import parse, verify

    return [float(verify(parse(ref), parse(text))) for text, ref in zip(completions, references)]


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes `pids` have used so far; Linux /proc, else 0."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def _timed(fn, *args, worker_pids: tuple[int, ...] = ()):
    """(result, wall seconds, CPU seconds of this process and of `worker_pids`)."""
    wall, cpu, workers = time.perf_counter(), time.process_time(), _cpu_s(list(worker_pids))
    out = fn(*args)
    cpu_used = time.process_time() - cpu + _cpu_s(list(worker_pids)) - workers
    return out, time.perf_counter() - wall, cpu_used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    start = time.perf_counter()
    with MathReward(RewardConfig(num_workers=args.workers, timeout_s=args.timeout_s)) as reward:
        reward.wait_ready()
        startup_s = time.perf_counter() - start
        # Untimed warm-up of the in-process scorers on other problems: math-verify imports its parser and
        # sympy's solvers lazily, a cost the pool's workers paid at start-up (pool_startup_s).
        warm_completions, warm_references = make_batch(len(KINDS), 1, args.seed - 1)
        score_in_process(warm_completions, warm_references, args.timeout_s)
        plain_math_verify(warm_completions, warm_references)
        # Each repeat scores a fresh batch (no cache carries over) with all three, back to back; the best
        # repeat of each counts, which filters out other load on a shared machine.
        seconds: dict[str, list[float]] = {"plain_math_verify": [], "serial": [], "pool": []}
        # CPU seconds spent, workers included: unlike wall time, hardly affected by other load on the machine.
        cpu_seconds: dict[str, list[float]] = {"plain_math_verify": [], "serial": [], "pool": []}
        reasons: Counter[str] = Counter()
        disagreements: Counter[str] = Counter()
        serial_vs_pool = 0  # rewards that differ between our two scorers (only a timeout under load can)
        for repeat in range(args.repeats):
            completions, references = make_batch(args.prompts, args.samples, args.seed + repeat)
            n = len(completions)
            print(f"repeat {repeat}: {n} completions, {sum(map(len, completions)) / n:.0f} chars on average")
            pids = tuple(reward.worker_pids())
            pool_results, elapsed, cpu = _timed(reward.score, completions, references, worker_pids=pids)
            seconds["pool"].append(elapsed)
            cpu_seconds["pool"].append(cpu)
            serial_results, elapsed, cpu = _timed(score_in_process, completions, references, args.timeout_s)
            seconds["serial"].append(elapsed)
            cpu_seconds["serial"].append(cpu)
            plain_rewards, elapsed, cpu = _timed(plain_math_verify, completions, references)
            seconds["plain_math_verify"].append(elapsed)
            cpu_seconds["plain_math_verify"].append(cpu)
            reasons.update(r.reason for r in pool_results)
            serial_vs_pool += sum(a.reward != b.reward for a, b in zip(serial_results, pool_results))
            disagreements.update(
                f"pool {r.reward:.0f} / plain {q:.0f} ({r.reason})"
                for r, q in zip(pool_results, plain_rewards)
                if r.reward != q
            )
        stats = reward.stats
    best = {name: min(times) for name, times in seconds.items()}
    result = {
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "workers": args.workers,
        "completions_per_repeat": n,
        "repeats": args.repeats,
        "rates_per_s": {name: round(n / t, 1) for name, t in best.items()},
        "seconds": {name: [round(t, 3) for t in times] for name, times in seconds.items()},
        "cpu_ms_per_completion": {name: round(1000 * min(t) / n, 3) for name, t in cpu_seconds.items()},
        "pool_startup_s": round(startup_s, 2),
        "speedup_pool_vs_plain": round(best["plain_math_verify"] / best["pool"], 2),
        "speedup_pool_vs_serial": round(best["serial"] / best["pool"], 2),
        "reasons": {reason: reasons[reason] for reason in count_reasons([])},
        "disagreements_with_plain": dict(disagreements),
        "serial_vs_pool_differences": serial_vs_pool,
        "pool_stats": vars(stats),
        "python": platform.python_version(),
        "math_verify": version("math-verify"),
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"reward_{socket.gethostname()}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    rates = result["rates_per_s"]
    print(
        f"{result['cpu_model']}, {result['cores']} cores, {args.workers} workers: "
        f"plain math-verify {rates['plain_math_verify']}/s, serial {rates['serial']}/s, "
        f"pool {rates['pool']}/s "
        f"(x{result['speedup_pool_vs_plain']} vs plain, x{result['speedup_pool_vs_serial']} vs serial); "
        f"pool start-up {startup_s:.1f} s; load average {result['load_average_1m']}"
    )
    print(f"CPU ms per completion (workers included): {result['cpu_ms_per_completion']}")
    print(f"reasons {result['reasons']}; disagreements with plain: {result['disagreements_with_plain']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
