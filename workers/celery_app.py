"""The Celery application: queues `gpu` (model work) and `default`, and the beat schedule.

Start a model worker with ``verdict worker`` (``--pool=solo -Q gpu,default``): a solo pool runs
tasks in the worker's own process, so nothing is forked after torch (or CUDA) is loaded.
The broker is Redis in production and Celery-over-SQLAlchemy on SQLite in the embedded default.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init
from kombu import Queue

from app.core.config import Settings, get_settings
from app.kinds.queues import DEFAULT_QUEUE, GPU_QUEUE
from app.services.dispatch import (
    REAP_TASK,
    RELEASE_LEASES_TASK,
    TRIGGER_REWARD_TASK,
    broker_options,
    prepare_broker,
)


def reap_interval_s(settings: Settings) -> float:
    """How often the reaper looks for dead runs: a few times per heartbeat timeout."""
    return max(1.0, min(60.0, settings.worker_heartbeat_timeout_s / 3))


def make_celery(settings: Settings | None = None) -> Celery:
    """Build the Celery app from the settings (broker, queues, beat schedule)."""
    settings = settings or get_settings()
    prepare_broker(settings.broker_url)
    app = Celery(
        "verdict",
        broker=settings.broker_url,
        backend=settings.result_backend or None,
        include=["workers.tasks"],
    )
    reap_every = reap_interval_s(settings)
    sweep_every = float(settings.lease_sweep_interval_s)
    trigger_every = float(settings.reward_trigger_interval_s)
    conf: dict[str, Any] = {
        "task_queues": (Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        "task_default_queue": DEFAULT_QUEUE,
        # The runs table is the source of truth; Celery only carries "run id N is ready".
        "task_ignore_result": not settings.result_backend,
        # Keep the message until the task ends, and take one at a time: a long run must not
        # sit on a prefetched message another worker could start.
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": broker_options(settings.broker_url),
        "broker_connection_retry_on_startup": True,
        "timezone": "UTC",
        "beat_schedule": {
            "reap-stale-runs": {
                "task": REAP_TASK,
                "schedule": reap_every,
                # A sweep that waited longer than its period is superseded by the next one.
                "options": {"queue": DEFAULT_QUEUE, "expires": reap_every},
            },
            "release-expired-leases": {
                "task": RELEASE_LEASES_TASK,
                "schedule": sweep_every,
                "options": {"queue": DEFAULT_QUEUE, "expires": sweep_every},
            },
            "trigger-reward-runs": {
                "task": TRIGGER_REWARD_TASK,
                "schedule": trigger_every,
                "options": {"queue": DEFAULT_QUEUE, "expires": trigger_every},
            },
        },
    }
    app.conf.update(conf)
    return app


celery_app = make_celery()
app = celery_app


@worker_process_init.connect
def _fresh_engines_after_fork(**_: Any) -> None:
    # A prefork child must not reuse database connections opened by its parent.
    from app.core.db import _sessionmaker, get_engine

    get_engine.cache_clear()
    _sessionmaker.cache_clear()
