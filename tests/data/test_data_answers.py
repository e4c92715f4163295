"""VQA answer normalisation and accuracy, prompt templates."""

from __future__ import annotations

import pytest

from vtrlab.data.answers import accuracy, answer_accuracy, format_prompt, normalize_answer


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("The Cat.", "cat"),
        ("  a Dog\n", "dog"),
        ("Two", "2"),
        ("none", "0"),
        ("ten apples", "10 apples"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("yes!", "yes"),
        ("dont know", "don't know"),
        ("red-and-blue", "red and blue"),
        ("red, blue", "red blue"),
        ("an apple", "apple"),
    ],
)
def test_normalize_answer_follows_vqa_eval(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_accuracy_accepts_any_listed_answer():
    assert answer_accuracy("Two", ["2", "two people"]) == 1.0
    assert answer_accuracy("The cat", ["kitten", "cat"]) == 1.0
    assert answer_accuracy("dog", ["cat"]) == 0.0
    assert accuracy(["cat", "dog"], [["cat"], ["cat"]]).tolist() == [1.0, 0.0]


def test_vqa_consensus_score():
    # 10 human answers: leave-one-out mean of min(1, matches / 3)
    assert answer_accuracy("red", ["red"] * 3 + ["blue"] * 7, "vqa") == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert answer_accuracy("red", ["red"] * 4 + ["blue"] * 6, "vqa") == 1.0
    assert answer_accuracy("red", ["red"] + ["blue"] * 9, "vqa") == pytest.approx(9 * (1 / 3) / 10)
    with pytest.raises(ValueError, match="at least 4"):
        answer_accuracy("red", ["red"], "vqa")


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: answer_accuracy("a", [], "exact"), "non-empty"),
        (lambda: answer_accuracy("a", ["a"], "f1"), "metric='f1'"),
        (lambda: accuracy(["a"], [["a"], ["b"]]), "1 predictions for 2"),
        (lambda: normalize_answer(3), "not a string"),
        (lambda: format_prompt("q", "Answer: {answer}"), "Answer: {answer}"),
        (lambda: format_prompt("q", "no field"), "exactly once"),
        (lambda: format_prompt("q", "{question} {question}"), "exactly once"),
        (lambda: format_prompt("q", "{question"), "not a valid template"),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_format_prompt():
    assert (
        format_prompt("What is it?", "{question} Answer with a single word.")
        == "What is it? Answer with a single word."
    )
    assert format_prompt("q") == "q"
