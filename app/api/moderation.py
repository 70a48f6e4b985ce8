"""Governance of a project's training data: rater exclusions and the moderation queue.

Reads are for admins and reviewers (`DataReader`), actions for admins; every action is in the
audit log with its actor and reason (`services/exclusions.py`, `services/moderation.py`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app.api.access import access
from app.api.deps import AdminUser, DataReader, ProjectDep, SessionDep
from app.api.schemas import InputModel
from app.models import Project, RaterExclusion, User
from app.services import exclusions, moderation

router = APIRouter(prefix="/api/v1/projects/{slug}", tags=["governance"])

Flag = Literal["unsafe", "personal_data", "broken"]


# --- exclusions ---------------------------------------------------------------------------------


class ExclusionCreate(InputModel):
    rater_id: int | None = Field(None, description="the rater's user id (or give `email`)")
    email: str | None = Field(None, description="the rater's email, if no `rater_id` is given")
    reason: str = Field(description="why (required; kept in the audit log and the history)")


class ExclusionLift(InputModel):
    reason: str = Field(description="why the rater's judgments may be trained on again")


class ExclusionOut(BaseModel):
    id: int
    rater_id: int
    rater_email: str
    live: bool = Field(description="true while the rater's judgments are left out of training")
    reason: str
    created_at: datetime
    created_by: str | None = Field(description="email of the admin who excluded the rater")
    lifted_at: datetime | None
    lifted_by: str | None = Field(description="email of the admin who lifted the exclusion")
    lift_reason: str | None


def _email(session: Session, user_id: int | None) -> str | None:
    user = session.get(User, user_id) if user_id is not None else None
    return user.email if user is not None else None


def _exclusion_out(session: Session, row: RaterExclusion) -> ExclusionOut:
    return ExclusionOut(
        id=row.id,
        rater_id=row.rater_id,
        rater_email=_email(session, row.rater_id) or "",
        live=row.lifted_at is None,
        reason=row.reason,
        created_at=row.created_at,
        created_by=_email(session, row.created_by_id),
        lifted_at=row.lifted_at,
        lifted_by=_email(session, row.lifted_by_id),
        lift_reason=row.lift_reason,
    )


@router.get("/exclusions", openapi_extra=access("reader"))
def list_exclusions(
    project: ProjectDep,
    session: SessionDep,
    user: DataReader,
    live: bool = Query(False, description="only the live exclusions (default: the history)"),
) -> list[ExclusionOut]:
    """The project's rater exclusions, newest first: live ones and lifted ones."""
    return [
        ExclusionOut(
            id=r.exclusion.id,
            rater_id=r.exclusion.rater_id,
            rater_email=r.rater_email,
            live=r.live,
            reason=r.exclusion.reason,
            created_at=r.exclusion.created_at,
            created_by=r.created_by_email,
            lifted_at=r.exclusion.lifted_at,
            lifted_by=r.lifted_by_email,
            lift_reason=r.exclusion.lift_reason,
        )
        for r in exclusions.exclusion_history(session, project)
        if r.live or not live
    ]


@router.post("/exclusions", status_code=201, openapi_extra=access("admin"))
def exclude_rater(
    project: ProjectDep, session: SessionDep, user: AdminUser, body: ExclusionCreate
) -> ExclusionOut:
    """Leave every judgment of a rater in this project, past and future, out of the snapshots
    taken from now on, until the exclusion is lifted. 409 if the rater is already excluded;
    422 without a reason or for an unknown user. Snapshots taken before are unchanged."""
    rater = exclusions.find_rater(session, rater_id=body.rater_id, email=body.email or "")
    row = exclusions.exclude_rater(session, project, rater.id, reason=body.reason, actor=user)
    return _exclusion_out(session, row)


@router.post("/exclusions/{rater_id}/lift", openapi_extra=access("admin"))
def lift_exclusion(
    project: ProjectDep, session: SessionDep, user: AdminUser, rater_id: int, body: ExclusionLift
) -> ExclusionOut:
    """Let an excluded rater's judgments back into new snapshots. 409 if none is live."""
    row = exclusions.lift_exclusion(session, project, rater_id, reason=body.reason, actor=user)
    return _exclusion_out(session, row)


# --- moderation ---------------------------------------------------------------------------------


class MessageOut(BaseModel):
    role: str
    content: str


class ResponseOut(BaseModel):
    id: int
    text: str
    model: str = Field(description='"name vN" for a model version of ours, else the model name')
    model_version_id: int | None


class FlagOut(BaseModel):
    judgment_id: int
    rater_id: int | None
    rater_email: str | None = Field(description="null for an imported judgment")
    flags: list[str]
    rationale: str
    created_at: datetime
    new: bool = Field(description="raised after the pair was last moderated")


class ModerationItemOut(BaseModel):
    pair_id: int
    prompt_id: int
    status: str = Field(description="open, resolved, excluded (from training) or removed")
    gold: bool
    judgments: int
    moderated_at: datetime | None
    training_excluded_at: datetime | None
    rating_removed_at: datetime | None
    prompt: list[MessageOut]
    response_a: ResponseOut
    response_b: ResponseOut
    flags: list[FlagOut] = Field(description="every flagged judgment of the pair, oldest first")
    counts: dict[str, int] = Field(
        description="flags per name: of the new ones for an open pair, of all for a moderated one"
    )


class ModerationPageOut(BaseModel):
    state: str
    flag: str | None
    total: int = Field(description="pairs in this view (state and flag)")
    offset: int
    limit: int
    next_offset: int | None = Field(description="the next page's offset; null on the last page")
    open_by_flag: dict[str, int] = Field(description="open pairs with each flag")
    items: list[ModerationItemOut]


def _response_out(item: moderation.ResponseItem) -> ResponseOut:
    return ResponseOut(
        id=item.id, text=item.text, model=item.model, model_version_id=item.model_version_id
    )


def _item_out(item: moderation.ModerationItem) -> ModerationItemOut:
    pair = item.pair
    return ModerationItemOut(
        pair_id=pair.id,
        prompt_id=pair.prompt_id,
        status=item.status,
        gold=pair.gold_choice is not None,
        judgments=pair.judgment_count,
        moderated_at=pair.moderated_at,
        training_excluded_at=pair.training_excluded_at,
        rating_removed_at=pair.rating_removed_at,
        prompt=[MessageOut(role=m["role"], content=m["content"]) for m in item.messages],
        response_a=_response_out(item.a),
        response_b=_response_out(item.b),
        flags=[
            FlagOut(
                judgment_id=f.judgment_id,
                rater_id=f.rater_id,
                rater_email=f.rater_email,
                flags=f.flags,
                rationale=f.rationale,
                created_at=f.created_at,
                new=f.new,
            )
            for f in item.flags
        ],
        counts=item.counts,
    )


@router.get("/moderation", openapi_extra=access("reader"))
def moderation_queue(
    project: ProjectDep,
    session: SessionDep,
    user: DataReader,
    state: Literal["open", "moderated"] = Query(
        "open",
        description="open: flagged since last moderated (newest flag first); moderated: the"
        " history, pairs acted on and not flagged since (newest action first)",
    ),
    flag: Flag | None = Query(None, description="only pairs with this flag"),
    offset: int = Query(0, ge=0),
    limit: int = Query(moderation.PAGE_SIZE, ge=1, le=moderation.MAX_PAGE_SIZE),
) -> ModerationPageOut:
    """The moderation queue: flagged pairs with their prompt, both responses, and who flagged
    what and when."""
    page = moderation.queue(session, project, state=state, flag=flag, offset=offset, limit=limit)
    return ModerationPageOut(
        state=page.state,
        flag=page.flag,
        total=page.total,
        offset=page.offset,
        limit=page.limit,
        next_offset=page.next_offset,
        open_by_flag=page.open_by_flag,
        items=[_item_out(item) for item in page.items],
    )


class ModerationAction(InputModel):
    action: Literal["resolve", "exclude", "remove", "restore"] = Field(
        description="resolve: flags reviewed, nothing else changes; exclude: left out of"
        " training, still rated; remove: no longer served to raters, and excluded; restore:"
        " undo exclude and remove"
    )
    reason: str = Field("", description="why: required for every action but resolve")


class ModerationOutcome(BaseModel):
    action: str
    target_type: str
    target_id: int
    pair_ids: list[int] = Field(description="the pairs the action covered")
    changed: int = Field(description="of those, how many changed training or rating state")


def _moderate(
    session: Session,
    project: Project,
    user: User,
    target: tuple[moderation.TargetKind, int],
    body: ModerationAction,
) -> ModerationOutcome:
    out = moderation.moderate(session, project, target, body.action, reason=body.reason, actor=user)
    return ModerationOutcome(
        action=out.action,
        target_type=out.target[0],
        target_id=out.target[1],
        pair_ids=out.pair_ids,
        changed=out.changed,
    )


@router.post("/moderation/pairs/{pair_id}", openapi_extra=access("admin"))
def moderate_pair(
    project: ProjectDep, session: SessionDep, user: AdminUser, pair_id: int, body: ModerationAction
) -> ModerationOutcome:
    """Act on one flagged pair. Audited as moderation.<action>."""
    return _moderate(session, project, user, ("pair", pair_id), body)


@router.post("/moderation/prompts/{prompt_id}", openapi_extra=access("admin"))
def moderate_prompt(
    project: ProjectDep,
    session: SessionDep,
    user: AdminUser,
    prompt_id: int,
    body: ModerationAction,
) -> ModerationOutcome:
    """Act on every pair of a prompt (a flagged prompt). Audited as moderation.<action>."""
    return _moderate(session, project, user, ("prompt", prompt_id), body)


@router.post("/moderation/responses/{response_id}", openapi_extra=access("admin"))
def moderate_response(
    project: ProjectDep,
    session: SessionDep,
    user: AdminUser,
    response_id: int,
    body: ModerationAction,
) -> ModerationOutcome:
    """Act on every pair containing a response (a flagged response). Audited as
    moderation.<action>."""
    return _moderate(session, project, user, ("response", response_id), body)
