"""The worker's Celery app with a short Redis visibility timeout, for `test_resilience`.

Redis redelivers a message that is not acknowledged within `visibility_timeout` (an hour by
default). Verdict acknowledges a run's message when the run ends (`task_acks_late`), so a run
longer than that is delivered again while it runs; the test checks that it still runs once.
Started as `celery -A tests.workers.short_visibility worker ...`.
"""

from __future__ import annotations

import os

from workers.celery_app import celery_app

celery_app.conf.broker_transport_options = {
    **celery_app.conf.broker_transport_options,
    "visibility_timeout": float(os.environ["VERDICT_TEST_VISIBILITY_TIMEOUT_S"]),
    # Look for overdue messages every second (kombu's default: every 100 s).
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
app = celery_app
