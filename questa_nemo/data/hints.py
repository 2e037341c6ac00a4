"""Hint construction: the reference's character cut, kept byte-for-byte, and boundary-aware cuts beside it.

The reference (docs/recipe.md, "Hint construction") strips a quoted generation, keeps the text after the last
`</think>` as the solution and shows the first int(len(solution) * (p / 100)) characters as the hint. That cut can
split a word, a number or a LaTeX group. The other modes measure the solution in their own unit (tokens of a
tokenizer, sentences, solution steps), keep the first int(units * (p / 100)) units and then move the cut back to
the nearest earlier position that splits no LaTeX group ({...}, $...$, $$...$$, \\(...\\), \\[...\\]), LaTeX
command or number. A hint is always a prefix of the solution: the model continues it, it never restarts.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from questa_nemo.config import CHOICES

THINK_END = "</think>"
CUT_MODES = CHOICES["data.cut_mode"]  # the schema's list (config key data.cut_mode)
HINT_PAD = "_"  # fills the fixed-width hint slot of formats that have one (the small world)


class TokenOffsets(Protocol):
    """What token mode needs from a tokenizer: the (start, end) character span of each token."""

    def __call__(self, text: str) -> Sequence[tuple[int, int]]: ...


@dataclass(frozen=True)
class PromptFormat:
    """How problem and hint become the user message. Defaults are the reference's."""

    separator: str = "\n\n"  # between the problem and the hint section
    hint_prefix: str = "## Hint."  # opens the hint section
    min_hint_chars: int = 10  # a shorter hint is not shown (reference: the prompt is problem + separator)
    hint_slot_chars: int = 0  # > 0: every prompt carries a hint slot this wide, padded with HINT_PAD


def reference_solution(generation: str) -> str:
    """The text hints are cut from: a generation starting with a double quote loses its first and last character
    (the reference does not check that the last one is a quote), then only what follows the last `</think>`."""
    text = generation
    if text[:1] == '"':
        text = text[1:-1]
    return text.split(THINK_END)[-1]


def char_cut(solution: str, ratio: float) -> int:
    """Reference cut: int(len(solution) * (ratio / 100)) characters, in floating point as the reference does."""
    return int(len(solution) * (ratio / 100))


def render_prompt(problem: str, hint: str, fmt: PromptFormat) -> tuple[str, str]:
    """(prompt, hint shown). A hint under fmt.min_hint_chars is not shown; without a hint slot the prompt is then
    problem + separator, as in the reference."""
    shown = hint if len(hint) >= fmt.min_hint_chars else ""
    if fmt.hint_slot_chars <= 0:
        if not shown:
            return problem + fmt.separator, ""
        return problem + fmt.separator + fmt.hint_prefix + shown, shown
    if len(shown) > fmt.hint_slot_chars:
        raise ValueError(
            f"hint of {len(shown)} characters does not fit the {fmt.hint_slot_chars}-character slot"
        )
    return problem + fmt.separator + fmt.hint_prefix + shown.ljust(fmt.hint_slot_chars, HINT_PAD), shown


# ------------------------------------------------------------------------------------- safe positions
# Delimiters of LaTeX groups. Escaped characters (\{, \}, \$, \\) come first so they never open or close one.
_DELIMITER = re.compile(r"\\[\\{}$]|\\[()\[\]]|\$\$|[{}$]")
_ESCAPED = {"\\\\", "\\{", "\\}", "\\$"}
_OPENER_OF = {"}": "{", "\\)": "\\(", "\\]": "\\["}
_TOGGLES = {"$", "$$"}  # the same mark opens and closes
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_COMMAND = re.compile(r"\\[A-Za-z]+")


def _latex_groups(text: str) -> list[tuple[int, int]]:
    """[start, end) spans of balanced LaTeX groups, delimiters included. An opener that is never closed (a
    currency dollar, a truncated formula) is not a group; a stray closer is ignored."""
    stack: list[tuple[str, int]] = []
    spans: list[tuple[int, int]] = []
    for m in _DELIMITER.finditer(text):
        mark = m.group()
        if mark in _ESCAPED:
            continue
        if mark in _TOGGLES and stack and stack[-1][0] == mark:
            spans.append((stack.pop()[1], m.end()))
        elif mark in _TOGGLES or mark not in _OPENER_OF:
            stack.append((mark, m.start()))
        else:
            opener = _OPENER_OF[mark]
            depth = next((i for i in range(len(stack) - 1, -1, -1) if stack[i][0] == opener), None)
            if depth is not None:
                spans.append((stack[depth][1], m.end()))
                del stack[depth:]
    return spans


def blocked_positions(text: str) -> bytearray:
    """blocked[i] == 1 when cutting before text[i] would split a LaTeX group, a LaTeX command (or a command from
    its first argument) or a number.  # [len(text) + 1]"""
    blocked = bytearray(len(text) + 1)

    def block(start: int, end: int) -> None:  # cuts strictly inside [start, end)
        if end - start > 1:
            blocked[start + 1 : end] = b"\x01" * (end - start - 1)

    for start, end in _latex_groups(text):
        block(start, end)
    for m in _NUMBER.finditer(text):
        block(m.start(), m.end())
    for m in _COMMAND.finditer(text):
        block(m.start(), m.end())
        if text[m.end() : m.end() + 1] in ("{", "["):
            blocked[m.end()] = 1
    for m in re.finditer(r"\}(?=[{\[^_])", text):  # \frac{1}{2}, x_{1}^{2}: one expression
        blocked[m.end()] = 1
    return blocked


# ------------------------------------------------------------------------------------- unit boundaries
_SENTENCE_END = re.compile(r"[.!?][\"')\]*]*\s+|\n\s*")
_STEP_MARKER = re.compile(r"^[ \t]*(?:#{1,6}[ \t]*|\*\*)?Step[ \t]*\d+", re.MULTILINE | re.IGNORECASE)
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
_WORD_GAP = re.compile(r"\s+")


def _inside(positions: list[int], text: str) -> list[int]:
    """Positions strictly inside the text's content: leading and trailing whitespace is no unit of its own."""
    first, last = len(text) - len(text.lstrip()), len(text.rstrip())
    return [p for p in positions if first < p < last]


def sentence_boundaries(text: str) -> list[int]:
    """Starts of sentences after the first: after [.!?] (and closing quotes, brackets, bold marks) plus
    whitespace, or after a line break."""
    return _inside([m.end() for m in _SENTENCE_END.finditer(text)], text)


def step_boundaries(text: str) -> list[int]:
    """Starts of solution steps after the first: "Step k" headings when there are at least two, else
    paragraphs (blank lines), else lines."""
    markers = [m.start() for m in _STEP_MARKER.finditer(text)]
    if len(markers) >= 2:
        return _inside(markers, text)
    paragraphs = [m.end() for m in _BLANK_LINE.finditer(text)]
    if paragraphs:
        return _inside(paragraphs, text)
    return _inside([m.end() for m in re.finditer(r"\n", text)], text)


def token_boundaries(text: str, offsets: TokenOffsets) -> list[int]:
    """Ends of every token but the last: len(result) + 1 == number of tokens (for a non-empty text)."""
    ends = sorted(end for _, end in offsets(text))
    return ends[:-1]


def word_boundaries(text: str) -> list[int]:
    """Starts of words after the first: where char mode re-cuts a hint that leaks the answer."""
    return _inside([m.end() for m in _WORD_GAP.finditer(text)], text)


def boundaries(text: str, mode: str, offsets: TokenOffsets | None = None) -> list[int]:
    """Sorted cut candidates splitting `text` into len(result) + 1 units of `mode` (char mode: words)."""
    if mode == "token":
        if offsets is None:
            raise ValueError("cut mode 'token' needs a tokenizer")
        return token_boundaries(text, offsets)
    if mode == "sentence":
        return sentence_boundaries(text)
    if mode == "step":
        return step_boundaries(text)
    if mode == "char":
        return word_boundaries(text)
    raise ValueError(f"unknown cut mode {mode!r}; expected one of {', '.join(CUT_MODES)}")


def safe_cut_at_or_before(position: int, candidates: list[int], blocked: bytearray) -> int:
    """The largest candidate <= position that splits nothing; 0 (no hint) when there is none."""
    i = bisect.bisect_right(candidates, position)
    while i > 0:
        i -= 1
        if not blocked[candidates[i]]:
            return candidates[i]
    return 0


def unit_cut(text: str, candidates: list[int], units: int) -> int:
    """Cut after the first `units` units (0 <= units), moved back to a safe position."""
    if units <= 0 or not text:
        return 0
    if units > len(candidates):
        return len(text)
    return safe_cut_at_or_before(candidates[units - 1], candidates, blocked_positions(text))


def hint_end(solution: str, ratio: float, mode: str, offsets: TokenOffsets | None = None) -> int:
    """Where the hint ends: solution[:hint_end(...)] is the hint for ratio p (percent)."""
    if mode == "char":
        return char_cut(solution, ratio)
    candidates = boundaries(solution, mode, offsets)
    units = len(candidates) + 1 if solution else 0
    return unit_cut(solution, candidates, int(units * (ratio / 100)))


# ------------------------------------------------------------------------------------- answer leaks
def _answer_pattern(answer: str) -> re.Pattern[str]:
    """The answer boxed, or standing on its own as a term: "2" does not occur in "12", "2.5", "x2", "-2",
    "2^3", "x^2", "2/3" or "\\frac{1}{2}"; it does in "is 2.", "$x = 2$" and "(2, 3)"."""
    escaped = re.escape(answer)
    alone = r"(?<![0-9A-Za-z.^_/{-])" + escaped + r"(?![0-9A-Za-z^_/])(?!\.\d)"
    return re.compile(r"\\boxed\{" + escaped + r"\}|" + alone)


def first_answer_in(solution: str, answer: str, end: int) -> int:
    """Start of the first standalone occurrence of `answer` lying wholly in solution[:end]; -1 when none."""
    if not answer:
        return -1
    for m in _answer_pattern(answer).finditer(solution):
        if m.end() > end:
            return -1
        return m.start()
    return -1


def recut_before(solution: str, position: int, mode: str, offsets: TokenOffsets | None = None) -> int:
    """A safe cut at or before `position` in the mode's units (char mode: at a word start)."""
    candidates = boundaries(solution, mode, offsets)
    return safe_cut_at_or_before(position, candidates, blocked_positions(solution))
