"""What reward and DPO runs train on: how judgments become pairs (`SnapshotConfig`), and the
pairs themselves as plain data (`PreferenceExample`), handed from the services to `app.ml`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from app.kinds.knobs import Knobs


class SnapshotConfig(Knobs):
    """How judgments become training pairs. Stored with the snapshot and the run."""

    ties: Literal["exclude", "soft"] = Field(
        "exclude", description="drop ties, or keep them as soft labels (p = 0.5)"
    )
    margin_by_strength: dict[str, float] = Field(
        default_factory=lambda: {"1": 0.0, "2": 1.0},
        description="reward margin asked of 'better' (1) and 'much better' (2)",
    )
    include_gold: bool = Field(False, description="gold pairs are quality checks, not data")
    unsafe: Literal["include", "exclude"] = Field(
        "include", description="judgments flagged unsafe: keep (the preference still holds) or drop"
    )
    aggregate: Literal["separate", "majority", "reliability"] = Field(
        "separate",
        description=(
            "several raters on one pair: one sample per judgment, one majority sample per pair,"
            " or one sample per pair soft-labelled with P(preferred side) from a model of each"
            " rater's reliability (services/reliability.py)"
        ),
    )
    sources: Literal["all", "raters", "imports"] = Field(
        "all", description="rater judgments, imported comparisons, or both"
    )


@dataclass(frozen=True)
class PreferenceExample:
    """One human comparison: `chosen` was preferred over `rejected` as an answer to `prompt`.

    `prompt` is the conversation so far as chat messages (`{"role": ..., "content": ...}`); the
    two responses are the assistant turn that follows it. `label` is the probability that
    `chosen` is better (1.0 for a clear preference, 0.5 for a tie used as a soft label, the
    posterior of the raters' reliability model under `aggregate="reliability"`); `margin`
    is subtracted from the reward difference (stronger judgments ask for a wider gap). `group`
    keys the prompt for the split; when empty, the prompt's messages themselves are the key.
    `pair` names the distinct comparison pair the example came from (`"pair:12"`), so a run can
    count distinct pairs apart from judgments: three raters on one pair are three examples of
    one pair under the "separate" aggregation.
    """

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    margin: float = 0.0
    label: float = 1.0
    group: str = field(default="")
    pair: str = field(default="")

    @property
    def group_key(self) -> str:
        """The key that decides which side of the split this example lands on."""
        if self.group:
            return self.group
        return json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)
