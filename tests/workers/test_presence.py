"""Worker presence and sizing with real workers: each one writes its `workers` row, `/readyz`
turns ready when every queue has one, two workers of different queues on one host get
different node names, and a worker logs JSON lines with the run id and sizes torch."""

from __future__ import annotations

import json
import socket
from datetime import datetime

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from app.models import Run, Worker
from app.services import presence, projects, runs
from tests.workers.conftest import CeleryProcess, Stack, wait_for

pytestmark = pytest.mark.worker

FINISHED = ("succeeded", "failed", "cancelled")


def _rows(stack: Stack) -> dict[str, Worker]:
    with stack.session() as s:
        return {w.name: w for w in s.scalars(sa.select(Worker))}


def _readyz(stack: Stack, within_s: int = 60) -> tuple[int, dict[str, object]]:
    settings = Settings(
        database_url=stack.database_url,
        broker_url=stack.broker_url,
        var_dir=stack.var_dir,
        secret_key="test-secret-key-" + "x" * 32,
        worker_seen_within_s=within_s,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        response = client.get("/readyz")
    app.state.engine.dispose()
    return response.status_code, response.json()


def test_workers_of_two_queues_on_one_host_register_apart(stack: Stack) -> None:
    """`verdict worker -Q gpu` and `verdict worker -Q default`, no --name: two rows, named after
    their queues; then /readyz is ready. The gpu worker logs JSON and runs a run."""
    host = socket.gethostname()
    # The database is the session's: rows of the workers of earlier test modules (stopped
    # seconds ago, so still "seen recently") are not this test's.
    with stack.session() as s:
        s.execute(sa.delete(Worker))
        s.commit()
    code, body = _readyz(stack)
    assert code == 503 and body["failed"] == ["worker:gpu", "worker:default"]
    env = {**stack.env, "VERDICT_LOG_FORMAT": "json", "VERDICT_WORKER_SEEN_WITHIN_S": "8"}
    gpu = CeleryProcess.verdict(["worker", "-Q", "gpu"], env, stack.var_dir / "gpu.log")
    default = CeleryProcess.verdict(["worker", "-Q", "default"], env, stack.var_dir / "dflt.log")
    try:
        rows = wait_for(
            lambda: (r := _rows(stack)) and {f"gpu@{host}", f"default@{host}"} <= set(r) and r,
            90,
            "both workers' rows",
            interval=0.3,
        )
        assert rows[f"gpu@{host}"].queues == ["gpu"]
        assert rows[f"default@{host}"].queues == ["default"]
        assert rows[f"gpu@{host}"].pid != rows[f"default@{host}"].pid
        assert rows[f"gpu@{host}"].hostname == host
        code, body = _readyz(stack)
        assert code == 200, body
        first_seen: datetime = rows[f"gpu@{host}"].seen_at
        # The row is written again every few seconds (8 s window: every 2 s).
        wait_for(lambda: _rows(stack)[f"gpu@{host}"].seen_at > first_seen, 10, "a second beat")

        stack.project(n_prompts=1, slug="presence")
        with stack.session() as s:
            run = runs.create_run(
                s, projects.get_project(s, "presence"), "generate", {}, settings=stack.settings
            )
        done = stack.wait_status(run.id, FINISHED, timeout=120)
        assert done.status == "succeeded", done.error or done.log_tail
        assert done.worker == f"gpu@{host}"
        entries = [json.loads(row) for row in gpu.output().splitlines() if row.startswith("{")]
        mine = [e for e in entries if e.get("run_id") == run.id]
        assert any(e["message"] == f"run {run.id}: started on gpu@{host} (attempt 1)" for e in mine)
        assert any(e["logger"] == "celery.app.trace" for e in mine)  # Celery's own line too
        assert any(e["message"].startswith("torch threads: 1 intra-op") for e in entries)
        assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    finally:
        gpu.stop()
        default.stop()

    # Stopped: the rows stay and grow old, and readiness no longer counts them once they are
    # older than the window (/readyz's 503 for stale rows: tests/api/test_readyz.py).
    def counted() -> set[str]:
        with stack.session() as s:
            return {name for queue in presence.queue_presence(s, 8) for name in queue.workers}

    stopped = {f"gpu@{host}", f"default@{host}"}
    wait_for(lambda: not (counted() & stopped), 30, "the stopped workers to grow old")
    assert stopped <= set(_rows(stack))
    with stack.session() as s:
        s.execute(sa.delete(Run))
        s.execute(sa.delete(Worker))


def test_the_test_stack_worker_writes_its_row(live: Stack) -> None:
    assert live.worker is not None
    host = socket.gethostname()
    name = f"w{live._count}-{live.broker}@{host}"
    row = wait_for(lambda: _rows(live).get(name), 30, "the worker's row")
    assert row.queues == ["default", "gpu"]
    code, body = _readyz(live)
    assert code == 200, body
