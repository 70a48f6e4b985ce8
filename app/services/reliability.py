"""How reliable each rater is, estimated from the judgments alone, and what each pair's votes
then say about which response is better.

The model is Dawid and Skene's (1979) with one parameter per rater, the "one-coin" model: every
pair has a true better response z ∈ {a, b}, and rater r's decisive vote matches it with
probability q_r whatever z is. Expectation–maximisation alternates between the posterior of each
pair's z given the current accuracies (E-step) and each rater's accuracy given those posteriors
(M-step).

Why one coin and not Dawid–Skene's full confusion matrix (a separate P(vote a | z = a) and
P(vote b | z = b)): "a" and "b" are only the order in which a pair stores its two responses, and
the rater never sees it: Verdict shows each rater the two responses on sides drawn at random per
assignment. Whatever a rater's habits, they act on the left/right sides, which are independent of
a/b, so P(vote a | z = a) = P(vote b | z = b) and one number per rater is the whole confusion
matrix. It follows that a spammer who always picks the left side votes a or b by a coin flip the
assignment made, independently of z: to this model they are a random rater, accuracy ≈ 0.5, whose
votes weigh nothing. (That they are a left-side clicker rather than a guesser is the position-bias
statistic's job, from `Judgment.shown_left`.)

Choices, and why:

* **The class prior P(z = a) is fixed at 0.5**, not estimated: a and b carry no meaning the
  raters see, so nothing makes one side likelier to be better. Estimating it would let the storage
  order leak into the labels: an import stores the dataset's chosen answer as a, which would make
  the prior ≈ 1 and turn every unsure pair into "a". With the prior at 0.5 a pair judged once
  carries no information about its rater (its vote has probability 0.5 under any accuracy), so
  the accuracies are estimated from the pairs judged at least twice only, exactly the same answer
  as EM over all of them, in fewer iterations; single votes still get a posterior at the end.
* **A Beta(4, 2) prior on each accuracy**, so the M-step is a MAP estimate
  q_r = (matches_r + 3) / (votes_r + 4): a rater is credited with three matching and one
  mismatching vote before their own count. A rater with three votes is then never estimated at
  1.0 or 0.0 (all three agreeing gives 6/7, all disagreeing 3/7), a rater who shares no pair with
  anyone sits at the prior's mode 0.75 — better than chance, as most raters are, so that a project
  with one rater per pair still gets usable labels — and the prior's asymmetry breaks EM's
  label-switching symmetry (every q ↔ 1 − q with every posterior flipped) towards raters who are
  mostly right.
* **A rater below 0.5 is adversarial, and their votes count against** their choice: a vote's
  weight is the log-odds log(q / (1 − q)), negative when q < 0.5. If most raters on a pair were
  adversarial the model could not tell (nothing can, from the votes alone).
* **Deterministic**: votes are sorted before use, EM starts from each pair's vote shares (the
  soft majority), and the arithmetic is a fixed sequence of numpy sums, so the same votes in any
  order give the same estimate.

Ties and both-bad answers are not votes here: they say nothing about which side is better, and
the caller decides what they mean (the snapshot's `ties` setting).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np

# Beta(PRIOR_MATCHES + 1, PRIOR_MISSES + 1) on every rater's accuracy: worth four votes, mode 0.75.
PRIOR_MATCHES = 3.0
PRIOR_MISSES = 1.0
PRIOR_ACCURACY = PRIOR_MATCHES / (PRIOR_MATCHES + PRIOR_MISSES)


@dataclass(frozen=True)
class Vote:
    """One decisive judgment: `rater` preferred response `choice` of comparison pair `item`."""

    item: int  # the comparison pair's id
    rater: int  # the rater's user id
    choice: Literal["a", "b"]  # decisive votes only; ties/both-bad are not votes here


@dataclass(frozen=True)
class ReliabilityEstimate:
    """EM's answer. `votes` counts, per rater, the votes on pairs someone else also judged — the
    only ones the accuracy rests on (a pair judged once says nothing about its rater); `p_a` has
    every item that had a vote, pairs judged once included."""

    accuracy: dict[int, float]  # rater -> estimated P(their vote matches the true preference)
    votes: dict[int, int]  # rater -> decisive votes the estimate rests on
    p_a: dict[int, float]  # item -> posterior P(response a is the better one)
    iterations: int
    converged: bool


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def estimate(
    votes: Iterable[Vote], *, max_iter: int = 200, tol: float = 1e-6
) -> ReliabilityEstimate:
    """Each rater's accuracy and each item's P(a is better) by EM under the one-coin model.

    One iteration is an M-step (accuracies from the current posteriors) then an E-step
    (posteriors from those accuracies); EM stops when no accuracy moved by `tol` or more, or
    after `max_iter` iterations (`converged` says which). With no votes the estimate is empty.
    """
    signs = {"a": 1, "b": -1}
    rows = []
    for v in votes:
        if v.choice not in signs:
            raise ValueError(f"a vote's choice must be 'a' or 'b', not {v.choice!r}")
        rows.append((v.item, v.rater, signs[v.choice]))
    if not rows:
        return ReliabilityEstimate({}, {}, {}, iterations=0, converged=True)
    rows.sort()
    data = np.array(rows, dtype=np.int64)
    item_ids, item_of = np.unique(data[:, 0], return_inverse=True)
    rater_ids, rater_of = np.unique(data[:, 1], return_inverse=True)
    sign = data[:, 2].astype(np.float64)
    n_items, n_raters = len(item_ids), len(rater_ids)

    # Pairs judged at least twice are the only ones that say anything about a rater.
    shared = np.bincount(item_of, minlength=n_items)[item_of] >= 2
    s_item, s_rater, s_sign = item_of[shared], rater_of[shared], sign[shared]
    counts = np.bincount(s_rater, minlength=n_raters).astype(np.float64)
    # Start from each pair's share of "a" votes: the soft majority.
    a_votes = np.bincount(s_item, weights=(s_sign > 0).astype(np.float64), minlength=n_items)
    all_votes = np.bincount(s_item, minlength=n_items)
    posterior = np.divide(a_votes, all_votes, out=np.full(n_items, 0.5), where=all_votes > 0)

    accuracy = np.full(n_raters, PRIOR_ACCURACY)
    iterations, converged = 0, False
    while iterations < max_iter:
        iterations += 1
        matches = np.where(s_sign > 0, posterior[s_item], 1.0 - posterior[s_item])
        matched = np.bincount(s_rater, weights=matches, minlength=n_raters)
        new_accuracy = (matched + PRIOR_MATCHES) / (counts + PRIOR_MATCHES + PRIOR_MISSES)
        weight = np.log(new_accuracy / (1.0 - new_accuracy))
        log_odds = np.bincount(s_item, weights=s_sign * weight[s_rater], minlength=n_items)
        posterior = _sigmoid(log_odds)
        moved = float(np.max(np.abs(new_accuracy - accuracy)))
        accuracy = new_accuracy
        if moved < tol:
            converged = True
            break

    weight = np.log(accuracy / (1.0 - accuracy))
    p_a = _sigmoid(np.bincount(item_of, weights=sign * weight[rater_of], minlength=n_items))
    return ReliabilityEstimate(
        accuracy={int(r): float(q) for r, q in zip(rater_ids, accuracy, strict=True)},
        votes={int(r): int(n) for r, n in zip(rater_ids, counts, strict=True)},
        p_a={int(i): float(p) for i, p in zip(item_ids, p_a, strict=True)},
        iterations=iterations,
        converged=converged,
    )
