"""Best-of-K's pair rules (`app.kinds.pairs`) on scores whose answer is worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from app.kinds.pairs import PAIR_RULES, choose_pair, ranked

# Answer 3 is the best (0.9), answer 1 the worst (-1.2), answer 0 the second best (0.5).
SCORES = [0.5, -1.2, 0.1, 0.9, 0.2]


def test_ranked_orders_from_highest_to_lowest() -> None:
    assert ranked(SCORES) == [3, 0, 4, 2, 1]


def test_ties_keep_the_earlier_answer_first() -> None:
    assert ranked([1.0, 2.0, 1.0, 2.0]) == [1, 3, 0, 2]
    assert choose_pair([1.0, 2.0, 1.0, 2.0], "top_two") == (1, 3)
    assert choose_pair([1.0, 2.0, 1.0, 2.0], "top_bottom") == (1, 2)
    assert choose_pair([0.0, 0.0], "top_bottom") == (0, 1)


def test_top_bottom_takes_the_best_and_the_worst() -> None:
    assert choose_pair(SCORES, "top_bottom") == (3, 1)


def test_top_two_takes_the_two_best() -> None:
    assert choose_pair(SCORES, "top_two") == (3, 0)


def test_top_random_draws_the_contrast_from_the_others_with_the_generator() -> None:
    # The contrast is `rng.choice` over the ranking without the top: [0, 4, 2, 1].
    for seed in range(5):
        expected = random.Random(seed).choice([0, 4, 2, 1])
        assert choose_pair(SCORES, "top_random", random.Random(seed)) == (3, expected)
    # Without a generator it is still reproducible.
    assert choose_pair(SCORES, "top_random") == choose_pair(SCORES, "top_random")
    # Over many draws every other answer is the contrast about a quarter of the time.
    rng = random.Random(7)
    counts = {i: 0 for i in (0, 1, 2, 4)}
    for _ in range(4000):
        top, contrast = choose_pair(SCORES, "top_random", rng)
        assert top == 3
        counts[contrast] += 1
    assert all(850 < n < 1150 for n in counts.values()), counts


def test_with_two_answers_every_rule_gives_the_same_pair() -> None:
    assert {choose_pair([0.1, 0.7], rule) for rule in PAIR_RULES} == {(1, 0)}


def test_bad_input_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="at least 2 answers, got 1"):
        choose_pair([1.0], "top_bottom")
    with pytest.raises(ValueError, match="unknown pair rule 'best'"):
        choose_pair(SCORES, "best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="score 1 is NaN"):
        choose_pair([0.0, math.nan, 1.0], "top_two")
