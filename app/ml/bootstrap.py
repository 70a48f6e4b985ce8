"""How sure an evaluation is: a paired bootstrap over prompts of the candidate's score gain.

An evaluation scores the candidate and its parent on the same held-out prompts, so each prompt
gives one difference `d_i = candidate_i - parent_i`, and the score gain is their mean. How much
that mean would move on other prompts from the same source is what decides whether a gain is
real: +0.22 on 11 prompts and +0.22 on 500 are not the same evidence. The bootstrap answers it
without assuming a distribution of the differences:

    draw n prompts with replacement from the n evaluated (one resample), take the mean of their
    differences; repeat `resamples` times; the interval at `confidence` c is the (1-c)/2 and
    (1+c)/2 percentiles of those means (the percentile interval).

Resampling whole prompts keeps each prompt's two scores together (paired), so what the prompts
have in common (a hard prompt scores low for both models) drops out of the difference, as it
drops out of the gain. A resample is n prompt indices drawn uniformly; the resamples are drawn
in blocks to bound memory, from one stream of indices, so the block size never changes a result.

The same resamples give the win share, the share of prompts where the candidate scored higher
(a tie counts half, as in the human leaderboard: a policy against itself has 0.5), and its
interval, at no extra cost. The generator is numpy's, seeded: the same scores, seed, confidence
and resample count always give the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Resamples are drawn in blocks of at most this many prompt indices, so a large evaluation
# (10,000 prompts x 2,000 resamples) never holds all its indices in memory at once.
MAX_BLOCK_CELLS = 1_000_000


@dataclass(frozen=True)
class PairedBootstrap:
    """The score gain and win share of a candidate over its parent, each with its interval."""

    gain: float  # mean over prompts of candidate minus parent
    gain_interval: tuple[float, float]
    win_share: float  # share of prompts the candidate scored higher on, ties counting half
    win_share_interval: tuple[float, float]
    prompts: int
    confidence: float
    resamples: int
    seed: int


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central `confidence` interval of `values`: their (1-c)/2 and (1+c)/2 percentiles
    (numpy's linear interpolation between order statistics)."""
    if values.size == 0:
        raise ValueError("no values to take an interval of")
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(
    candidate: Sequence[float],
    parent: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedBootstrap:
    """Paired bootstrap over prompts of `mean(candidate - parent)` and of the win share.

    `candidate[i]` and `parent[i]` are the two models' scores on prompt i. Raises ValueError on
    no prompts, unequal lengths, a non-finite score, a confidence outside (0, 1) or fewer than
    one resample. With one prompt, or the same difference on every prompt, every resample has
    the same mean and the interval has zero width: the bootstrap only knows the prompts it saw,
    which is why evaluations default to many of them."""
    if len(candidate) != len(parent):
        raise ValueError(
            f"{len(candidate)} candidate scores but {len(parent)} parent scores; they must pair"
        )
    if not candidate:
        raise ValueError("no prompts to bootstrap over")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (exclusive), not {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    cand = np.asarray(candidate, dtype=float)
    par = np.asarray(parent, dtype=float)
    if not (np.isfinite(cand).all() and np.isfinite(par).all()):
        raise ValueError("a score is not a finite number")

    n = cand.size
    diff = cand - par
    # 1 where the candidate scored higher, 0.5 on a tie, 0 where the parent did.
    wins = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
    stats = np.stack([diff, wins], axis=1)  # (n, 2): both statistics from the same resamples

    rng = np.random.default_rng(seed)
    block = max(1, MAX_BLOCK_CELLS // n)
    means = np.empty((resamples, 2))
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        drawn = rng.integers(0, n, size=(rows, n))  # each row: the prompts of one resample
        means[start : start + rows] = stats[drawn].mean(axis=1)
    # Every resample of a constant column has its mean; say so exactly, not one rounding away,
    # so that the interval of a constant difference is zero-wide at the gain itself.
    for column, values in enumerate((diff, wins)):
        if np.all(values == values[0]):
            means[:, column] = values.mean()

    return PairedBootstrap(
        gain=float(diff.mean()),
        gain_interval=percentile_interval(means[:, 0], confidence),
        win_share=float(wins.mean()),
        win_share_interval=percentile_interval(means[:, 1], confidence),
        prompts=n,
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )
