"""Distinct pairs apart from examples, and the Wilson interval of a validation accuracy: each
against numbers worked out by hand, then as a reward run reports them."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.ml.counts import decided_pairs, distinct_pairs, wilson_interval
from app.ml.preferences import PreferenceExample
from app.ml.reward import train_reward_model
from tests.ml.test_reward import tiny_config
from tests.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "lm", pad_equals_eos=True)


def judged(pair: int, raters: int, label: float = 1.0, prompt: int = 0) -> list[PreferenceExample]:
    """`raters` judgments of pair `pair`: one example each, all with the pair's key."""
    return [
        PreferenceExample(
            prompt=[{"role": "user", "content": f"question {prompt}"}],
            chosen=f"helpful answer {pair}",
            rejected=f"answer {pair}",
            label=label,
            group=f"prompt:{prompt}",
            pair=f"pair:{pair}",
        )
        for _ in range(raters)
    ]


def test_pairs_are_counted_once_however_many_raters_judged_them() -> None:
    # The run: 64 distinct pairs, 3 raters each, are 192 examples of 64 pairs.
    examples = [e for p in range(64) for e in judged(p, 3)]
    assert (len(examples), distinct_pairs(examples)) == (192, 64)
    # A pair judged once is one example of one pair; examples without a key count one each.
    unkeyed = [PreferenceExample([{"role": "user", "content": "q"}], "a", "b") for _ in range(2)]
    assert distinct_pairs([*judged(1, 1), *unkeyed]) == 3
    assert distinct_pairs([]) == 0


def test_decided_pairs_leave_out_pairs_with_only_ties() -> None:
    examples = [*judged(1, 2), *judged(2, 3, label=0.5), *judged(3, 1), *judged(3, 1, label=0.5)]
    assert distinct_pairs(examples) == 3
    assert decided_pairs(examples) == 2  # pair 2 was only ever a tie
    assert decided_pairs(judged(4, 3, label=0.5)) == 0  # all ties


@pytest.mark.parametrize(
    ("accuracy", "n", "low", "high"),
    [
        # By hand, z = 1.96: center = (p + z²/2n) / (1 + z²/n),
        # half = z / (1 + z²/n) · sqrt(p(1 - p)/n + z²/4n²).
        (0.75, 12, 0.46769, 0.91106),  # the 0.75 on 12 distinct pairs: center 0.68937
        (0.75, 36, 0.58930, 0.86250),  # the same accuracy read as 36 independent examples
        (1.0, 3, 0.43850, 1.0),  # three right of three still allows 0.44
        (0.0, 5, 0.0, 0.43448),
        (0.5, 100, 0.40383, 0.59617),
    ],
)
def test_wilson_interval_against_hand_computed_values(
    accuracy: float, n: int, low: float, high: float
) -> None:
    interval = wilson_interval(accuracy, n)
    assert interval is not None
    assert interval == pytest.approx((low, high), abs=5e-5)


def test_no_trials_or_no_accuracy_have_no_interval() -> None:
    assert wilson_interval(0.8, 0) is None
    assert wilson_interval(float("nan"), 10) is None


def test_a_reward_run_reports_examples_pairs_and_the_accuracy_s_interval(
    backbone: Path, tmp_path: Path
) -> None:
    train = [e for p in range(4) for e in judged(p, 3, prompt=p)]  # 12 examples of 4 pairs
    val = [*judged(10, 3, prompt=10), *judged(11, 2, prompt=11), *judged(12, 3, 0.5, prompt=12)]
    result = train_reward_model(tiny_config(backbone, epochs=1, batch_size=4), train, val, tmp_path)
    assert (result.train_examples, result.train_pairs) == (12, 4)
    assert (result.val_examples, result.val_pairs) == (8, 3)
    assert result.best_val_accuracy_pairs == 2  # pair 12 is all ties: accuracy leaves it out
    assert result.best_val_accuracy is not None
    assert result.best_val_accuracy_ci95 == wilson_interval(result.best_val_accuracy, 2)
