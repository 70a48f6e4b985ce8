"""The runner: how a worker executes a run of any kind, and how dead or lost runs are recovered.

    message (run id) ──claim_run──► running ──handler(ctx)──► succeeded | failed | cancelled
                                       │  RunHooks: progress, log tail, metrics, heartbeat
                                       ├─ worker shutting down: resumable → queued, resent
                                       └─ heartbeat stops (worker died): the reaper requeues

* A task message carries only the run id; the runner re-reads everything from the row.
* `claim_run` moves a row from `queued` to `running` with one conditional UPDATE and checks the
  row count, so of several deliveries of a run's messages (a duplicate, a message re-sent by the
  reaper) exactly one runs it. Claiming increments `attempts`; every write of the attempt is
  conditional on `(status running, attempts = its attempt)`, so a worker whose run was taken
  over (the reaper requeued it while the worker was only slow) stops instead of writing on.
* A run's task id is fixed when it is created: every message sent for it, the first and any
  re-sent one, carries it, and a cancel revokes them all.
* Handlers come from `app.kinds.RUN_KINDS`: "module:function" taking a `RunContext` and
  returning the run's result dict.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import after_commit, new_session
from app.kinds.registry import RUN_KINDS, RunKind
from app.ml.hooks import Cancelled
from app.models import Project, Run, RunMetric, utcnow
from app.services import audit
from app.services.generation import storable_text
from app.services.runs import (
    LOG_TAIL_LINES,
    append_line,
    line,
    rowcount,
    send_after_commit,
    trim,
)

logger = logging.getLogger(__name__)

C = TypeVar("C", bound=BaseModel)

# A resumable run whose worker died this many times is failed instead of requeued again: the
# run itself is probably what kills the worker (out of memory, a crash in native code).
MAX_ATTEMPTS = 3


# --- the context a handler gets ---------------------------------------------------------------


@dataclass
class RunContext:
    """What a kind handler gets: ids and config, settings, hooks, and a session of its own.

    The handler owns its transactions and must not keep one open while it computes: on SQLite
    every transaction holds the write lock, which would block the web process and the heartbeat.
    """

    run_id: int
    project_id: int
    kind: str
    config: BaseModel
    attempt: int
    settings: Settings
    session: Session
    hooks: RunHooks
    log: Callable[[str], None] = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.hooks.log

    def log_after_commit(self, message: str) -> None:
        """Log `message` once the handler's session commits. For what is said while that
        session holds a write (on SQLite, the log's own write would wait for its lock)."""
        after_commit(self.session, lambda: self.log(message))

    def project(self) -> Project:
        """The run's project, read in the handler's session."""
        project = self.session.get(Project, self.project_id)
        assert project is not None, f"project {self.project_id} vanished"
        return project

    def run_row(self) -> Run:
        """The run's own row, read in the handler's session (to record lineage on it)."""
        run = self.session.get(Run, self.run_id)
        assert run is not None
        return run

    def config_as(self, model: type[C]) -> C:
        """The run's config as its kind's knob class."""
        assert isinstance(self.config, model), f"{self.kind} run config is {type(self.config)}"
        return self.config


def handler_of(kind: RunKind) -> Callable[[RunContext], dict[str, Any]]:
    """The kind's handler function, imported now (this is where torch gets imported)."""
    module, _, name = kind.handler.partition(":")
    handler: Callable[[RunContext], dict[str, Any]] = getattr(importlib.import_module(module), name)
    return handler


# --- claiming and executing ---------------------------------------------------------------------


def claim_run(session: Session, run_id: int, *, worker: str) -> int | None:
    """Move a run from `queued` to `running`; returns its attempt number, or None when it must
    not run (already claimed, finished or cancelled). Commits."""
    now = utcnow()
    result = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == "queued", Run.cancel_requested.is_(False))
        .values(
            status="running",
            worker=worker,
            attempts=Run.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            progress_done=0,
            error=None,
        )
    )
    session.commit()
    if rowcount(result) != 1:
        return None
    attempt = session.scalar(select(Run.attempts).where(Run.id == run_id))
    session.commit()
    return attempt


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
    if interrupted is not None and interrupted():
        # A worker already shutting down takes no new run (on the SQLite broker it may still be
        # handed the message it re-sent for the run it just put back): the run stays queued,
        # and the next worker to start sends its message again.
        logger.info(
            "run %s: delivery of task %s left queued, the worker is stopping", run_id, task_id
        )
        return "skipped"
    session = new_session(settings.database_url)
    try:
        attempt = claim_run(session, run_id, worker=worker)
        if attempt is None:
            current = session.get(Run, run_id)
            state = "missing" if current is None else current.status
            logger.info(
                "run %s: delivery of task %s skipped, the run is %s", run_id, task_id, state
            )
            session.rollback()
            return "skipped"
        run = session.get(Run, run_id)
        assert run is not None
        spec = RUN_KINDS[run.kind]
        hooks = RunHooks(
            settings.database_url,
            run_id,
            attempt,
            heartbeat_interval_s=heartbeat_interval(settings),
            interrupted=interrupted,
            log_tail=run.log_tail,
        )
        ctx = RunContext(
            run_id=run.id,
            project_id=run.project_id,
            kind=run.kind,
            config=spec.config.model_validate(run.config or {}),
            attempt=attempt,
            settings=settings,
            session=session,
            hooks=hooks,
        )
        session.commit()
        hooks.start()
        hooks.log(f"started on {worker} (attempt {attempt})")
        try:
            result = handler_of(spec)(ctx)
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
            run = session.get(Run, hooks.run_id)
            assert run is not None
            send_after_commit(session, run, settings, raise_errors=False)
            session.commit()
            return "queued"
        return "lost"
    hooks.finish("failed", error="the worker shut down during the run")
    return "failed"


def _storable(value: Any) -> Any:
    """`value` (JSON-able) with every string in it, keys too, as `storable_text` makes it."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


def heartbeat_interval(settings: Settings) -> float:
    """Heartbeat (and cancel check) period: a few beats per timeout, at most 5 s apart."""
    return max(0.2, min(5.0, settings.worker_heartbeat_timeout_s / 4))


class RunHooks:
    """`app.ml.hooks.Hooks` backed by the run row, plus a heartbeat thread.

    Every write uses a short session of its own, so the handler's session and these writes
    never wait on each other's transactions. All writes are conditional on the row still being
    `running` in this attempt: if the reaper took the run over, this worker stops.
    """

    def __init__(
        self,
        database_url: str,
        run_id: int,
        attempt: int,
        *,
        heartbeat_interval_s: float,
        interrupted: Callable[[], bool] | None = None,
        log_tail: str = "",
    ) -> None:
        self.database_url = database_url
        self.run_id = run_id
        self.attempt = attempt
        self.heartbeat_interval_s = heartbeat_interval_s
        self.interrupted = interrupted
        self.cancel_seen = False
        self.lost = False
        self._lines: deque[str] = deque(
            (row for row in log_tail.splitlines() if row), maxlen=LOG_TAIL_LINES
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
        # A diverged loss (NaN, inf) is said in the log rather than stored: SQLite keeps NaN as
        # NULL, which the table refuses, and a chart has nothing to draw for it anyway.
        finite = {name: float(v) for name, v in values.items() if math.isfinite(float(v))}
        if len(finite) < len(values):
            dropped = sorted(set(values) - set(finite))
            self.log(f"step {step}: not a finite number, not recorded: {', '.join(dropped)}")
        with new_session(self.database_url) as s:
            s.add_all(
                RunMetric(run_id=self.run_id, step=step, name=name, value=value)
                for name, value in finite.items()
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
            values["error"] = storable_text(error)
        if result is not None:
            # Model output (a PPO sample table) may hold NUL, which PostgreSQL's jsonb refuses:
            # the run would then never record its end and be retried until it fails.
            values["result"] = _storable(result)
        if not self._write(values):
            logger.warning(
                "run %s: could not record %r, the run was taken over", self.run_id, status
            )

    def requeue(self, reason: str) -> bool:
        """Put the run back to `queued`; the caller sends its message again."""
        self.stop()
        return self._write(
            {"status": "queued", "worker": None, "log_tail": self._push(f"requeued: {reason}")}
        )

    # internals ---------------------------------------------------------------------------

    def _push(self, message: str) -> str:
        with self._lock:
            for row in storable_text(message).splitlines() or [""]:
                self._lines.append(line(row))
            return trim("\n".join(self._lines))

    def _write(self, values: dict[str, Any]) -> bool:
        """UPDATE the run if this attempt still holds it; False (and `lost`) when it does not."""
        with new_session(self.database_url) as s:
            result = s.execute(
                update(Run)
                .where(Run.id == self.run_id, Run.status == "running", Run.attempts == self.attempt)
                .values(**values)
            )
            s.commit()
        if rowcount(result) != 1:
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


# --- recovery: dead workers, lost messages ------------------------------------------------------


def reap_stale_runs(
    session: Session,
    settings: Settings,
    *,
    now: datetime | None = None,
    timeout_s: float | None = None,
    queues: tuple[str, ...] | None = None,
) -> list[Run]:
    """Deal with `running` runs whose heartbeat stopped (their worker died). Commits each.

    A resumable kind is requeued and its message sent again (up to `MAX_ATTEMPTS` starts), a
    run with a pending cancel ends `cancelled`, anything else ends `failed` with the reason.
    Returns the runs it changed. `timeout_s=0` treats every running run (of `queues`, default
    all) as dead: what the only worker of those queues does when it starts.
    """
    now = now or utcnow()
    timeout = settings.worker_heartbeat_timeout_s if timeout_s is None else timeout_s
    cutoff = now - timedelta(seconds=timeout)
    silent_since = or_(Run.heartbeat_at.is_(None), Run.heartbeat_at <= cutoff)
    kinds = _kinds_on(queues)
    stale = list(
        session.scalars(
            select(Run).where(Run.status == "running", Run.kind.in_(kinds), silent_since)
        )
    )
    session.commit()
    changed: list[Run] = []
    for run in stale:
        spec = RUN_KINDS[run.kind]
        silent = f"no heartbeat from worker {run.worker} since {_hhmmss(run.heartbeat_at)}"
        values: dict[str, Any]
        if run.cancel_requested:
            values = {"status": "cancelled", "finished_at": now}
            note = f"reaper: {silent}; the run was being cancelled, so it ends cancelled"
        elif spec.resumable and run.attempts < MAX_ATTEMPTS:
            values = {"status": "queued", "worker": None}
            note = f"reaper: {silent}; requeued (attempt {run.attempts + 1} of {MAX_ATTEMPTS})"
        else:
            reason = f"the worker stopped ({silent}, over the {timeout:g} s heartbeat timeout)" + (
                f" in all {run.attempts} attempts" if run.attempts >= MAX_ATTEMPTS else ""
            )
            values = {"status": "failed", "finished_at": now, "error": reason}
            note = f"reaper: {reason}"
        values["log_tail"] = append_line(run.log_tail, note)
        result = session.execute(
            update(Run)
            .where(Run.id == run.id, Run.status == "running", silent_since)
            .values(**values)
        )
        if rowcount(result) != 1:
            session.rollback()  # it came back to life between the scan and the update
            continue
        audit.record(
            session, "run.reap", project_id=run.project_id, target=("run", run.id),
            outcome=values["status"],
        )  # fmt: skip
        if values["status"] == "queued":
            send_after_commit(session, run, settings, raise_errors=False)
        session.commit()
        session.refresh(run)
        logger.warning("run %s: %s", run.id, note)
        changed.append(run)
    return changed


def resend_waiting_runs(
    session: Session,
    settings: Settings,
    *,
    older_than_s: float,
    queues: tuple[str, ...] | None = None,
    now: datetime | None = None,
) -> list[Run]:
    """Send again the message of every run that has waited `queued` longer than `older_than_s`
    on a queue where no run is running. Commits each.

    A queued run nobody works on while its queue's workers are idle has lost its message (a
    broker restarted without persistence, a worker killed holding it unacknowledged). Sending it
    again is safe: whichever delivery comes first claims the run and the others are skipped.
    `older_than_s=0` re-sends every queued run of `queues`: what a worker does when it starts.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than_s)
    busy = set(session.scalars(select(Run.kind).where(Run.status == "running").distinct()))
    busy_queues = {RUN_KINDS[k].queue for k in busy if k in RUN_KINDS}
    idle_kinds = [k for k in _kinds_on(queues) if RUN_KINDS[k].queue not in busy_queues]
    waiting = list(
        session.scalars(
            select(Run)
            .where(
                Run.status == "queued",
                Run.cancel_requested.is_(False),
                Run.kind.in_(idle_kinds),
                or_(Run.started_at.is_(None), Run.started_at <= cutoff),
                Run.created_at <= cutoff,
            )
            .order_by(Run.id)
        )
    )
    session.commit()
    for run in waiting:
        run.log_tail = append_line(run.log_tail, "its message was lost; sent again")
        send_after_commit(session, run, settings, raise_errors=False)
        session.commit()
        logger.warning("run %s: waited queued with its queue idle; message sent again", run.id)
    return waiting


def recover_at_start(
    session: Session, settings: Settings, queues: tuple[str, ...], *, sole: bool
) -> None:
    """What a worker does before it takes its first task: runs of its queues still marked
    running are requeued when it is the only worker of those queues (`sole`: nobody else can be
    working on them), and every queued run gets its message again, so a stopped and restarted
    deployment finishes every run it had started."""
    if sole:
        reap_stale_runs(session, settings, timeout_s=0, queues=queues)
    resend_waiting_runs(session, settings, older_than_s=0, queues=queues)


def _kinds_on(queues: tuple[str, ...] | None) -> list[str]:
    return [k.name for k in RUN_KINDS.values() if queues is None or k.queue in queues]


def _hhmmss(moment: datetime | None) -> str:
    return moment.strftime("%H:%M:%S UTC") if moment else "never"
