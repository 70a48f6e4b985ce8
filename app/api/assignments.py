"""Assignments API for programmatic raters (scripts, LLM judges, load tests) and gold marking."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, Field

from app.api.access import access
from app.api.deps import AdminUser, RaterCallDep, RatingUser, SessionDep
from app.api.schemas import InputModel
from app.models import Assignment, Judgment
from app.models import Response as ResponseRow
from app.services import assignment as assignment_service
from app.services import judgments
from app.services.prompts import prompt_messages

router = APIRouter(prefix="/api/v1", tags=["assignments"])

Rater = RatingUser  # a token needs scope `rater` (app.api.deps)


class ResponseOut(BaseModel):
    id: int
    text: str
    truncated: bool = Field(
        False, description="the model was cut off at the token limit before it finished"
    )

    @classmethod
    def of(cls, response: ResponseRow) -> ResponseOut:
        return cls(id=response.id, text=response.text, truncated=response.truncated)


class PromptOut(BaseModel):
    id: int
    messages: list[dict[str, str]] = Field(
        description="the prompt as chat turns; a plain-text prompt is one user turn"
    )


class AssignmentOut(BaseModel):
    id: int
    pair_id: int
    project: str
    prompt: PromptOut
    response_a: ResponseOut
    response_b: ResponseOut
    shown_left: Literal["a", "b"] = Field(
        description="the response to present first (randomized per assignment, against"
        " position bias); answers still name the pair's responses as a/b"
    )
    leased_at: datetime
    expires_at: datetime

    @classmethod
    def of(cls, assignment: Assignment, slug: str) -> AssignmentOut:
        pair = assignment.pair
        return cls(
            id=assignment.id,
            pair_id=pair.id,
            project=slug,
            prompt=PromptOut(id=pair.prompt.id, messages=prompt_messages(pair.prompt)),
            response_a=ResponseOut.of(pair.response_a),
            response_b=ResponseOut.of(pair.response_b),
            shown_left=assignment.shown_left,
            leased_at=assignment.leased_at,
            expires_at=assignment.expires_at,
        )


class JudgmentIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    choice: str = Field(description="a | b | tie | both_bad (a/b: the pair's responses)")
    strength: int | None = Field(None, description="for a/b: 1 better, 2 much better")
    aspects: dict[str, str] = Field(
        default_factory=dict, description="per project aspect: a | b | tie"
    )
    rationale: str = ""
    flags: list[str] = Field(default_factory=list, description="unsafe, personal_data, broken")
    active_ms: int | None = Field(None, description="time actively spent, as measured by you")


class JudgmentOut(BaseModel):
    """A stored judgment as its rater sees it (no gold information)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    assignment_id: int
    pair_id: int
    choice: str
    strength: int | None
    aspects: dict[str, str]
    rationale: str
    flags: list[str]
    time_on_task_ms: int | None
    active_ms: int | None
    created_at: datetime

    @classmethod
    def of(cls, judgment: Judgment) -> JudgmentOut:
        return cls.model_validate(judgment)


class SkipIn(InputModel):
    reason: str = Field(min_length=1, max_length=1000)


class SkipOut(BaseModel):
    id: int
    status: str
    skip_reason: str | None


class GoldIn(InputModel):
    choice: Literal["a", "b", "tie", "both_bad"] | None = Field(
        description="the expected answer, in the pair's terms; null unmarks the pair"
    )


class GoldOut(BaseModel):
    pair_id: int
    gold_choice: str | None


def _json(model: BaseModel) -> Response:
    """`model` as the JSON body FastAPI would send for it, serialized in the endpoint's thread.

    FastAPI validates a sync endpoint's return value against its response model in the thread
    pool, a second thread hand-off per call; a Response is sent as it is. The model needs no
    second validation: it was just built, and validated, from the database's row.
    """
    return Response(content=model.model_dump_json(), media_type="application/json")


@router.get(
    "/projects/{slug}/assignments/next",
    response_model=AssignmentOut,
    responses={204: {"description": "nothing left for you in this project"}},
    openapi_extra=access("rater", token_scope="rater"),
)
def next_assignment(slug: str, call: RaterCallDep) -> Response:
    """Lease the next comparison (or return the one you already hold); 204 when none is left."""
    with call.open() as (session, user):
        assignment = assignment_service.next_assignment(session, slug, user)
        session.commit()  # let go of the row locks before the answer is built
        if assignment is None:
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        return _json(AssignmentOut.of(assignment, slug))


@router.post(
    "/assignments/{assignment_id}/judgment",
    response_model=JudgmentOut,
    responses={409: {"description": "skipped, judged differently, or expired and full"}},
    openapi_extra=access("own", token_scope="rater"),
)
def submit_judgment(assignment_id: int, body: JudgmentIn, call: RaterCallDep) -> Response:
    """Store your judgment. Sending the same body again returns the same stored judgment."""
    data = judgments.JudgmentInput(**body.model_dump())
    with call.open() as (session, user):
        judgment = judgments.submit(session, assignment_id, user, data)
        session.commit()  # let go of the row locks before the answer is built
        return _json(JudgmentOut.of(judgment))


@router.post("/assignments/{assignment_id}/skip", openapi_extra=access("own", token_scope="rater"))
def skip_assignment(assignment_id: int, body: SkipIn, session: SessionDep, user: Rater) -> SkipOut:
    """Give the comparison back with a reason; you will not get it again."""
    row = assignment_service.skip_assignment(session, assignment_id, user, body.reason)
    return SkipOut(id=row.id, status=row.status, skip_reason=row.skip_reason)


@router.put("/pairs/{pair_id}/gold", openapi_extra=access("admin"))
def set_gold(pair_id: int, body: GoldIn, session: SessionDep, user: AdminUser) -> GoldOut:
    """Mark a pair as gold with its expected answer (admin only)."""
    pair = judgments.set_gold(session, pair_id, body.choice, actor_id=user.id)
    return GoldOut(pair_id=pair.id, gold_choice=pair.gold_choice)
