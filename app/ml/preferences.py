"""Preference pairs as plain data, and the train/validation split by prompt.

The services turn judgments into `PreferenceExample`s; `app.ml.reward` turns those into a reward
model. Nothing here knows about the database.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PreferenceExample:
    """One human comparison: `chosen` was preferred over `rejected` as an answer to `prompt`.

    `prompt` is the conversation so far as chat messages (`{"role": ..., "content": ...}`); the
    two responses are the assistant turn that follows it. `label` is the probability that
    `chosen` is better (1.0 for a clear preference, 0.5 for a tie used as a soft label); `margin`
    is subtracted from the reward difference (stronger judgments ask for a wider gap). `group`
    keys the prompt for the split; when empty, the prompt's messages themselves are the key.
    """

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    margin: float = 0.0
    label: float = 1.0
    group: str = field(default="")

    @property
    def group_key(self) -> str:
        """The key that decides which side of the split this example lands on."""
        if self.group:
            return self.group
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)


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
