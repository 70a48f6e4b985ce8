"""Runs: creating, listing and cancelling units of worker work; the `runs` row is the truth.

    create_run ──caller commits──► task message (by name, after the commit)      cancel_run
        queued ──claimed by a worker──► running ──► succeeded | failed | cancelled
                     ▲                     │
                     └──── the reaper ◄────┘ heartbeat stopped: requeue (resumable) or fail

What a run kind is (its config, handler, queue, resumability) is defined once, in
`app.kinds.RUN_KINDS`. This module is the request-time half: it validates a config against the
kind's knob definitions and the database, stores the row and has its message sent once the
caller's transaction commits. The worker-time half (claiming, heartbeat, hooks, reaping) is
`app.jobs.runner`.
"""

from __future__ import annotations

import importlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, load_only

from app.core.config import Settings
from app.core.db import after_commit
from app.core.logs import current_request_id
from app.kinds.knobs import Knobs
from app.kinds.registry import LAUNCHABLE_KINDS, RUN_KINDS, RunKind
from app.models import DatasetSnapshot, ModelVersion, Project, Run, RunMetric, User, utcnow
from app.models.training import FINISHED_STATUSES, RUN_STATUSES
from app.services import audit, dispatch, inputs
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound, ServiceError

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 8000
ACTIVE_STATUSES = ("queued", "running")

# A kind's database check: (session, project, parsed config) -> the config to store.
Validator = Callable[[Session, Project, Any], Knobs]


class BrokerUnavailable(ServiceError):
    status_code = 503


# --- kinds and their configs --------------------------------------------------------------------


def get_kind(name: str, *, launchable_only: bool = False) -> RunKind:
    """The registry entry of kind `name`; 422 naming the accepted kinds when there is none."""
    accepted = LAUNCHABLE_KINDS if launchable_only else tuple(RUN_KINDS)
    kind = RUN_KINDS.get(name)
    if kind is None or name not in accepted:
        raise InvalidInput(
            f"unknown run kind {name!r}; use one of {', '.join(accepted)}",
            [FieldError(None, "kind", "unknown run kind")],
        )
    return kind


def config_errors(exc: ValidationError, prefix: str = "config") -> list[FieldError]:
    """Pydantic's errors as field errors named like the request: `config.batch_size`."""
    return [
        FieldError(None, ".".join([prefix, *(str(p) for p in e["loc"])]), e["msg"])
        for e in exc.errors()
    ]


def parse_config(kind: RunKind, config: dict[str, Any], prefix: str = "config") -> BaseModel:
    """`config` checked against the kind's knob definitions (422 at the field when it fails)."""
    try:
        return kind.config.model_validate(config)
    except ValidationError as exc:
        raise InvalidInput(f"invalid {kind.name} config", config_errors(exc, prefix)) from exc


def _validator(kind: RunKind) -> Validator | None:
    if kind.validate is None:
        return None
    module, _, name = kind.validate.partition(":")
    check: Validator = getattr(importlib.import_module(module), name)
    return check


def validated_config(
    session: Session, project: Project, kind: RunKind, config: dict[str, Any]
) -> dict[str, Any]:
    """The config a run of `kind` stores: parsed, checked against the database, normalised.

    The stored config is complete (every knob with its value), so a run's row says exactly what
    it trained with even when defaults change later.
    """
    parsed = parse_config(kind, config)
    check = _validator(kind)
    if check is not None:
        parsed = check(session, project, parsed)
    stored = parsed.model_dump(mode="json")
    # Texts a config carries (a playground prompt, a reason) are stored with the run.
    if (problem := inputs.value_problem(stored)) is not None:
        raise InvalidInput(f"config: {problem}", [FieldError(None, "config", problem)])
    return stored


# --- creating, listing, cancelling ------------------------------------------------------------


def create_run(
    session: Session,
    project: Project,
    kind: str,
    config: dict[str, Any] | None = None,
    *,
    settings: Settings,
    actor_id: int | None = None,
    trigger: str = "api",
    parent_run_id: int | None = None,
    launchable_only: bool = False,
    broker_errors_fail_commit: bool = True,
) -> Run:
    """Validate and add a `queued` run; its task is sent once the caller commits.

    Raises `InvalidInput` (422) for an unknown kind or a bad config. If the broker refuses the
    message after the commit, the run is marked failed and, unless
    `broker_errors_fail_commit=False` (a follow-up run whose failure must not fail the work
    that queued it), the commit raises `BrokerUnavailable` (503).
    """
    spec = get_kind(kind, launchable_only=launchable_only)
    stored = validated_config(session, project, spec, config or {})
    run = Run(
        project_id=project.id,
        kind=spec.name,
        status="queued",
        config=stored,
        trigger=trigger,
        created_by_id=actor_id,
        parent_run_id=parent_run_id,
        # Known before the commit, so a cancel arriving before the message can still revoke it.
        task_id=uuid.uuid4().hex,
        log_tail=line(_queued_message(trigger)),
    )
    session.add(run)
    session.flush()
    audit.record(
        session,
        "run.create",
        actor_id=actor_id,
        project_id=project.id,
        target=("run", run.id),
        kind=spec.name,
        trigger=trigger,
    )
    send_after_commit(session, run, settings, raise_errors=broker_errors_fail_commit)
    return run


def _queued_message(trigger: str) -> str:
    """The run's first log line; it names the HTTP request that created the run, if one did,
    so the run's log and the web logs (`request_id`) can be joined."""
    request_id = current_request_id()
    if request_id is None:
        return f"queued ({trigger})"
    return f"queued ({trigger}), created by request {request_id}"


def create_run_if_idle(
    session: Session,
    project: Project,
    kind: str,
    config: dict[str, Any] | None = None,
    *,
    settings: Settings,
    actor_id: int | None = None,
    trigger: str = "auto",
    parent_run_id: int | None = None,
    broker_errors_fail_commit: bool = True,
) -> Run | None:
    """Like `create_run`, but only when the project has no queued or running run of this kind.

    Returns None when one is active. Two callers at the same moment never both create one: the
    check and the insert happen under a lock on the project row (PostgreSQL) or inside SQLite's
    write lock (every transaction here begins IMMEDIATE), both held until the caller commits.
    """
    get_kind(kind)
    if session.get_bind().dialect.name != "sqlite":
        session.execute(select(Project.id).where(Project.id == project.id).with_for_update())
    active = session.scalar(
        select(Run.id).where(
            Run.project_id == project.id, Run.kind == kind, Run.status.in_(ACTIVE_STATUSES)
        )
    )
    if active is not None:
        return None
    return create_run(
        session, project, kind, config, settings=settings, actor_id=actor_id, trigger=trigger,
        parent_run_id=parent_run_id, broker_errors_fail_commit=broker_errors_fail_commit,
    )  # fmt: skip


def send_after_commit(
    session: Session, run: Run, settings: Settings, *, raise_errors: bool = True
) -> None:
    """Send `run`'s task message once the caller's transaction has committed.

    A worker therefore never receives a task whose row it cannot read yet. If the broker fails,
    the run is marked failed with the broker's error and `BrokerUnavailable` is raised out of
    the commit (or only logged, with `raise_errors=False`).
    """
    run_id, task_id, queue = run.id, run.task_id, RUN_KINDS[run.kind].queue
    assert task_id is not None

    def send() -> None:
        try:
            dispatch.enqueue(
                settings.broker_url, dispatch.RUN_TASK, [run_id], queue=queue, task_id=task_id
            )
        except Exception as exc:
            message = f"could not queue the run: the broker at {settings.broker_url} failed ({exc})"
            session.execute(
                update(Run)
                .where(Run.id == run_id, Run.status == "queued")
                .values(status="failed", error=message, finished_at=utcnow())
            )
            session.commit()
            if raise_errors:
                raise BrokerUnavailable(message) from exc
            logger.error("run %s: %s", run_id, message)

    after_commit(session, send)


def get_run(session: Session, run_id: int) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} not found")
    return run


def list_runs(
    session: Session,
    project: Project,
    *,
    kind: str | None = None,
    status: str | None = None,
    limit: int = 50,
) -> list[Run]:
    """The project's runs, newest first."""
    if status is not None and status not in RUN_STATUSES:
        raise InvalidInput(f"unknown status {status!r}; use one of {', '.join(RUN_STATUSES)}")
    query = select(Run).where(Run.project_id == project.id)
    if kind is not None:
        query = query.where(Run.kind == kind)
    if status is not None:
        query = query.where(Run.status == status)
    return list(session.scalars(query.order_by(Run.id.desc()).limit(limit)))


def cancel_run(
    session: Session, run: Run, *, settings: Settings, actor_id: int | None = None
) -> Run:
    """Cancel a run: a queued one ends `cancelled` (its task is revoked after the commit); a
    running one gets its cancel flag set and stops at the worker's next safe point. 409 when it
    has ended."""
    queued = session.execute(
        update(Run)
        .where(Run.id == run.id, Run.status == "queued")
        .values(
            status="cancelled",
            cancel_requested=True,
            finished_at=utcnow(),
            log_tail=append_line(run.log_tail, "cancelled before it started"),
        )
    )
    if rowcount(queued) == 1:
        was = "queued"
        if run.task_id:
            task_id = run.task_id
            after_commit(session, lambda: _revoke(settings, run.id, task_id))
    else:
        running = session.execute(
            update(Run)
            .where(Run.id == run.id, Run.status == "running")
            .values(cancel_requested=True)
        )
        if rowcount(running) != 1:
            session.refresh(run)
            raise Conflict(f"run {run.id} has already ended ({run.status}); nothing to cancel")
        was = "running"
    audit.record(
        session, "run.cancel", actor_id=actor_id, project_id=run.project_id,
        target=("run", run.id), was=was,
    )  # fmt: skip
    session.flush()
    session.refresh(run)
    return run


def retry_run(
    session: Session, run: Run, *, settings: Settings, actor_id: int | None = None
) -> Run:
    """Queue a new run of `run`'s kind with its stored config, as its child (`parent_run_id`),
    started from the console; its task is sent once the caller commits.

    The stored config is complete, so the retry trains with exactly the knobs the original did;
    it is validated again, since the rows it names (a snapshot, a reward model) may be gone.
    409 while `run` is queued or running, and for the kinds an API call starts and awaits
    (`score`, `sample`): their caller is no longer waiting for a retry.
    """
    if not is_finished(run):
        raise Conflict(f"run {run.id} is still {run.status}; cancel it or let it end first")
    if run.kind not in LAUNCHABLE_KINDS:
        raise Conflict(f"{run.kind} runs are started by the API call they answer; start a new one")
    project = session.get(Project, run.project_id)
    if project is None:
        raise NotFound(f"the project of run {run.id} is gone")
    retry = create_run(
        session, project, run.kind, dict(run.config), settings=settings, actor_id=actor_id,
        trigger="console", parent_run_id=run.id, launchable_only=True,
    )  # fmt: skip
    audit.record(
        session, "run.retry", actor_id=actor_id, project_id=project.id, target=("run", run.id),
        retry_run_id=retry.id, was=run.status,
    )  # fmt: skip
    return retry


def _revoke(settings: Settings, run_id: int, task_id: str) -> None:
    revoked = dispatch.revoke(settings.broker_url, task_id)
    logger.info("run %s: cancelled while queued (revoke sent: %s)", run_id, revoked)


# --- pages of runs, and a run's lineage -------------------------------------------------------


PAGE_SIZE = 50


def runs_page(
    session: Session,
    project: Project,
    *,
    kind: str | None = None,
    status: str | None = None,
    before: int | None = None,
    after: int | None = None,
    limit: int = PAGE_SIZE,
) -> tuple[list[tuple[Run, str | None]], int | None, int | None]:
    """One page of the project's runs, newest first, keyset-paginated by id: (run, the email
    of whoever created it) rows, and the ids to continue from for newer and older pages (None
    when there are none). The rows carry only the columns a list shows (never a run's log tail,
    config or result, which may hold sample tables); touching another raises instead of a query
    per row."""
    query = (
        select(Run, User.email)
        .outerjoin(User, User.id == Run.created_by_id)
        .where(Run.project_id == project.id)
        .options(
            load_only(
                Run.id, Run.kind, Run.status, Run.trigger, Run.created_by_id, Run.parent_run_id,
                Run.progress_done, Run.progress_total, Run.error, Run.created_at, Run.started_at,
                Run.finished_at, raiseload=True,
            )
        )
    )  # fmt: skip
    if kind is not None:
        query = query.where(Run.kind == kind)
    if status is not None:
        query = query.where(Run.status == status)
    if after is not None:
        # Going back towards the newest: read upwards from `after`, then show newest first.
        query = query.where(Run.id > after).order_by(Run.id.asc())
    else:
        if before is not None:
            query = query.where(Run.id < before)
        query = query.order_by(Run.id.desc())
    found: list[tuple[Run, str | None]] = [
        (run, email) for run, email in session.execute(query.limit(limit + 1))
    ]
    more = len(found) > limit
    found = found[:limit]
    if after is not None:
        found.reverse()
    if not found:
        return found, None, None
    newer = found[0][0].id if (more if after is not None else before is not None) else None
    older = found[-1][0].id if (more if after is None else True) else None
    return found, newer, older


@dataclass
class Lineage:
    """Where a run comes from and what came of it."""

    parent: Run | None
    children: list[Run]
    versions: list[ModelVersion]
    snapshot: dict[str, Any] | None  # id, content_hash, stats, created_at (never the ids)


def run_lineage(session: Session, run: Run) -> Lineage:
    """The run's parent run, the runs it started, the model versions it produced and its
    snapshot, each read with only the columns a link to it needs."""
    # Other runs by id, kind and status only: their logs and results are their own pages'.
    brief = load_only(Run.id, Run.kind, Run.status, raiseload=True)
    parent = None
    if run.parent_run_id is not None:
        parent = session.scalar(select(Run).where(Run.id == run.parent_run_id).options(brief))
    children = list(
        session.scalars(
            select(Run).where(Run.parent_run_id == run.id).order_by(Run.id).options(brief)
        )
    )
    versions = list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.run_id == run.id)
            .order_by(ModelVersion.id)
            .options(
                load_only(
                    ModelVersion.id, ModelVersion.kind, ModelVersion.version, ModelVersion.name,
                    ModelVersion.status, raiseload=True,
                )
            )
        )
    )  # fmt: skip
    snapshot = None
    if run.snapshot_id is not None:
        # Columns, not the row: a snapshot's judgment ids may run to a million.
        found = session.execute(
            select(
                DatasetSnapshot.id,
                DatasetSnapshot.content_hash,
                DatasetSnapshot.stats,
                DatasetSnapshot.created_at,
            ).where(DatasetSnapshot.id == run.snapshot_id)
        ).first()
        snapshot = dict(found._mapping) if found is not None else None
    return Lineage(parent, children, versions, snapshot)


# --- reading progress -----------------------------------------------------------------------


def elapsed_seconds(run: Run, now: datetime | None = None) -> float | None:
    """Seconds since the run (last) started, up to its end: the run's own clock, the same for
    every page and watcher; None while it has not started."""
    if run.started_at is None:
        return None
    end = run.finished_at or now or utcnow()
    return max(0.0, (end - run.started_at).total_seconds())


def format_duration(seconds: float | None, unknown: str = "—") -> str:
    """A duration as h:mm:ss ("0:03:07"); `unknown` when there is none."""
    if seconds is None:
        return unknown
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def eta_seconds(run: Run, now: datetime | None = None) -> float | None:
    """Seconds left at the rate observed since the run (re)started; None when unknown."""
    if run.status != "running" or run.started_at is None or not run.progress_total:
        return None
    done = run.progress_done
    if done <= 0 or done >= run.progress_total:
        return None
    elapsed = ((now or utcnow()) - run.started_at).total_seconds()
    return max(0.0, elapsed / done * (run.progress_total - done))


def run_metrics(session: Session, run: Run) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run as ``{name: [(step, value), ...]}`` in step order."""
    rows = session.execute(
        select(RunMetric.name, RunMetric.step, RunMetric.value)
        .where(RunMetric.run_id == run.id)
        .order_by(RunMetric.name, RunMetric.step, RunMetric.id)
    )
    out: dict[str, list[tuple[int, float]]] = {}
    for name, step, value in rows:
        out.setdefault(name, []).append((step, value))
    return out


def is_finished(run: Run) -> bool:
    return run.status in FINISHED_STATUSES


# --- the log tail ----------------------------------------------------------------------------


def rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def line(message: str) -> str:
    """One log-tail line, stamped with the time."""
    return f"{utcnow():%H:%M:%S} {message}"


def trim(text: str) -> str:
    return text[-LOG_TAIL_CHARS:]


def append_line(log_tail: str, message: str) -> str:
    """`log_tail` with `message` added as its newest line, kept to the last lines and chars."""
    lines = [row for row in (log_tail or "").splitlines() if row]
    lines.append(line(message))
    return trim("\n".join(lines[-LOG_TAIL_LINES:]))
