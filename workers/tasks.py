"""Celery tasks: thin wrappers that pass ids to `app.services` and let it record the outcome."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Task
from celery.signals import worker_shutting_down

from app.core.config import get_settings
from app.core.db import session_scope
from app.services import runs
from app.services.dispatch import REAP_TASK, RELEASE_LEASES_TASK, RUN_TASK, TRIGGER_REWARD_TASK
from workers.celery_app import celery_app

logger = logging.getLogger(__name__)

# Set when the worker begins a warm shutdown (SIGTERM, Ctrl-C): a running run then stops at its
# next safe point, and a resumable one goes back to the queue instead of holding the shutdown.
SHUTTING_DOWN = threading.Event()


@worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    SHUTTING_DOWN.set()


@celery_app.task(name=RUN_TASK, bind=True)
def execute_run(self: Task, run_id: int) -> str:
    """Execute run `run_id`; the run row records progress, errors and the outcome."""
    return runs.execute_run(
        run_id,
        task_id=str(self.request.id),
        worker=str(self.request.hostname or "unknown"),
        settings=get_settings(),
        interrupted=SHUTTING_DOWN.is_set,
    )


@celery_app.task(name=REAP_TASK)
def reap_stale_runs() -> list[int]:
    """Requeue or fail running runs whose worker stopped heartbeating."""
    with session_scope() as session:
        return [run.id for run in runs.reap_stale_runs(session, get_settings())]


@celery_app.task(name=RELEASE_LEASES_TASK)
def release_expired_leases() -> Any:
    """Return expired rater leases to the pool (the assignment service decides how)."""
    try:
        from app.services.assignment import release_expired_leases as release
    except ImportError:
        logger.info("app.services.assignment is not available; no leases to release")
        return None
    with session_scope() as session:
        return release(session)


@celery_app.task(name=TRIGGER_REWARD_TASK)
def trigger_reward_runs() -> list[int]:
    """Queue a reward run for every project with enough new judgments (none already active)."""
    from app.services.reward_runs import trigger_all_projects

    with session_scope() as session:
        return trigger_all_projects(session, get_settings())
