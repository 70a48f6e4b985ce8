"""Data quality: each rater's figures, and the project's agreement, majority and cycles.

The definitions are those of `app.services.quality` (its module docstring); each field's
description says them in short, so they appear in the OpenAPI document.
"""

from __future__ import annotations

from datetime import date, datetime

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.api.access import access
from app.api.deps import DataReader, ProjectDep, SessionDep
from app.services import quality

router = APIRouter(prefix="/api/v1/projects/{slug}", tags=["quality"])


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ShareOut(_Out):
    k: int = Field(description="how many of the n")
    n: int = Field(description="out of how many")
    share: float | None = Field(description="k / n; null when n is 0")
    low: float | None = Field(description="lower end of the Wilson score 95 % interval")
    high: float | None = Field(description="upper end of the Wilson score 95 % interval")


class OutlierOut(_Out):
    code: str = Field(
        description="what stands out: position_bias, low_agreement, fast, gold, reliability or ties"
    )
    reason: str = Field(description="the reason in words, with the figures behind it")


class RaterQualityOut(_Out):
    rater_id: int
    email: str
    judgments: int = Field(description="the rater's judgments in the project")
    timed: int = Field(description="judgments with an active time (the others have none)")
    median_active_ms: float | None = Field(
        description="median active time per judgment, over the timed ones"
    )
    p10_active_ms: float | None = Field(
        description="10th percentile of active time (linear interpolation), over the timed ones"
    )
    shared_pairs: int = Field(description="pairs the rater judged that other raters judged too")
    consensus_pairs: int = Field(
        description="shared pairs where one choice (a, b, tie, both_bad) is held by more than"
        " half of the other raters' judgments: the consensus"
    )
    agreed: int = Field(description="consensus pairs where the rater's choice is the consensus")
    agreement: float | None = Field(
        description="agreed / consensus_pairs (strength ignored; null without a consensus pair)"
    )
    gold_judgments: int = Field(description="judgments of gold pairs")
    gold_correct: int = Field(description="of which matched the gold answer")
    gold_accuracy: float | None = Field(description="gold_correct / gold_judgments")
    left: ShareOut = Field(
        description="decisive judgments with a known shown side where the response shown on the"
        " left won (position bias), with its Wilson 95 % interval"
    )
    position_biased: bool = Field(description="whether the left share's interval excludes 0.5")
    ties: int
    tie_rate: float = Field(description="ties / judgments")
    both_bad: int
    both_bad_rate: float = Field(description="both-bad answers / judgments")
    flagged: int = Field(description="judgments carrying at least one flag")
    flag_rate: float = Field(description="flagged / judgments")
    reliability: float | None = Field(
        description="estimated P(the rater's decisive vote picks the better response), from"
        " a one-coin Dawid–Skene EM over every rater's votes (app.services.reliability)"
    )
    reliability_votes: int = Field(
        description="decisive votes on pairs someone else judged too: what the estimate rests on"
    )
    excluded: bool = Field(description="whether the rater's judgments are excluded from training")
    excluded_reason: str | None
    excluded_at: datetime | None
    outliers: list[OutlierOut] = Field(description="why the rater stands out; empty if not")


class RatersOut(_Out):
    raters: list[RaterQualityOut] = Field(description="highlighted raters first, then by volume")
    median_agreement: float | None = Field(
        description="median agreement over raters with enough consensus pairs (the bar for"
        " low_agreement)"
    )
    median_active_ms: float | None = Field(
        description="median of the raters' median active times (the bar for fast)"
    )


class FiguresOut(_Out):
    judgments: int = Field(description="rater judgments counted")
    raters: int
    pairs: int = Field(description="distinct pairs judged")
    pairs_judged_twice: int = Field(description="pairs with at least two judgments")
    clear_majority_pairs: int = Field(
        description="pairs judged twice or more where one choice has more than half the votes"
    )
    clear_majority: float | None = Field(description="clear_majority_pairs / pairs_judged_twice")
    alpha: float | None = Field(
        description="Krippendorff's α, ordinal, on b much better = 1 … a much better = 5 (tie 3;"
        " both-bad left out); null when undefined (see alpha_note)"
    )
    alpha_pairs: int = Field(description="pairs with two or more values on the scale")
    alpha_note: str = Field(description="why α is undefined; empty when it is defined")
    left: ShareOut = Field(description="share of decisive judgments won by the left side")
    gold_judgments: int
    gold_correct: int
    cycles: int = Field(description="preference cycles (A > B > C > A) among prompts' responses")
    prompts_checked: int = Field(
        description="prompts with three or more responses joined by aggregated preferences"
    )


class CycleOut(_Out):
    prompt_id: int
    response_ids: tuple[int, int, int] = Field(
        description="first > second > third > first, by the aggregated judgments"
    )
    pair_ids: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] = Field(
        description="the pairs behind each of the three preferences, in the same order"
    )


class WeekOut(_Out):
    week: str = Field(description="ISO week of the judgments' created_at, e.g. 2026-W49")
    starts: date = Field(description="the week's Monday")
    figures: FiguresOut = Field(description="the figures of that week's judgments alone")


class ProjectQualityOut(_Out):
    figures: FiguresOut = Field(description="every rater judgment of the project")
    cycles: list[CycleOut] = Field(
        description=f"the cycles, at most {quality.CYCLES_LISTED} (figures.cycles counts all)"
    )
    weeks: list[WeekOut] = Field(description="the same figures per ISO week, oldest first")


@router.get("/quality/raters", openapi_extra=access("reader"))
def rater_quality(project: ProjectDep, session: SessionDep, user: DataReader) -> RatersOut:
    """Each rater's judgments, time, agreement, gold accuracy, position bias, rates and
    reliability in the project, with the reasons a rater stands out."""
    return RatersOut.model_validate(quality.rater_quality(session, project))


@router.get("/quality", openapi_extra=access("reader"))
def project_quality(
    project: ProjectDep, session: SessionDep, user: DataReader
) -> ProjectQualityOut:
    """The project's Krippendorff's α, clear-majority share and preference cycles, overall and
    per ISO week."""
    return ProjectQualityOut.model_validate(quality.project_quality(session, project))
