"""`/readyz`: the database, the broker and a recent worker of each queue; each failure named.

The live check (a real worker writes its own row) is in tests/workers/test_presence.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.kinds.queues import QUEUES
from app.main import create_app
from app.models import utcnow
from app.services import presence


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seen(session: Session, name: str, queues: list[str], ago_s: float = 0) -> None:
    now = utcnow() - timedelta(seconds=ago_s)
    presence.record_seen(session, name, queues, started_at=now, now=now)
    session.commit()


def test_not_ready_without_workers_and_says_which_queues(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["database"] == "ok" and body["broker"] == "ok"
    assert body["workers"] == {q: "no worker of this queue has ever started" for q in QUEUES}
    assert body["failed"] == [f"worker:{q}" for q in QUEUES]


def test_ready_with_a_recent_worker_of_each_queue(client: TestClient, session: Session) -> None:
    _seen(session, "gpu@host-a", ["gpu"], ago_s=5)
    _seen(session, "default@host-a", ["default"], ago_s=1)
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "status": "ok", "database": "ok", "broker": "ok",
        "workers": {"gpu": "ok", "default": "ok"}, "failed": [],
    }  # fmt: skip


def test_a_stale_worker_does_not_count(client: TestClient, session: Session) -> None:
    # Seen 90 s ago, the readiness window is 60 s: its queue is not served.
    _seen(session, "gpu@host-a", ["gpu"], ago_s=90)
    _seen(session, "default@host-a", ["default", "gpu"], ago_s=2)
    _seen(session, "other@host-b", ["default"], ago_s=600)
    body = client.get("/readyz").json()
    assert body["workers"] == {"gpu": "ok", "default": "ok"}  # default@host-a serves both
    _seen(session, "default@host-a", ["default"], ago_s=2)
    response = client.get("/readyz")
    assert response.status_code == 503
    answer = response.json()["workers"]["gpu"]
    assert (
        answer.startswith("no worker seen in the last 60 s (the last one 9") and "s ago" in answer
    )
    assert response.json()["failed"] == ["worker:gpu"]


def test_the_window_is_the_setting(settings: Settings, session: Session, tmp_path: Path) -> None:
    _seen(session, "both@host", list(QUEUES), ago_s=20)
    for within, code in ((10, 503), (30, 200)):
        app = create_app(settings.model_copy(update={"worker_seen_within_s": within}))
        with TestClient(app) as client:
            assert client.get("/readyz").status_code == code
        app.state.engine.dispose()


@pytest.mark.parametrize("broker", ["redis", "sqlite"])
def test_an_unreachable_broker_is_named(
    settings: Settings, session: Session, tmp_path: Path, broker: str
) -> None:
    _seen(session, "both@host", list(QUEUES))
    # The SQLite broker's folder cannot be made: a file is in its way.
    (tmp_path / "a-file").write_text("")
    url = (
        f"redis://127.0.0.1:{_closed_port()}/0"
        if broker == "redis"
        else f"sqla+sqlite:///{tmp_path / 'a-file' / 'broker.sqlite'}"
    )
    app = create_app(settings.model_copy(update={"broker_url": url}))
    with TestClient(app) as client:
        response = client.get("/readyz")
    app.state.engine.dispose()
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["broker"] and body["database"] == "ok"
    expected = ("ConnectionError",) if broker == "redis" else ("FileExistsError", "NotADirectory")
    assert body["broker"].startswith(expected), body["broker"]


@pytest.fixture
def app_on_a_dead_database(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        database_url=f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/verdict",
        var_dir=tmp_path / "var",
        secret_key="test-secret-key-" + "x" * 32,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield client
    app.state.engine.dispose()


def test_an_unreachable_database_is_named(app_on_a_dead_database: TestClient) -> None:
    response = app_on_a_dead_database.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["database"].startswith("OperationalError"), body
    assert body["broker"] == "ok"  # the embedded SQLite broker under var/
    assert body["workers"] == {"*": "not checked: the database is unavailable"}
    assert body["failed"] == ["database", "worker:*"]
    # The process itself is up.
    assert app_on_a_dead_database.get("/healthz").status_code == 200
