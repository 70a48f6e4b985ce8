"""GET /api/v1/projects/{slug}/export: the service's bytes streamed with a filename and media
type, who may export what, the audit event, and bad parameters refused before any byte."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import AuditEvent, Judgment, Project, User
from app.services import exports, snapshots
from tests.conftest import Factory, bearer


@pytest.fixture
def project(factory: Factory) -> Project:
    project = factory.project("api-exp")
    rater = factory.user("rater", "rita@example.com")
    for i, choice in enumerate(("a", "b", "tie")):
        pair = factory.pair(project, (f"yes {i}", f"no {i}"), prompt=f"question {i}")
        factory.session.add(
            Judgment(
                project_id=project.id,
                pair_id=pair.id,
                rater_id=rater.id,
                choice=choice,
                strength=1 if choice != "tie" else None,
                created_at=datetime(2026, 11, 1 + i, tzinfo=UTC),
            )
        )
    factory.session.commit()
    return project


@pytest.fixture
def admin(factory: Factory) -> User:
    return factory.user("admin")


def get(client: TestClient, token: str, slug: str = "api-exp", **params: Any) -> Any:
    return client.get(f"/api/v1/projects/{slug}/export", params=params, headers=bearer(token))


def test_streams_the_services_bytes_with_a_filename(
    client: TestClient, factory: Factory, session: Session, project: Project, admin: User
) -> None:
    token = factory.token(admin)
    answer = get(client, token, format="trl")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/x-ndjson"
    assert answer.headers["content-disposition"] == 'attachment; filename="api-exp-trl.jsonl"'
    rows = [json.loads(line) for line in answer.text.splitlines()]
    assert [r["chosen"][0]["content"] for r in rows] == ["yes 0", "no 1"]

    plan = exports.prepare_export(session, project, "raw-csv", secret_key="unused")
    expected = b"".join(exports.stream_export(session, plan))
    csv_answer = get(client, token, format="raw-csv", since="2026-11-01")
    assert csv_answer.content == expected
    assert csv_answer.headers["content-type"] == "text/csv; charset=utf-8"
    assert csv_answer.headers["content-disposition"] == (
        'attachment; filename="api-exp-raw-csv-since-20261101T000000Z.csv"'
    )
    assert "rita@example.com" in csv_answer.content.decode("utf-8-sig")

    session.commit()
    events = session.scalars(
        sa.select(AuditEvent).where(AuditEvent.action == "project.export").order_by(AuditEvent.id)
    ).all()
    assert [(e.actor_id, e.project_id, e.data) for e in events] == [
        (admin.id, project.id, {"format": "trl", "snapshot": None, "since": None,
                                "until": None, "pseudonymize": False}),
        (admin.id, project.id, {"format": "raw-csv", "snapshot": None,
                                "since": "2026-11-01T00:00:00+00:00", "until": None,
                                "pseudonymize": False}),
    ]  # fmt: skip


def test_a_snapshot_export_repeats_byte_for_byte(
    client: TestClient, factory: Factory, session: Session, project: Project, admin: User
) -> None:
    snap = snapshots.create_snapshot(session, project)
    session.commit()
    token = factory.token(admin)
    first = get(client, token, format="hh", snapshot=snap.id)
    assert first.status_code == 200
    assert first.headers["content-disposition"].endswith(f'-hh-snapshot-{snap.id}.jsonl"')
    assert get(client, token, format="hh", snapshot=snap.id).content == first.content
    assert len(first.content.splitlines()) == 2


def test_reviewers_export_raters_only_under_pseudonyms(
    client: TestClient, factory: Factory, project: Project
) -> None:
    reviewer = factory.token(factory.user("reviewer"))
    assert get(client, reviewer, format="trl").status_code == 200
    refused = get(client, reviewer, format="raw-jsonl")
    assert refused.status_code == 403
    assert "pseudonymize=true" in refused.json()["detail"]
    hidden = get(client, reviewer, format="raw-jsonl", pseudonymize="true")
    assert hidden.status_code == 200
    assert "rita@example.com" not in hidden.text and '"rater":"rater-' in hidden.text
    rater = factory.token(factory.user("rater"))
    assert get(client, rater, format="trl").status_code == 403


@pytest.mark.parametrize(
    ("params", "field", "detail"),
    [
        ({}, "format", "Field required"),
        ({"format": "xml"}, "format", "format: unknown export format 'xml'; use one of trl, hh"),
        ({"format": "trl", "snapshot": 424242}, "snapshot", "424242 is not a snapshot of"),
        ({"format": "trl", "snapshot": "first"}, "snapshot", "valid integer"),
        (
            {"format": "trl", "since": "2026-11-03", "until": "2026-11-02"},
            "since",
            "since must be earlier than until",
        ),
        ({"format": "raw-csv", "since": "last week"}, "since", "not an ISO 8601 date"),
        ({"format": "trl", "pseudonymize": "true"}, "pseudonymize", "names no raters"),
    ],
)
def test_bad_parameters_answer_422_naming_them(
    client: TestClient,
    factory: Factory,
    session: Session,
    project: Project,
    admin: User,
    params: dict[str, Any],
    field: str,
    detail: str,
) -> None:
    answer = get(client, factory.token(admin), **params)
    assert answer.status_code == 422
    body = answer.json()
    assert [e["field"] for e in body["errors"]] == [field]
    assert detail in body["detail"] + " ".join(e["message"] for e in body["errors"])
    session.commit()
    audited = sa.select(sa.func.count()).where(AuditEvent.action == "project.export")
    assert session.scalar(audited) == 0


def test_another_projects_snapshot_is_unknown_here(
    client: TestClient, factory: Factory, session: Session, project: Project, admin: User
) -> None:
    other = factory.project("elsewhere")
    pair = factory.pair(other)
    session.add(Judgment(project_id=other.id, pair_id=pair.id, source="x", choice="a", strength=1))
    session.commit()
    snap = snapshots.create_snapshot(session, other)
    session.commit()
    answer = get(client, factory.token(admin), format="trl", snapshot=snap.id)
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["field"] == "snapshot"
    theirs = get(client, factory.token(admin), slug="elsewhere", format="trl", snapshot=snap.id)
    assert theirs.status_code == 200 and theirs.text.count("\n") == 1
