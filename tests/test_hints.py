"""Hint cuts: the reference's character cut, the boundary-aware modes, prompt rendering and answer leaks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from questa_nemo.data import hints
from questa_nemo.data.world_assets import asset_dir

REFERENCE = hints.PromptFormat()


# ---------------------------------------------------------------------------------------- reference
def test_reference_solution_strips_quotes_and_keeps_text_after_last_think():
    assert hints.reference_solution('"<think>a</think>b</think>sol"') == "sol"
    assert hints.reference_solution("no think here") == "no think here"
    # The last character goes even when it is not a quote, as in the reference.
    assert hints.reference_solution('"<think>x</think>\n\nanswer 5.') == "\n\nanswer 5"
    assert hints.reference_solution('"') == ""
    assert hints.reference_solution("") == ""


def test_char_cut_is_computed_in_floating_point_like_the_reference():
    assert hints.char_cut("x" * 7, 50) == 3
    assert hints.char_cut("x" * 10, 25) == 2
    # 100 * 0.29 == 28.999999999999996 in floating point: the reference keeps 28 characters, not 29.
    assert hints.char_cut("x" * 100, 29) == 28
    assert hints.hint_end("x" * 100, 29, "char") == 28


def test_render_prompt_follows_the_reference_rules():
    assert hints.render_prompt("P", "0123456789", REFERENCE) == ("P\n\n## Hint.0123456789", "0123456789")
    assert hints.render_prompt("P", "012345678", REFERENCE) == ("P\n\n", "")  # under 10 characters
    assert hints.render_prompt("P", "", REFERENCE) == ("P\n\n", "")


def test_render_prompt_pads_a_fixed_width_slot():
    fmt = hints.PromptFormat(separator="|", hint_prefix="", min_hint_chars=0, hint_slot_chars=6)
    assert hints.render_prompt("7+1", "08\n", fmt) == ("7+1|08\n___", "08\n")
    assert hints.render_prompt("7+1", "", fmt) == ("7+1|______", "")
    with pytest.raises(ValueError, match="slot"):
        hints.render_prompt("7+1", "1234567", fmt)


# ---------------------------------------------------------------------------------------- safety
@pytest.mark.parametrize(
    "text, inside",
    [
        ("so $x^{2}+1$ holds", "$x^{2}+1$"),
        ("so \\(a+b\\) holds", "\\(a+b\\)"),
        ("so \\[\n a \n\n b \\] holds", "\\[\n a \n\n b \\]"),
        ("so $$a + b$$ holds", "$$a + b$$"),
        ("value 3.14159 here", "3.14159"),
        ("value 1,000,000 here", "1,000,000"),
        ("see \\frac{1}{2} here", "\\frac{1}{2}"),
        ("group {a {b} c} end", "{a {b} c}"),
    ],
)
def test_no_cut_splits_a_latex_group_a_command_or_a_number(text, inside):
    start = text.index(inside)
    blocked = hints.blocked_positions(text)
    assert not any(blocked[: start + 1]) or start == 0
    assert all(blocked[start + 1 : start + len(inside)])
    assert not blocked[start + len(inside)]


def test_escaped_and_unbalanced_delimiters_do_not_block_the_rest():
    text = "costs \\$5 and {unclosed then words"
    blocked = hints.blocked_positions(text)
    assert not blocked[text.index("and")]
    assert not blocked[text.index("then")]
    stray = "a } b $ c"
    assert not any(hints.blocked_positions(stray))


# ---------------------------------------------------------------------------------------- modes
def test_sentence_mode_cuts_between_sentences_never_inside_math():
    text = "First we note $x = 3.5$. Then $y = 2$! Finally we add. So the sum is $5.5$."
    assert hints.sentence_boundaries(text) == [
        text.index("Then"),
        text.index("Finally"),
        text.index("So"),
    ]
    assert text[: hints.hint_end(text, 50, "sentence")] == "First we note $x = 3.5$. Then $y = 2$! "


def test_step_mode_prefers_step_headings_then_paragraphs_then_lines():
    steps = "Intro.\nStep 1: add.\nmore\nStep 2: multiply.\nStep 3: done."
    assert hints.step_boundaries(steps) == [
        steps.index("Step 1"),
        steps.index("Step 2"),
        steps.index("Step 3"),
    ]
    paragraphs = "First.\n\nSecond\nstill second.\n\nThird."
    assert hints.step_boundaries(paragraphs) == [paragraphs.index("Second"), paragraphs.index("Third")]
    lines = "10\n20\n\\boxed{30}"
    assert hints.step_boundaries(lines) == [3, 6]
    assert hints.step_boundaries("\n\n" + paragraphs + "\n\n") == [
        x + 2 for x in hints.step_boundaries(paragraphs)
    ]
    assert lines[: hints.hint_end(lines, 50, "step")] == "10\n"
    assert lines[: hints.hint_end(lines, 25, "step")] == ""
    assert lines[: hints.hint_end(lines, 100, "step")] == lines


def test_step_mode_never_splits_display_math_holding_a_blank_line():
    text = "Setup.\n\n\\[\na\n\nb\n\\]\n\nEnd."
    # 4 paragraphs by blank lines; 2 kept would end inside \[...\], so the cut moves back to after the first.
    assert text[: hints.hint_end(text, 50, "step")] == "Setup.\n\n"
    assert text[: hints.hint_end(text, 75, "step")] == "Setup.\n\n\\[\na\n\nb\n\\]\n\n"


def _bpe_offsets():
    """A tiny byte-level BPE trained here, so token mode sees multi-character tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = ["the answer is $\\frac{1}{2}$ and 3.14 so 12345 plus \\boxed{7}"] * 20
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    return lambda text: tokenizer.encode(text, add_special_tokens=False).offsets


def test_token_mode_with_a_tiny_bpe_cuts_at_token_ends_outside_math():
    offsets = _bpe_offsets()
    text = "We get $\\frac{1}{2}$ first, then 12345 and 3.14, so \\boxed{7} is it."
    ends = {end for _, end in offsets(text)}
    blocked = hints.blocked_positions(text)
    seen = set()
    for ratio in range(0, 101, 5):
        cut = hints.hint_end(text, ratio, "token", offsets)
        assert cut in ends or cut == 0
        assert not blocked[cut]
        seen.add(cut)
    assert len(seen) > 4  # the cut moves with the ratio
    n_tokens = len(offsets(text))
    assert hints.hint_end(text, 100, "token", offsets) == len(text)
    assert len(ends) < len(text)  # multi-character tokens: token mode is not char mode
    assert n_tokens > 1


def test_token_mode_with_the_world_tokenizer_is_a_character_cut_that_respects_numbers():
    from questa_nemo.data.build import token_offsets

    offsets = token_offsets(str(asset_dir() / "tokenizer"))
    text = "12\n34\n\\boxed{56}"
    assert len(offsets(text)) == len(text)
    cut = hints.hint_end(text, 50, "token", offsets)  # 8 of 16 characters lands inside \boxed
    assert text[:cut] == "12\n34\n"


def test_token_mode_without_a_tokenizer_is_an_error():
    with pytest.raises(ValueError, match="tokenizer"):
        hints.hint_end("abc", 50, "token")


latex_text = st.text(alphabet=list("ab 12.,{}$\\()[]\n!?Step"), max_size=120)


@settings(max_examples=200, deadline=None)
@given(text=latex_text, low=st.floats(0, 100), high=st.floats(0, 100))
def test_boundary_cuts_are_safe_prefixes_monotone_in_the_ratio(text, low, high):
    low, high = min(low, high), max(low, high)
    blocked = hints.blocked_positions(text)
    for mode in ("sentence", "step"):
        a, b = hints.hint_end(text, low, mode), hints.hint_end(text, high, mode)
        assert 0 <= a <= b <= len(text)
        assert not blocked[a] and not blocked[b]
        assert b in (0, len(text)) or b in hints.boundaries(text, mode)


# ---------------------------------------------------------------------------------------- leaks
@pytest.mark.parametrize("text", ["12", "2.5", "x2", "-2", "2^3", "x^2", "2/3", "\\frac{1}{2}", "a_2", "2x"])
def test_an_answer_inside_a_larger_term_is_no_leak(text):
    assert hints.first_answer_in(f"so {text} holds", "2", 100) == -1


@pytest.mark.parametrize("text", ["is 2.", "$x = 2$", "(2, 3)", "\\boxed{2}", "x - 2"])
def test_an_answer_standing_alone_or_boxed_is_a_leak(text):
    assert hints.first_answer_in(f"so {text} holds", "2", 100) == 3 + (
        text.index("2") if "boxed" not in text else 0
    )


def test_answer_found_only_standing_alone():
    assert hints.first_answer_in("x = 112 and 12.5", "12", 100) == -1
    assert hints.first_answer_in("so x = 12.", "12", 100) == 7
    assert hints.first_answer_in("so x = 12", "12", 8) == -1  # not wholly inside the hint
    assert hints.first_answer_in("is \\frac{1}{2}", "\\frac{1}{2}", 100) == 3


def test_recut_moves_the_hint_before_the_answer():
    solution = "First note that the answer is 42. Then we check it carefully: 42 works."
    leak = hints.first_answer_in(solution, "42", len(solution))
    for mode in ("char", "sentence", "step"):
        cut = hints.recut_before(solution, leak, mode)
        assert cut <= leak
        assert hints.first_answer_in(solution, "42", cut) == -1
    assert solution[: hints.recut_before(solution, leak, "char")] == "First note that the answer is "
