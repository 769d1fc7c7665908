"""TextVQA's VQA accuracy and MagnifierBench's letter parsing, on cases computed by hand."""

import pytest

from flexattn.scoring import (
    freeform_match,
    multiple_choice_prompt,
    normalise_vqa,
    option_letter,
    split_instruction,
    vqa_accuracy,
)


@pytest.mark.parametrize("raw,normal", [
    ("The Dog.", "dog"),  # articles and a final period go
    ("Two", "2"),  # number words become digits
    ("dont", "don't"),  # contractions get their apostrophe back
    ("3.5", "3.5"),  # a period before a digit stays
    ("1,000", "1000"),  # a digit comma goes
    ("coca-cola", "coca cola"),  # punctuation inside a word splits it
    ("coca - cola", "coca cola"),  # punctuation beside a space just goes
    ("it's  an APPLE\n", "it 's apple"),
])
def test_answer_normalisation(raw, normal):
    assert normalise_vqa(raw) == normal


def test_vqa_accuracy_averages_min_matches_over_3_with_each_human_answer_left_out():
    # 3 of 10 say "2": leaving one of them out leaves 2 matches (2/3), leaving any other out leaves 3 (1):
    # (3 * 2/3 + 7 * 1) / 10 = 0.9, not min(3/3, 1) = 1.
    answers = ["2", "2", "2", "x", "x", "x", "x", "x", "x", "x"]
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("x", answers) == 1.0  # 7 matches: 6 or 7 remain, both >= 3
    assert vqa_accuracy("y", answers) == 0.0
    one = ["stop"] + ["go"] * 9  # a single match: 0 when it is left out, 1/3 otherwise
    assert vqa_accuracy("STOP!", one) == pytest.approx(9 / 10 * 1 / 3)
    four = ["a cat"] * 4 + ["dog"] * 6  # 4 matches: 3 remain when one of them is left out, so always 1
    assert vqa_accuracy("cat", four) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


INSTRUCTION = "What colour is the car next to the tree? A. red, B. dark blue, C. green, D. white"


def test_magnifier_instruction_prompt_and_letters():
    question, options = split_instruction(INSTRUCTION)
    assert question == "What colour is the car next to the tree?"
    assert options == {"A": "red", "B": "dark blue", "C": "green", "D": "white"}
    assert multiple_choice_prompt(INSTRUCTION) == (
        "What colour is the car next to the tree?\nA. red\nB. dark blue\nC. green\nD. white"
        "\nAnswer with the option's letter from the given choices directly.")
    assert option_letter("The answer is C.", options) == "C"
    assert option_letter("B", options) == "B"
    assert option_letter("D. white", options) == "D"
    assert option_letter("dark blue", options) == "B"  # no capital letter: the option's text decides
    assert option_letter("it is white", options) == "D"
    assert option_letter("no idea", options) == "A"  # the last rule: the first of A-D in "NO IDEA"
    assert option_letter("purple", options) == "other"


def test_freeform_match_needs_the_whole_option_text():
    assert freeform_match("The car is dark blue.", "dark blue")
    assert not freeform_match("The car is blue.", "dark blue")
    assert not freeform_match("reddish", "red")
    assert not freeform_match("anything", "")
