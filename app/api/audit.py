"""The audit log: every consequential action, filtered and paginated, newest first.

Readable by admins and reviewers (`DataReader`), like every page of the console: reviewers see
everything and change nothing, and the log changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from app.api.access import access
from app.api.deps import DataReader, SessionDep
from app.services import audit

router = APIRouter(prefix="/api/v1", tags=["audit"])


class AuditEventOut(BaseModel):
    id: int
    created_at: datetime
    action: str
    actor_id: int | None
    actor_email: str | None = Field(description="the actor's email; null for the system")
    project_id: int | None
    project_slug: str | None
    target_type: str | None
    target_id: int | None
    data: dict[str, Any]


class AuditPageOut(BaseModel):
    events: list[AuditEventOut]
    next_before: int | None = Field(
        description="pass as `before` for the next, older page; null on the last page"
    )
    next: str | None = Field(description="the next page's URL, with the same filters")


@router.get(
    "/audit",
    responses={422: {"description": "a filter names nothing that exists"}},
    openapi_extra=access("reader"),
)
def list_audit_events(
    request: Request,
    session: SessionDep,
    user: DataReader,
    actor: str = Query("", description="the actor's email or user id"),
    action: str = Query("", description="an action (`run.cancel`), or a prefix ending in `.`"),
    target_type: str = Query("", description="the object's type: run, user, pair, ..."),
    target_id: str = Query("", description="the object's id (with or without target_type)"),
    project: str = Query("", description="a project's slug"),
    since: str = Query("", description="from this date or ISO date-time (inclusive, UTC)"),
    until: str = Query("", description="to this date (inclusive) or date-time (exclusive)"),
    before: int | None = Query(None, ge=1, description="the previous page's `next_before`"),
    limit: int = Query(audit.PAGE_SIZE, ge=1, le=audit.MAX_PAGE_SIZE),
) -> AuditPageOut:
    """Audit events newest first, a page at a time (keyset on the event id)."""
    filters = {
        "actor": actor, "action": action, "target_type": target_type, "target_id": target_id,
        "project": project, "since": since, "until": until,
    }  # fmt: skip
    where = audit.AuditFilter.parse(session, filters)
    found = audit.browse_events(session, where, before=before, limit=limit)
    following = None
    if found.next_before is not None:
        query = {k: v for k, v in filters.items() if v}
        query.update(before=str(found.next_before), limit=str(limit))
        following = f"{request.url.path}?{urlencode(query)}"
    return AuditPageOut(
        events=[
            AuditEventOut(
                id=row.event.id,
                created_at=row.event.created_at,
                action=row.event.action,
                actor_id=row.event.actor_id,
                actor_email=row.actor_email,
                project_id=row.event.project_id,
                project_slug=row.project_slug,
                target_type=row.event.target_type,
                target_id=row.event.target_id,
                data=row.event.data or {},
            )
            for row in found.rows
        ],
        next_before=found.next_before,
        next=following,
    )
