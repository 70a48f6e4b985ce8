"""Counts that say what they count: distinct pairs apart from examples, and how far an accuracy
measured on them can be trusted.

Under the snapshot's "separate" aggregation every judgment is its own training example, so a
pair judged by three raters is three examples with the same prompt and responses. A reward model
scores those three identically, so on validation they are one trial, not three: an accuracy over
36 examples of 12 pairs rests on 12 independent answers. The interval here is therefore computed
over distinct pairs (a conservative effective sample size; raters who disagree on a pair make its
examples partly right, which the example-weighted accuracy already averages in).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from app.kinds.data import PreferenceExample

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile


def distinct_pairs(examples: Iterable[PreferenceExample]) -> int:
    """How many distinct comparison pairs `examples` come from (`PreferenceExample.pair`); an
    example without a pair key counts as a pair of its own."""
    keys: set[str] = set()
    unkeyed = 0
    for example in examples:
        if example.pair:
            keys.add(example.pair)
        else:
            unkeyed += 1
    return len(keys) + unkeyed


def decided_pairs(examples: Iterable[PreferenceExample]) -> int:
    """Distinct pairs with at least one decided example (label not 0.5): what an accuracy, which
    leaves ties out, is measured on."""
    return distinct_pairs(e for e in examples if e.label != 0.5)


def wilson_interval(accuracy: float, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval (95 % by default) of a proportion `accuracy` observed on `n`
    trials; None without trials or without a finite accuracy. Unlike the normal approximation
    it stays inside [0, 1] and is not empty at 0 or 1, which matters on a dozen pairs."""
    if n <= 0 or not math.isfinite(accuracy):
        return None
    z2n = z * z / n
    center = (accuracy + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(accuracy * (1 - accuracy) / n + z2n / (4 * n))
    return max(0.0, center - half), min(1.0, center + half)
