"""Runs API: create, read, list, cancel, and the model registry; by role, with the rows left."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.jobs import runner
from app.models import AuditEvent, ModelVersion, Project, Run, RunMetric
from app.services import runs
from tests.conftest import Factory, bearer
from tests.services.test_runs import broker_messages


@pytest.fixture
def project(factory: Factory) -> Project:
    return factory.project("runs-api", base_policy="/models/base")


@pytest.fixture
def admin(factory: Factory) -> dict[str, str]:
    return bearer(factory.token(factory.user("admin")))


def test_admin_creates_a_generate_run(
    client: TestClient, project: Project, admin: dict[str, str], factory: Factory,
    settings: Settings,
) -> None:  # fmt: skip
    response = client.post(
        f"/api/v1/projects/{project.slug}/runs",
        json={"kind": "generate", "config": {"limit": 5, "max_new_tokens": 32}},
        headers=admin,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "queued" and body["kind"] == "generate"
    assert body["config"]["limit"] == 5 and body["eta_s"] is None
    row = factory.session.get(Run, body["id"])
    assert row is not None and row.status == "queued" and row.project_id == project.id
    assert broker_messages(settings) == 1


def test_unknown_and_internal_kinds_are_a_422_naming_the_launchable_ones(
    client: TestClient, project: Project, admin: dict[str, str], factory: Factory,
    settings: Settings,
) -> None:  # fmt: skip
    unknown = client.post(
        f"/api/v1/projects/{project.slug}/runs", json={"kind": "train"}, headers=admin
    )
    assert unknown.status_code == 422
    assert unknown.json()["detail"] == (
        "unknown run kind 'train'; use one of generate, reward, ppo, rloo, grpo, dpo, evaluate"
    )
    # `score` and `sample` runs are started by the calls they serve, not launched.
    internal = client.post(
        f"/api/v1/projects/{project.slug}/runs", json={"kind": "score"}, headers=admin
    )
    assert internal.status_code == 422 and "unknown run kind 'score'" in internal.json()["detail"]
    bad_config = client.post(
        f"/api/v1/projects/{project.slug}/runs",
        json={"kind": "generate", "config": {"temperature": -1}},
        headers=admin,
    )
    assert bad_config.status_code == 422
    assert bad_config.json()["errors"][0]["field"] == "config.temperature"
    assert factory.count(Run) == 0 and broker_messages(settings) == 0


@pytest.mark.parametrize("role", ["rater", "reviewer"])
def test_only_admins_create_and_cancel_runs(
    client: TestClient, project: Project, factory: Factory, session: Session,
    settings: Settings, role: str,
) -> None:  # fmt: skip
    headers = bearer(factory.token(factory.user(role)))
    response = client.post(
        f"/api/v1/projects/{project.slug}/runs", json={"kind": "generate"}, headers=headers
    )
    assert response.status_code == 403
    assert factory.count(Run) == 0
    run = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    assert client.post(f"/api/v1/runs/{run.id}/cancel", headers=headers).status_code == 403
    session.expire_all()
    assert session.get(Run, run.id).status == "queued"  # type: ignore[union-attr]


def test_raters_cannot_read_runs_but_reviewers_can(
    client: TestClient, project: Project, factory: Factory, session: Session, settings: Settings
) -> None:
    run = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    rater = bearer(factory.token(factory.user("rater")))
    reviewer = bearer(factory.token(factory.user("reviewer")))
    for path in (f"/api/v1/runs/{run.id}", f"/api/v1/projects/{project.slug}/runs"):
        assert client.get(path, headers=rater).status_code == 403
        assert client.get(path, headers=reviewer).status_code == 200
    assert client.get(f"/api/v1/runs/{run.id}").status_code == 401


def test_get_run_shows_progress_eta_metrics_error_and_log(
    client: TestClient, project: Project, admin: dict[str, str], session: Session,
    settings: Settings,
) -> None:  # fmt: skip
    run = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    assert run.task_id is not None
    runner.claim_run(session, run.id, worker="w@host")
    hooks = runner.RunHooks(settings.database_url, run.id, 1, heartbeat_interval_s=60)
    hooks.progress(3, 12, "batch 3/12 done")
    hooks.metrics(0, {"generation/tokens_per_s": 10.0})
    hooks.metrics(1, {"generation/tokens_per_s": 12.5})

    body = client.get(f"/api/v1/runs/{run.id}", headers=admin).json()
    assert body["status"] == "running" and body["worker"] == "w@host"
    assert (body["progress_done"], body["progress_total"]) == (3, 12)
    assert body["eta_s"] is not None and body["eta_s"] >= 0
    assert body["log_tail"].splitlines()[-1].endswith("batch 3/12 done")
    assert body["metrics"]["generation/tokens_per_s"] == [
        {"step": 0, "value": 10.0},
        {"step": 1, "value": 12.5},
    ]
    assert body["latest_metrics"] == {"generation/tokens_per_s": 12.5}

    hooks.finish("failed", error="ValueError: boom")
    body = client.get(f"/api/v1/runs/{run.id}", headers=admin).json()
    assert body["status"] == "failed" and body["error"] == "ValueError: boom"
    assert body["finished_at"] is not None and body["eta_s"] is None
    assert session.scalar(sa.select(sa.func.count()).select_from(RunMetric)) == 2
    assert client.get("/api/v1/runs/999999", headers=admin).status_code == 404


def test_list_runs_newest_first_with_filters(
    client: TestClient, project: Project, admin: dict[str, str], session: Session,
    settings: Settings, factory: Factory,
) -> None:  # fmt: skip
    first = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    second = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    runs.cancel_run(session, first, settings=settings)
    session.commit()
    other = factory.project()
    runs.create_run(session, other, "generate", settings=settings)
    session.commit()

    listed = client.get(f"/api/v1/projects/{project.slug}/runs", headers=admin).json()
    assert [r["id"] for r in listed] == [second.id, first.id]
    cancelled = client.get(
        f"/api/v1/projects/{project.slug}/runs?status=cancelled", headers=admin
    ).json()
    assert [r["id"] for r in cancelled] == [first.id]
    bad = client.get(f"/api/v1/projects/{project.slug}/runs?status=done", headers=admin)
    assert bad.status_code == 422


def test_cancel_a_queued_run_revokes_it(
    client: TestClient, project: Project, admin: dict[str, str], session: Session,
    settings: Settings,
) -> None:  # fmt: skip
    run = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    response = client.post(f"/api/v1/runs/{run.id}/cancel", headers=admin)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    session.expire_all()
    row = session.get(Run, run.id)
    assert row is not None and row.status == "cancelled" and row.cancel_requested
    assert row.finished_at is not None and "cancelled before it started" in row.log_tail
    # Its message is still in the broker, but the run can no longer be claimed by it.
    assert row.task_id is not None
    assert runner.claim_run(session, run.id, worker="late") is None
    event = session.scalars(sa.select(AuditEvent).where(AuditEvent.action == "run.cancel")).one()
    assert event.target_id == run.id and event.data == {"was": "queued"}

    again = client.post(f"/api/v1/runs/{run.id}/cancel", headers=admin)
    assert again.status_code == 409 and "already ended (cancelled)" in again.json()["detail"]


def test_cancel_a_running_run_sets_its_flag(
    client: TestClient, project: Project, admin: dict[str, str], session: Session,
    settings: Settings,
) -> None:  # fmt: skip
    run = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    assert run.task_id is not None
    runner.claim_run(session, run.id, worker="w")
    body = client.post(f"/api/v1/runs/{run.id}/cancel", headers=admin).json()
    assert body["status"] == "running" and body["cancel_requested"] is True
    # The worker's hooks notice it on their next heartbeat and stop the run there.
    hooks = runner.RunHooks(settings.database_url, run.id, 1, heartbeat_interval_s=0.05)
    hooks.start()
    try:
        for _ in range(100):
            if hooks.should_stop():
                break
            hooks._stop.wait(0.05)
        assert hooks.should_stop()
    finally:
        hooks.stop()


def test_models_lists_the_base_policy(
    client: TestClient, project: Project, admin: dict[str, str], session: Session
) -> None:
    body = client.get(f"/api/v1/projects/{project.slug}/models", headers=admin).json()
    assert [(m["kind"], m["version"], m["status"], m["base_model"]) for m in body] == [
        ("policy", 0, "active", "/models/base")
    ]
    client.get(f"/api/v1/projects/{project.slug}/models", headers=admin)
    assert session.scalar(sa.select(sa.func.count()).select_from(ModelVersion)) == 1
