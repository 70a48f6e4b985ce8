"""Rater exclusions: leaving one rater's judgments in a project out of training, reversibly.

An exclusion is a row of `rater_exclusions` (`app.models.RaterExclusion`). While it is live
(`lifted_at` is null) every judgment of the rater in the project, those made before and those
made after, is left out of new snapshots (`snapshots._usable_filter` reads the table, so the
auto-trigger's counter and the exports leave them out too). Lifting it lets them back in.
Snapshots taken earlier are immutable and keep what they froze. Rows are never deleted, so the
history of who excluded whom, when and why stays readable.

Decisions:

- a reason is required to exclude and to lift (it is what the audit log and the history show);
- excluding a rater who is already excluded is a Conflict (409) that says since when and why,
  rather than a silent success: the second admin learns that someone acted first. Two admins
  excluding at once end the same way, one row (the partial unique index
  `uq_rater_exclusions_live`) and a Conflict for the other;
- lifting an exclusion that is not live is a Conflict as well;
- any existing user may be excluded, also one who has not rated in the project yet: an admin
  can keep a rater known to spam elsewhere out of this project's training from the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from app.models import Project, RaterExclusion, User, utcnow
from app.services import audit
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound

MAX_REASON_CHARS = 1000


def _clean_reason(reason: str, field: str = "reason") -> str:
    reason = (reason or "").strip()
    if not reason:
        message = "say why (a short reason; the audit log keeps it)"
        raise InvalidInput(message, [FieldError(None, field, message)])
    if len(reason) > MAX_REASON_CHARS:
        message = f"the reason is longer than {MAX_REASON_CHARS} characters"
        raise InvalidInput(message, [FieldError(None, field, message)])
    return reason


def _live(session: Session, project: Project, rater_id: int) -> RaterExclusion | None:
    return session.scalar(
        select(RaterExclusion).where(
            RaterExclusion.project_id == project.id,
            RaterExclusion.rater_id == rater_id,
            RaterExclusion.lifted_at.is_(None),
        )
    )


def _already(existing: RaterExclusion, email: str) -> Conflict:
    since = existing.created_at.strftime("%Y-%m-%d %H:%M UTC")
    return Conflict(f"{email} is already excluded from training (since {since}: {existing.reason})")


def find_rater(session: Session, *, rater_id: int | None = None, email: str = "") -> User:
    """The user an exclusion form or request names, by id or by email; InvalidInput at the
    field that names nobody."""
    email = (email or "").strip().lower()
    if rater_id is not None:
        user = session.get(User, rater_id)
        if user is None:
            raise InvalidInput("no such user", [FieldError(None, "rater_id", "no such user")])
        return user
    if email:
        user = session.scalar(select(User).where(User.email == email))
        if user is None:
            message = f"no user has the email {email}"
            raise InvalidInput("no such user", [FieldError(None, "email", message)])
        return user
    message = "name the rater: rater_id or email"
    raise InvalidInput(message, [FieldError(None, "rater_id", message)])


def exclude_rater(
    session: Session,
    project: Project,
    rater_id: int,
    *,
    reason: str,
    actor: User,
    now: datetime | None = None,
) -> RaterExclusion:
    """Leave every judgment of `rater_id` in `project` out of training until lifted. Audited
    as "rater.exclude" with the reason. InvalidInput without a reason or for an unknown user;
    Conflict if the rater is already excluded (also when a concurrent request won)."""
    reason = _clean_reason(reason)
    rater = find_rater(session, rater_id=rater_id)
    existing = _live(session, project, rater.id)
    if existing is not None:
        raise _already(existing, rater.email)
    exclusion = RaterExclusion(
        project_id=project.id,
        rater_id=rater.id,
        reason=reason,
        created_by_id=actor.id,
        created_at=now or utcnow(),
    )
    try:
        with session.begin_nested():  # another admin excluding the same rater right now
            session.add(exclusion)
    except IntegrityError:
        winner = _live(session, project, rater.id)
        if winner is None:  # the user or the project was deleted meanwhile
            raise NotFound(f"user {rater.id} or project {project.slug!r} is gone") from None
        raise _already(winner, rater.email) from None
    audit.record(
        session, "rater.exclude", actor_id=actor.id, project_id=project.id,
        target=("user", rater.id), reason=reason, exclusion_id=exclusion.id,
    )  # fmt: skip
    return exclusion


def lift_exclusion(
    session: Session,
    project: Project,
    rater_id: int,
    *,
    reason: str,
    actor: User,
    now: datetime | None = None,
) -> RaterExclusion:
    """Let the rater's judgments back into new snapshots. Audited as "rater.include" with the
    reason. Conflict if the rater has no live exclusion in the project."""
    reason = _clean_reason(reason)
    # Locked, so that two admins lifting at once do not both write (SQLite: BEGIN IMMEDIATE
    # already serializes them).
    exclusion = session.scalar(
        select(RaterExclusion)
        .where(
            RaterExclusion.project_id == project.id,
            RaterExclusion.rater_id == rater_id,
            RaterExclusion.lifted_at.is_(None),
        )
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if exclusion is None:
        user = session.get(User, rater_id)
        who = user.email if user is not None else f"user {rater_id}"
        raise Conflict(f"{who} is not excluded from training in {project.slug!r}")
    exclusion.lifted_at = now or utcnow()
    exclusion.lifted_by_id = actor.id
    exclusion.lift_reason = reason
    session.flush()
    audit.record(
        session, "rater.include", actor_id=actor.id, project_id=project.id,
        target=("user", rater_id), reason=reason, exclusion_id=exclusion.id,
    )  # fmt: skip
    return exclusion


def live_exclusions(session: Session, project: Project) -> dict[int, RaterExclusion]:
    """The project's live exclusions, keyed by rater id (one query)."""
    rows = session.scalars(
        select(RaterExclusion).where(
            RaterExclusion.project_id == project.id, RaterExclusion.lifted_at.is_(None)
        )
    )
    return {row.rater_id: row for row in rows}


@dataclass(frozen=True)
class ExclusionRecord:
    """An exclusion as the history shows it: the row with the emails of those involved."""

    exclusion: RaterExclusion
    rater_email: str
    created_by_email: str | None
    lifted_by_email: str | None

    @property
    def live(self) -> bool:
        return self.exclusion.lifted_at is None


def exclusion_history(
    session: Session, project: Project, *, limit: int | None = None
) -> list[ExclusionRecord]:
    """Every exclusion of the project, live and lifted, newest first (one query)."""
    rater = aliased(User)
    creator = aliased(User)
    lifter = aliased(User)
    stmt = (
        select(RaterExclusion, rater.email, creator.email, lifter.email)
        .join(rater, rater.id == RaterExclusion.rater_id)
        .outerjoin(creator, creator.id == RaterExclusion.created_by_id)
        .outerjoin(lifter, lifter.id == RaterExclusion.lifted_by_id)
        .where(RaterExclusion.project_id == project.id)
        .order_by(RaterExclusion.created_at.desc(), RaterExclusion.id.desc())
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    return [ExclusionRecord(*row) for row in session.execute(stmt).all()]
