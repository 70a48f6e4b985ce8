"""Judgments: validating and storing a rater's verdict, idempotently; gold answers.

`a` and `b` always name the pair's responses (`response_a`, `response_b`), never screen sides;
the page converts its left/right answer with `from_screen` before calling the same `submit`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from sqlalchemy import Integer, Table, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

from app.models import Assignment, ComparisonPair, Judgment, Project, User, utcnow
from app.models.base import UTCDateTime
from app.models.projects import CHOICES
from app.services import audit, permissions, staffing
from app.services.assignment import is_live
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound
from app.services.projects import ProjectSettings
from app.services.staffing import open_to

FLAGS = ("unsafe", "personal_data", "broken")
ASPECT_VALUES = ("a", "b", "tie")
MAX_RATIONALE_CHARS = 10_000
# The page's 1-5 scale and 0 (both bad), as (side, strength) with side "left"/"right"/None.
SCALE: dict[int, tuple[str | None, int | None]] = {
    1: ("left", 2),
    2: ("left", 1),
    3: (None, None),
    4: ("right", 1),
    5: ("right", 2),
}


@dataclass(frozen=True)
class JudgmentInput:
    """A verdict as submitted (API) or converted from the page (`from_screen`)."""

    choice: str
    strength: int | None = None
    aspects: Mapping[str, str] = field(default_factory=dict)
    rationale: str = ""
    flags: Sequence[str] = ()
    active_ms: int | None = None

    def content(self) -> tuple[object, ...]:
        """What makes two submits the same answer (timings may differ between retries)."""
        return (
            self.choice,
            self.strength,
            tuple(sorted(self.aspects.items())),
            self.rationale,
            tuple(sorted(self.flags)),
        )


def _content_of(judgment: Judgment) -> tuple[object, ...]:
    return JudgmentInput(
        choice=judgment.choice,
        strength=judgment.strength,
        aspects=judgment.aspects or {},
        rationale=judgment.rationale or "",
        flags=judgment.flags or [],
    ).content()


def validate(data: JudgmentInput, settings: ProjectSettings) -> JudgmentInput:
    """Check a verdict against the rules and the project's settings; return it normalized."""
    errors: list[FieldError] = []

    def err(name: str, message: str) -> None:
        errors.append(FieldError(None, name, message))

    if data.choice not in CHOICES:
        err("choice", f"must be one of {', '.join(CHOICES)}")
    if data.choice in ("a", "b"):
        if data.strength not in (1, 2):
            err("strength", "must be 1 (better) or 2 (much better) when choice is a or b")
    elif data.strength is not None:
        err("strength", "only a or b take a strength; leave it out for tie and both_bad")

    aspects: dict[str, str] = {}
    for name, value in data.aspects.items():
        if name not in settings.aspects:
            allowed = ", ".join(settings.aspects) or "none"
            err(f"aspects.{name}", f"not an aspect of this project (aspects: {allowed})")
        elif value not in ASPECT_VALUES:
            err(f"aspects.{name}", "must be a, b or tie")
        else:
            aspects[name] = value

    rationale = data.rationale.strip()
    if len(rationale) > MAX_RATIONALE_CHARS:
        err("rationale", f"longer than {MAX_RATIONALE_CHARS} characters")
    if settings.require_rationale and not rationale:
        err("rationale", "this project asks for a rationale with every judgment")

    flags = sorted(set(data.flags))
    for flag in flags:
        if flag not in FLAGS:
            err("flags", f"unknown flag {flag!r} (flags: {', '.join(FLAGS)})")

    active_ms = data.active_ms
    if active_ms is not None and active_ms < 0:
        err("active_ms", "must not be negative")

    if errors:
        raise InvalidInput("the judgment is not valid", errors)
    return JudgmentInput(
        choice=data.choice,
        strength=data.strength if data.choice in ("a", "b") else None,
        aspects=aspects,
        rationale=rationale,
        flags=flags,
        active_ms=active_ms,
    )


def from_screen(
    shown_left: str,
    scale: int,
    *,
    aspects: Mapping[str, str] | None = None,
    rationale: str = "",
    flags: Sequence[str] = (),
    active_ms: int | None = None,
) -> JudgmentInput:
    """Turn the page's answer (scale 1-5 or 0, aspects as left/tie/right) into pair terms."""
    shown_right = "b" if shown_left == "a" else "a"
    sides = {"left": shown_left, "right": shown_right, "tie": "tie"}
    if scale == 0:
        choice, strength = "both_bad", None
    elif scale in SCALE:
        side, strength = SCALE[scale]
        choice = sides[side] if side else "tie"
    else:
        raise InvalidInput(
            "pick a verdict", [FieldError(None, "scale", "choose 1-5, or 0 for both bad")]
        )
    converted: dict[str, str] = {}
    for name, value in (aspects or {}).items():
        if value not in sides:
            raise InvalidInput(
                "invalid aspect answer", [FieldError(None, f"aspects.{name}", "left, tie or right")]
            )
        converted[name] = sides[value]
    return JudgmentInput(
        choice=choice,
        strength=strength,
        aspects=converted,
        rationale=rationale,
        flags=list(flags),
        active_ms=active_ms,
    )


def _replay(existing: Judgment, data: JudgmentInput) -> Judgment:
    if _content_of(existing) != data.content():
        raise Conflict(
            "this comparison is already judged with a different answer; a judgment cannot be"
            " changed by submitting again"
        )
    return existing


def _existing(session: Session, assignment_id: int) -> Judgment | None:
    return session.scalar(select(Judgment).where(Judgment.assignment_id == assignment_id))


# Built once: a submit runs these on every call (see app/services/assignment.py on why).
# With the assignment, its project's settings and whether the project's staffing still lets
# its rater in (`staffing.open_to`: a rater taken off the staff while holding a lease).
_LOCK_ASSIGNMENT = (
    select(
        Assignment,
        Project.settings,
        open_to(Assignment.project_id, Assignment.rater_id).label("open"),
    )
    .join(Project, Project.id == Assignment.project_id)
    .where(Assignment.id == bindparam("assignment_id", type_=Integer))
    .with_for_update(of=Assignment)
    .execution_options(populate_existing=True)
)
_PAIRS = cast(Table, ComparisonPair.__table__)
# Core, not the ORM's UPDATE: nothing in the session needs the new count, and the ORM's
# in-memory synchronization costs more CPU than the statement.
_COUNT_JUDGMENT = (
    update(_PAIRS)
    .where(_PAIRS.c.id == bindparam("pair_id", type_=Integer))
    .values(judgment_count=_PAIRS.c.judgment_count + 1)
    .returning(_PAIRS.c.gold_choice)
)
# The judgment and the assignment's new status are written in Core too, and the ORM objects
# are then told what the rows hold (no flush): the unit of work cost more CPU than the two
# statements it sends.
_JUDGMENTS = cast(Table, Judgment.__table__)
# ON CONFLICT DO NOTHING: a judgment of this (pair, rater) that arrived by another way (an import
# carrying the rater's id) makes the insert return no id instead of aborting the transaction.
_INSERT_JUDGMENT = {
    "postgresql": postgresql.insert(_JUDGMENTS).on_conflict_do_nothing().returning(_JUDGMENTS.c.id),
    "sqlite": sqlite.insert(_JUDGMENTS).on_conflict_do_nothing().returning(_JUDGMENTS.c.id),
}
_UNCOUNT_JUDGMENT = (
    update(_PAIRS)
    .where(_PAIRS.c.id == bindparam("pair_id", type_=Integer))
    .values(judgment_count=_PAIRS.c.judgment_count - 1)
)
_ASSIGNMENTS = cast(Table, Assignment.__table__)
_MARK_SUBMITTED = (
    update(_ASSIGNMENTS)
    .where(_ASSIGNMENTS.c.id == bindparam("assignment_id", type_=Integer))
    .values(status="submitted", completed_at=bindparam("now", type_=UTCDateTime))
)


def _lock_own_assignment(
    session: Session, assignment_id: int, rater: User
) -> tuple[Assignment, ProjectSettings, bool]:
    """The rater's assignment, row-locked, with its project's settings and whether its staffing
    lets the rater in (one statement).

    NotFound for anyone else's.
    """
    row = session.execute(_LOCK_ASSIGNMENT, {"assignment_id": assignment_id}).first()
    if row is None or row[0].rater_id != rater.id:
        raise NotFound(f"assignment {assignment_id} not found")
    return row[0], ProjectSettings.model_validate(row[1] or {}), bool(row[2])


def _count_judgment(session: Session, pair_id: int) -> str | None:
    """Add one to the pair's `judgment_count` (row-locking the pair); its gold answer."""
    gold_choice: str | None = session.execute(_COUNT_JUDGMENT, {"pair_id": pair_id}).scalar_one()
    return gold_choice


def submit(
    session: Session,
    assignment_id: int,
    rater: User,
    data: JudgmentInput,
    *,
    now: datetime | None = None,
) -> Judgment:
    """Store the rater's judgment for an assignment, exactly once.

    Idempotent by assignment: submitting the same answer again (also at the same moment)
    returns the stored judgment; a different answer is a Conflict. The assignment row lock
    serializes submits of one assignment; the pair row lock (taken by the counter update, or
    first of all for a late submit) keeps `judgment_count` exact and makes the "still needs
    judgments" check of a late submit race-free. A submit after the lease ran out is stored if
    the pair still has a free place (judgments plus other raters' live leases below
    `required_judgments`; gold pairs always); otherwise Conflict. A rater taken off the staff
    of the project since the lease gets PermissionDenied (`services/staffing.py`).
    """
    now = now or utcnow()
    assignment, settings, staffed_in = _lock_own_assignment(session, assignment_id, rater)
    clean = validate(data, settings)
    if assignment.status == "submitted":
        # Only a submit stores a judgment with an assignment, and it marks the assignment
        # submitted in the same transaction. Read by a new statement: if the lock above
        # waited for that submit, the locking statement's snapshot predates its judgment.
        existing = _existing(session, assignment.id)
        if existing is not None:
            return _replay(existing, clean)
    # After the replay: a retry of a judgment stored before the rater left the staff still
    # gets its judgment back; a new one is refused.
    if not staffed_in and not permissions.rates_unstaffed(rater):
        raise staffing.not_staffed()
    if assignment.status == "skipped":
        raise Conflict("you skipped this comparison; a skipped comparison cannot be judged")
    live = assignment.status == "leased" and assignment.expires_at > now
    if not live:
        # The lease no longer holds a place: lock the pair, then count in a new statement.
        pair = session.scalars(
            select(ComparisonPair)
            .where(ComparisonPair.id == assignment.pair_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one()
        if pair.gold_choice is None:
            _check_room_for_late_submit(session, assignment, pair, now)
    # A live lease already counts in the pair's total; judging turns it into a judgment.
    gold_choice = _count_judgment(session, assignment.pair_id)
    time_on_task_ms = max(0, int((now - assignment.leased_at).total_seconds() * 1000))
    row = {
        "project_id": assignment.project_id,
        "pair_id": assignment.pair_id,
        "rater_id": rater.id,
        "assignment_id": assignment.id,
        "choice": clean.choice,
        "strength": clean.strength,
        "aspects": dict(clean.aspects),
        "rationale": clean.rationale,
        "flags": list(clean.flags),
        "shown_left": assignment.shown_left,
        "time_on_task_ms": time_on_task_ms,
        # The page can only be active while the rater held it.
        "active_ms": None if clean.active_ms is None else min(clean.active_ms, time_on_task_ms),
        "gold_correct": None if gold_choice is None else clean.choice == gold_choice,
        "source": "rater",
        "extra": {},
        "created_at": now,
    }
    insert = _INSERT_JUDGMENT[session.get_bind().dialect.name]
    judgment_id = session.execute(insert, row).scalar()
    if judgment_id is None:
        # Only reachable if a judgment for this (pair, rater) arrived by another way (an import
        # carrying the rater's id): the unique constraints keep the table right.
        session.execute(_UNCOUNT_JUDGMENT, {"pair_id": assignment.pair_id})
        existing = _existing(session, assignment_id)
        if existing is not None:
            return _replay(existing, data)
        raise Conflict("you have already judged this comparison")
    judgment = Judgment(id=judgment_id, **row)
    make_transient_to_detached(judgment)  # as if loaded: in the session, nothing to flush
    session.add(judgment)
    session.execute(_MARK_SUBMITTED, {"assignment_id": assignment.id, "now": now})
    set_committed_value(assignment, "status", "submitted")
    set_committed_value(assignment, "completed_at", now)
    return judgment


def _check_room_for_late_submit(
    session: Session, assignment: Assignment, pair: ComparisonPair, now: datetime
) -> None:
    live_others = session.scalar(
        select(func.count())
        .select_from(Assignment)
        .where(Assignment.pair_id == pair.id, Assignment.id != assignment.id, is_live(now))
    )
    if pair.judgment_count + (live_others or 0) >= pair.required_judgments:
        raise Conflict(
            "your time on this comparison ran out at "
            f"{assignment.expires_at:%H:%M} UTC and other raters have since judged it, so this"
            " judgment was not stored. Your answer is still on the page; go on to the next"
            " comparison when ready."
        )


def set_gold(
    session: Session, pair_id: int, choice: str | None, *, actor_id: int | None = None
) -> ComparisonPair:
    """Mark a pair as gold with its expected answer (None unmarks it).

    Judgments already stored for the pair get `gold_correct` recomputed, so a rater's gold
    record does not depend on when the admin marked the pair.
    """
    if choice is not None and choice not in CHOICES:
        raise InvalidInput(
            "invalid gold answer",
            [FieldError(None, "choice", f"must be one of {', '.join(CHOICES)}, or null")],
        )
    pair = session.scalars(
        select(ComparisonPair)
        .where(ComparisonPair.id == pair_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if pair is None:
        raise NotFound(f"pair {pair_id} not found")
    pair.gold_choice = choice
    session.flush()
    session.execute(
        update(Judgment)
        .where(Judgment.pair_id == pair.id)
        .values(gold_correct=None if choice is None else Judgment.choice == choice)
        .execution_options(synchronize_session=False)
    )
    audit.record(
        session,
        "pair.gold",
        actor_id=actor_id,
        project_id=pair.project_id,
        target=("pair", pair.id),
        choice=choice,
    )
    return pair
