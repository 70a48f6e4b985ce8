"""Exports: a project's preference data in the formats the field's tools read, streamed.

Every format is a writer in `FORMATS`, the format table that the API's `format` parameter, the
`verdict export` command and the console's form all read. A writer is a generator of byte
chunks that reads its rows in keyset batches (never the whole project at once), so an export
takes the same memory for a thousand judgments as for a million:

- `trl`: one training example, as `app.services.snapshots.to_examples` makes it, in TRL's
  conversational preference format (`prompt`, `chosen`, `rejected` as chat messages) plus
  `id`, `snapshot`, `margin` and `label`;
- `hh`: one training example as an HH-RLHF transcript pair (`chosen`, `rejected`);
- `raw-jsonl`, `raw-csv`: one judgment, every one the filter selects, with its rater, choice,
  timings, sides, models and gold status.

What is exported (`prepare_export`): a snapshot (exactly its judgments, under its config: what a
model trained on), or the current state, optionally narrowed to judgments made in a date range
(`since` inclusive, `until` exclusive): for `trl` and `hh` the judgments a new snapshot with the
default `SnapshotConfig` would use, for the raw formats every judgment. An export's bytes
depend only on the data and its parameters (no timestamp of the export, a fixed row order, JSON
written the same way each time), so exporting a snapshot twice gives identical files.

A stream only reads. It ends its read transaction after every batch, so an export that a slow
client reads for minutes never holds SQLite's write lock (the app begins every transaction
IMMEDIATE) nor a PostgreSQL snapshot that long: give it a session of its own, with nothing
uncommitted in it.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session, aliased

from app.kinds.data import PreferenceExample, SnapshotConfig
from app.models import ComparisonPair, DatasetSnapshot, Judgment, Project, Prompt, Response, User
from app.models.training import ModelVersion
from app.services import audit, reliability
from app.services.errors import Conflict, FieldError, InvalidInput
from app.services.snapshots import (
    _Row,
    _usable_filter,
    content_hash,
    to_examples,
    vote_rater,
)

# Judgments read per query. Large enough that the round trips do not dominate, small enough
# that a batch of ORM rows stays a few megabytes.
BATCH = 1000
# A CSV cell that starts with one of these is a formula to a spreadsheet (=1+1, @SUM(..),
# -2+3, a leading tab or carriage return that hides one): it gets a leading apostrophe.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# Excel reads a CSV without a byte-order mark in the system's code page, not UTF-8.
UTF8_BOM = "\ufeff"


@dataclass(frozen=True)
class ExportPlan:
    """A checked export request, as plain values (a stream outlives the request's session)."""

    project_id: int
    project_slug: str
    format: str
    snapshot_id: int | None
    config: SnapshotConfig
    since: datetime | None
    until: datetime | None
    pseudonymize: bool
    pseudonym_key: bytes
    max_judgment_id: int | None

    @property
    def spec(self) -> ExportFormat:
        return FORMATS[self.format]

    @property
    def filename(self) -> str:
        """`<slug>-<format>[-snapshot-N][-since-..][-until-..].<ext>`: what and which data."""
        parts = [self.project_slug, self.format]
        if self.snapshot_id is not None:
            parts.append(f"snapshot-{self.snapshot_id}")
        if self.since is not None:
            parts.append("since-" + self.since.strftime("%Y%m%dT%H%M%SZ"))
        if self.until is not None:
            parts.append("until-" + self.until.strftime("%Y%m%dT%H%M%SZ"))
        return "-".join(parts) + "." + self.spec.extension

    def filters(self) -> dict[str, Any]:
        """The parameters the audit log records (never the salt)."""
        return {
            "format": self.format,
            "snapshot": self.snapshot_id,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "pseudonymize": self.pseudonymize,
        }


@dataclass(frozen=True)
class ExportFormat:
    """A row of the format table: a name, how the file is served, and its streaming writer."""

    name: str
    description: str
    media_type: str
    extension: str
    writer: Callable[[Session, ExportPlan], Iterator[bytes]]
    # The `verdict import` format that reads the file back, if any.
    imports_as: str | None = None
    # Whether the file names raters (then `pseudonymize` applies).
    has_raters: bool = False


# --- parameters -------------------------------------------------------------------------------


def parse_when(value: str | None, field: str) -> datetime | None:
    """An ISO 8601 date or date-time → an aware UTC datetime (a date is its midnight UTC; a
    time without an offset is UTC). InvalidInput names `field` when it is not one."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            when = datetime.combine(date.fromisoformat(text), datetime.min.time())
        else:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"{field}: {value!r} is not an ISO 8601 date or date-time (2026-12-01 or"
            " 2026-12-01T09:30:00Z)",
            [FieldError(None, field, "not an ISO 8601 date or date-time")],
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def prepare_export(
    session: Session,
    project: Project,
    format: str,
    *,
    snapshot_id: int | None = None,
    since: str | None = None,
    until: str | None = None,
    pseudonymize: bool = False,
    salt: str | None = None,
    secret_key: str,
) -> ExportPlan:
    """Check an export's parameters and return its plan; nothing is streamed yet, so every
    problem is an answer of its own: InvalidInput naming the parameter, or Conflict when the
    snapshot no longer matches its judgments (the same check a training run makes).

    The pseudonyms of a raw export are HMAC-SHA256 of the rater's id keyed by `salt` when one is
    given (the same salt links several exports), otherwise by a key derived from `secret_key`
    and the export's parameters, so exporting the same thing twice gives the same file.
    """
    spec = FORMATS.get(format)
    if spec is None:
        raise InvalidInput(
            f"format: unknown export format {format!r}; use one of {', '.join(FORMATS)}",
            [FieldError(None, "format", "unknown export format")],
        )
    start, end = parse_when(since, "since"), parse_when(until, "until")
    if start is not None and end is not None and start >= end:
        raise InvalidInput(
            "since must be earlier than until (since is inclusive, until exclusive)",
            [FieldError(None, "since", "must be before the end of the range")],
        )
    if salt is not None and not pseudonymize:
        raise InvalidInput(
            "salt keys the raters' pseudonyms: ask for pseudonymize too",
            [FieldError(None, "salt", "only used with pseudonymize")],
        )
    if pseudonymize and not spec.has_raters:
        raise InvalidInput(
            f"pseudonymize: the {format} format names no raters (only the raw formats do)",
            [FieldError(None, "pseudonymize", f"not applicable to {format}")],
        )
    config = SnapshotConfig()
    max_judgment_id = None
    if snapshot_id is not None:
        snapshot = session.get(DatasetSnapshot, snapshot_id)
        if snapshot is None or snapshot.project_id != project.id:
            raise InvalidInput(
                f"snapshot: {snapshot_id} is not a snapshot of project {project.slug}",
                [FieldError(None, "snapshot", "unknown snapshot")],
            )
        if start is not None or end is not None:
            raise InvalidInput(
                "a snapshot is exported whole: leave out since and until",
                [FieldError(None, "since" if start is not None else "until", "not with snapshot")],
            )
        config = SnapshotConfig.model_validate(snapshot.config)
        max_judgment_id = snapshot.max_judgment_id
        _check_snapshot(session, snapshot, config)
    params = json.dumps(
        [project.id, format, snapshot_id, start and start.isoformat(), end and end.isoformat()],
        separators=(",", ":"),
    )
    key = (
        salt.encode()
        if salt is not None
        else hmac.new(secret_key.encode(), b"verdict-export:" + params.encode(), "sha256").digest()
    )
    return ExportPlan(
        project_id=project.id,
        project_slug=project.slug,
        format=format,
        snapshot_id=snapshot_id,
        config=config,
        since=start,
        until=end,
        pseudonymize=pseudonymize,
        pseudonym_key=key,
        max_judgment_id=max_judgment_id,
    )


def record_export(session: Session, plan: ExportPlan, *, actor_id: int | None) -> None:
    """Audit the export ("project.export", its format and filters) in the caller's unit of work."""
    audit.record(
        session,
        "project.export",
        actor_id=actor_id,
        project_id=plan.project_id,
        target=("project", plan.project_id),
        **plan.filters(),
    )


def stream_export(session: Session, plan: ExportPlan) -> Iterator[bytes]:
    """The export's bytes, batch by batch (see the module docstring for the session it needs)."""
    return plan.spec.writer(session, plan)


def pseudonym(key: bytes, rater_id: int) -> str:
    """A rater's stable pseudonym under `key`: `rater-` and 16 hex digits of an HMAC."""
    return "rater-" + hmac.new(key, str(rater_id).encode(), "sha256").hexdigest()[:16]


# --- which judgments --------------------------------------------------------------------------


def _snapshot_ids(session: Session, snapshot_id: int) -> array[int]:
    """The snapshot's judgment ids, sorted, as a packed array (8 bytes per judgment), read
    through the database's JSON functions in batches rather than decoded as one list."""
    array_of_ids = (
        select(DatasetSnapshot.judgment_ids)
        .where(DatasetSnapshot.id == snapshot_id)
        .scalar_subquery()
    )
    if session.get_bind().dialect.name == "postgresql":
        elements = func.jsonb_array_elements_text(array_of_ids).table_valued("value")
    else:
        elements = func.json_each(array_of_ids).table_valued("value")
    query = select(elements.c.value).execution_options(yield_per=10_000)
    ids = array("q", (int(value) for value in session.execute(query).scalars()))
    # Snapshots store them in id order; sort anyway rather than trust it (bisect needs it).
    if any(ids[i] >= ids[i + 1] for i in range(len(ids) - 1)):
        ids = array("q", sorted(ids))
    return ids


def _check_snapshot(session: Session, snapshot: DatasetSnapshot, config: SnapshotConfig) -> None:
    """Conflict unless the snapshot's judgments still hash to its content hash (read in
    batches of ids, in the order the hash was made: by judgment id)."""
    ids = _snapshot_ids(session, snapshot.id)
    found = 0

    def rows() -> Iterator[_Row]:
        nonlocal found
        for start in range(0, len(ids), BATCH):
            chunk = list(ids[start : start + BATCH])
            batch = _row_query(snapshot.project_id).where(Judgment.id.in_(chunk))
            for row in session.execute(batch.order_by(Judgment.id)):
                found += 1
                yield _Row(*row)

    digest = content_hash(rows(), config)
    if found != len(ids) or digest != snapshot.content_hash:
        raise Conflict(
            f"dataset snapshot {snapshot.id} no longer matches its judgments (rows were deleted"
            " or changed); it cannot be exported as it was trained on"
        )


def _row_query(project_id: int) -> Select[Judgment, ComparisonPair, Prompt, Response, Response]:
    resp_a, resp_b = aliased(Response), aliased(Response)
    return (
        select(Judgment, ComparisonPair, Prompt, resp_a, resp_b)
        .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
        .join(Prompt, ComparisonPair.prompt_id == Prompt.id)
        .join(resp_a, ComparisonPair.response_a_id == resp_a.id)
        .join(resp_b, ComparisonPair.response_b_id == resp_b.id)
        .where(Judgment.project_id == project_id)
    )


def _date_filter(plan: ExportPlan) -> list[ColumnElement[bool]]:
    clauses = []
    if plan.since is not None:
        clauses.append(Judgment.created_at >= plan.since)
    if plan.until is not None:
        clauses.append(Judgment.created_at < plan.until)
    return clauses


def _end_read(session: Session) -> None:
    # Nothing was written: ending the read transaction releases SQLite's lock and PostgreSQL's
    # snapshot while the consumer takes its time with the batch. The batch's rows are detached
    # first: a rollback expires what the session holds, and reading an expired row again would
    # cost a query per row.
    session.expunge_all()
    session.rollback()


def _selection(plan: ExportPlan, ids: array[int] | None) -> list[Any]:
    """SQL clauses (on Judgment joined to its pair) narrowing to the export's judgments: for a
    snapshot, those up to its last id (membership is checked against `ids`); otherwise the
    usable ones under the config, in the date range."""
    if ids is not None:
        return [Judgment.id <= (plan.max_judgment_id or 0)]
    return [*_usable_filter(plan.config), *_date_filter(plan)]


def _kept(plan: ExportPlan, ids: array[int] | None, judgment_id: int, flags: list[str]) -> bool:
    """What SQL cannot say: membership of the snapshot, or the config's unsafe rule (applied
    in Python, as `create_snapshot` does)."""
    if ids is not None:
        return _contains(ids, judgment_id)
    return not (plan.config.unsafe == "exclude" and "unsafe" in (flags or []))


def _pair_batches(
    session: Session, plan: ExportPlan, ids: array[int] | None
) -> Iterator[list[_Row]]:
    """The export's judgments as (pair, judgment id)-ordered batches that never split a pair,
    so that an aggregation over a pair's judgments sees all of them."""
    where = _selection(plan, ids)
    last_pair = 0
    while True:
        pair_ids = list(
            session.scalars(
                select(Judgment.pair_id)
                .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
                .where(Judgment.project_id == plan.project_id, Judgment.pair_id > last_pair, *where)
                .group_by(Judgment.pair_id)
                .order_by(Judgment.pair_id)
                .limit(BATCH)
            )
        )
        if not pair_ids:
            _end_read(session)
            return
        query = _row_query(plan.project_id).where(
            Judgment.pair_id > last_pair, Judgment.pair_id <= pair_ids[-1], *where
        )
        batch = [
            r
            for r in (
                _Row(*row) for row in session.execute(query.order_by(Judgment.pair_id, Judgment.id))
            )
            if _kept(plan, ids, r.judgment.id, r.judgment.flags)
        ]
        last_pair = pair_ids[-1]
        _end_read(session)
        yield batch


def _contains(ids: array[int], value: int) -> bool:
    i = bisect_left(ids, value)
    return i < len(ids) and ids[i] == value


def _global_estimate(
    session: Session, plan: ExportPlan, ids: array[int] | None
) -> reliability.ReliabilityEstimate:
    """The reliability model over every decisive vote of the export, from a light (pair, rater,
    choice) query, so that batches are labelled as one `to_examples` call over all the rows
    would label them. The model holds its votes in memory: this aggregation is the one export
    whose memory grows with the data (one small object a decisive judgment)."""
    query = (
        select(
            Judgment.id, Judgment.pair_id, Judgment.rater_id, Judgment.source, Judgment.choice,
            Judgment.flags,
        )
        .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
        .where(
            Judgment.project_id == plan.project_id,
            Judgment.choice.in_(("a", "b")),
            *_selection(plan, ids),
        )
        .execution_options(yield_per=10_000)
    )  # fmt: skip
    votes = [
        reliability.Vote(pair_id, vote_rater(rater_id, source), "a" if choice == "a" else "b")
        for jid, pair_id, rater_id, source, choice, flags in session.execute(query)
        if _kept(plan, ids, jid, flags)
    ]
    _end_read(session)
    return reliability.estimate(votes)


def _examples(session: Session, plan: ExportPlan) -> Iterator[tuple[str, PreferenceExample]]:
    """(id, example) for every training example the export holds, pair by pair; the id is the
    example's pair and its rank among that pair's examples (`pair:12/0`)."""
    ids = _snapshot_ids(session, plan.snapshot_id) if plan.snapshot_id is not None else None
    estimate = None
    if plan.config.aggregate == "reliability":
        estimate = _global_estimate(session, plan, ids)
    for batch in _pair_batches(session, plan, ids):
        rank: dict[str, int] = {}
        for example in to_examples(batch, plan.config, estimate=estimate):
            n = rank.get(example.pair, 0)
            rank[example.pair] = n + 1
            yield f"{example.pair}/{n}", example


def _json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def _chunked(lines: Iterable[str], size: int = BATCH) -> Iterator[bytes]:
    buffer: list[str] = []
    for line in lines:
        buffer.append(line)
        if len(buffer) >= size:
            yield "".join(buffer).encode()
            buffer = []
    if buffer:
        yield "".join(buffer).encode()


def write_trl(session: Session, plan: ExportPlan) -> Iterator[bytes]:
    """TRL's conversational preference rows: `datasets.load_dataset("json", ...)` reads them
    and `RewardTrainer` (which also reads `margin`) and `DPOTrainer` take them as they are.
    `label` is the probability that `chosen` is the better answer (1.0 unless the config made
    soft labels); TRL's trainers ignore it."""

    def lines() -> Iterator[str]:
        for key, ex in _examples(session, plan):
            yield _json_line(
                {
                    "id": key,
                    "snapshot": plan.snapshot_id,
                    "prompt": ex.prompt,
                    "chosen": [{"role": "assistant", "content": ex.chosen}],
                    "rejected": [{"role": "assistant", "content": ex.rejected}],
                    "margin": ex.margin,
                    "label": ex.label,
                }
            )

    return _chunked(lines())


def hh_transcript(messages: list[dict[str, str]]) -> str:
    """Chat messages → an HH-RLHF transcript ('\\n\\nHuman: …\\n\\nAssistant: …'), the inverse of
    `imports.parse_hh_transcript`. HH-RLHF has no system turn: a system message becomes the
    start of the first Human turn."""
    out: list[str] = []
    system: list[str] = []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
            continue
        content = m["content"]
        if system and m["role"] == "user":
            content = "\n\n".join([*system, content])
            system = []
        out.append(("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ") + content)
    return "".join(out)


def write_hh(session: Session, plan: ExportPlan) -> Iterator[bytes]:
    """HH-RLHF rows `{"chosen": transcript, "rejected": transcript}`, which `verdict import`
    reads back. A tie (label 0.5) has no chosen side and is left out; a soft label below 0.5
    is written with the answers the other way round."""

    def lines() -> Iterator[str]:
        for _key, ex in _examples(session, plan):
            if ex.label == 0.5:
                continue
            chosen, rejected = (
                (ex.chosen, ex.rejected) if ex.label > 0.5 else (ex.rejected, ex.chosen)
            )
            head = hh_transcript(ex.prompt) + "\n\nAssistant: "
            yield _json_line({"chosen": head + chosen, "rejected": head + rejected})

    return _chunked(lines())


# --- raw --------------------------------------------------------------------------------------

RAW_COLUMNS = (
    "judgment_id", "created_at", "pair_id", "prompt_id", "rater", "source", "choice", "strength",
    "aspects", "rationale", "flags", "active_ms", "time_on_task_ms", "shown_left",
    "response_a_id", "response_a_model_version_id", "response_a_model_version",
    "response_a_model_name", "response_b_id", "response_b_model_version_id",
    "response_b_model_version", "response_b_model_name", "gold_choice", "gold_correct",
)  # fmt: skip


def _raw_records(session: Session, plan: ExportPlan) -> Iterator[dict[str, Any]]:
    """Every judgment the filter selects, in judgment id order, as a flat record."""
    resp_a, resp_b = aliased(Response), aliased(Response)
    mv_a, mv_b = aliased(ModelVersion), aliased(ModelVersion)
    columns = (
        Judgment.id, Judgment.created_at, Judgment.pair_id, ComparisonPair.prompt_id,
        Judgment.rater_id, User.email, Judgment.source, Judgment.choice, Judgment.strength,
        Judgment.aspects, Judgment.rationale, Judgment.flags, Judgment.active_ms,
        Judgment.time_on_task_ms, Judgment.shown_left,
        resp_a.id, resp_a.model_version_id, mv_a.name, resp_a.model_name,
        resp_b.id, resp_b.model_version_id, mv_b.name, resp_b.model_name,
        ComparisonPair.gold_choice, Judgment.gold_correct,
    )  # fmt: skip
    base = (
        select(*columns)
        .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
        .join(resp_a, ComparisonPair.response_a_id == resp_a.id)
        .join(resp_b, ComparisonPair.response_b_id == resp_b.id)
        .outerjoin(mv_a, resp_a.model_version_id == mv_a.id)
        .outerjoin(mv_b, resp_b.model_version_id == mv_b.id)
        .outerjoin(User, Judgment.rater_id == User.id)
        .where(Judgment.project_id == plan.project_id)
        .order_by(Judgment.id)
    )
    ids = _snapshot_ids(session, plan.snapshot_id) if plan.snapshot_id is not None else None
    last = 0
    position = 0
    while True:
        if ids is not None:
            chunk = list(ids[position : position + BATCH])
            position += BATCH
            rows = session.execute(base.where(Judgment.id.in_(chunk))).all() if chunk else []
        else:
            query = base.where(Judgment.id > last, *_date_filter(plan)).limit(BATCH)
            rows = session.execute(query).all()
        _end_read(session)
        if not rows:
            return
        last = rows[-1][0]
        for row in rows:
            (jid, created, pair_id, prompt_id, rater_id, email, *rest) = row
            rater = None
            if rater_id is not None:
                rater = pseudonym(plan.pseudonym_key, rater_id) if plan.pseudonymize else email
            values = [jid, created.isoformat(), pair_id, prompt_id, rater, *rest]
            yield dict(zip(RAW_COLUMNS, values, strict=True))


def write_raw_jsonl(session: Session, plan: ExportPlan) -> Iterator[bytes]:
    """One JSON object per judgment (columns `RAW_COLUMNS`; aspects and flags as JSON)."""
    return _chunked(_json_line(r) for r in _raw_records(session, plan))


def csv_cell(value: Any) -> str:
    """A value as a spreadsheet-safe CSV cell: null is empty, booleans are true/false, lists
    and objects are JSON text, and text a spreadsheet would run as a formula gets a leading
    apostrophe (OWASP's CSV-injection advice)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    text = str(value)
    if isinstance(value, str) and text.startswith(FORMULA_STARTS):
        return "'" + text
    return text


def write_raw_csv(session: Session, plan: ExportPlan) -> Iterator[bytes]:
    """RFC 4180 CSV (CRLF line ends, fields with a comma, quote or line break quoted), UTF-8
    with a byte-order mark so Excel reads it as UTF-8; cells as `csv_cell` writes them."""

    def lines() -> Iterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(RAW_COLUMNS)
        yield UTF8_BOM + buffer.getvalue()
        for record in _raw_records(session, plan):
            buffer.seek(0)
            buffer.truncate()
            writer.writerow([csv_cell(record[c]) for c in RAW_COLUMNS])
            yield buffer.getvalue()

    return _chunked(lines())


FORMATS: dict[str, ExportFormat] = {
    f.name: f
    for f in (
        ExportFormat(
            "trl",
            "training examples in TRL's conversational preference format (JSONL)",
            "application/x-ndjson",
            "jsonl",
            write_trl,
            imports_as="trl",
        ),
        ExportFormat(
            "hh",
            "training examples as HH-RLHF transcripts (JSONL)",
            "application/x-ndjson",
            "jsonl",
            write_hh,
            imports_as="hh-rlhf",
        ),
        ExportFormat(
            "raw-jsonl",
            "every judgment with its rater, timings, sides, models and gold status (JSONL)",
            "application/x-ndjson",
            "jsonl",
            write_raw_jsonl,
            has_raters=True,
        ),
        ExportFormat(
            "raw-csv",
            "every judgment as raw-jsonl, as a spreadsheet-safe CSV",
            "text/csv; charset=utf-8",
            "csv",
            write_raw_csv,
            has_raters=True,
        ),
    )
}
