"""Worker presence: who consumes which queue, and when each worker was last seen.

Celery's own liveness (`inspect ping`, worker events) needs broadcast, which the SQLite broker
lacks, and Verdict's workers run `--without-gossip --without-heartbeat`. So each worker writes
its own row in the `workers` table from a thread (`PresenceBeat`, started by
`workers.celery_app` when the worker is ready), and readers look at `seen_at`: `/readyz` wants a
worker of each queue seen within `worker_seen_within_s`, `/metrics` reports each one's age. The
database is the one thing every web process and every worker host already share.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from app.core.db import unit_of_work
from app.kinds.queues import QUEUES
from app.models import Worker, utcnow

logger = logging.getLogger(__name__)


def beat_interval(seen_within_s: int) -> float:
    """How often a worker writes its row: several times per readiness window, at most 5 s."""
    return max(0.5, min(5.0, seen_within_s / 4))


def record_seen(
    session: Session,
    name: str,
    queues: Sequence[str],
    *,
    started_at: datetime,
    now: datetime | None = None,
    hostname: str | None = None,
    pid: int | None = None,
) -> None:
    """Upsert worker `name`'s row: its queues, host, pid, start, and `seen_at = now`.

    One statement (INSERT ... ON CONFLICT (name) DO UPDATE), so two workers that were given the
    same name by mistake overwrite each other's row instead of failing their beats.
    """
    values = {
        "name": name,
        "queues": list(queues),
        "hostname": hostname or socket.gethostname(),
        "pid": pid if pid is not None else os.getpid(),
        "started_at": started_at,
        "seen_at": now or utcnow(),
    }
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(Worker).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Worker.name],
        set_={key: stmt.excluded[key] for key in values if key != "name"},
    )
    session.execute(stmt)


@dataclass(frozen=True)
class QueuePresence:
    """Whether queue `queue` has a worker seen recently enough, and which ones."""

    queue: str
    workers: tuple[str, ...]
    last_seen_s: float | None  # age of the freshest worker of the queue; None: never seen

    @property
    def ok(self) -> bool:
        return bool(self.workers)


def queue_presence(
    session: Session, within_s: int, *, now: datetime | None = None
) -> list[QueuePresence]:
    """For each queue of `app.kinds.queues.QUEUES`: the workers seen in the last `within_s`."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=within_s)
    rows = session.execute(select(Worker.name, Worker.queues, Worker.seen_at)).all()
    out = []
    for queue in QUEUES:
        mine = [(name, seen) for name, queues, seen in rows if queue in queues]
        fresh = tuple(sorted(name for name, seen in mine if seen >= cutoff))
        newest = max((seen for _, seen in mine), default=None)
        age = None if newest is None else max(0.0, (now - newest).total_seconds())
        out.append(QueuePresence(queue, fresh, age))
    return out


def heartbeat_ages(
    session: Session, *, now: datetime | None = None
) -> list[tuple[str, str, float]]:
    """(worker name, queue, seconds since it was seen) for every worker row and queue."""
    now = now or utcnow()
    rows = session.execute(select(Worker.name, Worker.queues, Worker.seen_at)).all()
    return [
        (name, queue, max(0.0, (now - seen).total_seconds()))
        for name, queues, seen in rows
        for queue in queues
    ]


class PresenceBeat:
    """A daemon thread that upserts this worker's row every `interval_s` until stopped.

    A failed write (database restarting) is logged and tried again at the next beat: the row
    then simply grows old, which is what readiness should see.
    """

    def __init__(
        self, database_url: str, name: str, queues: Sequence[str], *, interval_s: float
    ) -> None:
        self.database_url = database_url
        self.name = name
        self.queues = tuple(queues)
        self.interval_s = interval_s
        self.started_at = utcnow()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Write the row once (also called before the thread starts, so the row exists then)."""
        with unit_of_work(self.database_url) as session:
            record_seen(session, self.name, self.queues, started_at=self.started_at)

    def start(self) -> None:
        try:
            self.beat()
        except Exception:
            logger.warning("worker %s: could not record its presence", self.name, exc_info=True)
        self._thread = threading.Thread(
            target=self._loop, name=f"presence-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # a database hiccup must not end the beats for good
                logger.warning("worker %s: presence beat failed", self.name, exc_info=True)
