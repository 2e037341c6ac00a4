"""pass@k against exact combinatorics, standard errors, majority vote (eval/passk.py)."""

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from questa_nemo.eval.passk import (
    majority_vote,
    mean_and_std,
    mean_and_stderr,
    normalise_answer,
    paired_difference,
    pass_at_k,
    pass_at_k_over_problems,
    pass_at_k_over_seeds,
)


def exact(n, c, k):
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


@pytest.mark.parametrize("n,c,k", [(5, 2, 2), (10, 3, 1), (10, 3, 4), (32, 1, 16), (16, 7, 8), (4, 1, 3)])
def test_matches_exact_combinatorics(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(exact(n, c, k), rel=1e-12)


def test_hand_values_and_edges():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(8, 1, 8) == 1.0  # k = n: one correct sample is always drawn
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0  # all correct
    assert pass_at_k(8, 0, 1) == 0.0  # none correct
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)  # large n stays stable
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_mean_and_stderr_across_problems():
    est = pass_at_k_over_problems([(4, 4), (4, 0), (4, 2), (4, 2)], k=1)
    assert est.mean == pytest.approx(0.5)
    # sample std of 1, 0, .5, .5 = sqrt(0.5 / 3); stderr = that / 2
    assert est.stderr == pytest.approx(math.sqrt(0.5 / 3) / 2)
    assert mean_and_stderr([0.25]).stderr == 0.0
    with pytest.raises(ValueError):
        mean_and_stderr([])


def test_paired_difference_is_the_mean_per_problem_gap_with_its_own_error():
    a, b = [(4, 4), (4, 2), (4, 1)], [(4, 3), (4, 1), (4, 1)]  # A is 0.25, 0.25, 0 ahead per problem
    est = paired_difference(a, b, k=1)
    assert est.mean == pytest.approx(pass_at_k_over_problems(a, 1).mean - pass_at_k_over_problems(b, 1).mean)
    assert est.stderr == pytest.approx(mean_and_stderr([0.25, 0.25, 0.0]).stderr)
    # the same gap on every problem has no spread, however much the problems differ from each other
    assert paired_difference([(4, 3), (4, 1)], [(4, 2), (4, 0)], k=1).stderr == 0.0
    with pytest.raises(ValueError, match="same problems"):
        paired_difference(a, b[:2], k=1)


def test_normalise_answer():
    assert normalise_answer(r"$\dfrac{1}{2}$") == normalise_answer(r"\frac{1}{2}")
    assert normalise_answer(r"\left( 1, 2 \right)") == "(1,2)"
    assert normalise_answer("42.") == "42"


def test_majority_vote():
    assert majority_vote(["12", "13", "12 ", None], [True, False, True, False])
    assert not majority_vote(["13", "13", "12"], [False, False, True])
    assert majority_vote(["7", "8"], [True, False])  # a tie goes to the first seen
    assert not majority_vote([None, None], [False, False])
    with pytest.raises(ValueError):
        majority_vote(["1"], [])


@given(st.integers(1, 60).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_exact_and_monotone(nck):
    n, c, k = nck
    value = pass_at_k(n, c, k)
    assert value == pytest.approx(exact(n, c, k), rel=1e-9, abs=1e-12)
    if k < n:
        assert pass_at_k(n, c, k + 1) >= value - 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, k) >= value - 1e-12


# ------------------------------------------------------------------------------------- seeds (leaderboard)
def test_mean_and_std_over_seeds():
    """Sample standard deviation (n - 1) over seeds, as numpy's std(ddof=1); one seed has std 0."""
    spread = mean_and_std([0.2, 0.4, 0.3, 0.5])
    assert spread.mean == pytest.approx(0.35) and spread.seeds == 4
    assert spread.std == pytest.approx(math.sqrt(((0.15**2) * 2 + 0.05**2 * 2) / 3))
    assert mean_and_std([0.7]) == (0.7, 0.0, 1)
    assert mean_and_std([0.5] * 10).std == 0.0
    with pytest.raises(ValueError):
        mean_and_std([])


def test_pass_at_k_over_seeds_averages_each_seeds_estimate():
    # two problems, three seeds of one sample each (the leaderboard's pass@1): per-seed accuracies 1/2, 1, 0
    per_seed = [[(1, 1), (1, 0)], [(1, 1), (1, 1)], [(1, 0), (1, 0)]]
    spread = pass_at_k_over_seeds(per_seed, 1)
    assert spread.mean == pytest.approx(0.5) and spread.std == pytest.approx(0.5) and spread.seeds == 3
    # with 4 samples per seed, pass@2 per seed then over seeds
    per_seed = [[(4, 2)], [(4, 0)]]
    assert pass_at_k_over_seeds(per_seed, 2).mean == pytest.approx((pass_at_k(4, 2, 2) + 0.0) / 2)


@given(st.lists(st.floats(0, 1), min_size=2, max_size=12))
def test_std_matches_the_textbook_formula(values):
    m = sum(values) / len(values)
    want = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    assert mean_and_std(values).std == pytest.approx(want, abs=1e-12)
