"""Runs: the lifecycle of one unit of worker work, with the `runs` row as the source of truth.

    create_run ──commit──► enqueue (by task name)          cancel_run
        queued ──claim_run (conditional UPDATE)──► running ──► succeeded | failed | cancelled
                                      ▲                 │
                                      └── reaper ◄──────┘ heartbeat stopped: requeue or fail

* A task message carries only the run id; the task re-reads everything from the row.
* `claim_run` moves a row from `queued` to `running` with one conditional UPDATE and checks the
  row count, so a message delivered twice (or a stale message after a requeue) runs once.
* While a run executes, `RunHooks` (the `app.ml.hooks.Hooks` protocol) writes progress, the log
  tail and metrics, and a background thread keeps `heartbeat_at` fresh and notices cancels.
* Each kind names a handler ``"module:function"`` taking a `RunContext` and returning the run's
  result dict; `RUN_KINDS` lists them. A kind without a handler is refused with a clear 422.
"""

from __future__ import annotations

import importlib
import logging
import threading
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import new_session
from app.ml.hooks import Cancelled
from app.models import Project, Run, RunMetric, utcnow
from app.models.training import FINISHED_STATUSES, RUN_STATUSES
from app.services import audit, dispatch
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound, ServiceError

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 40
LOG_TAIL_CHARS = 8000
# A resumable run whose worker died this many times is failed instead of requeued again: the
# run itself is probably what kills the worker (out of memory, a crash in native code).
MAX_ATTEMPTS = 3
ACTIVE_STATUSES = ("queued", "running")


class BrokerUnavailable(ServiceError):
    status_code = 503


# --- kinds ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunKind:
    """How one kind of run is validated and executed.

    `handler` and `validate` are ``"module:function"`` strings, imported only when used, so the
    web process never imports torch and handler modules can import this one.
    """

    name: str
    handler: str | None
    validate: str | None = None
    queue: str = dispatch.GPU_QUEUE
    # True when running the handler again after a crash continues the work (nothing is done
    # twice): the reaper then requeues a dead run instead of failing it.
    resumable: bool = False
    unavailable: str = ""


RUN_KINDS: dict[str, RunKind] = {
    "generate": RunKind(
        "generate",
        handler="app.services.generation:execute_generation_run",
        validate="app.services.generation:validate_generation_config",
        resumable=True,
    ),
    "reward": RunKind(
        "reward",
        handler="app.services.reward_runs:execute_reward_run",
        validate="app.services.reward_runs:validate_reward_config",
        resumable=True,
    ),
    "ppo": RunKind(
        "ppo",
        handler="app.services.policy_runs:execute_ppo_run",
        validate="app.services.policy_runs:validate_ppo_config",
        resumable=True,
    ),
    "dpo": RunKind(
        "dpo",
        handler="app.services.policy_runs:execute_dpo_run",
        validate="app.services.policy_runs:validate_dpo_config",
        resumable=True,
    ),
    "evaluate": RunKind(
        "evaluate",
        handler="app.services.evaluation:execute_evaluate_run",
        validate="app.services.evaluation:validate_evaluate_config",
        resumable=True,
    ),
    # Interactive calls of the API (scoring, the playground): short runs awaited by the caller.
    "score": RunKind(
        "score",
        handler="app.services.interactive:execute_score_run",
        validate="app.services.interactive:validate_score_config",
    ),
    "sample": RunKind(
        "sample",
        handler="app.services.interactive:execute_sample_run",
        validate="app.services.interactive:validate_sample_config",
    ),
}


def register_kind(kind: RunKind) -> None:
    """Install or replace the definition of a run kind (its name must be in the schema)."""
    RUN_KINDS[kind.name] = kind


def implemented_kinds() -> list[str]:
    return [name for name, kind in RUN_KINDS.items() if kind.handler is not None]


def _resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    func: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return func


def _kind(name: str) -> RunKind:
    kind = RUN_KINDS.get(name)
    if kind is None:
        raise InvalidInput(
            f"unknown run kind {name!r}; use one of {', '.join(RUN_KINDS)}",
            [FieldError(None, "kind", "unknown run kind")],
        )
    if kind.handler is None:
        message = (
            f"run kind {name!r} is not available: {kind.unavailable}. "
            f"Implemented kinds: {', '.join(implemented_kinds())}."
        )
        raise InvalidInput(message, [FieldError(None, "kind", kind.unavailable)])
    return kind


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
) -> Run:
    """Validate, store a `queued` run, commit, then enqueue its task.

    Raises `InvalidInput` (422) for an unknown or unimplemented kind or a bad config, and
    `BrokerUnavailable` (503, with the run marked failed) when the message cannot be sent.
    """
    spec = _kind(kind)
    run = _new_run(session, project, spec, config or {}, actor_id=actor_id, trigger=trigger)
    session.commit()
    _enqueue(session, run, spec, settings)
    return run


def create_run_if_idle(
    session: Session,
    project: Project,
    kind: str,
    config: dict[str, Any] | None = None,
    *,
    settings: Settings,
    actor_id: int | None = None,
    trigger: str = "auto",
) -> Run | None:
    """Like `create_run`, but only when the project has no queued or running run of this kind.

    Returns None when one is active. Two callers at the same moment never both create one: the
    check and the insert happen under a lock on the project row (PostgreSQL) or inside SQLite's
    write lock (every transaction here begins IMMEDIATE).
    """
    spec = _kind(kind)
    session.commit()  # start a fresh transaction so the lock below covers check and insert
    if session.get_bind().dialect.name != "sqlite":
        session.execute(select(Project.id).where(Project.id == project.id).with_for_update())
    active = session.scalar(
        select(Run.id).where(
            Run.project_id == project.id, Run.kind == kind, Run.status.in_(ACTIVE_STATUSES)
        )
    )
    if active is not None:
        session.rollback()
        return None
    run = _new_run(session, project, spec, config or {}, actor_id=actor_id, trigger=trigger)
    session.commit()
    _enqueue(session, run, spec, settings)
    return run


def _new_run(
    session: Session,
    project: Project,
    spec: RunKind,
    config: dict[str, Any],
    *,
    actor_id: int | None,
    trigger: str,
) -> Run:
    if spec.validate is not None:
        config = _resolve(spec.validate)(session, project, config)
    run = Run(
        project_id=project.id,
        kind=spec.name,
        status="queued",
        config=config,
        trigger=trigger,
        created_by_id=actor_id,
        # Known before the commit, so a cancel arriving before the enqueue can still revoke it.
        task_id=uuid.uuid4().hex,
        log_tail=_line(f"queued ({trigger})"),
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
    return run


def _enqueue(session: Session, run: Run, spec: RunKind, settings: Settings) -> None:
    assert run.task_id is not None
    try:
        dispatch.enqueue(
            settings.broker_url, dispatch.RUN_TASK, [run.id], queue=spec.queue, task_id=run.task_id
        )
    except Exception as exc:
        message = f"could not queue the run: the broker at {settings.broker_url} failed ({exc})"
        session.execute(
            update(Run)
            .where(Run.id == run.id, Run.status == "queued")
            .values(status="failed", error=message, finished_at=utcnow())
        )
        session.commit()
        raise BrokerUnavailable(message) from exc


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
    """Cancel a run: a queued one ends `cancelled` now and its task is revoked; a running one
    gets its cancel flag set and stops at the worker's next safe point. 409 when it has ended."""
    queued = session.execute(
        update(Run)
        .where(Run.id == run.id, Run.status == "queued")
        .values(
            status="cancelled",
            cancel_requested=True,
            finished_at=utcnow(),
            log_tail=_append(run.log_tail, "cancelled before it started"),
        )
    )
    revoked = False
    if _rowcount(queued) == 1:
        audit.record(
            session, "run.cancel", actor_id=actor_id, project_id=run.project_id,
            target=("run", run.id), was="queued",
        )  # fmt: skip
        session.commit()
        if run.task_id:
            revoked = dispatch.revoke(settings.broker_url, run.task_id)
    else:
        running = session.execute(
            update(Run)
            .where(Run.id == run.id, Run.status == "running")
            .values(cancel_requested=True)
        )
        if _rowcount(running) != 1:
            session.rollback()
            session.refresh(run)
            raise Conflict(f"run {run.id} has already ended ({run.status}); nothing to cancel")
        audit.record(
            session, "run.cancel", actor_id=actor_id, project_id=run.project_id,
            target=("run", run.id), was="running",
        )  # fmt: skip
        session.commit()
    session.refresh(run)
    logger.info("run %s: cancel requested (revoke sent: %s)", run.id, revoked)
    return run


# --- reading progress -----------------------------------------------------------------------


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


# --- executing (called by the worker task) ----------------------------------------------------


@dataclass
class RunContext:
    """What a kind handler gets: ids and config, settings, hooks, and a session of its own.

    The handler must not keep a transaction open while it computes: on SQLite every
    transaction holds the write lock, which would block the web process and the heartbeat.
    """

    run_id: int
    project_id: int
    kind: str
    config: dict[str, Any]
    attempt: int
    settings: Settings
    session: Session
    hooks: RunHooks
    log: Callable[[str], None] = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.hooks.log


def claim_run(session: Session, run_id: int, *, task_id: str, worker: str) -> bool:
    """Move a run from `queued` to `running` for this delivery; False when it must not run.

    One conditional UPDATE decides, so of two deliveries of the same message (or a stale one
    after the reaper requeued the run under a new task id) exactly one gets rowcount 1.
    """
    now = utcnow()
    result = session.execute(
        update(Run)
        .where(
            Run.id == run_id,
            Run.status == "queued",
            Run.cancel_requested.is_(False),
            or_(Run.task_id.is_(None), Run.task_id == task_id),
        )
        .values(
            status="running",
            task_id=task_id,
            worker=worker,
            attempts=Run.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            progress_done=0,
            error=None,
        )
    )
    session.commit()
    return _rowcount(result) == 1


def execute_run(
    run_id: int,
    *,
    task_id: str,
    worker: str,
    settings: Settings,
    interrupted: Callable[[], bool] | None = None,
) -> str:
    """Run the handler of a queued run and record how it ended; returns the final status.

    `interrupted` tells the run that the worker is shutting down: a resumable run is then put
    back in the queue (it continues on the next worker start), any other run fails. An error
    in the handler marks the run failed with the message and is re-raised for the worker log.
    """
    session = new_session(settings.database_url)
    try:
        if not claim_run(session, run_id, task_id=task_id, worker=worker):
            current = session.get(Run, run_id)
            state = "missing" if current is None else f"{current.status}, task {current.task_id}"
            logger.warning(
                "run %s: delivery of task %s skipped, the run is not queued for it (%s)",
                run_id, task_id, state,
            )  # fmt: skip
            session.rollback()
            return "skipped"
        run = session.get(Run, run_id)
        assert run is not None
        spec = RUN_KINDS[run.kind]
        hooks = RunHooks(
            settings.database_url,
            run_id,
            task_id,
            heartbeat_interval_s=heartbeat_interval(settings),
            interrupted=interrupted,
            log_tail=run.log_tail,
        )
        ctx = RunContext(
            run_id=run.id,
            project_id=run.project_id,
            kind=run.kind,
            config=dict(run.config or {}),
            attempt=run.attempts,
            settings=settings,
            session=session,
            hooks=hooks,
        )
        session.commit()
        hooks.start()
        hooks.log(f"started on {worker} (attempt {run.attempts})")
        try:
            assert spec.handler is not None, f"run kind {run.kind} has no handler"
            result = _resolve(spec.handler)(ctx)
        except Cancelled:
            session.rollback()
            return _end_stopped(session, hooks, spec, settings)
        except BaseException as exc:
            session.rollback()
            hooks.log("".join(traceback.format_exception(exc, limit=-3)).rstrip())
            hooks.finish("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        hooks.finish("succeeded", result=result or {})
        return "succeeded"
    finally:
        session.close()


def _end_stopped(session: Session, hooks: RunHooks, spec: RunKind, settings: Settings) -> str:
    if hooks.cancel_seen:
        hooks.finish("cancelled")
        return "cancelled"
    if hooks.lost:
        logger.warning("run %s: stopped, another process took the run over", hooks.run_id)
        hooks.stop()
        return "lost"
    if spec.resumable:
        if hooks.requeue("the worker shut down; the run continues on the next worker"):
            _enqueue(session, get_run(session, hooks.run_id), spec, settings)
            return "queued"
        return "lost"
    hooks.finish("failed", error="the worker shut down during the run")
    return "failed"


def heartbeat_interval(settings: Settings) -> float:
    """Heartbeat (and cancel check) period: a few beats per timeout, at most 5 s apart."""
    return max(0.2, min(5.0, settings.worker_heartbeat_timeout_s / 4))


class RunHooks:
    """`app.ml.hooks.Hooks` backed by the run row, plus a heartbeat thread.

    Every write uses a short session of its own, so the handler's session and these writes
    never wait on each other's transactions. All writes are conditional on the row still being
    `running` under this task id: if the reaper took the run over, this worker stops.
    """

    def __init__(
        self,
        database_url: str,
        run_id: int,
        task_id: str,
        *,
        heartbeat_interval_s: float,
        interrupted: Callable[[], bool] | None = None,
        log_tail: str = "",
    ) -> None:
        self.database_url = database_url
        self.run_id = run_id
        self.task_id = task_id
        self.heartbeat_interval_s = heartbeat_interval_s
        self.interrupted = interrupted
        self.cancel_seen = False
        self.lost = False
        self._lines: deque[str] = deque(
            (line for line in log_tail.splitlines() if line), maxlen=LOG_TAIL_LINES
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # Hooks protocol ---------------------------------------------------------------------

    def progress(self, done: int, total: int | None, message: str = "") -> None:
        values: dict[str, Any] = {"progress_done": done, "progress_total": total}
        if message:
            values["log_tail"] = self._push(message)
        self._write(values)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        with new_session(self.database_url) as s:
            s.add_all(
                RunMetric(run_id=self.run_id, step=step, name=name, value=float(value))
                for name, value in values.items()
            )
            s.commit()

    def should_stop(self) -> bool:
        if self.interrupted is not None and self.interrupted():
            return True
        return self.cancel_seen or self.lost

    # lifecycle ---------------------------------------------------------------------------

    def log(self, message: str) -> None:
        """Add a line to the run's log tail (and the worker log)."""
        logger.info("run %s: %s", self.run_id, message)
        self._write({"log_tail": self._push(message)})

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._beat, name=f"heartbeat-run-{self.run_id}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def finish(
        self, status: str, *, error: str | None = None, result: dict[str, Any] | None = None
    ) -> None:
        """Record the end of the run (stops the heartbeat first, so it cannot race the write)."""
        self.stop()
        message = status if error is None else f"{status}: {error}"
        values: dict[str, Any] = {
            "status": status,
            "finished_at": utcnow(),
            "heartbeat_at": utcnow(),
            "log_tail": self._push(message),
        }
        if error is not None:
            values["error"] = error
        if result is not None:
            values["result"] = result
        if not self._write(values):
            logger.warning(
                "run %s: could not record %r, the run was taken over", self.run_id, status
            )

    def requeue(self, reason: str) -> bool:
        """Put the run back to `queued` under a new task id; the caller enqueues it."""
        self.stop()
        new_task_id = uuid.uuid4().hex
        ok = self._write(
            {
                "status": "queued",
                "task_id": new_task_id,
                "worker": None,
                "log_tail": self._push(f"requeued: {reason}"),
            }
        )
        if ok:
            self.task_id = new_task_id
        return ok

    # internals ---------------------------------------------------------------------------

    def _push(self, message: str) -> str:
        with self._lock:
            for line in message.splitlines() or [""]:
                self._lines.append(_line(line))
            return _trim("\n".join(self._lines))

    def _write(self, values: dict[str, Any]) -> bool:
        """UPDATE the run if it is still ours; False (and `lost`) when it is not."""
        with new_session(self.database_url) as s:
            result = s.execute(
                update(Run)
                .where(Run.id == self.run_id, Run.status == "running", Run.task_id == self.task_id)
                .values(**values)
            )
            s.commit()
        if _rowcount(result) != 1:
            self.lost = True
            return False
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval_s):
            try:
                if not self._write({"heartbeat_at": utcnow()}):
                    return
                with new_session(self.database_url) as s:
                    cancel = s.scalar(select(Run.cancel_requested).where(Run.id == self.run_id))
                    s.rollback()
                if cancel:
                    self.cancel_seen = True
            except Exception:  # a database hiccup must not kill the heartbeat for good
                logger.warning("run %s: heartbeat failed", self.run_id, exc_info=True)


# --- the reaper -------------------------------------------------------------------------------


def reap_stale_runs(
    session: Session,
    settings: Settings,
    *,
    now: datetime | None = None,
    timeout_s: float | None = None,
) -> list[Run]:
    """Deal with `running` runs whose heartbeat stopped (their worker died).

    A resumable kind is requeued (up to `MAX_ATTEMPTS` starts), a run with a pending cancel ends
    `cancelled`, anything else ends `failed` with the reason. Returns the runs it changed.
    `timeout_s=0` treats every running run as dead (used when the only worker restarts).
    """
    now = now or utcnow()
    timeout = settings.worker_heartbeat_timeout_s if timeout_s is None else timeout_s
    cutoff = now - timedelta(seconds=timeout)
    stale = list(
        session.scalars(
            select(Run).where(
                Run.status == "running",
                or_(Run.heartbeat_at.is_(None), Run.heartbeat_at <= cutoff),
            )
        )
    )
    session.commit()
    changed: list[Run] = []
    for run in stale:
        spec = RUN_KINDS.get(run.kind)
        silent = f"no heartbeat from worker {run.worker} since {_hhmmss(run.heartbeat_at)}"
        values: dict[str, Any]
        if run.cancel_requested:
            values = {"status": "cancelled", "finished_at": now}
            line = f"reaper: {silent}; the run was being cancelled, so it ends cancelled"
        elif spec is not None and spec.resumable and run.attempts < MAX_ATTEMPTS:
            values = {"status": "queued", "task_id": uuid.uuid4().hex, "worker": None}
            line = f"reaper: {silent}; requeued (attempt {run.attempts + 1} of {MAX_ATTEMPTS})"
        else:
            reason = f"the worker stopped ({silent}, over the {timeout:g} s heartbeat timeout)" + (
                f" in all {run.attempts} attempts" if run.attempts >= MAX_ATTEMPTS else ""
            )
            values = {"status": "failed", "finished_at": now, "error": reason}
            line = f"reaper: {reason}"
        values["log_tail"] = _append(run.log_tail, line)
        result = session.execute(
            update(Run)
            .where(
                Run.id == run.id,
                Run.status == "running",
                or_(Run.heartbeat_at.is_(None), Run.heartbeat_at <= cutoff),
            )
            .values(**values)
        )
        if _rowcount(result) != 1:
            session.rollback()  # it came back to life between the scan and the update
            continue
        audit.record(
            session, "run.reap", project_id=run.project_id, target=("run", run.id),
            outcome=values["status"],
        )  # fmt: skip
        session.commit()
        session.refresh(run)
        logger.warning("run %s: %s", run.id, line)
        if run.status == "queued" and spec is not None:
            try:
                _enqueue(session, run, spec, settings)
            except BrokerUnavailable:
                # _enqueue marked the run failed with the broker's error; go on with the rest.
                logger.exception("run %s: could not requeue", run.id)
                session.refresh(run)
        changed.append(run)
    return changed


# --- helpers ---------------------------------------------------------------------------------


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def _hhmmss(moment: datetime | None) -> str:
    return moment.strftime("%H:%M:%S UTC") if moment else "never"


def _line(message: str) -> str:
    return f"{utcnow():%H:%M:%S} {message}"


def _trim(text: str) -> str:
    return text[-LOG_TAIL_CHARS:]


def _append(log_tail: str, message: str) -> str:
    lines = [line for line in (log_tail or "").splitlines() if line]
    lines.append(_line(message))
    return _trim("\n".join(lines[-LOG_TAIL_LINES:]))


def is_finished(run: Run) -> bool:
    return run.status in FINISHED_STATUSES
