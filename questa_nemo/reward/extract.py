"""Find a completion's final answer the way the reference recipe does, in bounded time on any input.

The reference takes the text inside the last `boxed{...}` (brace-matched), and falls back to what follows
"he answer is" or "final answer is" (docs/recipe.md, "Reward"). Completions are untrusted model output: a
10 MB string, thousands of braces, NUL bytes or lone surrogates must cost at most a few linear scans here, and
what comes out is capped so that the parser never sees more than `max_chars` characters.

Two deliberate differences from the reference: a `boxed{` whose brace never closes (a truncated completion)
gives no answer instead of the rest of the text, and the phrase fallback keeps only the rest of its line (the
reference joins every line after it, so "the answer is 5, not 7 ..." could be read as 7).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from questa_nemo.reward.types import NO_ANSWER, PARSE_ERROR

BOXED = "boxed"  # the answer came from inside the last boxed{...} / fbox{...}
PHRASE = "phrase"  # the answer came from the text after "he answer is" / "final answer is"

# The greedy `.*` backtracks from the end, so this finds the LAST opener in one linear pass.
_LAST_BOX_OPEN_RE = re.compile(r".*(?:boxed|fbox)\s*\{", re.DOTALL)
_BRACE_RE = re.compile(r"[{}]")
_PHRASES = ("he answer is", "final answer is")  # in the reference's order of preference
_PLAIN_INTEGER_RE = re.compile(r"[+-]?\d{1,18}")  # 18 digits: exact in int, and math-verify compares exactly
# NUL and the other C0 controls except tab/newline/carriage return, and lone surrogates (invalid UTF-8 decoded
# with surrogateescape): no real answer contains them, and they break C parsers downstream.
_FORBIDDEN_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


class Extraction(NamedTuple):
    answer: str  # the final answer's text ("" when there is none)
    form: str  # BOXED | PHRASE | "" (none)
    problem: str  # "" when the answer is usable, else the reason it scores 0: NO_ANSWER | PARSE_ERROR


def _last_box_start(text: str) -> int:
    """Index just after the `{` of the last boxed{ / fbox{ (spaces allowed before the brace), or -1."""
    match = _LAST_BOX_OPEN_RE.match(text)
    return match.end() if match else -1


def _boxed_content(text: str, open_at: int, max_chars: int) -> tuple[str, str]:
    """(content, problem) of the group opened just before `open_at`; scans at most max_chars + 1 chars."""
    depth = 1
    window_end = min(len(text), open_at + max_chars + 1)
    for brace in _BRACE_RE.finditer(text, open_at, window_end):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[open_at : brace.start()], ""
    if window_end == len(text):
        return "", NO_ANSWER  # never closed: a truncated completion
    return "", PARSE_ERROR  # longer than max_chars


def _phrase_answer(text: str, max_chars: int) -> tuple[str, str] | None:
    """(answer, problem) after the last "he answer is", else the last "final answer is"; None if neither."""
    for phrase in _PHRASES:
        at = text.rfind(phrase)
        if at < 0:
            continue
        start = at + len(phrase)
        line_end = text.find("\n", start, start + max_chars + 2)
        if line_end < 0:
            line_end = min(len(text), start + max_chars + 2)
        answer = text[start:line_end].strip().removeprefix(":").strip().removesuffix(".").strip()
        if len(answer) > max_chars:
            return "", PARSE_ERROR
        return answer, ""
    return None


def extract_answer(completion: str, max_chars: int) -> Extraction:
    """The completion's final answer, or why there is none. Runs in O(len(completion)) string scans."""
    if not isinstance(completion, str):
        return Extraction("", "", PARSE_ERROR)
    open_at = _last_box_start(completion)
    if open_at >= 0:
        answer, problem = _boxed_content(completion, open_at, max_chars)
        form = BOXED
    else:
        found = _phrase_answer(completion, max_chars)
        if found is None:
            return Extraction("", "", NO_ANSWER)
        (answer, problem), form = found, PHRASE
    if problem:
        return Extraction("", form, problem)
    answer = answer.strip()
    if not answer:
        return Extraction("", form, NO_ANSWER)
    if _FORBIDDEN_RE.search(answer):
        return Extraction("", form, PARSE_ERROR)
    return Extraction(answer, form, "")


def reference_answer(reference: str, max_chars: int) -> Extraction:
    """The reference arrives as "\\boxed{...}"; a bare answer is taken as it is."""
    found = extract_answer(reference, max_chars)
    if found.form == BOXED or not isinstance(reference, str):
        return found
    bare = reference.strip()
    if not bare:
        return Extraction("", "", NO_ANSWER)
    if len(bare) > max_chars or _FORBIDDEN_RE.search(bare):
        return Extraction("", "", PARSE_ERROR)
    return Extraction(bare, BOXED, "")


def plain_integer(answer: str) -> int | None:
    """The answer's value when it is a plain integer ("42", "-7", "+3", "007"), else None."""
    return int(answer) if _PLAIN_INTEGER_RE.fullmatch(answer) else None
