"""Judge one extracted answer against its reference with math-verify, naming why it scored what it scored.

`judge` is what a worker process runs on each item. It needs the main thread of its process: the soft time
limit is a SIGALRM (math-verify's own `parsing_timeout` / `timeout_seconds` use signal.alarm too, in whole
seconds, and swallow every error; here one float deadline covers parse + verify and errors are counted).
Work stuck in C code ignores signals; the pool's hard kill (pool.py) covers that.

`fast_judge` settles the common case of two plain integers in the caller's process without math-verify; the
tests check that it agrees with math-verify exactly.
"""

from __future__ import annotations

import logging
import re
import signal
from functools import lru_cache
from itertools import product

from questa_nemo.reward.extract import BOXED, plain_integer
from questa_nemo.reward.types import CORRECT, PARSE_ERROR, TIMEOUT, WRONG, RewardResult

logger = logging.getLogger(__name__)


class SoftTimeout(BaseException):
    """Raised by SIGALRM inside `judge`; a BaseException, so math-verify's `except Exception` passes it on."""


_armed = False  # SIGALRM raises SoftTimeout only while a judge call is running


def _on_alarm(signum: int, frame: object) -> None:
    if _armed:
        raise SoftTimeout


def install_alarm_handler() -> None:
    """Route SIGALRM to the soft time limit; call once in the main thread of the judging process."""
    signal.signal(signal.SIGALRM, _on_alarm)
    # math-verify warns on every call made with its own timeouts off; the deadline here replaces them.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


# Thousands separators math-verify misreads: "1\\,000" parses as 1*0 = 0 (a plain "1,000" it reads as 1000).
_THIN_THOUSANDS_RE = re.compile(r"(?<![\d.])\d{1,3}(?:(?:\\[,;: ]|~|\{,\})\d{3})+(?![\d])")
_THIN_SEPARATOR_RE = re.compile(r"\\[,;: ]|~|\{,\}")
# A number (with an optional percent sign) inside \text{}: math-verify keeps "\text{50\%}" as a symbol.
_TEXT_NUMBER_RE = re.compile(r"\\(?:text|textrm|textbf|mathrm|mbox)\{\s*([+-]?[\d.,]+\s*\\?%?)\s*\}")
_CURRENCY_RE = re.compile("[\u20ac\u00a3\u00a5]")  # euro, pound, yen signs: math-verify gives up on them
_OUTER_DOLLARS_RE = re.compile(r"^\$+|(?<!\\)\$+$")  # math delimiters the model put inside its box


def normalise_for_math_verify(answer: str) -> str:
    """Rewrite the forms math-verify misreads into ones it reads: thin-space thousands separators, a number
    in \\text{}, currency signs, and $ delimiters around the whole answer. Linear scans of a capped string."""
    answer = _THIN_THOUSANDS_RE.sub(lambda m: _THIN_SEPARATOR_RE.sub("", m.group()), answer)
    answer = _TEXT_NUMBER_RE.sub(r"\1", answer)
    answer = _CURRENCY_RE.sub("", answer)
    return _OUTER_DOLLARS_RE.sub("", answer.strip()).strip()


def _math_verify_input(answer: str, form: str) -> str:
    """Boxed answers go into $...$ (math-verify's LaTeX extraction); phrases go as written.

    Not back into \\boxed{}: math-verify reads "$50\\%$" and "$90°$" as 50 and 90 but gives up on
    "\\boxed{50\\%}" and "\\boxed{90°}" (kept as strings, so every such answer scored parse_error); on every
    other form we tried the two agree (tests/test_reward.py, test_math_verify_input_forms).
    """
    answer = normalise_for_math_verify(answer)
    return "$" + answer + "$" if form == BOXED else answer


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None, raise_on_error=True)


@lru_cache(maxsize=4096)
def _parse_reference(text: str) -> tuple:
    """A step's 2,048 completions share 128 references: parse each once per worker."""
    return tuple(_parse(text))


def _is_parsed(value: object) -> bool:
    """True for a sympy object; math-verify also returns the raw string when its parser gave up."""
    return not isinstance(value, str)


def _compare(gold: tuple, pred: list) -> str:
    """CORRECT when any (gold, pred) pair verifies, as math-verify's `verify` does; errors count, not hide."""
    from math_verify import verify

    errors = 0
    for g, p in product(gold, pred):
        try:
            if verify(g, p, timeout_seconds=None, raise_on_error=True):
                return CORRECT
        except Exception:
            errors += 1
    if errors or not any(_is_parsed(p) for p in pred):
        return PARSE_ERROR
    return WRONG


def _judge_unbounded(answer: str, form: str, reference: str) -> str:
    gold = _parse_reference(_math_verify_input(reference, BOXED))
    if not gold:
        logger.warning("reward: math-verify cannot parse the reference answer %r", reference[:200])
        return PARSE_ERROR
    pred = _parse(_math_verify_input(answer, form))
    if not pred:
        return PARSE_ERROR
    return _compare(gold, pred)


def judge(answer: str, form: str, reference: str, timeout_s: float) -> RewardResult:
    """1 when `answer` (extracted, of `form`) equals `reference` under math-verify, else 0; with why."""
    global _armed
    try:
        _armed = True
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            reason = _judge_unbounded(answer, form, reference)
        finally:
            _armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except SoftTimeout:
        reason = TIMEOUT
    except Exception:  # RecursionError and MemoryError included: deep or huge inputs
        logger.debug("reward: checker error", exc_info=True)
        reason = PARSE_ERROR
    return RewardResult(1.0 if reason == CORRECT else 0.0, reason)


# Math-verify imports its LaTeX grammar and sympy's solvers lazily, on the first answer of each kind (2-3 s
# on a slow core): judge one of each first, so that no real item spends its time limit on imports.
_WARM_UP = (
    ("1/2", "0.5"),
    ("(0,1]", "[0,1]"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("2x", "x+x"),
    ("x=3", "3"),
    ("x^2+1", "1+x^{2}"),
    ("\\sqrt{12}", "2\\sqrt{3}"),
    ("\\log_2 8", "3"),
)
_WARM_UP_TIMEOUT_S = 120.0
_warmed_up = False


def warm_up() -> None:
    """Pay math-verify's lazy imports now; once per process. Needs install_alarm_handler() first."""
    global _warmed_up
    if not _warmed_up:
        for answer, reference in _WARM_UP:
            judge(answer, BOXED, reference, _WARM_UP_TIMEOUT_S)
        _warmed_up = True


def fast_judge(answer: str, reference: str) -> RewardResult | None:
    """The verdict when both sides are plain integers (no worker needed), else None."""
    got, want = plain_integer(answer), plain_integer(reference)
    if got is None or want is None:
        return None
    return RewardResult(1.0, CORRECT) if got == want else RewardResult(0.0, WRONG)
