"""Authentication and authorization: tokens, sessions, CSRF, and the route x role matrix."""

import re

import pytest
from fastapi.testclient import TestClient

from app.models import Project, User
from tests.conftest import TEST_PASSWORD, Factory, bearer


def test_no_token_is_401(client: TestClient) -> None:
    response = client.get("/api/v1/projects")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_malformed_authorization_header_is_401(client: TestClient) -> None:
    assert client.get("/api/v1/me", headers={"Authorization": "Basic abc"}).status_code == 401
    assert client.get("/api/v1/me", headers=bearer("vd_not-a-real-token")).status_code == 401


def test_token_is_shown_once_and_stored_hashed(client: TestClient, factory: Factory) -> None:
    admin = factory.user("admin")
    created = client.post(
        "/api/v1/tokens", json={"name": "ci"}, headers=bearer(factory.token(admin))
    )
    assert created.status_code == 201
    secret = created.json()["token"]
    row = factory.token_row(secret)
    assert row.token_hash != secret and secret not in row.token_hash
    assert secret.startswith(row.prefix)
    listed = client.get("/api/v1/tokens", headers=bearer(secret)).json()
    assert all("token" not in t for t in listed)
    assert {t["name"] for t in listed} == {"test", "ci"}


def test_revoked_token_is_401(client: TestClient, factory: Factory) -> None:
    user = factory.user("rater")
    secret = factory.token(user)
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 200
    token_id = factory.token_row(secret).id
    revoked = client.delete(f"/api/v1/tokens/{token_id}", headers=bearer(secret))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 401


def test_inactive_user_token_is_401(client: TestClient, factory: Factory) -> None:
    user = factory.user("admin")
    secret = factory.token(user)
    user.is_active = False
    factory.session.commit()
    assert client.get("/api/v1/me", headers=bearer(secret)).status_code == 401


def test_token_last_used_is_recorded(client: TestClient, factory: Factory) -> None:
    secret = factory.token(factory.user("rater"))
    client.get("/api/v1/me", headers=bearer(secret))
    factory.session.expire_all()
    assert factory.token_row(secret).last_used_at is not None


# Each admin-only route, called by every role: only admins get through.
ADMIN_ROUTES = [
    ("POST", "/api/v1/projects", {"slug": "new-proj", "name": "New"}),
    ("PATCH", "/api/v1/projects/{slug}", {"name": "Renamed"}),
    ("POST", "/api/v1/projects/{slug}/prompts", {"prompts": [{"prompt": "hi"}]}),
    ("POST", "/api/v1/users", {"email": "x@example.com", "password": "password123"}),
]
READER_ROUTES = [("GET", "/api/v1/projects/{slug}/prompts", None)]
ANY_USER_ROUTES = [
    ("GET", "/api/v1/projects", None),
    ("GET", "/api/v1/projects/{slug}", None),
    ("GET", "/api/v1/me", None),
]


@pytest.mark.parametrize("role", ["admin", "reviewer", "rater"])
def test_route_role_matrix(client: TestClient, factory: Factory, role: str) -> None:
    project = factory.project()
    secret = factory.token(factory.user(role))
    allowed = {
        "admin": ADMIN_ROUTES + READER_ROUTES + ANY_USER_ROUTES,
        "reviewer": READER_ROUTES + ANY_USER_ROUTES,
        "rater": ANY_USER_ROUTES,
    }[role]
    for method, path, body in ADMIN_ROUTES + READER_ROUTES + ANY_USER_ROUTES:
        response = client.request(
            method, path.format(slug=project.slug), json=body, headers=bearer(secret)
        )
        expected_ok = (method, path, body) in allowed
        if expected_ok:
            assert response.status_code < 400, (role, method, path, response.text)
        else:
            assert response.status_code == 403, (role, method, path, response.text)
            assert role in response.json()["detail"]


def _login(client: TestClient, email: str, password: str = TEST_PASSWORD) -> str:
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf
    response = client.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": csrf.group(1)},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    home = client.get("/")
    token = re.search(r'<meta name="csrf-token" content="([^"]+)"', home.text)
    assert token
    return token.group(1)


def test_login_sets_a_hardened_session_cookie(client: TestClient, factory: Factory) -> None:
    user = factory.user("admin")
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf
    response = client.post(
        "/login",
        data={"email": user.email, "password": TEST_PASSWORD, "csrf_token": csrf.group(1)},
        follow_redirects=False,
    )
    assert response.status_code == 303
    cookie = response.headers["set-cookie"].lower()
    assert "verdict_session=" in cookie and "httponly" in cookie and "samesite=lax" in cookie
    assert user.email in client.get("/").text


def test_wrong_password_is_refused(client: TestClient, factory: Factory) -> None:
    user = factory.user("admin")
    page = client.get("/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf
    response = client.post(
        "/login",
        data={"email": user.email, "password": "wrong password", "csrf_token": csrf.group(1)},
    )
    assert response.status_code == 401 and "Wrong email or password" in response.text
    assert client.get("/api/v1/me").status_code == 401


def test_login_form_without_csrf_is_403(client: TestClient, factory: Factory) -> None:
    user = factory.user("admin")
    client.get("/login")
    response = client.post("/login", data={"email": user.email, "password": TEST_PASSWORD})
    assert response.status_code == 403
    assert client.get("/api/v1/me").status_code == 401


def test_session_api_writes_need_the_csrf_header(client: TestClient, factory: Factory) -> None:
    admin = factory.user("admin")
    csrf = _login(client, admin.email)
    assert client.get("/api/v1/me").json()["email"] == admin.email
    body = {"slug": "from-browser", "name": "From browser"}
    assert client.post("/api/v1/projects", json=body).status_code == 403
    assert factory.count(Project) == 0
    ok = client.post("/api/v1/projects", json=body, headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 201


def test_logout_needs_csrf_and_ends_the_session(client: TestClient, factory: Factory) -> None:
    admin = factory.user("admin")
    csrf = _login(client, admin.email)
    assert client.post("/logout", data={}).status_code == 403
    assert client.get("/api/v1/me").status_code == 200
    assert (
        client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    )
    assert client.get("/api/v1/me").status_code == 401


def test_login_redirect_stays_on_site(client: TestClient, factory: Factory) -> None:
    admin = factory.user("admin")
    page = client.get("/login?next=//evil.example/x")
    assert "//evil.example" not in page.text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf
    response = client.post(
        "/login",
        data={
            "email": admin.email,
            "password": TEST_PASSWORD,
            "csrf_token": csrf.group(1),
            "next": "https://evil.example/",
        },
        follow_redirects=False,
    )
    assert response.headers["location"] == "/"


def test_passwords_are_argon2(factory: Factory) -> None:
    user: User = factory.user("rater")
    assert user.password_hash.startswith("$argon2id$")
    assert TEST_PASSWORD not in user.password_hash
