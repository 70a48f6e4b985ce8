"""The Celery application: queues `gpu` (model work) and `default`, and the beat schedule.

Start a model worker with ``verdict worker`` (``--pool=solo -Q gpu,default``): a solo pool runs
tasks in the worker's own process, so nothing is forked after torch (or CUDA) is loaded.
The broker is Redis in production and Celery-over-SQLAlchemy on SQLite in the embedded default.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from contextvars import Token
from typing import Any

from celery import Celery
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_ready,
    worker_shutdown,
)
from kombu import Queue

from app.core.config import Settings, get_settings
from app.core.logs import RUN_ID, use_json
from app.kinds.queues import DEFAULT_QUEUE, GPU_QUEUE
from app.services.dispatch import (
    REAP_TASK,
    RELEASE_LEASES_TASK,
    RUN_TASK,
    TRIGGER_REWARD_TASK,
    broker_options,
    prepare_broker,
)
from app.services.presence import PresenceBeat, beat_interval

logger = logging.getLogger(__name__)


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


# --- worker sizing: torch threads -----------------------------------------------------------

# Before torch is imported, these fix the size of its thread pools (and of any OpenMP or MKL
# pool) in this process and in every process it starts (a `torchrun` launch inherits them).
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_torch_threads_set = False


def apply_torch_threads(threads: int) -> None:
    """Size torch's intra-op and inter-op pools to `threads` in this worker process.

    The environment is set at worker start (cheap: a housekeeping worker never imports torch);
    torch itself is sized again before each run, when the run is about to import it anyway.
    Torch's default is one thread per core, and with several workers (and the web server) on
    one host those threads fight for the cores: docs/operations.md, "Worker sizing".
    """
    for name in THREAD_ENV_VARS:
        os.environ[name] = str(threads)
    if "torch" in sys.modules:
        size_torch(threads)


def size_torch(threads: int) -> None:
    """`torch.set_num_threads` (and, once, the inter-op pool, which only a fresh process can
    still resize)."""
    global _torch_threads_set
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if not _torch_threads_set:
        _torch_threads_set = True
        # Refused once inter-op work ran in this process; the intra-op size is what counts.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
        logger.info(
            "torch threads: %d intra-op, %d inter-op (VERDICT_TORCH_THREADS=%d)",
            torch.get_num_threads(), torch.get_num_interop_threads(), threads,
        )  # fmt: skip


@worker_init.connect
def _size_threads_at_start(**_: Any) -> None:
    apply_torch_threads(get_settings().torch_threads)


# --- logs: JSON lines, and the run id of the run being executed --------------------------------

_run_tokens: dict[str, Token[int | None]] = {}


@after_setup_logger.connect
@after_setup_task_logger.connect
def _json_logs(**kwargs: Any) -> None:
    if get_settings().log_format == "json":
        use_json(kwargs["logger"])


@task_prerun.connect
def _before_task(task_id: str, task: Any, args: Any = (), kwargs: Any = None, **_: Any) -> None:
    if task.name != RUN_TASK:
        return
    run_id = (kwargs or {}).get("run_id", args[0] if args else None)
    if isinstance(run_id, int):
        _run_tokens[task_id] = RUN_ID.set(run_id)
    size_torch(get_settings().torch_threads)


@task_postrun.connect
def _after_task(task_id: str, **_: Any) -> None:
    token = _run_tokens.pop(task_id, None)
    if token is not None:
        RUN_ID.reset(token)


# --- presence: the `workers` row that /readyz and /metrics read --------------------------------

_presence: list[PresenceBeat] = []


@worker_ready.connect
def _start_presence(sender: Any = None, **_: Any) -> None:
    """Write this worker's row now and every few seconds (`services/presence.py`)."""
    if sender is None:
        return
    settings = get_settings()
    queues = sorted(q.name for q in sender.task_consumer.queues)
    beat = PresenceBeat(
        settings.database_url,
        str(sender.hostname),
        queues,
        interval_s=beat_interval(settings.worker_seen_within_s),
    )
    beat.start()
    _presence.append(beat)


@worker_shutdown.connect
def _stop_presence(**_: Any) -> None:
    while _presence:
        _presence.pop().stop()
