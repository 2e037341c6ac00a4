"""pass@k, pass@1 with its standard error, and majority vote: pure functions on counts and answer strings."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    missing = 1.0
    for i in range(n - c + 1, n + 1):
        missing *= 1.0 - k / i
    return 1.0 - missing


class Estimate(NamedTuple):
    mean: float
    stderr: (
        float  # standard error of the mean across problems (sample std / sqrt(problems)); 0 for one problem
    )


def _mean_and_sample_var(values: Sequence[float], what: str) -> tuple[float, float]:
    """(mean, sample variance with n - 1); the variance of one value is 0."""
    m = len(values)
    if m == 0:
        raise ValueError(what)
    mean = sum(values) / m
    if m == 1:
        return mean, 0.0
    return mean, sum((v - mean) ** 2 for v in values) / (m - 1)


def mean_and_stderr(values: Sequence[float]) -> Estimate:
    """Mean across problems with its standard error; the problems are the unit of sampling."""
    mean, var = _mean_and_sample_var(values, "mean_and_stderr: no problems")
    return Estimate(mean, math.sqrt(var / len(values)))


def pass_at_k_over_problems(counts: Sequence[tuple[int, int]], k: int) -> Estimate:
    """pass@k averaged over problems given (n, correct) per problem; pass@1 is the mean per-sample accuracy."""
    return mean_and_stderr([pass_at_k(n, c, k) for n, c in counts])


def paired_difference(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]], k: int) -> Estimate:
    """pass@k of model A minus model B on the same problems, a[i] and b[i] the (n, correct) of problem i: the mean
    per-problem difference and its standard error over problems. Pairing takes out how hard each problem is (it
    is hard for both), so this error is smaller than the two means' errors taken as independent."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs the same problems on both sides, got {len(a)} and {len(b)}")
    return mean_and_stderr([pass_at_k(na, ca, k) - pass_at_k(nb, cb, k) for (na, ca), (nb, cb) in zip(a, b)])


_SPACING = re.compile(r"\\[,!;: ]|\\q?quad|\s+")
_WRAPPERS = re.compile(r"\\(?:left|right|displaystyle)")


def normalise_answer(answer: str) -> str:
    """A key under which equal-looking answers vote together: no spacing, no \\left/\\right, no $ or trailing dot.

    Only for counting votes; correctness is still the reward's mathematical check.
    """
    text = _WRAPPERS.sub("", _SPACING.sub("", answer))
    text = text.strip("$").rstrip(".")
    return text.replace("dfrac", "frac").replace("tfrac", "frac")


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent answer (by normalise_answer) was a correct one.

    answers[i] is sample i's extracted answer (None when it gave none, which never votes); ties go to the answer
    seen first. A problem where no sample answered counts as wrong.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_vote: {len(answers)} answers but {len(correct)} correctness flags")
    keys = [normalise_answer(a) if a is not None else None for a in answers]
    votes = Counter(k for k in keys if k)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(k for k in keys if k and votes[k] == top)
    return any(ok for k, ok in zip(keys, correct) if k == winner)


class SeedSpread(NamedTuple):
    mean: float  # mean over seeds of a per-seed metric
    std: float  # sample standard deviation over seeds (n - 1 in the denominator); 0 for one seed
    seeds: int


def mean_and_std(values: Sequence[float]) -> SeedSpread:
    """Mean and sample standard deviation of one metric over independent seeds (the leaderboard's mean +- std)."""
    mean, var = _mean_and_sample_var(values, "mean_and_std: no seeds")
    return SeedSpread(mean, math.sqrt(var), len(values))


def pass_at_k_over_seeds(per_seed: Sequence[Sequence[tuple[int, int]]], k: int) -> SeedSpread:
    """pass@k computed on each seed's (n, correct) per problem, then mean and std over the seeds."""
    return mean_and_std([pass_at_k_over_problems(counts, k).mean for counts in per_seed])
