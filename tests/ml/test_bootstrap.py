"""The paired bootstrap of an evaluation's score gain, against intervals worked out by hand.

With n prompts there are n^n equally likely ordered resamples, so for two or three prompts the
distribution of a resample's mean can be written down, and with it which values the percentile
interval's ends must take; the seeded draws land on them because each end is several standard
errors of the resampling away from a boundary of that distribution.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.ml import bootstrap
from app.ml.bootstrap import paired_bootstrap, percentile_interval


def test_a_constant_difference_has_a_zero_width_interval_at_it() -> None:
    # The parent's scores vary a lot from prompt to prompt; the difference does not. Paired
    # resampling sees only the difference: every resample's mean gain is 0.25.
    result = paired_bootstrap([1.25, 7.25, -2.75, 0.25], [1.0, 7.0, -3.0, 0.0])
    assert result.gain == 0.25
    assert result.gain_interval == (0.25, 0.25)
    assert result.win_share == 1.0 and result.win_share_interval == (1.0, 1.0)
    assert (result.prompts, result.confidence, result.resamples) == (4, 0.95, 2000)


def test_one_prompt_has_a_zero_width_interval() -> None:
    result = paired_bootstrap([0.5], [0.75])
    assert result.gain == -0.25 and result.gain_interval == (-0.25, -0.25)
    assert result.win_share == 0.0 and result.win_share_interval == (0.0, 0.0)


def test_a_policy_against_itself_ties_everywhere() -> None:
    scores = [0.1, 0.9, 0.4]
    result = paired_bootstrap(scores, scores)
    assert result.gain == 0.0 and result.gain_interval == (0.0, 0.0)
    # A tie counts half: no better, no worse.
    assert result.win_share == 0.5 and result.win_share_interval == (0.5, 0.5)


@pytest.mark.parametrize(
    ("confidence", "gain", "wins"),
    [
        # Differences (0, 1): the 4 resamples (0,0) (0,1) (1,0) (1,1) have mean 0, 0.5, 0.5, 1,
        # so P(mean = 0) = 1/4, P(0.5) = 1/2, P(1) = 1/4. The win of a resample's prompt is 0.5
        # (the tie) or 1, so its win share is 0.5, 0.75 or 1 with the same chances.
        (0.95, (0.0, 1.0), (0.5, 1.0)),  # percentiles 2.5 and 97.5: the extremes
        (0.6, (0.0, 1.0), (0.5, 1.0)),  # 20 and 80: still inside the 1/4 tails
        (0.4, (0.5, 0.5), (0.75, 0.75)),  # 30 and 70: past them, in the middle half
    ],
)
def test_two_prompts_every_resample_enumerated(
    confidence: float, gain: tuple[float, float], wins: tuple[float, float]
) -> None:
    result = paired_bootstrap([3.0, 4.0], [3.0, 3.0], confidence=confidence)
    assert result.gain == 0.5 and result.win_share == 0.75
    assert result.gain_interval == gain
    assert result.win_share_interval == wins


@pytest.mark.parametrize(
    ("confidence", "interval"),
    [
        # Differences (0, 0, 3): a resample's mean is the number k of times the third prompt is
        # drawn, k ~ Binomial(3, 1/3) over the 27 resamples: P(k) = 8, 12, 6, 1 (/27), so the
        # cumulative chances are 0.296, 0.741, 0.963, 1.
        (0.95, (0.0, 3.0)),  # 2.5 % < 0.296; 97.5 % > 0.963
        (0.90, (0.0, 2.0)),  # 95 % < 0.963
        (0.60, (0.0, 2.0)),  # 20 % < 0.296; 80 % > 0.741
        (0.30, (1.0, 1.0)),  # 35 % > 0.296; 65 % < 0.741
    ],
)
def test_three_prompts_against_the_exact_resampling_distribution(
    confidence: float, interval: tuple[float, float]
) -> None:
    result = paired_bootstrap([0.0, 0.0, 3.0], [0.0, 0.0, 0.0], confidence=confidence,
                              resamples=20_000)  # fmt: skip
    assert result.gain == 1.0
    assert result.gain_interval == interval


def test_the_interval_is_seeded_and_does_not_depend_on_the_block_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(7)
    candidate, parent = rng.normal(0.2, 1.0, 50).tolist(), rng.normal(0.0, 1.0, 50).tolist()
    first = paired_bootstrap(candidate, parent, seed=3)
    assert paired_bootstrap(candidate, parent, seed=3) == first
    assert paired_bootstrap(candidate, parent, seed=4).gain_interval != first.gain_interval
    monkeypatch.setattr(bootstrap, "MAX_BLOCK_CELLS", 70)  # one resample per block
    assert paired_bootstrap(candidate, parent, seed=3) == first
    low, high = first.gain_interval
    assert low < first.gain < high
    # About the normal interval: gain ± 1.96 standard errors of the mean difference.
    diff = np.subtract(candidate, parent)
    half = 1.96 * diff.std() / math.sqrt(diff.size)
    assert low == pytest.approx(first.gain - half, abs=0.25 * half)
    assert high == pytest.approx(first.gain + half, abs=0.25 * half)


def test_a_higher_confidence_gives_a_wider_interval() -> None:
    rng = np.random.default_rng(1)
    candidate, parent = rng.normal(size=40).tolist(), rng.normal(size=40).tolist()
    narrow = paired_bootstrap(candidate, parent, confidence=0.5).gain_interval
    wide = paired_bootstrap(candidate, parent, confidence=0.99).gain_interval
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_percentile_interval_interpolates_between_order_statistics() -> None:
    values = np.arange(101, dtype=float)  # the q-quantile of 0..100 is 100 q
    assert percentile_interval(values, 0.5) == (25.0, 75.0)
    assert percentile_interval(values, 0.9) == pytest.approx((5.0, 95.0))
    assert percentile_interval(np.array([0.0, 1.0]), 0.5) == (0.25, 0.75)
    with pytest.raises(ValueError, match="no values"):
        percentile_interval(np.array([]), 0.9)


@pytest.mark.parametrize(
    ("candidate", "parent", "knobs", "message"),
    [
        ([1.0, 2.0], [1.0], {}, "must pair"),
        ([], [], {}, "no prompts"),
        ([1.0], [0.0], {"confidence": 1.0}, "between 0 and 1"),
        ([1.0], [0.0], {"confidence": 0.0}, "between 0 and 1"),
        ([1.0], [0.0], {"resamples": 0}, "at least 1"),
        ([float("nan")], [0.0], {}, "finite"),
        ([1.0], [float("inf")], {}, "finite"),
    ],
)
def test_bad_input_is_refused(
    candidate: list[float], parent: list[float], knobs: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(candidate, parent, **knobs)  # type: ignore[arg-type]
