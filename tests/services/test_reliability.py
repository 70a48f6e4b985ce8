"""The rater reliability model: one EM step by hand, its fixed point, the edge cases (no votes,
one rater, pairs judged once, an adversarial rater), determinism, and recovery of simulated
raters' accuracies."""

import math
import random

import pytest

from app.services.reliability import PRIOR_ACCURACY, Vote, estimate


def votes(*rows: tuple[int, int, str]) -> list[Vote]:
    return [Vote(item, rater, choice) for item, rater, choice in rows]  # type: ignore[arg-type]


# Pair 1: raters 1 and 2 say a, rater 3 says b. Pair 2: raters 1 and 2 say b. Pair 3: only rater
# 3, a (judged once: it says nothing about rater 3, but gets a posterior).
EXAMPLE = votes((1, 1, "a"), (1, 2, "a"), (1, 3, "b"), (2, 1, "b"), (2, 2, "b"), (3, 3, "a"))


def test_one_em_step_by_hand() -> None:
    """Start: P(a) is each shared pair's share of a votes, pair 1 2/3, pair 2 0.
    M-step, q = (matches + 3) / (votes + 4):
      rater 1 (and 2): matches 2/3 (pair 1) + 1 (pair 2) → (5/3 + 3) / 6 = 7/9
      rater 3: matches 1/3 (pair 1) → (1/3 + 3) / 5 = 2/3 (pair 3 is not counted)
    E-step, log-odds of a = Σ ± log(q / (1 − q)):
      pair 1: 2 log(7/2) − log 2 = log(49/8) → P(a) = 49/57
      pair 2: −2 log(7/2) → P(a) = 4/53
      pair 3: log 2 → P(a) = 2/3
    """
    est = estimate(EXAMPLE, max_iter=1)
    assert est.iterations == 1 and not est.converged
    assert est.accuracy == pytest.approx({1: 7 / 9, 2: 7 / 9, 3: 2 / 3}, abs=1e-12)
    assert est.votes == {1: 2, 2: 2, 3: 1}
    assert est.p_a == pytest.approx({1: 49 / 57, 2: 4 / 53, 3: 2 / 3}, abs=1e-12)


def test_converged_estimate_is_a_fixed_point() -> None:
    """At convergence each accuracy is the MAP update of the final posteriors, and each
    posterior follows from the accuracies."""
    est = estimate(EXAMPLE, tol=1e-12, max_iter=1000)
    assert est.converged and est.iterations > 1
    p = est.p_a
    matches = {1: p[1] + (1 - p[2]), 2: p[1] + (1 - p[2]), 3: 1 - p[1]}
    for rater, n in est.votes.items():
        assert est.accuracy[rater] == pytest.approx((matches[rater] + 3) / (n + 4), abs=1e-9)
    w = {r: math.log(q / (1 - q)) for r, q in est.accuracy.items()}
    assert p[1] == pytest.approx(1 / (1 + math.exp(-(w[1] + w[2] - w[3]))), abs=1e-9)
    assert p[3] == pytest.approx(est.accuracy[3], abs=1e-12)
    # The two raters who agree are trusted more than the one who contradicts them.
    assert est.accuracy[1] > est.accuracy[3]


def test_no_votes() -> None:
    est = estimate([])
    assert (est.accuracy, est.votes, est.p_a, est.iterations, est.converged) == (
        {},
        {},
        {},
        0,
        True,
    )


def test_one_rater_has_nothing_to_be_checked_against() -> None:
    """Every pair judged once: the accuracy stays at the prior's mode and a vote's posterior is
    that accuracy."""
    est = estimate(votes((1, 7, "a"), (2, 7, "b"), (3, 7, "a")))
    assert PRIOR_ACCURACY == 0.75
    assert est.accuracy == {7: 0.75} and est.votes == {7: 0}
    assert est.p_a == pytest.approx({1: 0.75, 2: 0.25, 3: 0.75})
    assert est.converged and est.iterations == 1


def test_a_rater_with_no_overlap_stays_at_the_prior() -> None:
    """Raters 1 and 2 share pairs; rater 3 judged only pairs nobody else did."""
    est = estimate(
        votes((1, 1, "a"), (1, 2, "a"), (2, 1, "b"), (2, 2, "b"), (5, 3, "b"), (6, 3, "a"))
    )
    assert est.accuracy[3] == pytest.approx(0.75) and est.votes[3] == 0
    assert est.p_a[5] == pytest.approx(0.25) and est.p_a[6] == pytest.approx(0.75)
    # Two raters who always agree: q = (2·P + 3) / 6 with P = q² / (q² + (1 − q)²).
    q = est.accuracy[1]
    posterior = q * q / (q * q + (1 - q) ** 2)
    assert q == pytest.approx((2 * posterior + 3) / 6, abs=1e-6)
    assert 0.75 < q < 1.0


def test_few_votes_are_never_certain() -> None:
    """Three votes, all matching two confident raters, or all against them: neither 1 nor 0."""
    rows = []
    for item in range(3):
        rows += [(item, 1, "a"), (item, 2, "a"), (item, 3, "a"), (item, 4, "b")]
    est = estimate(votes(*rows))
    assert 0.75 < est.accuracy[3] < 6 / 7 + 1e-9
    assert 3 / 7 - 1e-9 < est.accuracy[4] < 0.5


def test_an_adversarial_rater_counts_against_their_choice() -> None:
    """Rater 9 contradicts two consistent raters on 20 pairs: accuracy below 0.5, so on a pair
    only rater 9 judged, their vote for a makes b the likelier better side."""
    rows = []
    for item in range(20):
        truth, other = ("a", "b") if item % 2 else ("b", "a")
        rows += [(item, 1, truth), (item, 2, truth), (item, 9, other)]
    rows.append((100, 9, "a"))
    est = estimate(votes(*rows))
    assert est.accuracy[9] < 0.2
    assert est.p_a[100] == pytest.approx(est.accuracy[9]) and est.p_a[100] < 0.5
    assert all(est.p_a[i] > 0.99 for i in range(1, 20, 2))


def test_order_of_the_votes_does_not_matter() -> None:
    rows = list(EXAMPLE)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert estimate(shuffled) == estimate(rows)


def test_a_vote_must_be_decisive() -> None:
    with pytest.raises(ValueError, match="'a' or 'b'"):
        estimate([Vote(1, 1, "tie")])  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_simulated_raters(seed: int) -> None:
    """2,000 pairs, each judged by 3 of 10 raters drawn at random: 5 careful (5 % noise), 3
    noisy (35 %), one who answers at random, and one who always picks the left side while the
    side shown left is a coin flip. Tolerance: each estimate within 0.05 of the rater's realised
    accuracy (the share of their votes that matched the truth) and within 0.08 of the nominal
    one (the rest of that gap is the binomial spread of a rater's ~600 votes). Over seeds 0-199
    the worst rater's gaps were 0.041 and 0.077."""
    rng = random.Random(seed)
    noise = {r: 0.05 for r in range(5)} | {r: 0.35 for r in range(5, 8)} | {8: 0.5}
    left_clicker = 9
    raters = [*noise, left_clicker]
    matched = dict.fromkeys(raters, 0)
    cast = dict.fromkeys(raters, 0)
    rows = []
    for item in range(2000):
        truth = rng.choice("ab")
        for rater in rng.sample(raters, 3):
            if rater == left_clicker:
                choice = rng.choice("ab")  # the side shown left, drawn per assignment
            else:
                wrong = rng.random() < noise[rater]
                choice = ("b" if truth == "a" else "a") if wrong else truth
            matched[rater] += choice == truth
            cast[rater] += 1
            rows.append((item, rater, choice))
    est = estimate(votes(*rows))
    assert est.converged
    nominal = {r: 1 - n for r, n in noise.items()} | {left_clicker: 0.5}
    for rater in raters:
        assert est.votes[rater] == cast[rater]
        assert abs(est.accuracy[rater] - nominal[rater]) < 0.08, rater
        assert abs(est.accuracy[rater] - matched[rater] / cast[rater]) < 0.05, rater
