"""Policies API: model detail with lineage, promote, rollback, leaderboard; by role, with the rows
left behind."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import AuditEvent, ComparisonPair, Judgment, ModelVersion, Project, Response, Run
from app.services import registry
from tests.conftest import Factory, bearer
from tests.services.test_runs import broker_messages


@pytest.fixture
def project(factory: Factory) -> Project:
    return factory.project("pol-api", base_policy="/models/base", overlap=1)


@pytest.fixture
def versions(
    session: Session, project: Project, settings: Settings
) -> tuple[ModelVersion, ModelVersion, ModelVersion]:
    base = registry.ensure_base_policy(session, project, settings)
    reward = ModelVersion(
        project_id=project.id, kind="reward", version=0, name="reward v0", base_model="b",
        artifact_path="/artifacts/reward-v0", status="active",
    )  # fmt: skip
    session.add(reward)
    session.flush()
    run = Run(project_id=project.id, kind="ppo", status="succeeded", trigger="auto")
    session.add(run)
    session.flush()
    v1 = ModelVersion(
        project_id=project.id, kind="policy", version=1, name="ppo v1", base_model="/models/base",
        artifact_path="/artifacts/policy-v1", parent_id=base.id, run_id=run.id,
        reward_model_id=reward.id, status="candidate",
        metrics={"score_gain": 0.4, "kl_to_parent": 1.5, "train": {"objective/kl": 1.0}},
    )  # fmt: skip
    session.add(v1)
    session.commit()
    return base, v1, reward


def _status(session: Session, version_id: int) -> str:
    # End the session's read transaction first: on SQLite it is a snapshot from before the
    # request under test (an attribute access on an expired row may have started it).
    session.commit()
    session.expire_all()
    row = session.get(ModelVersion, version_id)
    assert row is not None
    session.commit()
    return row.status


def test_model_detail_has_lineage_and_metrics(
    client: TestClient, factory: Factory, versions: tuple[ModelVersion, ...]
) -> None:
    base, v1, reward = versions
    reviewer = bearer(factory.token(factory.user("reviewer")))
    response = client.get(f"/api/v1/models/{v1.id}", headers=reviewer)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["kind"], body["version"], body["status"]) == ("policy", 1, "candidate")
    assert body["parent"]["id"] == base.id and body["parent"]["version"] == 0
    assert body["reward_model"]["id"] == reward.id and body["reward_model"]["kind"] == "reward"
    assert body["run"]["kind"] == "ppo" and body["run"]["trigger"] == "auto"
    assert [v["id"] for v in body["lineage"]] == [base.id]
    assert body["metrics"]["score_gain"] == 0.4
    assert client.get("/api/v1/models/999999", headers=reviewer).status_code == 404


def test_only_admins_promote_and_rollback(
    client: TestClient, factory: Factory, session: Session, versions: tuple[ModelVersion, ...]
) -> None:
    base, v1, _ = versions
    for role in ("rater", "reviewer"):
        headers = bearer(factory.token(factory.user(role)))
        for action, target in (("promote", v1), ("rollback", base)):
            response = client.post(f"/api/v1/models/{target.id}/{action}", json={}, headers=headers)
            assert response.status_code == 403, (role, action, response.text)
    rater = bearer(factory.token(factory.user("rater")))
    assert client.get(f"/api/v1/models/{v1.id}", headers=rater).status_code == 403
    assert client.post(f"/api/v1/models/{v1.id}/promote", json={}).status_code == 401
    assert (_status(session, base.id), _status(session, v1.id)) == ("active", "candidate")
    events = session.scalars(sa.select(AuditEvent).where(AuditEvent.action.like("model.%")))
    assert list(events) == []
    session.commit()


def test_admin_promotes_then_rolls_back(
    client: TestClient,
    factory: Factory,
    session: Session,
    settings: Settings,
    versions: tuple[ModelVersion, ...],
) -> None:
    base, v1, _ = versions
    admin_user = factory.user("admin")
    admin = bearer(factory.token(admin_user))
    response = client.post(
        f"/api/v1/models/{v1.id}/promote", json={"reason": "gain 0.4"}, headers=admin
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["status"] == "active" and body["previous_id"] == base.id
    assert (_status(session, base.id), _status(session, v1.id)) == ("archived", "active")
    # The new active policy writes the next round: a generation run is queued and sent.
    run = session.get(Run, body["generation_run_id"])
    assert run is not None and (run.kind, run.status) == ("generate", "queued")
    assert broker_messages(settings) == 1
    event = session.scalar(sa.select(AuditEvent).where(AuditEvent.action == "model.promote"))
    assert event is not None and event.actor_id == admin_user.id and event.target_id == v1.id
    assert event.data["reason"] == "gain 0.4"
    session.commit()

    again = client.post(f"/api/v1/models/{v1.id}/promote", json={}, headers=admin)
    assert again.status_code == 409 and "already active" in again.json()["detail"]
    forward = client.post(f"/api/v1/models/{v1.id}/rollback", json={}, headers=admin)
    assert forward.status_code == 409

    back = client.post(
        f"/api/v1/models/{base.id}/rollback", json={"generate": False}, headers=admin
    )
    assert back.status_code == 200, back.text
    assert back.json()["generation_run_id"] is None and back.json()["previous_id"] == v1.id
    assert (_status(session, base.id), _status(session, v1.id)) == ("active", "archived")
    assert broker_messages(settings) == 1
    rollback_event = session.scalar(
        sa.select(AuditEvent).where(AuditEvent.action == "model.rollback")
    )
    assert rollback_event is not None and rollback_event.target_id == base.id
    session.commit()

    # An archived version can be promoted again (forward after a rollback).
    forward_again = client.post(
        f"/api/v1/models/{v1.id}/promote", json={"generate": False}, headers=admin
    )
    assert forward_again.status_code == 200
    assert _status(session, v1.id) == "active"


def test_promote_a_failed_version_is_a_409_and_changes_nothing(
    client: TestClient, factory: Factory, session: Session, versions: tuple[ModelVersion, ...]
) -> None:
    base, v1, _ = versions
    v1.status = "failed"
    session.commit()
    admin = bearer(factory.token(factory.user("admin")))
    response = client.post(f"/api/v1/models/{v1.id}/promote", json={}, headers=admin)
    assert response.status_code == 409 and "failed" in response.json()["detail"]
    assert (_status(session, base.id), _status(session, v1.id)) == ("active", "failed")
    assert factory.count(Run) == 1  # only the fixture's PPO run; nothing queued


def test_leaderboard_from_version_eval_judgments(
    client: TestClient,
    factory: Factory,
    session: Session,
    project: Project,
    versions: tuple[ModelVersion, ...],
) -> None:
    base, v1, _ = versions
    rater = factory.user("rater")
    for i, choice in enumerate(["a", "a", "a", "b", "tie"]):
        pair = factory.pair(project, texts=(f"new {i}", f"old {i}"), kind="version_eval")
        for response_id, version in ((pair.response_a_id, v1), (pair.response_b_id, base)):
            row = session.get(Response, response_id)
            assert row is not None
            row.model_version_id = version.id
        session.add(
            Judgment(
                project_id=project.id, pair_id=pair.id, rater_id=rater.id, choice=choice,
                strength=1 if choice in ("a", "b") else None,
            )
        )  # fmt: skip
        session.commit()
    factory.pair(project)  # a standard pair: not part of the leaderboard

    reviewer = bearer(factory.token(factory.user("reviewer")))
    url = f"/api/v1/projects/{project.slug}/leaderboard?seed=3&bootstrap=100"
    response = client.get(url, headers=reviewer)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["games"] == 5 and body["seed"] == 3
    top, bottom = body["versions"]
    assert top["version_id"] == v1.id and top["win_rate"] == pytest.approx(3.5 / 5)
    assert (top["wins"], top["losses"], top["ties"]) == (3, 1, 1)
    assert bottom["version_id"] == base.id and top["rating"] > bottom["rating"]
    assert top["ci_low"] <= top["rating"] <= top["ci_high"]
    assert client.get(url, headers=reviewer).json() == body  # seeded: the same intervals
    rater_headers = bearer(factory.token(rater))
    assert client.get(url, headers=rater_headers).status_code == 403
    assert session.scalar(sa.select(sa.func.count()).select_from(ComparisonPair)) == 6
    session.commit()
