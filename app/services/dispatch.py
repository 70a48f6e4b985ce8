"""The one place where services hand work to Celery: by task name, never by importing `workers`.

Services create a run row, commit, and only then call `enqueue`, so a worker never receives a
task whose row it cannot read yet. Sending by name keeps the web process free of worker code
(and of torch, which the task modules import lazily).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

RUN_TASK = "verdict.execute_run"
REAP_TASK = "verdict.reap_stale_runs"
RELEASE_LEASES_TASK = "verdict.release_expired_leases"
TRIGGER_REWARD_TASK = "verdict.trigger_reward_runs"


def prepare_broker(broker_url: str) -> None:
    """Create the directory of a SQLite broker file (SQLite creates the file, not its folder)."""
    if broker_url.startswith("sqla+sqlite:///"):
        from sqlalchemy.engine import make_url

        database = make_url(broker_url.removeprefix("sqla+")).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)


def broker_options(broker_url: str) -> dict[str, Any]:
    """Transport options per broker; shared by producers here and by `workers.celery_app`."""
    if broker_url.startswith("sqla+sqlite"):
        # Web, worker and beat write the same SQLite file; wait for a lock instead of failing.
        # (kombu passes these options straight to `create_engine`.)
        return {"connect_args": {"timeout": 30}}
    return {}


@lru_cache(maxsize=8)
def producer(broker_url: str) -> Celery:
    """A Celery app that only sends messages (no task code, no result backend)."""
    # Imported here, not at the top (nor is SQLAlchemy's `make_url` above): celery and kombu
    # take ~0.1 s to import, and many importers of this module never send anything
    # (`verdict --help` and most CLI commands only want the queue names).
    from celery import Celery

    prepare_broker(broker_url)
    app = Celery("verdict-dispatch", broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_options(broker_url),
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
    )
    return app


def enqueue(broker_url: str, task_name: str, args: list[Any], *, queue: str, task_id: str) -> None:
    """Publish one task message. Raises the broker's error if the message could not be stored."""
    producer(broker_url).send_task(
        task_name,
        args=args,
        queue=queue,
        task_id=task_id,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )


def revoke(broker_url: str, task_id: str) -> bool:
    """Ask workers to drop a task they have not started. Best effort; returns False on failure.

    Workers alive now remember the id and discard the message. The run row stays the real guard:
    a cancelled run is never claimed, so a message that slips through (a worker started later,
    or a broker without broadcast such as the SQLite one) ends without doing anything.
    """
    try:
        producer(broker_url).control.revoke(task_id)
    except Exception:  # a cancel must not fail because a broadcast could not be sent
        logger.warning("could not broadcast revoke of task %s", task_id, exc_info=True)
        return False
    return True
