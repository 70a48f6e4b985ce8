"""Moderation: the queue of flagged content and what an admin does about it.

Raters flag a pair's content (the prompt and its two responses) while judging it: a judgment's
`flags` is a subset of `judgments.FLAGS` (unsafe, personal data, broken). A pair is **open**
while it has a flagged judgment made after its `moderated_at` (or it was never moderated);
**moderated** once an admin acted on it and no flag came in since (the history view).

The four actions, each setting `moderated_at` (the flags so far were reviewed) and audited as
"moderation.<action>" with the actor, the reason and the pair ids:

- `resolve`: nothing else changes (a false alarm, or fixed elsewhere);
- `exclude`: `training_excluded_at`; the pair is still rated, its judgments (past and future)
  are left out of new snapshots (`snapshots._usable_filter`);
- `remove`: `rating_removed_at` and `training_excluded_at`; the rater queue never leases the
  pair again (`assignment._queue_head`). Judgments already made are kept, but not trained on.
  A lease taken before the removal is left to finish (stopping it would throw away a rater's
  half-done work and race with their submit); its judgment is excluded like the others;
- `restore`: undoes exclude and remove (both timestamps cleared).

A reason is optional for `resolve` and required for the others, which change what a model
trains on. An action names a pair, a prompt (every pair of the prompt) or a response (every
pair containing the response: flags are raised on pairs, so a bad response is dealt with by
acting on each pair it appears in). Snapshots taken earlier are immutable and keep what they
froze.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from sqlalchemy import (
    ColumnElement,
    Select,
    cast,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session, aliased

from app.models import (
    ComparisonPair,
    Judgment,
    ModelVersion,
    Project,
    Prompt,
    Response,
    User,
    utcnow,
)
from app.services import audit
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound
from app.services.judgments import FLAGS
from app.services.prompts import prompt_messages

ACTIONS = ("resolve", "exclude", "remove", "restore")
Action = Literal["resolve", "exclude", "remove", "restore"]
STATES = ("open", "moderated")
State = Literal["open", "moderated"]
TargetKind = Literal["pair", "prompt", "response"]
MAX_REASON_CHARS = 1000
PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


def _flags_set(dialect: str) -> ColumnElement[bool]:
    """A judgment carries a flag. The predicates of the partial index `ix_judgments_flagged_pair`
    (the same ones `services/browse.py` writes), so each planner can read only flagged rows."""
    if dialect == "postgresql":
        return Judgment.flags != literal_column("'[]'::jsonb")
    return func.json_array_length(Judgment.flags) > 0


def _has_flag(dialect: str, flag: str) -> ColumnElement[bool]:
    """A judgment carries this flag (`flags` is a JSON array of names)."""
    if dialect == "postgresql":
        return cast(Judgment.flags, JSONB).contains([flag])
    names = func.json_each(Judgment.flags).table_valued("value").alias("f")
    return exists(select(literal(1)).select_from(names).where(names.c.value == flag))


def _unreviewed() -> ColumnElement[bool]:
    """The judgment came after the pair was last moderated (or it never was)."""
    return or_(
        ComparisonPair.moderated_at.is_(None), Judgment.created_at > ComparisonPair.moderated_at
    )


@dataclass(frozen=True)
class ResponseItem:
    id: int
    text: str
    model: str  # "name v3" for a version of ours, else the uploaded model name ("" if none)
    model_version_id: int | None


@dataclass(frozen=True)
class FlagItem:
    """One flagged judgment: who flagged what, when, and whether it came after the last review."""

    judgment_id: int
    rater_id: int | None
    rater_email: str | None  # None for an imported judgment (it has a source instead)
    flags: list[str]
    rationale: str
    created_at: datetime
    new: bool


@dataclass
class ModerationItem:
    """A pair as the moderation queue shows it."""

    pair: ComparisonPair
    prompt: Prompt
    messages: list[dict[str, str]]
    a: ResponseItem
    b: ResponseItem
    flags: list[FlagItem] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Flags per name, of the new flags for an open pair, of all for a moderated one."""
        shown = [f for f in self.flags if f.new] or self.flags
        counts = Counter(name for f in shown for name in f.flags)
        return {name: counts[name] for name in FLAGS if counts[name]}

    @property
    def status(self) -> str:
        """What moderation did to the pair: "removed", "excluded", "resolved" or "open"."""
        if self.pair.rating_removed_at is not None:
            return "removed"
        if self.pair.training_excluded_at is not None:
            return "excluded"
        return "resolved" if self.pair.moderated_at is not None else "open"


@dataclass(frozen=True)
class ModerationPage:
    items: list[ModerationItem]
    total: int
    offset: int
    limit: int
    state: State
    flag: str | None
    open_by_flag: dict[str, int]  # open pairs with each flag, the filter bar's counts

    @property
    def next_offset(self) -> int | None:
        end = self.offset + len(self.items)
        return end if end < self.total else None


def _check_filter(state: str, flag: str | None) -> None:
    if state not in STATES:
        message = f"state is one of {', '.join(STATES)}"
        raise InvalidInput(message, [FieldError(None, "state", message)])
    if flag is not None and flag not in FLAGS:
        message = f"flag is one of {', '.join(FLAGS)}"
        raise InvalidInput(message, [FieldError(None, "flag", message)])


def _flagged_judgments(
    project: Project, dialect: str, flag: str | None, *, unreviewed: bool
) -> Select[int, datetime, int]:
    """(pair_id, last flag time, flagged judgments) per pair of the project with flags."""
    stmt = (
        select(
            Judgment.pair_id.label("pair_id"),
            func.max(Judgment.created_at).label("last"),
            func.count().label("n"),
        )
        .join(ComparisonPair, ComparisonPair.id == Judgment.pair_id)
        .where(Judgment.project_id == project.id, _flags_set(dialect))
        .group_by(Judgment.pair_id)
    )
    if unreviewed:
        stmt = stmt.where(_unreviewed())
    if flag is not None:
        stmt = stmt.where(_has_flag(dialect, flag))
    return stmt


def queue(
    session: Session,
    project: Project,
    *,
    state: str = "open",
    flag: str | None = None,
    offset: int = 0,
    limit: int = PAGE_SIZE,
) -> ModerationPage:
    """One page of the moderation queue, in five queries whatever its size.

    `open`: pairs with a flag (of `flag`, if given) raised since they were last moderated, the
    most recently flagged first. `moderated`: pairs an admin acted on and nobody flagged since
    (with a flag of `flag`, if given, ever), the most recently moderated first. Each item has
    the pair's prompt, both responses and every flagged judgment with the rater's email."""
    _check_filter(state, flag)
    if offset < 0:
        raise InvalidInput("offset is 0 or more", [FieldError(None, "offset", "0 or more")])
    if not 1 <= limit <= MAX_PAGE_SIZE:
        message = f"limit is between 1 and {MAX_PAGE_SIZE}"
        raise InvalidInput(message, [FieldError(None, "limit", message)])
    dialect = session.get_bind().dialect.name
    if state == "open":
        groups = _flagged_judgments(project, dialect, flag, unreviewed=True).subquery()
        total = session.scalar(select(func.count()).select_from(groups)) or 0
        ids = list(
            session.scalars(
                select(groups.c.pair_id)
                .order_by(groups.c.last.desc(), groups.c.pair_id.desc())
                .offset(offset)
                .limit(limit)
            )
        )
    else:
        still_open = _flagged_judgments(project, dialect, None, unreviewed=True).subquery()
        conditions = [
            ComparisonPair.project_id == project.id,
            ComparisonPair.moderated_at.is_not(None),
            ComparisonPair.id.not_in(select(still_open.c.pair_id)),
        ]
        if flag is not None:
            ever = _flagged_judgments(project, dialect, flag, unreviewed=False).subquery()
            conditions.append(ComparisonPair.id.in_(select(ever.c.pair_id)))
        total = (
            session.scalar(select(func.count()).select_from(ComparisonPair).where(*conditions)) or 0
        )
        ids = list(
            session.scalars(
                select(ComparisonPair.id)
                .where(*conditions)
                .order_by(ComparisonPair.moderated_at.desc(), ComparisonPair.id.desc())
                .offset(offset)
                .limit(limit)
            )
        )
    open_by_flag = _open_by_flag(session, project, dialect)
    return ModerationPage(
        items=_items(session, ids, dialect),
        total=total,
        offset=offset,
        limit=limit,
        state=state,  # type: ignore[arg-type]  # checked by _check_filter
        flag=flag,
        open_by_flag=open_by_flag,
    )


def _open_by_flag(session: Session, project: Project, dialect: str) -> dict[str, int]:
    """Open pairs per flag name (a pair with two kinds of flag counts under each): one query
    over the flagged, unreviewed judgments, which are few."""
    rows = session.execute(
        select(Judgment.pair_id, Judgment.flags)
        .join(ComparisonPair, ComparisonPair.id == Judgment.pair_id)
        .where(Judgment.project_id == project.id, _flags_set(dialect), _unreviewed())
    )
    pairs: dict[str, set[int]] = {name: set() for name in FLAGS}
    for pair_id, flags in rows:
        for name in flags or []:
            if name in pairs:
                pairs[name].add(pair_id)
    return {name: len(ids) for name, ids in pairs.items()}


def _response_item(response: Response, version: ModelVersion | None) -> ResponseItem:
    model = f"{version.name} v{version.version}" if version else (response.model_name or "")
    return ResponseItem(response.id, response.text, model, response.model_version_id)


def _items(session: Session, pair_ids: list[int], dialect: str) -> list[ModerationItem]:
    """The pairs with their content and flagged judgments, in `pair_ids`' order (two queries)."""
    if not pair_ids:
        return []
    resp_a, resp_b = aliased(Response), aliased(Response)
    ver_a, ver_b = aliased(ModelVersion), aliased(ModelVersion)
    rows = session.execute(
        select(ComparisonPair, Prompt, resp_a, ver_a, resp_b, ver_b)
        .join(Prompt, Prompt.id == ComparisonPair.prompt_id)
        .join(resp_a, resp_a.id == ComparisonPair.response_a_id)
        .outerjoin(ver_a, ver_a.id == resp_a.model_version_id)
        .join(resp_b, resp_b.id == ComparisonPair.response_b_id)
        .outerjoin(ver_b, ver_b.id == resp_b.model_version_id)
        .where(ComparisonPair.id.in_(pair_ids))
    ).all()
    items = {
        pair.id: ModerationItem(
            pair=pair,
            prompt=prompt,
            messages=prompt_messages(prompt),
            a=_response_item(a, va),
            b=_response_item(b, vb),
        )
        for pair, prompt, a, va, b, vb in rows
    }
    flagged = session.execute(
        select(Judgment, User.email)
        .outerjoin(User, User.id == Judgment.rater_id)
        .where(Judgment.pair_id.in_(pair_ids), _flags_set(dialect))
        .order_by(Judgment.created_at, Judgment.id)
    )
    for judgment, email in flagged:
        item = items[judgment.pair_id]
        moderated_at = item.pair.moderated_at
        item.flags.append(
            FlagItem(
                judgment_id=judgment.id,
                rater_id=judgment.rater_id,
                rater_email=email,
                flags=list(judgment.flags or []),
                rationale=judgment.rationale or "",
                created_at=judgment.created_at,
                new=moderated_at is None or judgment.created_at > moderated_at,
            )
        )
    return [items[pair_id] for pair_id in pair_ids if pair_id in items]


@dataclass(frozen=True)
class Outcome:
    """What an action did: the pairs it covered and how many of them it changed."""

    action: Action
    target: tuple[str, int]
    pair_ids: list[int]
    changed: int


def _clean_reason(action: str, reason: str | None) -> str:
    reason = (reason or "").strip()
    if not reason and action != "resolve":
        message = f"say why ({action} changes what models train on; the audit log keeps it)"
        raise InvalidInput(message, [FieldError(None, "reason", message)])
    if len(reason) > MAX_REASON_CHARS:
        message = f"the reason is longer than {MAX_REASON_CHARS} characters"
        raise InvalidInput(message, [FieldError(None, "reason", message)])
    return reason


def _target_pairs(
    session: Session, project: Project, kind: TargetKind, target_id: int
) -> list[ComparisonPair]:
    """The pairs an action on a pair, a prompt or a response covers, locked (NotFound for
    another project's object; a prompt or response with no pair is a Conflict)."""
    stmt = select(ComparisonPair).where(ComparisonPair.project_id == project.id)
    if kind == "pair":
        stmt = stmt.where(ComparisonPair.id == target_id)
    elif kind == "prompt":
        stmt = stmt.where(ComparisonPair.prompt_id == target_id)
    else:
        stmt = stmt.where(
            or_(
                ComparisonPair.response_a_id == target_id,
                ComparisonPair.response_b_id == target_id,
            )
        )
    pairs = list(
        session.scalars(
            stmt.order_by(ComparisonPair.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    )
    if pairs:
        return pairs
    if kind == "pair":
        raise NotFound(f"pair {target_id} is not in project {project.slug!r}")
    owner = (
        session.scalar(select(Prompt.project_id).where(Prompt.id == target_id))
        if kind == "prompt"
        else session.scalar(
            select(Prompt.project_id)
            .join(Response, Response.prompt_id == Prompt.id)
            .where(Response.id == target_id)
        )
    )
    if owner != project.id:
        raise NotFound(f"{kind} {target_id} is not in project {project.slug!r}")
    raise Conflict(f"{kind} {target_id} is in no comparison pair: there is nothing to moderate")


def _apply(pair: ComparisonPair, action: Action, now: datetime) -> bool:
    """Set the pair's moderation columns for `action`; whether its training or rating state
    changed (resolve changes neither)."""
    before = (pair.training_excluded_at, pair.rating_removed_at)
    pair.moderated_at = now
    if action == "exclude":
        pair.training_excluded_at = pair.training_excluded_at or now
    elif action == "remove":
        pair.training_excluded_at = pair.training_excluded_at or now
        pair.rating_removed_at = pair.rating_removed_at or now
    elif action == "restore":
        pair.training_excluded_at = None
        pair.rating_removed_at = None
    return (pair.training_excluded_at, pair.rating_removed_at) != before


def moderate(
    session: Session,
    project: Project,
    target: tuple[TargetKind, int],
    action: str,
    *,
    reason: str | None = None,
    actor: User,
    now: datetime | None = None,
) -> Outcome:
    """Act on a pair, or on every pair of a prompt or containing a response (`target`), and
    record it in the audit log as "moderation.<action>" with the reason and the pair ids.

    InvalidInput for an unknown action or a missing reason (required except for resolve);
    NotFound for another project's object; Conflict for `restore` when none of the pairs is
    excluded or removed (there is nothing to undo)."""
    if action not in ACTIONS:
        message = f"action is one of {', '.join(ACTIONS)}"
        raise InvalidInput(message, [FieldError(None, "action", message)])
    act: Action = action  # type: ignore[assignment]  # checked above
    reason = _clean_reason(act, reason)
    kind, target_id = target
    pairs = _target_pairs(session, project, kind, target_id)
    if act == "restore" and not any(
        p.training_excluded_at is not None or p.rating_removed_at is not None for p in pairs
    ):
        what = f"pair {target_id} is" if kind == "pair" else f"{kind} {target_id}'s pairs are"
        raise Conflict(f"{what} neither excluded nor removed: nothing to restore")
    now = now or utcnow()
    changed = sum(_apply(pair, act, now) for pair in pairs)
    session.flush()
    pair_ids = [p.id for p in pairs]
    audit.record(
        session, f"moderation.{act}", actor_id=actor.id, project_id=project.id,
        target=(kind, target_id), reason=reason, pair_ids=pair_ids,
        prompt_ids=sorted({p.prompt_id for p in pairs}), changed=changed,
    )  # fmt: skip
    return Outcome(act, (kind, target_id), pair_ids, changed)
