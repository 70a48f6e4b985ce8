"""GET /api/v1/audit: who may read it, the filters and pages through HTTP, and the 422 of a
filter that names nothing. The filters themselves are checked in tests/services/test_audit.py."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.models import AuditEvent
from app.services import audit
from tests.conftest import Factory, bearer


def test_readers_see_the_log_raters_and_strangers_do_not(
    client: TestClient, factory: Factory
) -> None:
    admin, reviewer, rater = factory.user("admin"), factory.user("reviewer"), factory.user()
    for user, expected in ((admin, 200), (reviewer, 200), (rater, 403)):
        answer = client.get("/api/v1/audit", headers=bearer(factory.token(user)))
        assert answer.status_code == expected, (user.role, answer.text)
    assert client.get("/api/v1/audit").status_code == 401


def test_an_action_through_the_api_is_in_its_project_s_log(
    client: TestClient, factory: Factory
) -> None:
    admin = factory.user("admin", "chief@example.com")
    headers = bearer(factory.token(admin))
    project = factory.project("audited")
    pair = factory.pair(project)
    judge = client.put(f"/api/v1/pairs/{pair.id}/gold", json={"choice": "a"}, headers=headers)
    assert judge.status_code == 200, judge.text
    other = factory.project("elsewhere")
    factory.pair(other)

    answer = client.get("/api/v1/audit?project=audited", headers=headers)
    assert answer.status_code == 200
    events = answer.json()["events"]
    assert [e["action"] for e in events] == ["pair.gold", "project.create"]
    gold = events[0]
    assert gold["actor_email"] == "chief@example.com" and gold["actor_id"] == admin.id
    assert (gold["project_slug"], gold["target_type"], gold["target_id"]) == (
        "audited", "pair", pair.id,
    )  # fmt: skip
    assert gold["data"]["choice"] == "a"
    assert gold["created_at"].endswith("Z") or "+00:00" in gold["created_at"]


def test_pages_link_to_the_next_with_the_same_filters(client: TestClient, factory: Factory) -> None:
    admin = factory.user("admin")
    headers = bearer(factory.token(admin))
    s = factory.session
    s.execute(sa.delete(AuditEvent))
    made = [
        audit.record(s, "rater.exclude", actor_id=admin.id, target=("user", n)) for n in range(5)
    ]
    audit.record(s, "run.create", actor_id=admin.id)
    s.commit()
    expected = [e.id for e in made][::-1]

    seen: list[int] = []
    url: str | None = f"/api/v1/audit?action=rater.&actor={admin.email}&limit=2"
    pages = 0
    while url:
        answer = client.get(url, headers=headers)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        seen += [e["id"] for e in body["events"]]
        assert all(e["action"] == "rater.exclude" for e in body["events"])
        url, pages = body["next"], pages + 1
        assert (url is None) == (body["next_before"] is None)
        if url:
            assert "action=rater." in url and "limit=2" in url and "actor=" in url
    assert seen == expected and pages == 3


def test_bad_parameters_are_a_422_saying_which_and_why(
    client: TestClient, factory: Factory
) -> None:
    headers = bearer(factory.token(factory.user("admin")))
    answer = client.get("/api/v1/audit?actor=ghost@example.com&until=soon", headers=headers)
    assert answer.status_code == 422
    body = answer.json()
    assert {e["field"]: e["message"] for e in body["errors"]} == {
        "actor": "no user with the email or id 'ghost@example.com'",
        "until": "'soon' is not a date (YYYY-MM-DD) or an ISO date-time",
    }
    assert "ghost@example.com" in body["detail"]
    too_many = client.get(f"/api/v1/audit?limit={audit.MAX_PAGE_SIZE + 1}", headers=headers)
    assert too_many.status_code == 422
    assert too_many.json()["errors"][0]["field"] == "limit"
    assert client.get("/api/v1/audit?before=0", headers=headers).status_code == 422
