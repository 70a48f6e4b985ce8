"""Handing comparison pairs to raters: leases, overlap, gold interleaving, expiry, skips.

Invariants (docs/rating.md explains why they hold on PostgreSQL and on SQLite):

- a rater gets a pair at most once: one `assignments` row per (pair, rater), enforced by a
  unique constraint; a skipped or expired pair never comes back to that rater;
- a standard pair never has more live leases plus judgments than `required_judgments`;
- a rater holds at most one live lease per project: `next` hands back the one they hold.

A lease is live while `status = 'leased' AND expires_at > now`. Queries treat an old lease as
dead at once; `release_expired_leases` only makes that visible in the `status` column.

Gold pairs (a pair with `gold_choice`) measure raters, so they are not capped by
`required_judgments`: every rater may get each gold pair once, interleaved at the project's
`gold_rate`. Nothing a rater sees tells a gold pair from another.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import TypeVar, cast

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Integer,
    Select,
    String,
    Table,
    and_,
    bindparam,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    Session,
    SessionTransaction,
    aliased,
    contains_eager,
    joinedload,
    make_transient_to_detached,
)
from sqlalchemy.orm.attributes import set_committed_value

from app.models import (
    Assignment,
    ComparisonPair,
    Judgment,
    Project,
    Response,
    User,
    utcnow,
)
from app.models.base import UTCDateTime
from app.services import permissions, staffing
from app.services.errors import Conflict, InvalidInput, NotFound
from app.services.projects import ProjectSettings, project_settings
from app.services.staffing import open_to

_T = TypeVar("_T")

# How many candidates that filled up under us one `next` call steps over before giving up.
MAX_CLAIM_TRIES = 20
MAX_SKIP_REASON_CHARS = 1000

_rng = random.SystemRandom()


@dataclass(frozen=True)
class RaterCounts:
    """What the rater sees in the page header."""

    done_today: int
    left: int


def is_live(now: datetime | BindParameter[datetime]) -> ColumnElement[bool]:
    """SQL condition: an assignment is a lease that has not run out."""
    return and_(Assignment.status == "leased", Assignment.expires_at > now)


def _live_leases(now: datetime | BindParameter[datetime]) -> ColumnElement[int]:
    """Correlated subquery: live leases on the pair of the enclosing query."""
    return (
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.pair_id == ComparisonPair.id, is_live(now))
        .scalar_subquery()
    )


def _untouched_by(
    rater_id: int | BindParameter[int], project_id: int | BindParameter[int]
) -> ColumnElement[bool]:
    """The rater has never been assigned this pair, nor judged it in any other way.

    Written as NOT IN over the rater's own (small) sets so PostgreSQL hashes them once instead
    of probing per candidate pair; pair_id is NOT NULL in both tables, so NOT IN is exact.
    """
    mine = select(Assignment.pair_id).where(
        Assignment.rater_id == rater_id, Assignment.project_id == project_id
    )
    judged = select(Judgment.pair_id).where(
        Judgment.rater_id == rater_id, Judgment.project_id == project_id
    )
    return and_(ComparisonPair.id.not_in(mine), ComparisonPair.id.not_in(judged))


CONTENT = (
    joinedload(Assignment.pair).joinedload(ComparisonPair.prompt),
    joinedload(Assignment.pair).joinedload(ComparisonPair.response_a),
    joinedload(Assignment.pair).joinedload(ComparisonPair.response_b),
)

# The statements `next` runs on every call are built once, with these parameters: building a
# statement like the claim costs about a millisecond of CPU per call, more than running it.
_PROJECT = bindparam("project_id", type_=Integer)
_RATER = bindparam("rater_id", type_=Integer)
_PAIR = bindparam("pair_id", type_=Integer)
_NOW = bindparam("now", type_=UTCDateTime)

_ResponseA = aliased(Response)
_ResponseB = aliased(Response)
# A pair with everything a rater reads, in one row: the claim loads the prompt and both
# responses along with the pair it locks, so rendering needs no query of its own.
_PAIR_WITH_CONTENT = (
    select(ComparisonPair)
    .join(ComparisonPair.prompt)
    .join(ComparisonPair.response_a.of_type(_ResponseA))
    .join(ComparisonPair.response_b.of_type(_ResponseB))
    .options(
        contains_eager(ComparisonPair.prompt),
        contains_eager(ComparisonPair.response_a.of_type(_ResponseA)),
        contains_eager(ComparisonPair.response_b.of_type(_ResponseB)),
    )
    # A locked row must be read as it is now, also when the session already holds it.
    .execution_options(populate_existing=True)
)

# Serializes one rater's own `next` calls (two tabs, a double click): without it two calls
# could each find no live lease and each lease a different pair. FOR NO KEY UPDATE does not
# block the key-share locks that inserting rows referencing the user takes. The statement also
# answers whether the project's staffing lets the rater in (`staffing.open_to`, two index
# probes of project_members, which it does not lock), so staffing costs no round trip.
_LOCK_RATER = (
    select(open_to(_PROJECT, User.id).label("open"))
    .where(User.id == _RATER)
    .with_for_update(of=User, key_share=True)
)

# The same lock and staffing answer, also reading the project by its slug: the API's `next`
# names the project by slug, and one statement instead of two is a round trip and a
# statement's CPU less per call.
_LOCK_RATER_IN_PROJECT = (
    select(Project.id, Project.settings, open_to(Project.id, User.id).label("open"))
    .join(User, User.id == _RATER)
    .where(Project.slug == bindparam("slug", type_=String))
    .with_for_update(of=User, key_share=True)
)

_CURRENT_LEASE = (
    select(Assignment.id)
    .where(Assignment.rater_id == _RATER, Assignment.project_id == _PROJECT, is_live(_NOW))
    .order_by(Assignment.leased_at, Assignment.id)
    .limit(1)
)

# The lease, inserted only if the locked pair still has room (gold pairs are not capped).
# Run as a new statement while the pair's row lock is held: under READ COMMITTED it sees every
# lease committed by whoever held the lock before us, which the claim's older snapshot might
# not have seen. It inserts nothing when the pair filled up meanwhile. Core, returning the id
# only: the caller builds the Assignment from what it inserted (no ORM result handling).
_ASSIGNMENTS = cast(Table, Assignment.__table__)
_LEASE = (
    insert(_ASSIGNMENTS)
    .from_select(
        ["project_id", "pair_id", "rater_id", "status", "shown_left", "leased_at", "expires_at"],
        select(
            _PROJECT,
            ComparisonPair.id,
            _RATER,
            literal("leased"),
            bindparam("shown_left", type_=String),
            _NOW,
            bindparam("expires_at", type_=UTCDateTime),
        ).where(
            ComparisonPair.id == _PAIR,
            or_(
                ComparisonPair.gold_choice.is_not(None),
                ComparisonPair.judgment_count + _live_leases(_NOW)
                < ComparisonPair.required_judgments,
            ),
        ),
    )
    .returning(_ASSIGNMENTS.c.id)
)


def _queue_head(stmt: Select[_T], gold: bool) -> Select[_T]:
    """`stmt` limited to the best pair of one kind that the rater may lease.

    Parameters project_id, rater_id and now.
    """
    # Live leases per pair of the project, computed once and hash-joined, rather than a
    # count subquery per candidate: there are few live leases and many candidate pairs.
    live = (
        select(Assignment.pair_id, func.count().label("n"))
        .where(Assignment.project_id == _PROJECT, is_live(_NOW))
        .group_by(Assignment.pair_id)
        .subquery()
    )
    conditions = [
        ComparisonPair.project_id == _PROJECT,
        ComparisonPair.gold_choice.is_not(None) if gold else ComparisonPair.gold_choice.is_(None),
        # Moderation removed it from rating (`services/moderation.py`): never leased again. A
        # lease taken before the removal is left to finish; its judgment is kept, not trained on.
        ComparisonPair.rating_removed_at.is_(None),
        _untouched_by(_RATER, _PROJECT),
    ]
    if not gold:
        conditions.append(
            ComparisonPair.judgment_count + func.coalesce(live.c.n, 0)
            < ComparisonPair.required_judgments
        )
    # The order of ix_comparison_pairs_queue: PostgreSQL walks the index and stops at the first
    # pair that passes the conditions and is not locked, instead of sorting every open pair.
    return (
        stmt.outerjoin(live, live.c.pair_id == ComparisonPair.id)
        .where(*conditions)
        .order_by(
            ComparisonPair.judgment_count,
            ComparisonPair.priority.desc(),
            ComparisonPair.created_at,
            ComparisonPair.id,
        )
        .limit(1)
    )


@cache
def _claim_statement(gold: bool) -> Select[ComparisonPair]:
    """The best pair with its content, locked, skipping pairs others hold (see `_claim_pair`)."""
    return _queue_head(_PAIR_WITH_CONTENT, gold).with_for_update(
        of=ComparisonPair, skip_locked=True
    )


@cache
def _candidate_statement(gold: bool) -> Select[int]:
    """The best pair's id, without a lock (see `_claim_pair`)."""
    return _queue_head(select(ComparisonPair.id), gold)


_LOCK_PAIR_WITH_CONTENT = _PAIR_WITH_CONTENT.where(ComparisonPair.id == _PAIR).with_for_update(
    of=ComparisonPair
)


class _Full(Exception):
    """The locked candidate filled up meanwhile: start the transaction again without it."""

    def __init__(self, pair_id: int) -> None:
        self.pair_id = pair_id


def _claim_pair(
    session: Session,
    project_id: int,
    rater_id: int,
    now: datetime,
    *,
    gold: bool,
    wait: bool,
    excluded: set[int],
) -> ComparisonPair | None:
    """Lock and return the best pair of one kind that this rater may lease, or None.

    The pair comes with its prompt and responses loaded (same statement).

    Without `wait`, one `SELECT ... FOR UPDATE SKIP LOCKED` skips the pairs other transactions
    hold, so concurrent raters fan out over different pairs instead of queueing on the first
    one; it never waits. With `wait` (only when that found nothing, in a fresh transaction), the
    best candidate is read without a lock and then locked by id, so the transaction waits on
    exactly one row and holds no other pair lock meanwhile. A plain `FOR UPDATE ... LIMIT 1`
    could keep a lock on a row that failed its re-check and wait on the next one: a deadlock.

    Whether the locked pair still has room is checked by the insert of the lease (`_LEASE`).
    """
    params = {"project_id": project_id, "rater_id": rater_id, "now": now}
    if not wait:
        claim = _claim_statement(gold)
        if excluded:
            claim = claim.where(ComparisonPair.id.not_in(excluded))
        return session.scalars(claim, params).first()
    best = _candidate_statement(gold)
    if excluded:
        best = best.where(ComparisonPair.id.not_in(excluded))
    candidate = session.scalar(best, params)
    if candidate is None:
        return None
    locked = session.scalars(_LOCK_PAIR_WITH_CONTENT, {"pair_id": candidate}).one_or_none()
    if locked is None:  # deleted while we waited for it
        raise _Full(candidate)
    return locked


def _get_with_content(session: Session, assignment_id: int) -> Assignment:
    return session.scalars(
        select(Assignment).where(Assignment.id == assignment_id).options(*CONTENT)
    ).one()


def next_assignment(
    session: Session,
    project: Project | str,
    rater: User,
    *,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> Assignment | None:
    """The rater's next comparison in `project`, leased to them; None when nothing is left.

    `project` is the project or its slug (NotFound if there is none; the API's `next`, which
    then needs no statement of its own to find the project). A rater who is not on the staff of
    a staffed project gets PermissionDenied, also for a lease taken before they were removed
    (`services/staffing.py`; checked by the statement that locks the rater).

    A rater who still holds a live lease in the project gets that same assignment back, so
    reloading the page or calling the API twice never hoards pairs. Otherwise a pair is chosen
    (gold with probability `gold_rate`, else standard; then fewest judgments, highest priority,
    oldest) and leased for the project's `lease_ttl_s`, with a random side shown on the left.
    The returned assignment has its pair, prompt and responses loaded.
    """
    now = now or utcnow()
    rng = rng or _rng
    project_id: int | None = None
    settings: ProjectSettings | None = None
    if isinstance(project, Project):
        project_id, settings = project.id, project_settings(project)
    want_gold = settings is not None and rng.random() < settings.gold_rate
    postgres = session.get_bind().dialect.name == "postgresql"
    wait = False
    excluded: set[int] = set()
    for _ in range(MAX_CLAIM_TRIES):
        # A waiting try runs in a savepoint, so that a candidate that filled up meanwhile is let
        # go (rolling back to the savepoint releases its row lock) before the next one is waited
        # for. A SKIP LOCKED try needs none: a pair it found full stays locked until the call's
        # transaction ends, which blocks nobody (other claims skip locked rows, and a waiting
        # claim picks its candidate from committed rows, where that pair is full).
        attempt = session.begin_nested() if wait else None
        try:
            if project_id is None or settings is None:
                row = (
                    session.connection()
                    .execute(_LOCK_RATER_IN_PROJECT, {"rater_id": rater.id, "slug": project})
                    .first()
                )
                if row is None:
                    raise NotFound(f"project {project!r} not found")
                if not row.open and not permissions.rates_unstaffed(rater):
                    raise staffing.not_staffed(project)
                project_id = row.id
                settings = ProjectSettings.model_validate(row.settings or {})
                want_gold = rng.random() < settings.gold_rate
            else:
                open_ = session.connection().scalar(
                    _LOCK_RATER, {"rater_id": rater.id, "project_id": project_id}
                )
                if not open_ and not permissions.rates_unstaffed(rater):
                    raise staffing.not_staffed(project)
            # On the session's connection: a plain id, so none of the ORM's result handling.
            current = session.connection().scalar(
                _CURRENT_LEASE, {"rater_id": rater.id, "project_id": project_id, "now": now}
            )
            if current is not None:
                _release(attempt)
                return _get_with_content(session, current)
            pair = None
            # The kind drawn first, then the other, so "nothing left" means nothing at all.
            for gold in (want_gold, not want_gold):
                pair = _claim_pair(
                    session, project_id, rater.id, now, gold=gold, wait=wait, excluded=excluded
                )
                if pair is not None:
                    break
            if pair is None:
                _release(attempt)
                if postgres and not wait:
                    # Every open pair may just be locked by other raters: look again, waiting
                    # this time (SKIP LOCKED found nothing, so it holds no pair lock).
                    wait = True
                    continue
                return None
            shown_left = rng.choice(("a", "b"))
            expires_at = now + timedelta(seconds=settings.lease_ttl_s)
            lease = {
                "project_id": project_id,
                "pair_id": pair.id,
                "rater_id": rater.id,
                "shown_left": shown_left,
                "now": now,
                "expires_at": expires_at,
            }
            assignment_id = session.connection().scalar(_LEASE, lease)
            if assignment_id is None:
                raise _Full(pair.id)
            assignment = Assignment(
                id=assignment_id,
                project_id=project_id,
                pair_id=pair.id,
                rater_id=rater.id,
                status="leased",
                shown_left=shown_left,
                leased_at=now,
                expires_at=expires_at,
                completed_at=None,
                skip_reason=None,
            )
            make_transient_to_detached(assignment)  # the row as inserted, now in the session
            session.add(assignment)
            set_committed_value(assignment, "pair", pair)  # loaded already, with its content
            _release(attempt)
            return assignment
        except _Full as full:
            if attempt is not None:
                attempt.rollback()
            excluded.add(full.pair_id)
        except IntegrityError as exc:
            # Unreachable while _LOCK_RATER serializes the rater's calls; kept as a clear
            # answer rather than a 500 if that ever changes.
            raise Conflict("another request is assigning you work right now; try again") from exc
    # Every try found its pair filled meanwhile: heavy contention at the end of the queue.
    raise Conflict("the queue is busy right now; try again in a moment")


def _release(savepoint: SessionTransaction | None) -> None:
    if savepoint is not None:
        savepoint.commit()


def get_own_assignment(
    session: Session, assignment_id: int, rater: User, *, for_update: bool = False
) -> Assignment:
    """The rater's own assignment (optionally row-locked); NotFound for anyone else's."""
    stmt = select(Assignment).where(Assignment.id == assignment_id)
    if for_update:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    assignment = session.scalar(stmt)
    if assignment is None or assignment.rater_id != rater.id:
        raise NotFound(f"assignment {assignment_id} not found")
    return assignment


def skip_assignment(
    session: Session,
    assignment_id: int,
    rater: User,
    reason: str,
    *,
    now: datetime | None = None,
) -> Assignment:
    """Give a pair back with a reason; it never returns to this rater. Repeating is harmless."""
    now = now or utcnow()
    reason = reason.strip()
    if not reason:
        raise InvalidInput("say why you skip this comparison (a short reason)")
    if len(reason) > MAX_SKIP_REASON_CHARS:
        raise InvalidInput(f"the skip reason is longer than {MAX_SKIP_REASON_CHARS} characters")
    assignment = get_own_assignment(session, assignment_id, rater, for_update=True)
    if assignment.status == "submitted":
        raise Conflict("this comparison is already judged; it cannot be skipped")
    if assignment.status != "skipped":
        assignment.status = "skipped"
        assignment.skip_reason = reason
        assignment.completed_at = now
        session.flush()
    return assignment


def release_expired_leases(session: Session, *, now: datetime | None = None) -> int:
    """Mark leases past their `expires_at` as expired; returns how many. Safe to run anytime.

    Queries already treat such leases as dead, so this only tidies the status column (and the
    `ix_assignments_live` index). Rows a submit or skip holds right now are left for the next
    sweep (SKIP LOCKED), so the sweep never waits on, or deadlocks with, a rater.
    """
    now = now or utcnow()
    stale = (
        select(Assignment.id)
        .where(Assignment.status == "leased", Assignment.expires_at <= now)
        .with_for_update(skip_locked=True)
    )
    result = session.execute(
        update(Assignment)
        .where(Assignment.id.in_(stale.scalar_subquery()))
        .values(status="expired")
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def rater_counts(
    session: Session, project: Project, rater: User, *, now: datetime | None = None
) -> RaterCounts:
    """Judgments the rater stored today (UTC) and pairs still open to them, current one included."""
    now = now or utcnow()
    start_of_day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    done_today = session.scalar(
        select(func.count())
        .select_from(Judgment)
        .where(
            Judgment.project_id == project.id,
            Judgment.rater_id == rater.id,
            Judgment.created_at >= start_of_day,
        )
    )
    untouched = session.scalar(
        select(func.count())
        .select_from(ComparisonPair)
        .where(
            ComparisonPair.project_id == project.id,
            or_(
                ComparisonPair.gold_choice.is_not(None),
                ComparisonPair.judgment_count < ComparisonPair.required_judgments,
            ),
            ComparisonPair.rating_removed_at.is_(None),
            _untouched_by(rater.id, project.id),
        )
    )
    holding = session.scalar(
        select(func.count())
        .select_from(Assignment)
        .where(
            Assignment.project_id == project.id,
            Assignment.rater_id == rater.id,
            is_live(now),
        )
    )
    return RaterCounts(done_today=done_today or 0, left=(untouched or 0) + (holding or 0))
