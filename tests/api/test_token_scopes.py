"""API tokens with an expiry and a scope: enforced on every call, never wider than the owner's
role, and created with both from the API, the CLI and the tokens page."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.models import ApiToken, User, utcnow
from app.services import users
from app.services.errors import InvalidInput
from tests.conftest import Factory, bearer, run_verdict
from tests.console.conftest import Browser


def token_with(factory: Factory, user: User, scope: str, **kwargs: object) -> str:
    factory.session.commit()
    secret = users.create_token(factory.session, user, scope, scope=scope, **kwargs).secret  # type: ignore[arg-type]
    factory.session.commit()
    return secret


def test_expired_token_is_401_saying_when(client: TestClient, factory: Factory) -> None:
    admin = factory.user("admin")
    live = token_with(factory, admin, "admin", expires_in_days=1)
    assert client.get("/api/v1/me", headers=bearer(live)).status_code == 200
    expired = token_with(
        factory, admin, "admin", expires_in_days=1, now=utcnow() - timedelta(days=2)
    )
    row = factory.token_row(expired)
    answer = client.get("/api/v1/me", headers=bearer(expired))
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.json()["detail"] == (
        f"this token expired on {row.expires_at:%Y-%m-%d %H:%M} UTC: create a new one"
    )
    # An expiry in the future is a live token; no expiry never expires.
    assert row.expires_at is not None and row.expires_at < utcnow()
    assert factory.token_row(live).expires_at > utcnow() + timedelta(hours=23)  # type: ignore[operator]
    assert factory.token_row(factory.token(admin)).expires_at is None


# Each scope against a GET, the rating calls, and an admin write: the expected status codes.
SCOPE_MATRIX = {
    #         GET /me  next  judgment  skip  POST /projects
    "read": (200, 403, 403, 403, 403),
    "rater": (200, 200, 200, 200, 403),
    "admin": (200, 200, 200, 200, 201),
}


@pytest.mark.parametrize("scope", list(SCOPE_MATRIX))
def test_each_scope_against_a_read_a_rating_call_and_an_admin_call(
    scope: str, client: TestClient, factory: Factory
) -> None:
    admin = factory.user("admin")
    project = factory.project()
    for _ in range(2):
        factory.pair(project)
    headers = bearer(token_with(factory, admin, scope))
    rating = bearer(factory.token(admin))  # to lease the assignments a narrow token cannot

    def lease(h: dict[str, str]) -> tuple[int, int | None]:
        answer = client.get(f"/api/v1/projects/{project.slug}/assignments/next", headers=h)
        return answer.status_code, answer.json()["id"] if answer.status_code == 200 else None

    got_me = client.get("/api/v1/me", headers=headers).status_code
    got_next, first = lease(headers)
    if first is None:
        _, first = lease(rating)
    judged = client.post(
        f"/api/v1/assignments/{first}/judgment", json={"choice": "tie"}, headers=headers
    ).status_code
    _, second = lease(headers if got_next == 200 else rating)
    skipped = client.post(
        f"/api/v1/assignments/{second}/skip", json={"reason": "unclear"}, headers=headers
    ).status_code
    created = client.post(
        "/api/v1/projects", json={"slug": f"by-{scope}", "name": "x"}, headers=headers
    )
    assert (got_me, got_next, judged, skipped, created.status_code) == SCOPE_MATRIX[scope]
    if created.status_code == 403:
        assert created.json()["detail"] == (
            f"this token's scope ({scope}) does not allow this call: it needs a token with"
            " scope admin"
        )
    if scope == "read":
        refused = client.get(f"/api/v1/projects/{project.slug}/assignments/next", headers=headers)
        assert refused.json()["detail"].endswith("it needs a token with scope rater or admin")


def test_scope_never_exceeds_the_role(factory: Factory) -> None:
    rater, reviewer, admin = factory.user("rater"), factory.user("reviewer"), factory.user("admin")
    with pytest.raises(InvalidInput) as refused:
        users.create_token(factory.session, rater, "too wide", scope="admin")
    assert refused.value.errors[0].field == "scope"
    assert "a rater's token can have scope read or rater, not admin" in refused.value.message
    factory.session.rollback()
    assert users.scopes_for(rater) == ["read", "rater"]
    assert users.scopes_for(reviewer) == users.scopes_for(admin) == ["read", "rater", "admin"]
    # The default is the widest the role allows.
    assert factory.token_row(factory.token(rater)).scope == "rater"
    assert factory.token_row(factory.token(admin)).scope == "admin"
    with pytest.raises(InvalidInput):
        users.create_token(factory.session, admin, "x", scope="root")
    with pytest.raises(InvalidInput):
        users.create_token(factory.session, admin, "x", expires_in_days="0")


def test_api_creation_with_scope_and_expiry(client: TestClient, factory: Factory) -> None:
    admin = factory.user("admin")
    made = client.post(
        "/api/v1/tokens",
        json={"name": "reader", "scope": "read", "expires_in_days": 3},
        headers=bearer(factory.token(admin)),
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["scope"] == "read" and body["expires_at"] is not None
    row = factory.token_row(body["token"])
    assert row.scope == "read"
    assert timedelta(days=3) - timedelta(minutes=1) < row.expires_at - row.created_at  # type: ignore[operator]
    reader = bearer(body["token"])
    assert client.get("/api/v1/tokens", headers=reader).status_code == 200
    # A narrow token cannot mint a wider one (creating is a write: it needs scope admin).
    minted = client.post("/api/v1/tokens", json={"name": "wider"}, headers=reader)
    assert minted.status_code == 403
    bad = client.post(
        "/api/v1/tokens",
        json={"name": "x", "expires_in_days": 0},
        headers=bearer(factory.token(admin)),
    )
    assert bad.status_code == 422


def test_migrated_tokens_keep_full_access_and_role_still_bounds_scope(
    client: TestClient, factory: Factory
) -> None:
    """A token from before scopes is `admin` (the column's server default): a rater holding one
    may still manage their tokens, but cannot get an admin-scoped token from it."""
    rater = factory.user("rater")
    factory.session.execute(
        sa.insert(ApiToken).values(
            user_id=rater.id, name="old", prefix="vd_old", token_hash="0" * 64,
            created_at=utcnow(),
        )
    )  # fmt: skip
    factory.session.commit()
    legacy = factory.session.scalar(sa.select(ApiToken).where(ApiToken.name == "old"))
    assert legacy is not None and legacy.scope == "admin" and legacy.expires_at is None
    # Give it a real secret to use it.
    from app.core import security

    secret = security.new_api_token()
    legacy.token_hash = security.hash_api_token(secret)
    factory.session.commit()
    headers = bearer(secret)
    wider = client.post("/api/v1/tokens", json={"name": "w", "scope": "admin"}, headers=headers)
    assert wider.status_code == 422
    assert wider.json()["errors"][0]["field"] == "scope"
    narrow = client.post("/api/v1/tokens", json={"name": "n", "scope": "read"}, headers=headers)
    assert narrow.status_code == 201


def test_a_token_may_revoke_itself_but_only_admin_scope_revokes_others(
    client: TestClient, factory: Factory
) -> None:
    rater = factory.user("rater")
    first, second = factory.token(rater), factory.token(rater)
    other = factory.token_row(second).id
    refused = client.delete(f"/api/v1/tokens/{other}", headers=bearer(first))
    assert refused.status_code == 403
    assert "may revoke only itself" in refused.json()["detail"]
    own = factory.token_row(first).id
    assert client.delete(f"/api/v1/tokens/{own}", headers=bearer(first)).status_code == 200
    assert client.get("/api/v1/me", headers=bearer(first)).status_code == 401
    assert client.get("/api/v1/me", headers=bearer(second)).status_code == 200


def test_deactivation_stops_the_users_tokens(client: TestClient, factory: Factory) -> None:
    admin, rater = factory.user("admin"), factory.user("rater")
    secret = factory.token(rater)
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 200
    users.set_active(factory.session, rater.id, False, actor=admin)
    factory.session.commit()
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 401
    users.set_active(factory.session, rater.id, True, actor=admin)
    factory.session.commit()
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 200


def test_cli_creates_scoped_expiring_tokens(db_url: str, tmp_path: Path, factory: Factory) -> None:
    rater = factory.user("rater")
    env = {**os.environ, "VERDICT_DATABASE_URL": db_url, "VERDICT_VAR_DIR": str(tmp_path / "var")}
    made = run_verdict(
        "token", "create", "--email", rater.email, "--name", "script", "--scope", "read",
        "--expires-in-days", "30", env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "(scope read, until " in made.stdout
    row = factory.token_row(made.stdout.strip().splitlines()[-1])
    assert row.scope == "read" and row.expires_at is not None
    too_wide = run_verdict(
        "token", "create", "--email", rater.email, "--name", "x", "--scope", "admin", env=env
    )
    assert too_wide.returncode == 1
    assert "a rater's token can have scope read or rater" in too_wide.stderr
    assert factory.count(ApiToken) == 1


def test_tokens_page_creates_and_lists_scope_expiry_and_expired(
    client: TestClient, factory: Factory
) -> None:
    rater = factory.user("rater")
    token_with(factory, rater, "read", expires_in_days=1, now=utcnow() - timedelta(days=3))
    browser = Browser(client, rater)
    page = browser.get("/account/tokens").text  # type: ignore[attr-defined]
    assert '<option value="read"' in page and '<option value="rater"' in page
    assert '<option value="admin"' not in page  # not offered beyond the role
    assert '<span class="badge cancelled">expired</span>' in page
    made = browser.post(
        "/account/tokens", {"name": "labels", "scope": "read", "expires_in_days": "7"}
    )
    assert made.status_code == 201  # type: ignore[attr-defined]
    row = factory.session.scalar(sa.select(ApiToken).where(ApiToken.name == "labels"))
    assert row is not None and row.scope == "read" and row.expires_at is not None
    listed = browser.get("/account/tokens").text  # type: ignore[attr-defined]
    assert f'title="{row.expires_at:%Y-%m-%d %H:%M} UTC"' in listed
    assert '<span class="badge scope-read">read</span>' in listed
    refused = browser.post("/account/tokens", {"name": "x", "scope": "admin"})
    assert refused.status_code == 422  # type: ignore[attr-defined]
    assert "not admin" in refused.text  # type: ignore[attr-defined]
    assert 'id="token-scope-error"' in refused.text  # type: ignore[attr-defined]
    bad_days = browser.post("/account/tokens", {"name": "y", "expires_in_days": "-1"})
    assert 'id="token-expiry-error"' in bad_days.text  # type: ignore[attr-defined]
    assert factory.count(ApiToken) == 2
