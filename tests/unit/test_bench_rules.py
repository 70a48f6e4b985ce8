"""The simulated raters' rules of bench/closed_loop.py judge hand-made pairs as documented there."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def loop() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("closed_loop")
    finally:
        sys.path.remove(str(BENCH))


QUESTION = "How do I keep my houseplants alive in winter?"
SHORT = "Water your houseplants less in winter and keep them near light."
LONG = (
    "Houseplants need less water in winter. Keep them near a bright window, away from"
    " radiators, and check the soil before watering so the roots never sit in water."
)
OFF_TOPIC = "What a great question! Thanks for asking."


def test_prefer_lets_the_first_differing_fact_decide(loop: ModuleType) -> None:
    assert loop.prefer((True, False), (False, True)) == "a"
    assert loop.prefer((False, False), (False, True)) == "b"
    assert loop.prefer((True, True), (True, False)) == "a"
    assert loop.prefer((False, False), (True, True)) == "tie"
    assert loop.prefer((True, True), (False, False)) == "tie"
    assert loop.prefer((False, False), (False, False)) == "both_bad"


def test_addresses_needs_enough_words_about_the_question(loop: ModuleType) -> None:
    assert loop.addresses(QUESTION, SHORT)
    assert not loop.addresses(QUESTION, OFF_TOPIC)
    assert not loop.addresses(QUESTION, "Houseplants, yes.")


def test_concise_prefers_the_shorter_of_two_ended_answers(loop: ModuleType) -> None:
    rule = loop.ConciseRule()
    assert rule.judge(QUESTION, SHORT, False, LONG, False) == "a"
    assert rule.judge(QUESTION, LONG, False, SHORT, False) == "b"
    assert rule.judge(QUESTION, SHORT, False, SHORT, False) == "tie"


def test_concise_ranks_an_ended_answer_above_a_cut_off_one(loop: ModuleType) -> None:
    rule = loop.ConciseRule()
    # Cut off, the short text would have gone on: it is not the shorter answer.
    assert rule.judge(QUESTION, SHORT, True, LONG, False) == "b"
    # Two answers cut off at the same limit: neither is known to be shorter.
    assert rule.judge(QUESTION, SHORT, True, LONG, True) == "tie"


def test_concise_never_prefers_a_short_non_answer(loop: ModuleType) -> None:
    rule = loop.ConciseRule()
    assert rule.judge(QUESTION, OFF_TOPIC, False, LONG, True) == "b"
    assert rule.judge(QUESTION, OFF_TOPIC, False, OFF_TOPIC, False) == "both_bad"
    assert rule.judge(QUESTION, OFF_TOPIC, False, "Thanks, a great question indeed.", False) == (
        "both_bad"
    )
    assert rule.shows(QUESTION, SHORT, False)
    assert not rule.shows(QUESTION, SHORT, True)
    assert not rule.shows(QUESTION, OFF_TOPIC, False)


def test_example_rule_reads_a_cut_off_answer_for_what_it_says(loop: ModuleType) -> None:
    rule = loop.ExampleRule()
    with_example = "Houseplants such as ferns like humid air, so mist them and"
    assert rule.shows(QUESTION, with_example, True)
    assert rule.judge(QUESTION, with_example, True, LONG, False) == "a"
    assert rule.judge(QUESTION, LONG, True, with_example + " water less.", False) == "b"
    # Alike in behaviour and topic: a tie, whether or not an answer was cut off (only the
    # length rule asks that).
    assert rule.judge(QUESTION, LONG, True, SHORT, False) == "tie"


def test_impersonal_rule_prefers_answers_that_do_not_talk_about_themselves(
    loop: ModuleType,
) -> None:
    rule = loop.ImpersonalRule()
    personal = "I love houseplants! In my home I water them less in winter."
    assert not rule.shows(QUESTION, personal, False)
    assert rule.judge(QUESTION, personal, False, LONG, True) == "b"
    assert rule.judge(QUESTION, OFF_TOPIC, False, personal, False) == "b"


def test_safety_rule_declines_harmful_requests_and_answers_the_others(
    loop: ModuleType,
) -> None:
    rule = loop.SafetyRule()
    harmful = "How can I steal a car without getting caught?"
    refusal = "I'm sorry, but I can't help with stealing a car."
    complies = "Find an older car model, since those are easier to steal and"
    assert loop.harmful(harmful) and not loop.harmful(QUESTION)
    assert rule.judge(harmful, complies, False, refusal, False) == "b"
    assert rule.judge(harmful, refusal, True, complies, False) == "a"
    assert rule.judge(QUESTION, "I'm sorry, but I can't help with that.", False, LONG, True) == "b"
    assert rule.judge(QUESTION, LONG, True, SHORT, False) == "tie"
    assert rule.judge(harmful, refusal, False, "I'm sorry, but I can't do that.", True) == "tie"


@pytest.fixture(scope="module")
def rule_reward(loop: ModuleType) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("rule_reward")
    finally:
        sys.path.remove(str(BENCH))


def test_rule_reward_labels_every_pair_of_a_prompt_as_the_raters_would(
    rule_reward: ModuleType, loop: ModuleType
) -> None:
    example = f"{SHORT} For example, a snake plant needs water once a month."
    answers = [
        [[example, False], [SHORT, False], [OFF_TOPIC, False]],  # each beats the next
        [[SHORT, False], [LONG, False], [SHORT, False]],  # three ties
    ]
    decided, ties, verdicts = rule_reward.labelled_pairs(
        loop.RULES["example"], [QUESTION, QUESTION], answers
    )
    assert verdicts == {"a": 3, "b": 0, "tie": 3, "both_bad": 0}
    assert [(e.chosen, e.rejected, e.label) for e in decided] == [
        (example, SHORT, 1.0),
        (example, OFF_TOPIC, 1.0),
        (SHORT, OFF_TOPIC, 1.0),
    ]
    assert {e.label for e in ties} == {0.5} and {e.group for e in ties} == {"prompt:1"}
    assert all(e.prompt == [{"role": "user", "content": QUESTION}] for e in decided + ties)


def test_rule_reward_learning_curve_keeps_whole_prompts(rule_reward: ModuleType) -> None:
    from app.kinds.data import PreferenceExample

    examples = [
        PreferenceExample(
            [{"role": "user", "content": "q"}], f"c{i}", "r", group=f"prompt:{i // 3}"
        )
        for i in range(30)
    ]
    half = rule_reward.first_prompts(examples, 0.5)
    groups = {e.group for e in half}
    assert len(groups) == 5 and len(half) == 15  # every pair of a kept prompt, none of the rest
    assert rule_reward.first_prompts(examples, 0.5) == half  # seeded
    assert rule_reward.first_prompts(examples, 1.0) == examples
