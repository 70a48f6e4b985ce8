"""Readiness: can this deployment do its work now? (`GET /readyz`)

Three checks, each answering "ok" or why not: the database answers `SELECT 1`; the broker
accepts a connection (a Redis PING, or a `SELECT 1` on the SQLite broker's database, or a kombu
connection for any other transport); and every queue has a worker that wrote its presence row
within `worker_seen_within_s` (`services/presence.py`). A web process that is up but cannot
queue or finish work is not ready, and the answer says which part is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.services.dispatch import prepare_broker
from app.services.presence import queue_presence

OK = "ok"
BROKER_TIMEOUT_S = 2.0


@dataclass
class Readiness:
    """Each check's answer: "ok" or the reason it failed."""

    database: str
    broker: str
    workers: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        parts = (("database", self.database), ("broker", self.broker))
        out = [name for name, answer in parts if answer != OK]
        out += [f"worker:{queue}" for queue, answer in self.workers.items() if answer != OK]
        return out

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unavailable",
            "database": self.database,
            "broker": self.broker,
            "workers": self.workers,
            "failed": self.failed,
        }


def check(session: Session, settings: Settings) -> Readiness:
    """Run the three checks (the worker check only if the database answered)."""
    database = _check_database(session)
    broker = check_broker(settings.broker_url)
    if database != OK:
        workers = {"*": "not checked: the database is unavailable"}
    else:
        try:
            workers = _check_workers(session, settings.worker_seen_within_s)
        except Exception as exc:  # a database not migrated to 0006 has no workers table
            session.rollback()
            workers = {"*": _reason(exc)}
    return Readiness(database, broker, workers)


def _reason(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0]}" if first else type(exc).__name__


def _check_database(session: Session) -> str:
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready", with its reason
        session.rollback()
        return _reason(exc)
    return OK


def _check_workers(session: Session, within_s: int) -> dict[str, str]:
    answers = {}
    for presence in queue_presence(session, within_s):
        if presence.ok:
            answers[presence.queue] = OK
        elif presence.last_seen_s is None:
            answers[presence.queue] = "no worker of this queue has ever started"
        else:
            answers[presence.queue] = (
                f"no worker seen in the last {within_s} s"
                f" (the last one {presence.last_seen_s:.0f} s ago)"
            )
    return answers


def check_broker(broker_url: str) -> str:
    """ "ok" if the broker accepts a connection now, else why not."""
    try:
        if broker_url.startswith(("redis://", "rediss://", "unix://")):
            _redis(broker_url).ping()
        elif broker_url.startswith("sqla+"):
            prepare_broker(broker_url)  # its folder, as every producer and worker makes it
            with _broker_engine(broker_url.removeprefix("sqla+")).connect() as conn:
                conn.execute(text("SELECT 1"))
        else:
            _kombu_check(broker_url)
    except Exception as exc:  # an unreachable broker raises its client's own errors
        return _reason(exc)
    return OK


@lru_cache(maxsize=4)
def _redis(url: str) -> Any:
    import redis

    return redis.Redis.from_url(
        url, socket_connect_timeout=BROKER_TIMEOUT_S, socket_timeout=BROKER_TIMEOUT_S
    )


@lru_cache(maxsize=4)
def _broker_engine(url: str) -> Engine:
    # The SQLite broker's file is shared with the workers: wait for a lock, never write.
    connect_args = {"timeout": BROKER_TIMEOUT_S} if url.startswith("sqlite") else {}
    return create_engine(url, connect_args=connect_args, pool_pre_ping=True)


def _kombu_check(url: str) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=BROKER_TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
