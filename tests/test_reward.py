"""The math reward without worker processes: answer extraction, math-verify verdicts, the integer fast path,
reason counts and the config section. The pool (processes, crashes, hangs) is in test_reward_pool.py."""

from __future__ import annotations

import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from questa_nemo.config import Config, ConfigError, RewardConfig, conf_dir, validate
from questa_nemo.reward.check import _math_verify_input, fast_judge, install_alarm_handler, judge, warm_up
from questa_nemo.reward.extract import (
    BOXED,
    PHRASE,
    Extraction,
    extract_answer,
    plain_integer,
    reference_answer,
)
from questa_nemo.reward.math import MathReward, count_reasons, score_in_process
from questa_nemo.reward.types import REASONS, RewardResult

CAP = 1000


# ------------------------------------------------------------------------------------------ extraction
@pytest.mark.parametrize(
    "completion, answer, form",
    [
        ("so x = 2 and \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}", BOXED),
        ("first \\boxed{1} then \\boxed{2}", "2", BOXED),  # the LAST box
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", BOXED),  # nested braces
        ("\\boxed {7}", "7", BOXED),
        ("\\fbox{8}", "8", BOXED),
        ("\\boxed{ 9 }", "9", BOXED),
        ("$\\boxed{(0, 1]}$", "(0, 1]", BOXED),
        ("the boxed value is 3, so \\boxed{4}", "4", BOXED),  # "boxed" without a brace is skipped
        ("Thus the answer is $\\frac{3}{4}$.\nDone.", "$\\frac{3}{4}$", PHRASE),
        ("The answer is: 12.", "12", PHRASE),
        ("My final answer is 5", "5", PHRASE),
        (
            "the final answer is 5, and the answer is 6",
            "6",
            PHRASE,
        ),  # "he answer is" wins, as in the reference
    ],
)
def test_extract_answer_finds_the_final_answer(completion, answer, form):
    assert extract_answer(completion, CAP) == Extraction(answer, form, "")


@pytest.mark.parametrize(
    "completion, problem",
    [
        ("no answer here at all", "no_answer"),
        ("\\boxed{}", "no_answer"),
        ("\\boxed{  }", "no_answer"),
        ("truncated \\boxed{\\frac{1}{", "no_answer"),  # never closed
        ("\\boxed{" + "1" * (CAP + 1) + "}", "parse_error"),  # over the cap
        ("the answer is " + "1" * (CAP + 5), "parse_error"),
        ("\\boxed{4\x00}", "parse_error"),
        ("\\boxed{4\udcff}", "parse_error"),  # invalid UTF-8 read with surrogateescape
        (b"\\boxed{4}", "parse_error"),  # not a str at all
    ],
)
def test_extract_answer_reports_why_there_is_no_usable_answer(completion, problem):
    assert extract_answer(completion, CAP).problem == problem


def test_extract_answer_ignores_garbage_outside_the_answer():
    completion = "\x00\udcff" + "{" * 5000 + " reasoning \\boxed{42}"
    assert extract_answer(completion, CAP) == Extraction("42", BOXED, "")


@pytest.mark.parametrize(
    "completion",
    [
        "x" * 10_000_000,
        "\\boxed{" + "{" * 10_000_000,
        "boxed" * 2_000_000,
        "boxed{" * 2_000_000,
        "boxed" + " " * 10_000_000,
        "he answer is " * 800_000,
    ],
)
def test_extract_answer_is_linear_on_10_mb_inputs(completion):
    start = time.process_time()  # CPU time: other load on a shared machine must not fail this test
    result = extract_answer(completion, CAP)
    assert time.process_time() - start < 1.0
    assert result.answer == ""


def test_reference_answer_accepts_boxed_and_bare_references():
    assert reference_answer("\\boxed{\\frac{1}{2}}", CAP) == Extraction("\\frac{1}{2}", BOXED, "")
    assert reference_answer(" 17 ", CAP) == Extraction("17", BOXED, "")
    assert reference_answer("", CAP).problem == "no_answer"


def test_plain_integer():
    assert [plain_integer(s) for s in ("42", "-7", "+3", "007")] == [42, -7, 3, 7]
    assert [plain_integer(s) for s in ("4.0", "1,000", "1/2", "x", "", "1" * 19)] == [None] * 6


# ------------------------------------------------------------------------------------- verdicts
@pytest.fixture(scope="module", autouse=True)
def _alarm_handler():
    """judge() needs the SIGALRM handler; warm_up() keeps math-verify's lazy imports out of time limits."""
    install_alarm_handler()
    warm_up()


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac12", "0.5"),
        ("(0, 1]", "(0,1]"),
        ("\\{2, 1\\}", "\\{1,2\\}"),
        ("-3", "-3"),
        ("5\\text{ cm}", "5"),  # units dropped
        ("\\sqrt{12}", "2\\sqrt{3}"),
        ("x = 3", "3"),
        ("1,000,000", "1000000"),
        ("\\text{Tuesday}", "\\text{Tuesday}"),
    ],
)
def test_equivalent_forms_score_one(answer, reference):
    results = score_in_process([f"Reasoning ... so \\boxed{{{answer}}}"], [f"\\boxed{{{reference}}}"])
    assert results == [RewardResult(1.0, "correct")]


# Issue 16: answers with percent signs, units, \text{}, degrees, currency and thousands separators. Before the
# fix the extracted answer went back into \boxed{} for math-verify, which gives up on "\boxed{50\%}" (and on
# "\boxed{90°}") though it reads "$50\%$"; thin-space separators ("1\,000") it reads as 1*0.
ANSWER_FAMILY = [
    ("50\\%", "50"),  # percent
    ("50 \\%", "50"),
    ("12.5\\%", "12.5"),
    ("50\\text{\\%}", "50"),
    ("\\text{50\\%}", "50"),
    ("50\\%", "50\\%"),  # percent in the reference too
    ("10\\text{ cm}", "10"),  # units
    ("3\\text{ m/s}", "3"),
    ("5\\mbox{ cm}", "5"),
    ("5\\mathrm{~cm}", "5"),
    ("\\text{5}", "5"),  # \text{}
    ("\\textbf{5}", "5"),
    ("\\text{(B)}", "B"),
    ("90^\\circ", "90"),  # degrees
    ("90^{\\circ}", "90"),
    ("90°", "90"),
    ("100^\\circ\\text{C}", "100"),
    ("\\$5", "5"),  # currency
    ("\\$5.00", "5"),
    ("\\$1{,}000", "1000"),
    ("€5", "5"),
    ("5 \\text{ dollars}", "5"),
    ("1,000", "1000"),  # thousands separators
    ("1{,}000", "1000"),
    ("12,345,678", "12345678"),
    ("1\\,000", "1000"),
    ("1\\ 000", "1000"),
    ("1~000", "1000"),
    ("1\\,234\\,567", "1234567"),
    ("$42$", "42"),  # math delimiters inside the box
]


@pytest.mark.parametrize("answer, reference", ANSWER_FAMILY)
def test_answer_family_scores_one(answer, reference):
    results = score_in_process([f"so \\boxed{{{answer}}}"], [f"\\boxed{{{reference}}}"])
    assert results == [RewardResult(1.0, "correct")], answer


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("51\\%", "50"),
        ("91^\\circ", "90"),
        ("\\$6", "5"),
        ("1\\,001", "1000"),
        ("1\\,000", "0"),
        ("1,2", "1.2"),
    ],
)
def test_answer_family_near_misses_score_wrong(answer, reference):
    """The rewrites must not make different answers equal ("1\\,000" against 0 scored correct before the fix)."""
    results = score_in_process([f"\\boxed{{{answer}}}"], [f"\\boxed{{{reference}}}"])
    assert results == [RewardResult(0.0, "wrong")], answer


def test_answer_family_through_the_worker_pool():
    """The same verdicts from MathReward's worker processes (math-verify under their own time limits)."""
    answers = [a for a, _ in ANSWER_FAMILY]
    with MathReward(RewardConfig(num_workers=1, timeout_s=10.0)) as reward:
        results = reward.score(
            [f"\\boxed{{{a}}}" for a in answers], [f"\\boxed{{{r}}}" for _, r in ANSWER_FAMILY]
        )
    assert [r.reason for r in results] == ["correct"] * len(answers)


def test_math_verify_input_forms():
    """Boxed answers reach math-verify in $...$, normalised; phrase answers as written (normalised)."""
    assert _math_verify_input("50\\%", BOXED) == "$50\\%$"
    assert _math_verify_input("1\\,000", BOXED) == "$1000$"
    assert _math_verify_input("$\\frac{1}{2}$", BOXED) == "$\\frac{1}{2}$"
    assert _math_verify_input("\\$5", BOXED) == "$\\$5$"
    assert _math_verify_input("50\\%", PHRASE) == "50\\%"


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("3", "-3"),
        ("[0, 1]", "(0,1]"),
        ("\\frac{1}{3}", "\\frac{1}{2}"),
        ("\\{1, 3\\}", "\\{1,2\\}"),
        ("2\\sqrt{2}", "2\\sqrt{3}"),
        ("\\text{Monday}", "\\text{Tuesday}"),
    ],
)
def test_different_answers_score_zero_as_wrong(answer, reference):
    results = score_in_process([f"\\boxed{{{answer}}}"], [f"\\boxed{{{reference}}}"])
    assert results == [RewardResult(0.0, "wrong")]


def test_phrase_fallback_is_judged():
    results = score_in_process(
        ["so the answer is $\\frac{1}{2}$.", "The final answer is 0.25"], ["\\boxed{0.5}"] * 2
    )
    assert [r.reason for r in results] == ["correct", "wrong"]


def test_unparseable_answer_and_reference_score_zero_as_parse_error():
    results = score_in_process(["\\boxed{)(}", "\\boxed{\\sqrt{}}"], ["\\boxed{1}"] * 2)
    assert [r.reason for r in results] == ["parse_error"] * 2
    assert score_in_process(["\\boxed{1}"], ["\\boxed{}"])[0].reason == "parse_error"


def test_judge_soft_timeout_stops_slow_python_work():
    start = time.perf_counter()
    result = judge("10^{10^{10^{10}}}", BOXED, "1", timeout_s=0.5)
    assert result == RewardResult(0.0, "timeout")
    assert time.perf_counter() - start < 3.0


def test_python_code_in_an_answer_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f"__import__('os').system('touch {marker}')",
        f"eval(\"open('{marker}', 'w')\")",
        f"\\text{{__import__('os').system('touch {marker}')}}",
    ]
    completions = [f"\\boxed{{{p}}}" for p in payloads] + [f"The answer is {payloads[0]}"]
    results = score_in_process(completions, ["\\boxed{0}"] * len(completions))
    assert all(r.reward == 0.0 for r in results)
    assert not marker.exists()


@settings(max_examples=150, deadline=None)
@given(
    got=st.integers(-(10**15), 10**15),
    want=st.integers(-(10**15), 10**15),
    zeros=st.integers(0, 2),
    plus=st.booleans(),
    same=st.booleans(),
)
@example(
    got=123456789012345678, want=123456789012345679, zeros=0, plus=False, same=False
)  # past float precision
def test_integer_fast_path_agrees_with_math_verify(got, want, zeros, plus, same):
    want = got if same else want
    answer = ("+" if plus and got >= 0 else "") + ("-" if got < 0 else "") + "0" * zeros + str(abs(got))
    fast = fast_judge(answer, str(want))
    assert fast is not None
    assert fast == judge(answer, BOXED, str(want), timeout_s=5.0)


def test_fast_path_declines_non_integers():
    assert fast_judge("0.5", "1") is None
    assert fast_judge("1", "\\frac{2}{2}") is None


def test_count_reasons_lists_every_reason():
    results = [RewardResult(1.0, "correct"), RewardResult(0.0, "timeout"), RewardResult(0.0, "timeout")]
    counts = count_reasons(results)
    assert set(counts) == set(REASONS)
    assert counts["correct"] == 1 and counts["timeout"] == 2 and counts["wrong"] == 0


def test_mismatched_lengths_name_both_counts():
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        score_in_process(["a", "b"], ["c"])


# ---------------------------------------------------------------------------------------- config
def test_reward_yaml_matches_the_schema():
    raw = OmegaConf.load(conf_dir() / "reward" / "math.yaml")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardConfig), raw))
    assert cfg == RewardConfig()


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_workers", 0),
        ("timeout_s", 0.0),
        ("max_answer_chars", 0),
        ("kill_grace_s", -1.0),
        ("start_method", "fork"),
    ],
)
def test_bad_reward_config_names_the_key(key, value):
    cfg = Config()
    setattr(cfg.reward, key, value)
    with pytest.raises(ConfigError, match=f"^reward.{key}:"):
        validate(cfg)
