"""Interactive model calls that outlive their timeout: the API answers 202 with the run to follow
and leaves it queued (its result is read from `GET /api/v1/runs/{id}` once a worker finished
it); 503 is only for a broker that refused the run's task."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from app.models import AuditEvent, ModelVersion, Project, Run
from app.services import registry
from tests.conftest import Factory, bearer


def _app(db_url: str, tmp_path: Path, broker_url: str) -> FastAPI:
    return create_app(
        Settings(
            database_url=db_url,
            var_dir=tmp_path / "var",
            broker_url=broker_url,
            secret_key="test-secret-key-" + "x" * 32,
        )  # fmt: skip
    )


@pytest.fixture
def dropping_app(db_url: str, tmp_path: Path) -> Iterator[FastAPI]:
    """The app with an in-memory broker no worker reads: every run it queues stays queued."""
    app = _app(db_url, tmp_path, "memory://")
    yield app
    app.state.engine.dispose()


@pytest.fixture
def models(factory: Factory, settings: Settings) -> tuple[Project, ModelVersion, ModelVersion]:
    project = factory.project("interactive", base_policy="/models/base")
    s = factory.session
    policy = registry.ensure_base_policy(s, project, settings)
    reward = ModelVersion(
        project_id=project.id, kind="reward", version=0, name="reward v0", base_model="b",
        artifact_path="/artifacts/reward-v0", status="active",
    )  # fmt: skip
    s.add(reward)
    s.commit()
    return project, policy, reward


def _run(factory: Factory, run_id: int) -> Run:
    factory.session.rollback()
    factory.session.expire_all()
    run = factory.session.get(Run, run_id)
    assert run is not None
    return run


@pytest.mark.parametrize(
    ("route", "body"),
    [("generate", {"prompt": "hi"}), ("score", {"prompt": "hi", "responses": ["a", "b"]})],
)
def test_a_call_no_worker_takes_in_time_answers_202_and_leaves_its_run_queued(
    route: str,
    body: dict[str, Any],
    dropping_app: FastAPI,
    factory: Factory,
    models: tuple[Project, ModelVersion, ModelVersion],
) -> None:
    _, policy, reward = models
    version = policy if route == "generate" else reward
    token = factory.token(factory.user("admin"))
    with TestClient(dropping_app) as client:
        answer = client.post(
            f"/api/v1/models/{version.id}/{route}?timeout_s=0.3", json=body, headers=bearer(token)
        )
        assert answer.status_code == 202, answer.text
        pending = answer.json()
        run_id = pending["run_id"]
        assert pending == {"run_id": run_id, "status": "queued", "follow": f"/api/v1/runs/{run_id}"}
        assert answer.headers["location"] == f"/api/v1/runs/{run_id}"

        # Left alone: not cancelled, nothing thrown away; a worker will get to it.
        run = _run(factory, run_id)
        assert (run.kind, run.status, run.cancel_requested) == (
            "sample" if route == "generate" else "score", "queued", False,
        )  # fmt: skip
        assert run.config["model_version_id"] == version.id and run.trigger == "api"
        cancels = factory.session.scalars(
            sa.select(AuditEvent).where(AuditEvent.action == "run.cancel")
        ).all()
        assert cancels == []

        # When a worker has answered, the result is the run's `result`.
        result = {"model_version_id": version.id, "scores": [0.5, -0.5]}
        run.status, run.result = "succeeded", result
        factory.session.commit()
        followed = client.get(pending["follow"], headers=bearer(token))
        assert followed.status_code == 200
        assert (followed.json()["status"], followed.json()["result"]) == ("succeeded", result)


def test_the_202_is_documented_with_its_body(dropping_app: FastAPI) -> None:
    paths = dropping_app.openapi()["paths"]
    for route in ("generate", "score"):
        responses = paths[f"/api/v1/models/{{version_id}}/{route}"]["post"]["responses"]
        assert {"200", "202", "503"} <= set(responses)
        schema = responses["202"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/RunPending"}
        assert "broker" in responses["503"]["description"]
    pending = dropping_app.openapi()["components"]["schemas"]["RunPending"]
    assert set(pending["properties"]) == {"run_id", "status", "follow"}


def test_a_broker_that_refuses_the_task_is_still_a_503(
    db_url: str,
    tmp_path: Path,
    factory: Factory,
    models: tuple[Project, ModelVersion, ModelVersion],
) -> None:
    _, policy, _ = models
    token = factory.token(factory.user("admin"))
    app = _app(db_url, tmp_path, "redis://127.0.0.1:9/0")  # nothing listens on port 9
    try:
        with TestClient(app) as client:
            answer = client.post(
                f"/api/v1/models/{policy.id}/generate?timeout_s=5", json={"prompt": "hi"},
                headers=bearer(token),
            )  # fmt: skip
    finally:
        app.state.engine.dispose()
    assert answer.status_code == 503 and "could not queue the run" in answer.json()["detail"]
    run = factory.session.scalar(sa.select(Run).where(Run.kind == "sample"))
    assert run is not None and run.status == "failed"
