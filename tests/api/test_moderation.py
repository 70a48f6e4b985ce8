"""The governance API: rater exclusions and the moderation queue, by role, with the rows and
audit events they leave."""

from fastapi.testclient import TestClient

from app.models import AuditEvent, RaterExclusion
from tests.conftest import Factory, bearer
from tests.services.test_snapshots import judge


def test_exclude_list_and_lift_a_rater(client: TestClient, factory: Factory) -> None:
    project = factory.project("gov")
    admin = factory.user("admin", "boss@example.com")
    headers = bearer(factory.token(admin))
    rater = factory.user("rater", "spam@example.com")
    judge(factory, factory.pair(project), rater, "a")
    url = "/api/v1/projects/gov/exclusions"

    made = client.post(
        url, json={"email": "SPAM@example.com", "reason": "left 95 %"}, headers=headers
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert (body["rater_id"], body["rater_email"], body["live"], body["created_by"]) == (
        rater.id, "spam@example.com", True, "boss@example.com",
    )  # fmt: skip
    again = client.post(url, json={"rater_id": rater.id, "reason": "again"}, headers=headers)
    assert again.status_code == 409 and "already excluded" in again.json()["detail"]

    listed = client.get(url, headers=headers).json()
    assert [(e["rater_email"], e["live"]) for e in listed] == [("spam@example.com", True)]
    snap = client.post("/api/v1/projects/gov/snapshots", headers=headers)
    assert snap.status_code == 422  # the only judgment is the excluded rater's

    lifted = client.post(f"{url}/{rater.id}/lift", json={"reason": "retrained"}, headers=headers)
    assert lifted.status_code == 200, lifted.text
    assert (lifted.json()["live"], lifted.json()["lift_reason"]) == (False, "retrained")
    assert client.get(url, params={"live": "true"}, headers=headers).json() == []
    assert client.get(url, headers=headers).json()[0]["lifted_by"] == "boss@example.com"
    again = client.post(f"{url}/{rater.id}/lift", json={"reason": "x"}, headers=headers)
    assert again.status_code == 409
    snap = client.post("/api/v1/projects/gov/snapshots", headers=headers)
    assert snap.status_code == 201 and snap.json()["stats"]["excluded"]["raters"]["raters"] == 0

    actions = [e.action for e in factory.session.query(AuditEvent).order_by(AuditEvent.id)]
    assert [a for a in actions if a.startswith("rater.")] == ["rater.exclude", "rater.include"]


def test_exclusion_errors_name_the_field(client: TestClient, factory: Factory) -> None:
    factory.project("gov")
    headers = bearer(factory.token(factory.user("admin")))
    rater = factory.user("rater")
    url = "/api/v1/projects/gov/exclusions"
    cases = [
        ({"rater_id": rater.id, "reason": "  "}, "reason"),
        ({"rater_id": rater.id}, "reason"),
        ({"rater_id": 999_999, "reason": "spam"}, "rater_id"),
        ({"email": "nobody@example.com", "reason": "spam"}, "email"),
        ({"reason": "spam"}, "rater_id"),
    ]
    for body, field in cases:
        answer = client.post(url, json=body, headers=headers)
        assert answer.status_code == 422, (body, answer.text)
        assert [e["field"] for e in answer.json()["errors"]] == [field], body
    assert factory.count(RaterExclusion) == 0
    assert (
        client.post(
            "/api/v1/projects/nope/exclusions", json=cases[0][0], headers=headers
        ).status_code
        == 404
    )


def test_roles(client: TestClient, factory: Factory) -> None:
    project = factory.project("gov")
    pair = factory.pair(project)
    rater = factory.user("rater")
    reviewer = bearer(factory.token(factory.user("reviewer")))
    rater_h = bearer(factory.token(rater))
    base = "/api/v1/projects/gov"
    for path in ("/exclusions", "/moderation"):
        assert client.get(base + path, headers=reviewer).status_code == 200
        assert client.get(base + path, headers=rater_h).status_code == 403
        assert client.get(base + path).status_code == 401
    writes = [
        (f"{base}/exclusions", {"rater_id": rater.id, "reason": "x"}),
        (f"{base}/exclusions/{rater.id}/lift", {"reason": "x"}),
        (f"{base}/moderation/pairs/{pair.id}", {"action": "resolve"}),
        (f"{base}/moderation/prompts/{pair.prompt_id}", {"action": "resolve"}),
        (f"{base}/moderation/responses/{pair.response_a_id}", {"action": "resolve"}),
    ]
    for url, body in writes:
        assert client.post(url, json=body, headers=reviewer).status_code == 403, url
        assert client.post(url, json=body, headers=rater_h).status_code == 403, url
    actions = [e.action for e in factory.session.query(AuditEvent)]
    assert [a for a in actions if a.startswith(("rater.", "moderation."))] == []


def test_queue_and_actions(client: TestClient, factory: Factory) -> None:
    project = factory.project("gov", overlap=3)
    admin = factory.user("admin")
    headers = bearer(factory.token(admin))
    ann = factory.user("rater", "ann@example.com")
    bad = factory.pair(project, ("<b>bold</b> claim", "fine"), prompt="Tell me <secrets>")
    other = factory.pair(project, ("x", "y"), prompt="q2")
    j = judge(factory, bad, ann, "b", flags=["unsafe", "personal_data"])
    judge(factory, other, ann, "a", flags=["broken"])
    url = "/api/v1/projects/gov/moderation"

    page = client.get(url, params={"flag": "unsafe"}, headers=headers)
    assert page.status_code == 200, page.text
    body = page.json()
    assert (body["total"], body["next_offset"], body["state"]) == (1, None, "open")
    assert body["open_by_flag"] == {"unsafe": 1, "personal_data": 1, "broken": 1}
    item = body["items"][0]
    assert item["pair_id"] == bad.id and item["status"] == "open"
    assert item["prompt"] == [{"role": "user", "content": "Tell me <secrets>"}]
    assert item["response_a"]["text"] == "<b>bold</b> claim" and item["response_a"]["model"] == "m1"
    assert item["flags"][0]["rater_email"] == "ann@example.com"
    assert item["flags"][0]["judgment_id"] == j.id and item["flags"][0]["new"] is True
    assert item["counts"] == {"unsafe": 1, "personal_data": 1}
    assert client.get(url, params={"limit": 1}, headers=headers).json()["next_offset"] == 1

    removed = client.post(
        f"{url}/pairs/{bad.id}", json={"action": "remove", "reason": "leaks a phone number"},
        headers=headers,
    )  # fmt: skip
    assert removed.status_code == 200, removed.text
    assert removed.json() == {
        "action": "remove", "target_type": "pair", "target_id": bad.id,
        "pair_ids": [bad.id], "changed": 1,
    }  # fmt: skip
    assert [i["pair_id"] for i in client.get(url, headers=headers).json()["items"]] == [other.id]
    history = client.get(url, params={"state": "moderated"}, headers=headers).json()
    assert [(i["pair_id"], i["status"]) for i in history["items"]] == [(bad.id, "removed")]
    assert history["items"][0]["rating_removed_at"] is not None

    prompt = client.post(
        f"{url}/prompts/{other.prompt_id}", json={"action": "resolve"}, headers=headers
    )
    assert prompt.status_code == 200 and prompt.json()["pair_ids"] == [other.id]
    response = client.post(
        f"{url}/responses/{bad.response_a_id}", json={"action": "restore", "reason": "ok"},
        headers=headers,
    )  # fmt: skip
    assert response.status_code == 200 and response.json()["changed"] == 1
    assert client.get(url, headers=headers).json()["total"] == 0
    events = [
        (e.action, e.target_type, e.actor_id)
        for e in factory.session.query(AuditEvent).order_by(AuditEvent.id)
        if e.action.startswith("moderation.")
    ]
    assert events == [
        ("moderation.remove", "pair", admin.id),
        ("moderation.resolve", "prompt", admin.id),
        ("moderation.restore", "response", admin.id),
    ]


def test_moderation_bad_parameters_are_422_or_404(client: TestClient, factory: Factory) -> None:
    project = factory.project("gov")
    pair = factory.pair(project)
    theirs = factory.pair(factory.project("theirs"))
    headers = bearer(factory.token(factory.user("admin")))
    url = "/api/v1/projects/gov/moderation"
    for params, field in [
        ({"state": "closed"}, "state"),
        ({"flag": "rude"}, "flag"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"offset": -1}, "offset"),
    ]:
        answer = client.get(url, params=params, headers=headers)
        assert answer.status_code == 422, params
        assert [e["field"] for e in answer.json()["errors"]] == [field], answer.json()
    for body, field in [
        ({"action": "delete"}, "action"),
        ({"action": "exclude"}, "reason"),
        ({"action": "remove", "reason": " "}, "reason"),
    ]:
        answer = client.post(f"{url}/pairs/{pair.id}", json=body, headers=headers)
        assert answer.status_code == 422, body
        assert [e["field"] for e in answer.json()["errors"]] == [field], answer.json()
    assert (
        client.post(
            f"{url}/pairs/{theirs.id}", json={"action": "resolve"}, headers=headers
        ).status_code
        == 404
    )
    restore = client.post(
        f"{url}/pairs/{pair.id}", json={"action": "restore", "reason": "x"}, headers=headers
    )
    assert restore.status_code == 409 and "nothing to restore" in restore.json()["detail"]
