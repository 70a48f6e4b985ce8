"""The train/validation split of preference pairs by prompt.

The services turn judgments into `PreferenceExample`s (plain data, defined in `app.kinds.data`);
`app.ml.reward` turns those into a reward model. Nothing here knows about the database.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from app.kinds.data import PreferenceExample

__all__ = ["PreferenceExample", "split_by_prompt"]


def split_by_prompt(
    examples: Sequence[PreferenceExample], val_fraction: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """Split into (train, validation) so that no prompt group appears on both sides.

    Whole groups are drawn in a seeded random order until the validation side holds about
    `val_fraction` of the examples; both sides keep the input order. With at least two groups and
    `0 < val_fraction < 1`, both sides get at least one group.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sizes: dict[str, int] = {}
    for example in examples:
        sizes[example.group_key] = sizes.get(example.group_key, 0) + 1
    # Sorting first makes the draw depend only on the seed and the set of groups, not on the
    # order in which the judgments happened to arrive.
    groups = sorted(sizes)
    random.Random(seed).shuffle(groups)

    target = val_fraction * len(examples)
    val_groups: set[str] = set()
    val_count = 0
    for group in groups:
        if val_count >= target or len(val_groups) == len(groups) - 1:
            break
        # Take the group if that brings the count closer to the target than leaving it out.
        if val_count + sizes[group] - target <= target - val_count or not val_groups:
            val_groups.add(group)
            val_count += sizes[group]
    if val_fraction == 0.0:
        val_groups.clear()

    train = [e for e in examples if e.group_key not in val_groups]
    val = [e for e in examples if e.group_key in val_groups]
    return train, val
