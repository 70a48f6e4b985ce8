"""Reading a project's data for the console: the prompt browser and the page of one prompt.

    filters (search, source, has responses, judged, flagged, held out)
        ──► one keyset page of 50 prompt rows, newest first (never OFFSET)
        ──► their counts of responses, pairs, judgments and flags: two grouped queries
        ──► how many prompts match, counted up to COUNT_CAP

Sized for a project of 100,000 prompts and 1,000,000 judgments on PostgreSQL. Every filter is a
condition in SQL, so they compose and a page stops reading once it has its rows: EXISTS
subqueries on indexed foreign keys (`responses.prompt_id`, `comparison_pairs.prompt_id`,
`judgments.pair_id`); held out, a hash of the prompt's id rather than a column, is computed
while the rows are read (see `_heldout_condition`). The per-row figures are read for the page's
ids only, in grouped queries, so a page costs the same number of statements whatever it shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

from sqlalchemy import (
    ColumnElement,
    LargeBinary,
    Select,
    String,
    and_,
    case,
    exists,
    false,
    func,
    literal,
    literal_column,
    or_,
    select,
    true,
)
from sqlalchemy.orm import Session

from app.models import ComparisonPair, Judgment, ModelVersion, Project, Prompt, Response, User
from app.services import judgments
from app.services.errors import FieldError, InvalidInput, NotFound
from app.services.evaluation import is_heldout
from app.services.projects import project_settings
from app.services.prompts import prompt_messages

PAGE_SIZE = 50
# The browser's count stops here ("10,000+"): counting every match of a broad filter over
# 100,000 prompts would cost more than the page itself.
COUNT_CAP = 10_000
# Characters of a prompt's text the table shows (the cell clips further, with an ellipsis).
CLIP_CHARS = 200

Tri = Literal["any", "yes", "no"]
TRI: tuple[Tri, ...] = ("any", "yes", "no")
GOLD_CHOICES = ("a", "b", "tie", "both_bad")


# --- filters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFilter:
    """What the browser is asked to show. Every field's default shows everything."""

    q: str = ""
    source: str = ""
    responses: Tri = "any"
    judged: Tri = "any"
    flagged: Literal["any", "yes"] = "any"
    heldout: Tri = "any"

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> PromptFilter:
        """The filter of a query string. A value the form cannot send (a hand-edited link)
        reads as its default rather than an error: the page then shows what it filtered by."""

        def tri(name: str) -> Tri:
            value = params.get(name, "any")
            return cast(Tri, value) if value in TRI else "any"

        return cls(
            q=params.get("q", "").strip()[:200],
            source=params.get("source", "").strip()[:64],
            responses=tri("responses"),
            judged=tri("judged"),
            flagged="yes" if params.get("flagged") == "yes" else "any",
            heldout=tri("heldout"),
        )

    def params(self) -> dict[str, str]:
        """The query parameters that differ from the defaults (for links that keep the filter)."""
        default = PromptFilter()
        return {
            name: str(getattr(self, name))
            for name in ("q", "source", "responses", "judged", "flagged", "heldout")
            if getattr(self, name) != getattr(default, name)
        }

    @property
    def active(self) -> bool:
        return bool(self.params())


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _flags_set(dialect: str) -> ColumnElement[bool]:
    """A judgment carries at least one flag (`flags` is a JSON array, never null)."""
    if dialect == "postgresql":
        # Compared with the empty array rather than by length: the planner knows from the
        # column's statistics how rare flagged judgments are, and picks its plan accordingly.
        return Judgment.flags != literal_column("'[]'::jsonb")
    return func.json_array_length(Judgment.flags) > 0


def _message_contains(dialect: str, pattern: str) -> ColumnElement[bool]:
    """A chat prompt has a message whose content contains the pattern (case-insensitive).

    The contents are read out of the JSON rather than searching its text, which would also
    match the keys ("role") and miss anything the JSON escapes (quotes, newlines, and on SQLite
    every non-ASCII character)."""
    if dialect == "postgresql":
        message = func.jsonb_array_elements(Prompt.messages).table_valued("value").alias("m")
        content: ColumnElement[Any] = message.c.value.op("->>")(literal("content"))
    else:
        message = func.json_each(Prompt.messages).table_valued("value").alias("m")
        content = func.json_extract(message.c.value, "$.content")
    return exists(select(literal(1)).select_from(message).where(content.ilike(pattern, "\\")))


def _judged() -> ColumnElement[bool]:
    """Some pair of the prompt has a judgment. Read from the pairs' `judgment_count`, which the
    submit transaction (and an import) keeps equal to the pair's judgments, the same counter
    the rater queue relies on: an index probe on `comparison_pairs.prompt_id` per prompt, and
    the judgments table is never read."""
    return exists(
        select(literal(1)).where(
            ComparisonPair.prompt_id == Prompt.id, ComparisonPair.judgment_count > 0
        )
    )


def _flagged(dialect: str) -> ColumnElement[bool]:
    """Some judgment of the prompt's pairs is flagged: `comparison_pairs.prompt_id`, then
    `judgments.pair_id`."""
    return exists(
        select(literal(1))
        .select_from(ComparisonPair)
        .join(Judgment, Judgment.pair_id == ComparisonPair.id)
        .where(ComparisonPair.prompt_id == Prompt.id, _flags_set(dialect))
    )


def _conditions(session: Session, project: Project, flt: PromptFilter) -> list[ColumnElement[bool]]:
    """A filter as SQL conditions on `prompts`."""
    dialect = session.get_bind().dialect.name
    conds: list[ColumnElement[bool]] = [Prompt.project_id == project.id]
    if flt.q:
        pattern = _like_pattern(flt.q)
        conds.append(
            or_(
                Prompt.text.ilike(pattern, "\\"),
                and_(Prompt.messages.is_not(None), _message_contains(dialect, pattern)),
                Prompt.external_id == flt.q,
            )
        )
    if flt.source:
        conds.append(Prompt.source == flt.source)
    if flt.responses != "any":
        has = exists(select(literal(1)).where(Response.prompt_id == Prompt.id))
        conds.append(has if flt.responses == "yes" else ~has)
    if flt.judged != "any":
        conds.append(_judged() if flt.judged == "yes" else ~_judged())
    if flt.flagged == "yes":
        conds.append(_flagged(dialect))
    if flt.heldout != "any":
        conds.append(_heldout_condition(session, project, flt.heldout == "yes"))
    return conds


def _heldout_threshold(fraction: float) -> int:
    """The smallest 64-bit draw that is not held out.

    `is_heldout` compares draw / 2**64 (a correctly rounded float, so never decreasing in the
    draw) with the fraction: the held-out draws are exactly those below this bound, which makes
    the test an integer comparison SQL can do."""
    low, high = 0, 2**64
    while low < high:
        middle = (low + high) // 2
        if middle / 2**64 >= fraction:
            high = middle
        else:
            low = middle + 1
    return low


def _sqlite_is_heldout(prompt_id: int, fraction: float, seed: int) -> int:
    return int(is_heldout(prompt_id, fraction, seed))


def _heldout_condition(session: Session, project: Project, want: bool) -> ColumnElement[bool]:
    """Prompts held out (`want`) or not, by `evaluation.is_heldout`, as a condition in SQL so it
    composes with the other filters and with LIMIT.

    PostgreSQL computes the same draw itself: the first 8 bytes of sha256("{seed}:{id}"),
    compared as a big-endian number (bytea compares bytewise) with `_heldout_threshold`.
    SQLite has no sha256, so it calls `is_heldout` itself, as a function registered on the
    connection, while it reads the rows. `tests/services/test_browse.py` checks both against
    `is_heldout`."""
    settings = project_settings(project)
    fraction, seed = settings.heldout_fraction, settings.heldout_seed
    threshold = _heldout_threshold(fraction)
    if threshold == 0 or threshold >= 2**64:  # nothing, or everything, is held out
        everything = threshold >= 2**64
        return true() if everything == want else false()
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        text = literal(f"{seed}:", String) + Prompt.id.cast(String)
        draw = func.substring(func.sha256(func.convert_to(text, "UTF8")), 1, 8)
        bound = literal(threshold.to_bytes(8, "big"), LargeBinary)
        return draw < bound if want else draw >= bound
    raw = connection.connection.driver_connection
    assert raw is not None
    raw.create_function("verdict_is_heldout", 3, _sqlite_is_heldout, deterministic=True)
    held = func.verdict_is_heldout(Prompt.id, fraction, seed)
    return held == (1 if want else 0)


# --- the browser ------------------------------------------------------------------------------


@dataclass
class PromptRow:
    """One line of the browser."""

    id: int
    text: str  # clipped; for a chat, its first user message
    is_chat: bool
    external_id: str | None
    source: str
    created_at: datetime
    heldout: bool
    responses: int = 0
    pairs: int = 0
    judgments: int = 0
    flagged: bool = False


@dataclass
class PromptPage:
    """One page of the browser, and where the pages around it start."""

    rows: list[PromptRow]
    total: int  # matching prompts, counted up to COUNT_CAP
    total_capped: bool  # more than COUNT_CAP match
    newer_before: int | None  # `before` of the previous (newer) page, if there is one
    older_after: int | None  # `after` of the next (older) page, if there is one
    sources: list[str] = field(default_factory=list)

    @property
    def total_label(self) -> str:
        return f"{COUNT_CAP:,}+" if self.total_capped else f"{self.total:,}"


def _row_columns() -> Select[Any]:
    return select(
        Prompt.id,
        func.substr(Prompt.text, 1, CLIP_CHARS).label("clip"),
        Prompt.messages,
        Prompt.external_id,
        Prompt.source,
        Prompt.created_at,
    )


def _clip(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= CLIP_CHARS else flat[: CLIP_CHARS - 1] + "…"


def _first_user_message(messages: list[dict[str, str]] | None) -> str:
    for message in messages or []:
        if message.get("role") == "user":
            return message.get("content", "")
    return (messages or [{}])[0].get("content", "")


def list_prompts(
    session: Session,
    project: Project,
    flt: PromptFilter,
    *,
    after: int | None = None,
    before: int | None = None,
    page_size: int = PAGE_SIZE,
    with_sources: bool = True,
) -> PromptPage:
    """One page of the project's prompts matching `flt`, newest first, with their figures.

    Keyset pagination: `after` gives the page of prompts older than that id (the next page),
    `before` the page of those newer (the previous page); with neither, the newest. Costs a
    fixed number of statements whatever the page shows: its rows, two grouped queries for their
    figures, the count (left out when a first page that is not full already says it) and, with
    `with_sources`, the project's sources for the filter form."""
    conds = _conditions(session, project, flt)
    newer = before is not None and after is None
    if newer:
        conds.append(Prompt.id > before)
        order = Prompt.id.asc()
    else:
        if after is not None:
            conds.append(Prompt.id < after)
        order = Prompt.id.desc()
    found = list(session.execute(_row_columns().where(*conds).order_by(order).limit(page_size + 1)))
    more = len(found) > page_size
    found = found[:page_size]
    if newer:
        found.reverse()

    settings = project_settings(project)
    rows = [
        PromptRow(
            id=r.id,
            text=_clip(r.clip if r.clip is not None else _first_user_message(r.messages)),
            is_chat=r.clip is None,
            external_id=r.external_id,
            source=r.source,
            created_at=r.created_at,
            heldout=is_heldout(r.id, settings.heldout_fraction, settings.heldout_seed),
        )
        for r in found
    ]
    _add_figures(session, rows)
    if after is None and before is None and not more:
        total, capped = len(rows), False  # the whole result is on this page
    else:
        total, capped = count_prompts(session, project, flt)
    ids = [r.id for r in rows]
    if newer:
        newer_before = max(ids) if more else None
        older_after = min(ids) if ids else before
    else:
        newer_before = max(ids) if after is not None and ids else None
        older_after = min(ids) if more else None
    return PromptPage(
        rows=rows,
        total=total,
        total_capped=capped,
        newer_before=newer_before,
        older_after=older_after,
        sources=project_sources(session, project) if with_sources else [],
    )


def _add_figures(session: Session, rows: list[PromptRow]) -> None:
    """Fill each row's counts of responses, pairs and judgments and its flag marker: two
    grouped queries over the page's ids."""
    if not rows:
        return
    ids = [r.id for r in rows]
    by_id = {r.id: r for r in rows}
    responses = session.execute(
        select(Response.prompt_id, func.count())
        .where(Response.prompt_id.in_(ids))
        .group_by(Response.prompt_id)
    )
    for prompt_id, n in responses:
        by_id[prompt_id].responses = n
    flagged = case((_flags_set(session.get_bind().dialect.name), 1), else_=0)
    pairs = session.execute(
        select(
            ComparisonPair.prompt_id,
            func.count(func.distinct(ComparisonPair.id)),
            func.count(Judgment.id),
            func.coalesce(func.max(flagged), 0),
        )
        .outerjoin(Judgment, Judgment.pair_id == ComparisonPair.id)
        .where(ComparisonPair.prompt_id.in_(ids))
        .group_by(ComparisonPair.prompt_id)
    )
    for prompt_id, n_pairs, n_judgments, any_flag in pairs:
        row = by_id[prompt_id]
        row.pairs, row.judgments, row.flagged = n_pairs, n_judgments, bool(any_flag)


def count_prompts(
    session: Session, project: Project, flt: PromptFilter, *, cap: int = COUNT_CAP
) -> tuple[int, bool]:
    """(how many prompts match `flt`, whether more than `cap` do). Counting stops after
    `cap` + 1 matches, so a broad filter costs no more than reading that many index entries."""
    matching = select(Prompt.id).where(*_conditions(session, project, flt)).limit(cap + 1)
    n = session.scalar(select(func.count()).select_from(matching.subquery())) or 0
    return min(n, cap), n > cap


def project_sources(session: Session, project: Project) -> list[str]:
    """The distinct `source` values of the project's prompts (the browser's source filter)."""
    return list(
        session.scalars(
            select(Prompt.source)
            .where(Prompt.project_id == project.id)
            .distinct()
            .order_by(Prompt.source)
        )
    )


# --- one prompt ---------------------------------------------------------------------------------


@dataclass
class ResponseView:
    response: Response
    version: ModelVersion | None  # the model version of ours that wrote it, if one did


@dataclass
class JudgmentView:
    judgment: Judgment
    rater_email: str | None  # None for imported judgments (they carry a source)

    @property
    def label(self) -> str:
        return choice_label(self.judgment.choice, self.judgment.strength)


@dataclass
class PairView:
    pair: ComparisonPair
    judgments: list[JudgmentView]


@dataclass
class PromptDetail:
    """Everything the prompt page shows, read in four statements."""

    prompt: Prompt
    turns: list[dict[str, str]]
    heldout: bool
    responses: list[ResponseView]
    pairs: list[PairView]

    def response_number(self, response_id: int) -> int:
        """The response's 1-based place on the page (pairs name their responses by it)."""
        for i, view in enumerate(self.responses, 1):
            if view.response.id == response_id:
                return i
        return 0

    @property
    def judgment_count(self) -> int:
        return sum(len(p.judgments) for p in self.pairs)


def choice_label(choice: str, strength: int | None) -> str:
    """A judgment in the rater page's words: "A much better", "About the same", "Both bad".

    The words are those of the page's scale (`judgments.SCALE`): strength 2 is "much better"."""
    if choice == "both_bad":
        return "Both bad"
    if choice == "tie":
        return "About the same"
    strengths = {s: "much better" if s == 2 else "better" for _, s in judgments.SCALE.values() if s}
    return f"{choice.upper()} {strengths.get(strength or 1, 'better')}"


def prompt_detail(session: Session, project: Project, prompt_id: int) -> PromptDetail:
    """A prompt of the project with its responses (and the versions that wrote them), its pairs
    and every judgment of them with the rater's email. NotFound for another project's prompt."""
    prompt = session.scalar(
        select(Prompt).where(Prompt.id == prompt_id, Prompt.project_id == project.id)
    )
    if prompt is None:
        raise NotFound(f"prompt {prompt_id} is not in project {project.slug!r}")
    responses = [
        ResponseView(response, version)
        for response, version in session.execute(
            select(Response, ModelVersion)
            .outerjoin(ModelVersion, ModelVersion.id == Response.model_version_id)
            .where(Response.prompt_id == prompt.id)
            .order_by(Response.id)
        )
    ]
    pairs = {
        pair.id: PairView(pair, [])
        for pair in session.scalars(
            select(ComparisonPair)
            .where(ComparisonPair.prompt_id == prompt.id)
            .order_by(ComparisonPair.id)
        )
    }
    rows = session.execute(
        select(Judgment, User.email)
        .join(ComparisonPair, ComparisonPair.id == Judgment.pair_id)
        .outerjoin(User, User.id == Judgment.rater_id)
        .where(ComparisonPair.prompt_id == prompt.id)
        .order_by(Judgment.pair_id, Judgment.id)
    )
    for judgment, email in rows:
        pairs[judgment.pair_id].judgments.append(JudgmentView(judgment, email))
    settings = project_settings(project)
    return PromptDetail(
        prompt=prompt,
        turns=prompt_messages(prompt),
        heldout=is_heldout(prompt.id, settings.heldout_fraction, settings.heldout_seed),
        responses=responses,
        pairs=list(pairs.values()),
    )


def project_pair(session: Session, project: Project, pair_id: int) -> ComparisonPair:
    """A pair of the project (NotFound for another project's)."""
    pair = session.scalar(
        select(ComparisonPair).where(
            ComparisonPair.id == pair_id, ComparisonPair.project_id == project.id
        )
    )
    if pair is None:
        raise NotFound(f"pair {pair_id} is not in project {project.slug!r}")
    return pair


def mark_gold(
    session: Session, pair: ComparisonPair, choice: str | None, *, actor_id: int | None = None
) -> ComparisonPair:
    """Mark the pair gold with its expected answer (`a`, `b`, `tie`, `both_bad`) or unmark it
    (None), through `judgments.set_gold`, which audits the change and recomputes the pair's
    judgments' `gold_correct`."""
    if choice is not None and choice not in GOLD_CHOICES:
        raise InvalidInput(
            "invalid gold answer",
            [FieldError(None, "choice", "choose A, B, about the same, both bad, or not gold")],
        )
    return judgments.set_gold(session, pair.id, choice, actor_id=actor_id)
