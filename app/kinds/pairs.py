"""Best-of-K: which two of a prompt's K reward-scored answers make a pair.

Used by a `generate` run that samples K answers (`best_of_k`) and shows raters one pair
(`pair_selection`), and by on-policy DPO, whose pairs are the policy's own answers ranked by the
reward model. The rules, by name (`PAIR_RULES`); every one keeps the reward model's top answer,
so the policy's best answers reach raters first whichever is chosen:

- `top_bottom`: the top against the lowest: the widest contrast, so the pair is most often
  decided. The lowest of K is often a broken answer (cut off, repetitive), which loses to
  anything for reasons that have little to do with what raters are asked to prefer.
- `top_random`: the top against a uniformly drawn other one (the generation default): the
  contrast is a typical answer of the policy, so the reward model learns to tell the best from
  what the policy usually writes, which is what PPO then asks of it, and the reward model's
  middle ranks keep being checked by people.
- `top_two`: the two best: the hardest pairs, where the reward model is least sure; worth it
  once the reward model is good and the differences that remain are fine ones.

Plain Python and torch-free (it sits with the knob definitions): the generation service, the
knobs of `generate` and `dpo` runs, the project settings and on-policy DPO all read it.

Ties in score are broken by position (the earlier answer ranks higher), so a rule is a pure
function of the scores and, for `top_random`, of the generator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Literal

PairRule = Literal["top_bottom", "top_random", "top_two"]
PAIR_RULES: tuple[PairRule, ...] = ("top_bottom", "top_random", "top_two")


def ranked(scores: Sequence[float]) -> list[int]:
    """Indices of `scores` from the highest score to the lowest; ties keep their order."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def choose_pair(
    scores: Sequence[float], rule: PairRule, rng: random.Random | None = None
) -> tuple[int, int]:
    """`(top, contrast)`: the indices of the pair `rule` picks from K ≥ 2 scored answers.

    `rng` draws `top_random`'s contrast (default: a fresh `random.Random(0)`, so a call without
    one is reproducible); the other rules never touch it. A NaN score is refused: it would make
    the ranking depend on where it sits.
    """
    if len(scores) < 2:
        raise ValueError(f"a pair needs at least 2 answers, got {len(scores)}")
    bad = [i for i, s in enumerate(scores) if math.isnan(s)]
    if bad:
        raise ValueError(f"score {bad[0]} is NaN; the reward model's output is not a number")
    order = ranked(scores)
    if rule == "top_bottom":
        return order[0], order[-1]
    if rule == "top_two":
        return order[0], order[1]
    if rule == "top_random":
        return order[0], (rng or random.Random(0)).choice(order[1:])
    raise ValueError(f"unknown pair rule {rule!r}; choose one of {', '.join(PAIR_RULES)}")
