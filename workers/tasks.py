"""Celery tasks: thin wrappers that pass ids to `app.jobs` (model work) and `app.services`
(housekeeping), each in one unit of work."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Task
from celery.signals import worker_ready, worker_shutting_down

from app.core.config import get_settings
from app.core.db import unit_of_work
from app.jobs import runner
from app.kinds.queues import SOLE_WORKER_ENV
from app.services import assignment, reward_runs
from app.services.dispatch import REAP_TASK, RELEASE_LEASES_TASK, RUN_TASK, TRIGGER_REWARD_TASK
from workers.celery_app import celery_app

logger = logging.getLogger(__name__)

# Set when the worker begins a warm shutdown (SIGTERM, Ctrl-C): a running run then stops at its
# next safe point, and a resumable one goes back to the queue instead of holding the shutdown.
SHUTTING_DOWN = threading.Event()


@worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    SHUTTING_DOWN.set()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Pick up what a stopped deployment left: resend every queued run of this worker's queues
    (and requeue their orphaned running runs, when this is their only worker)."""
    queues = tuple(q.name for q in sender.task_consumer.queues) if sender is not None else ()
    sole = os.environ.get(SOLE_WORKER_ENV, "").lower() in ("1", "true", "yes")
    settings = get_settings()
    try:
        with unit_of_work(settings.database_url) as session:
            runner.recover_at_start(session, settings, queues, sole=sole)
    except Exception:  # a worker that cannot recover old runs can still do new ones
        logger.exception("could not recover the runs of queues %s", ", ".join(queues))


@celery_app.task(name=RUN_TASK, bind=True)
def execute_run(self: Task, run_id: int) -> str:
    """Execute run `run_id`; the run row records progress, errors and the outcome."""
    return runner.execute_run(
        run_id,
        task_id=str(self.request.id),
        worker=str(self.request.hostname or "unknown"),
        settings=get_settings(),
        interrupted=SHUTTING_DOWN.is_set,
    )


@celery_app.task(name=REAP_TASK)
def reap_stale_runs() -> list[int]:
    """Requeue or fail running runs whose worker stopped heartbeating, and resend the message
    of queued runs that waited with their queue idle (their message was lost)."""
    settings = get_settings()
    with unit_of_work(settings.database_url) as session:
        reaped = runner.reap_stale_runs(session, settings)
        resent = runner.resend_waiting_runs(
            session, settings, older_than_s=settings.resend_queued_after_s
        )
    return [run.id for run in reaped + resent]


@celery_app.task(name=RELEASE_LEASES_TASK)
def release_expired_leases() -> int:
    """Return expired rater leases to the pool."""
    with unit_of_work(get_settings().database_url) as session:
        return assignment.release_expired_leases(session)


@celery_app.task(name=TRIGGER_REWARD_TASK)
def trigger_reward_runs() -> list[int]:
    """Queue a reward run for every project with enough new judgments (none already active)."""
    settings = get_settings()
    with unit_of_work(settings.database_url) as session:
        return reward_runs.trigger_all_projects(session, settings)
