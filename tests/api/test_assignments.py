"""Assignments API: every rule, with the HTTP answer and the rows it leaves behind."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.models import Assignment, AuditEvent, Base, ComparisonPair, Judgment, Project, User, utcnow
from tests.conftest import Factory, bearer


def count(factory: Factory, model: type[Base]) -> int:
    """Rows now (ending the test session's read snapshot first)."""
    factory.session.rollback()
    return factory.count(model)


def setup(factory: Factory, **settings: Any) -> tuple[Project, User, dict[str, str]]:
    project = factory.project(**settings)
    rater = factory.user()
    return project, rater, bearer(factory.token(rater))


def next_of(client: TestClient, project: Project, headers: dict[str, str]) -> Any:
    return client.get(f"/api/v1/projects/{project.slug}/assignments/next", headers=headers)


def judge(client: TestClient, assignment_id: int, headers: dict[str, str], **body: Any) -> Any:
    return client.post(f"/api/v1/assignments/{assignment_id}/judgment", json=body, headers=headers)


def test_next_returns_the_pair_without_gold_and_then_the_same_lease(
    client: TestClient, factory: Factory
) -> None:
    project, rater, headers = setup(factory, gold_rate=1.0)
    pair = factory.pair(project, texts=("first", "second"), prompt="Why?", gold_choice="a")
    got = next_of(client, project, headers)
    assert got.status_code == 200
    body = got.json()
    assert set(body) == {
        "id", "pair_id", "project", "prompt", "response_a", "response_b", "shown_left",
        "leased_at", "expires_at",
    }  # fmt: skip
    assert "gold" not in got.text
    assert body["pair_id"] == pair.id
    assert body["prompt"]["messages"] == [{"role": "user", "content": "Why?"}]
    assert body["response_a"] == {"id": pair.response_a_id, "text": "first", "truncated": False}
    assert body["response_b"] == {"id": pair.response_b_id, "text": "second", "truncated": False}
    again = next_of(client, project, headers)
    assert again.json()["id"] == body["id"]
    row = factory.session.get(Assignment, body["id"])
    assert row is not None and row.rater_id == rater.id and row.status == "leased"
    assert count(factory, Assignment) == 1


def test_next_204_when_nothing_is_left_and_404_for_unknown_project(
    client: TestClient, factory: Factory
) -> None:
    project, _, headers = setup(factory)
    assert next_of(client, project, headers).status_code == 204
    missing = client.get("/api/v1/projects/nope/assignments/next", headers=headers)
    assert missing.status_code == 404
    assert client.get(f"/api/v1/projects/{project.slug}/assignments/next").status_code == 401
    assert count(factory, Assignment) == 0


def test_submit_stores_in_pair_terms_and_is_idempotent(
    client: TestClient, factory: Factory
) -> None:
    project, rater, headers = setup(factory)
    pair = factory.pair(project)
    a = next_of(client, project, headers).json()
    body = {
        "choice": "b",
        "strength": 2,
        "aspects": {"honesty": "b", "helpfulness": "tie"},
        "rationale": "B is right",
        "flags": ["broken"],
        "active_ms": 1500,
    }
    first = judge(client, a["id"], headers, **body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["choice"] == "b" and out["strength"] == 2 and out["pair_id"] == pair.id
    assert "gold" not in first.text
    second = judge(client, a["id"], headers, **body)
    assert second.status_code == 200 and second.json() == out
    different = judge(client, a["id"], headers, choice="a", strength=1)
    assert different.status_code == 409
    rows = factory.session.scalars(sa.select(Judgment)).all()
    assert len(rows) == 1
    row = rows[0]
    assert (row.rater_id, row.assignment_id, row.flags, row.aspects) == (
        rater.id, a["id"], ["broken"], {"honesty": "b", "helpfulness": "tie"},
    )  # fmt: skip
    assert row.shown_left == a["shown_left"] and row.active_ms is not None
    assert row.time_on_task_ms is not None and row.time_on_task_ms >= 0
    factory.session.rollback()  # a new snapshot: test sessions are deferred
    factory.session.expire_all()
    assert factory.session.get(ComparisonPair, pair.id).judgment_count == 1  # type: ignore[union-attr]
    assert factory.session.get(Assignment, a["id"]).status == "submitted"  # type: ignore[union-attr]


def test_concurrent_identical_submits_store_one_row(client: TestClient, factory: Factory) -> None:
    project, _, headers = setup(factory)
    factory.pair(project)
    a = next_of(client, project, headers).json()
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: judge(client, a["id"], headers, choice="tie"), range(6)))
    assert {r.status_code for r in answers} == {200}
    assert len({r.text for r in answers}) == 1
    assert count(factory, Judgment) == 1


def test_validation_rules(client: TestClient, factory: Factory) -> None:
    project, _, headers = setup(factory, aspects=["clarity"], require_rationale=True)
    factory.pair(project)
    a = next_of(client, project, headers).json()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"choice": "left", "rationale": "r"}, "choice"),
        ({"choice": "a", "rationale": "r"}, "strength"),
        ({"choice": "a", "strength": 3, "rationale": "r"}, "strength"),
        ({"choice": "tie", "strength": 1, "rationale": "r"}, "strength"),
        ({"choice": "tie", "aspects": {"honesty": "a"}, "rationale": "r"}, "aspects.honesty"),
        ({"choice": "tie", "aspects": {"clarity": "best"}, "rationale": "r"}, "aspects.clarity"),
        ({"choice": "tie", "flags": ["rude"], "rationale": "r"}, "flags"),
        ({"choice": "tie"}, "rationale"),
        ({"choice": "tie", "rationale": "  "}, "rationale"),
    ]
    for body, field in cases:
        got = judge(client, a["id"], headers, **body)
        assert got.status_code == 422, body
        assert field in [e["field"] for e in got.json()["errors"]], (body, got.json())
    unknown_key = judge(client, a["id"], headers, choice="tie", rationale="r", gold="a")
    assert unknown_key.status_code == 422
    assert count(factory, Judgment) == 0
    ok = judge(client, a["id"], headers, choice="tie", aspects={"clarity": "tie"}, rationale="r")
    assert ok.status_code == 200


def test_other_raters_cannot_touch_an_assignment(client: TestClient, factory: Factory) -> None:
    project, _, headers = setup(factory)
    factory.pair(project)
    a = next_of(client, project, headers).json()
    other = bearer(factory.token(factory.user()))
    assert judge(client, a["id"], other, choice="tie").status_code == 404
    skip = client.post(f"/api/v1/assignments/{a['id']}/skip", json={"reason": "x"}, headers=other)
    assert skip.status_code == 404
    assert judge(client, 999_999, headers, choice="tie").status_code == 404
    assert count(factory, Judgment) == 0


def test_skip_with_reason_then_never_again(client: TestClient, factory: Factory) -> None:
    project, rater, headers = setup(factory)
    pair = factory.pair(project)
    a = next_of(client, project, headers).json()
    url = f"/api/v1/assignments/{a['id']}/skip"
    assert client.post(url, json={"reason": ""}, headers=headers).status_code == 422
    assert client.post(url, json={"reason": "   "}, headers=headers).status_code == 422
    got = client.post(url, json={"reason": "not my field"}, headers=headers)
    assert got.status_code == 200
    assert got.json() == {"id": a["id"], "status": "skipped", "skip_reason": "not my field"}
    assert judge(client, a["id"], headers, choice="tie").status_code == 409
    assert next_of(client, project, headers).status_code == 204
    row = factory.session.get(Assignment, a["id"])
    assert row is not None and row.status == "skipped" and row.pair_id == pair.id
    assert row.completed_at is not None
    assert count(factory, Judgment) == 0


def test_expired_lease_returns_pair_and_late_submit_rules(
    client: TestClient, factory: Factory
) -> None:
    project, slow, slow_headers = setup(factory, overlap=1, lease_ttl_s=30)
    factory.pair(project)
    a = next_of(client, project, slow_headers).json()
    quick_headers = bearer(factory.token(factory.user()))
    assert next_of(client, project, quick_headers).status_code == 204
    # let the lease run out (moving the clock in the row is simpler than sleeping)
    factory.session.execute(
        sa.update(Assignment)
        .where(Assignment.id == a["id"])
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    factory.session.commit()
    b = next_of(client, project, quick_headers)
    assert b.status_code == 200 and b.json()["pair_id"] == a["pair_id"]
    late = judge(client, a["id"], slow_headers, choice="tie")
    assert late.status_code == 409
    assert "ran out" in late.json()["detail"]
    assert judge(client, b.json()["id"], quick_headers, choice="tie").status_code == 200
    assert count(factory, Judgment) == 1


def test_late_submit_is_stored_while_the_pair_still_needs_judgments(
    client: TestClient, factory: Factory
) -> None:
    project, _, headers = setup(factory, overlap=2)
    factory.pair(project)
    a = next_of(client, project, headers).json()
    factory.session.execute(
        sa.update(Assignment).values(expires_at=utcnow() - timedelta(seconds=1), status="expired")
    )
    factory.session.commit()
    assert judge(client, a["id"], headers, choice="a", strength=1).status_code == 200
    assert count(factory, Judgment) == 1


def test_gold_marking_is_admin_only_and_scores_judgments(
    client: TestClient, factory: Factory
) -> None:
    project, rater, headers = setup(factory, gold_rate=0.0)
    pair = factory.pair(project)
    admin_headers = bearer(factory.token(factory.user("admin")))
    url = f"/api/v1/pairs/{pair.id}/gold"
    assert client.put(url, json={"choice": "a"}, headers=headers).status_code == 403
    assert client.put(url, json={"choice": "left"}, headers=admin_headers).status_code == 422
    assert client.put("/api/v1/pairs/999999/gold", json={"choice": "a"}, headers=admin_headers)\
        .status_code == 404  # fmt: skip
    got = client.put(url, json={"choice": "a"}, headers=admin_headers)
    assert got.status_code == 200 and got.json() == {"pair_id": pair.id, "gold_choice": "a"}
    a = next_of(client, project, headers).json()  # gold is still served when nothing else is
    assert a["pair_id"] == pair.id and "gold" not in str(a)
    out = judge(client, a["id"], headers, choice="b", strength=1)
    assert out.status_code == 200 and "gold" not in out.text
    row = factory.session.scalar(sa.select(Judgment))
    assert row is not None and row.gold_correct is False
    audit = factory.session.scalar(sa.select(AuditEvent).where(AuditEvent.action == "pair.gold"))
    assert audit is not None and audit.target_id == pair.id
    cleared = client.put(url, json={"choice": None}, headers=admin_headers)
    assert cleared.json()["gold_choice"] is None
    factory.session.rollback()  # a new snapshot: test sessions are deferred
    factory.session.expire_all()
    assert factory.session.get(Judgment, row.id).gold_correct is None  # type: ignore[union-attr]


def test_browser_session_needs_csrf_on_writes(client: TestClient, factory: Factory) -> None:
    project = factory.project()
    factory.pair(project)
    factory.user(email="web@example.com")
    login_page = client.get("/login")
    token = login_page.text.split('name="csrf_token" value="')[1].split('"')[0]
    client.post(
        "/login",
        data={"email": "web@example.com", "password": "correct horse battery", "csrf_token": token},
    )
    a = client.get(f"/api/v1/projects/{project.slug}/assignments/next").json()
    url = f"/api/v1/assignments/{a['id']}/judgment"
    assert client.post(url, json={"choice": "tie"}).status_code == 403
    csrf = client.get("/").text.split('name="csrf-token" content="')[1].split('"')[0]
    ok = client.post(url, json={"choice": "tie"}, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200
    assert count(factory, Judgment) == 1
