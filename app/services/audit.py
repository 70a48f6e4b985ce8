"""The audit log: who did what to which row, written with the change it describes and read
back filtered and newest first.

`record` adds an event to the caller's transaction, so an event exists exactly when its change
was committed. `browse_events` reads the log a page at a time (keyset on the event id: a page
costs the same on the millionth event as on the first), filtered by actor, action, object,
project and date; `AuditFilter.parse` turns the filters as a person types them (an email or an
id, a slug, a date) into that query, refusing a bad one at its field, for the API and the
console alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.models import AuditEvent, ComparisonPair, Project, User
from app.services.errors import FieldError, InvalidInput

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# How a filter's parser reports a bad field: (field, message).
Complaint = Callable[[str, str], None]
FILTER_FIELDS = ("actor", "action", "target_type", "target_id", "project", "since", "until")


def record(
    session: Session,
    action: str,
    *,
    actor_id: int | None = None,
    project_id: int | None = None,
    target: tuple[str, int] | None = None,
    **data: Any,
) -> AuditEvent:
    """Add an audit event to the current transaction (it commits with the change it describes)."""
    event = AuditEvent(
        action=action,
        actor_id=actor_id,
        project_id=project_id,
        target_type=target[0] if target else None,
        target_id=target[1] if target else None,
        data=data,
    )
    session.add(event)
    return event


@dataclass(frozen=True)
class AuditFilter:
    """Which events to show, resolved to ids. `action` ending in `.` (or `*`) is a prefix
    (`rater.` is every rater action); `since` is inclusive and `until` exclusive, both UTC."""

    actor_id: int | None = None
    action: str = ""
    target_type: str = ""
    target_id: int | None = None
    project_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def parse(cls, session: Session, params: Mapping[str, str | int | None]) -> AuditFilter:
        """The filters as typed (all text; empty means no filter): `actor` an email or a user
        id, `project` a slug, `since`/`until` an ISO date or date-time (a date alone for
        `until` includes that whole day; a time without a zone is UTC). InvalidInput (422)
        naming each bad field."""
        text = {name: str(params.get(name) or "").strip() for name in FILTER_FIELDS}
        errors: list[FieldError] = []

        def bad(name: str, message: str) -> None:
            errors.append(FieldError(None, name, message))

        actor_id = _actor_id(session, text["actor"], bad) if text["actor"] else None
        project_id = None
        if text["project"]:
            project_id = session.scalar(select(Project.id).where(Project.slug == text["project"]))
            if project_id is None:
                bad("project", f"no project with the slug {text['project']!r}")
        target_id = None
        if text["target_id"]:
            if not text["target_id"].isdigit():
                bad("target_id", f"an object id is a whole number, not {text['target_id']!r}")
            else:
                target_id = int(text["target_id"])
        action = text["action"].removesuffix("*")
        if len(action) > 64:
            bad("action", "an action is at most 64 characters")
        since = _when(text["since"], "since", bad, end_of_day=False)
        until = _when(text["until"], "until", bad, end_of_day=True)
        if since and until and since >= until:
            bad("until", "the end of the date range must come after its start")
        if errors:
            raise InvalidInput("; ".join(f"{e.field}: {e.message}" for e in errors), errors)
        return cls(actor_id, action, text["target_type"], target_id, project_id, since, until)


def _actor_id(session: Session, value: str, bad: Complaint) -> int | None:
    if value.isdigit():
        user_id = session.scalar(select(User.id).where(User.id == int(value)))
    else:
        user_id = session.scalar(select(User.id).where(User.email == value.lower()))
    if user_id is None:
        bad("actor", f"no user with the email or id {value!r}")
    return user_id


def _when(value: str, name: str, bad: Complaint, *, end_of_day: bool) -> datetime | None:
    if not value:
        return None
    try:
        if len(value) == 10:  # a date alone: the day's start, or for `until` the next day's
            day = date.fromisoformat(value)
            start = datetime.combine(day, time(), tzinfo=UTC)
            return start + timedelta(days=1) if end_of_day else start
        moment = datetime.fromisoformat(value)
    except ValueError:
        bad(name, f"{value!r} is not a date (YYYY-MM-DD) or an ISO date-time")
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class AuditRow:
    """One event as a listing shows it: with the actor's email and the project's slug, and for
    a pair the prompt it belongs to (its page is the pair's page)."""

    event: AuditEvent
    actor_email: str | None
    project_slug: str | None
    prompt_id: int | None = None


@dataclass(frozen=True)
class AuditPage:
    rows: list[AuditRow]
    next_before: int | None  # the cursor of the next (older) page; None on the last one


def _query(where: AuditFilter) -> Select[AuditEvent, str, str]:
    stmt = (
        select(AuditEvent, User.email, Project.slug)
        .outerjoin(User, User.id == AuditEvent.actor_id)
        .outerjoin(Project, Project.id == AuditEvent.project_id)
    )
    if where.actor_id is not None:
        stmt = stmt.where(AuditEvent.actor_id == where.actor_id)
    if where.action.endswith("."):
        stmt = stmt.where(AuditEvent.action.startswith(where.action, autoescape=True))
    elif where.action:
        stmt = stmt.where(AuditEvent.action == where.action)
    if where.target_type:
        stmt = stmt.where(AuditEvent.target_type == where.target_type)
    if where.target_id is not None:
        stmt = stmt.where(AuditEvent.target_id == where.target_id)
    if where.project_id is not None:
        stmt = stmt.where(AuditEvent.project_id == where.project_id)
    if where.since is not None:
        stmt = stmt.where(AuditEvent.created_at >= where.since)
    if where.until is not None:
        stmt = stmt.where(AuditEvent.created_at < where.until)
    return stmt


def browse_events(
    session: Session,
    where: AuditFilter | None = None,
    *,
    before: int | None = None,
    limit: int = PAGE_SIZE,
) -> AuditPage:
    """The events matching `where`, newest first, `limit` (at most MAX_PAGE_SIZE) of those with
    an id below `before` (the previous page's `next_before`). Two queries per page."""
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    stmt = _query(where or AuditFilter())
    if before is not None:
        stmt = stmt.where(AuditEvent.id < before)
    found = session.execute(stmt.order_by(AuditEvent.id.desc()).limit(limit + 1)).all()
    more = len(found) > limit
    found = found[:limit]
    pair_ids = {e.target_id for e, _, _ in found if e.target_type == "pair" and e.target_id}
    prompts: dict[int, int] = {}
    if pair_ids:
        found_pairs = session.execute(
            select(ComparisonPair.id, ComparisonPair.prompt_id).where(
                ComparisonPair.id.in_(pair_ids)
            )
        )
        prompts = {pair_id: prompt_id for pair_id, prompt_id in found_pairs}
    rows = [
        AuditRow(event, email, slug, prompts.get(event.target_id or 0))
        for event, email, slug in found
    ]
    return AuditPage(rows, found[-1][0].id if more else None)
