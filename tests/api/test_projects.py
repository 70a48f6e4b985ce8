from fastapi.testclient import TestClient

from app.models import AuditEvent, Project
from tests.conftest import Factory, bearer


def test_create_get_patch_and_list(client: TestClient, factory: Factory) -> None:
    headers = bearer(factory.token(factory.user("admin")))
    created = client.post(
        "/api/v1/projects",
        json={"slug": "helpful", "name": "Helpful", "settings": {"overlap": 5}},
        headers=headers,
    )
    assert created.status_code == 201, created.text
    settings = created.json()["settings"]
    assert settings["overlap"] == 5 and settings["lease_ttl_s"] == 600  # defaults filled in
    patched = client.patch(
        "/api/v1/projects/helpful",
        json={"guidelines": "# Be kind", "settings": {"require_rationale": True}},
        headers=headers,
    )
    assert patched.status_code == 200
    body = patched.json()
    assert body["guidelines"] == "# Be kind"
    assert body["settings"]["require_rationale"] is True and body["settings"]["overlap"] == 5
    assert [p["slug"] for p in client.get("/api/v1/projects", headers=headers).json()] == [
        "helpful"
    ]
    actions = [e.action for e in factory.session.query(AuditEvent).all()]
    assert "project.create" in actions and "project.update" in actions


def test_duplicate_slug_is_409(client: TestClient, factory: Factory) -> None:
    headers = bearer(factory.token(factory.user("admin")))
    body = {"slug": "dup", "name": "Dup"}
    assert client.post("/api/v1/projects", json=body, headers=headers).status_code == 201
    again = client.post("/api/v1/projects", json=body, headers=headers)
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    assert factory.count(Project) == 1


def test_invalid_slug_and_settings_are_422(client: TestClient, factory: Factory) -> None:
    headers = bearer(factory.token(factory.user("admin")))
    bad_slug = client.post(
        "/api/v1/projects", json={"slug": "Bad Slug!", "name": "x"}, headers=headers
    )
    assert bad_slug.status_code == 422
    bad_settings = client.post(
        "/api/v1/projects",
        json={"slug": "ok", "name": "x", "settings": {"overlap": 0, "surprise": 1}},
        headers=headers,
    )
    assert bad_settings.status_code == 422
    fields = {e["field"] for e in bad_settings.json()["errors"]}
    assert fields == {"settings.overlap", "settings.surprise"}
    missing = client.post("/api/v1/projects", json={"name": "x"}, headers=headers)
    assert missing.status_code == 422 and missing.json()["errors"][0]["field"] == "slug"
    assert factory.count(Project) == 0


def test_loop_configs_are_checked_against_their_run_kinds_knobs(
    client: TestClient, factory: Factory
) -> None:
    headers = bearer(factory.token(factory.user("admin")))
    bad = client.post(
        "/api/v1/projects",
        headers=headers,
        json={
            "slug": "loopy",
            "name": "Loopy",
            "settings": {
                "loop_ppo_config": {"total_steps": 0},
                "loop_reward_config": {"train_mode": "half"},
                "loop_generation_config": {"temprature": 0.5},
            },
        },
    )
    assert bad.status_code == 422
    errors = {e["field"]: e["message"] for e in bad.json()["errors"]}
    assert set(errors) == {
        "settings.loop_ppo_config",
        "settings.loop_reward_config",
        "settings.loop_generation_config",
    }
    assert (
        "total_steps: Input should be greater than or equal to 1"
        in errors["settings.loop_ppo_config"]
    )
    assert (
        "'temprature' is not a knob of generate runs" in errors["settings.loop_generation_config"]
    )
    assert factory.count(Project) == 0
    good = client.post(
        "/api/v1/projects",
        headers=headers,
        json={
            "slug": "loopy",
            "name": "Loopy",
            "settings": {"loop_ppo_config": {"use_lora": True}},
        },
    )
    assert good.status_code == 201, good.text


def test_unknown_project_is_404(client: TestClient, factory: Factory) -> None:
    headers = bearer(factory.token(factory.user("rater")))
    assert client.get("/api/v1/projects/missing", headers=headers).status_code == 404


def test_raters_list_only_the_projects_they_may_rate(client: TestClient, factory: Factory) -> None:
    from app.services import staffing

    open_project, staffed, mine = (
        factory.project("open"),
        factory.project("staffed"),
        factory.project("mine"),
    )
    me, colleague = factory.user("rater"), factory.user("rater")
    staffing.add_member(factory.session, staffed, colleague)
    staffing.add_member(factory.session, mine, me)
    factory.session.commit()
    listed = client.get("/api/v1/projects", headers=bearer(factory.token(me))).json()
    assert [p["slug"] for p in listed] == [open_project.slug, mine.slug]
    admin = client.get("/api/v1/projects", headers=bearer(factory.token(factory.user("admin"))))
    assert len(admin.json()) == 3
