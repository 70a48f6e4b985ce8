"""Browser sessions end on a password change or a deactivation (every other session: the one
that changed its own password is rotated and stays), and failed logins are throttled per
account and per address with 429 and Retry-After."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core import limits
from app.models import User
from app.services import users
from tests.conftest import TEST_PASSWORD, Factory
from tests.console.conftest import Browser

NEW_PASSWORD = "another long password"


@pytest.fixture
def clients(app: FastAPI) -> Iterator[list[TestClient]]:
    made: list[TestClient] = []
    yield made
    for client in made:
        client.__exit__(None, None, None)


def new_client(app: FastAPI, clients: list[TestClient]) -> TestClient:
    client = TestClient(app)
    client.__enter__()
    clients.append(client)
    return client


def holding(app: FastAPI, clients: list[TestClient], cookie: str) -> TestClient:
    """A second client holding a copy of a session cookie (as a stolen or old browser would)."""
    client = new_client(app, clients)
    client.cookies.set("verdict_session", cookie)
    return client


def signed_in(client: TestClient) -> bool:
    answer = client.get("/account/tokens", follow_redirects=False)
    assert answer.status_code in (200, 303)
    return answer.status_code == 200


def login(client: TestClient, email: str, password: str) -> object:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    return client.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": token[1]},
        follow_redirects=False,
    )


def test_password_change_ends_other_sessions_and_keeps_this_one(
    app: FastAPI, clients: list[TestClient], factory: Factory
) -> None:
    rater = factory.user("rater")
    here = Browser(new_client(app, clients), rater)
    elsewhere = Browser(new_client(app, clients), rater)
    old_cookie = here.client.cookies["verdict_session"]
    assert signed_in(here.client) and signed_in(elsewhere.client)

    forged = here.client.post(
        "/account/password",
        data={"current_password": TEST_PASSWORD, "password": NEW_PASSWORD},
        follow_redirects=False,
    )
    assert forged.status_code == 403  # no CSRF token: a cross-site form cannot change it
    wrong = here.post(
        "/account/password", {"current_password": "not it at all", "password": NEW_PASSWORD}
    )
    assert wrong.status_code == 422  # type: ignore[attr-defined]
    assert "not your current password" in wrong.text  # type: ignore[attr-defined]
    assert signed_in(elsewhere.client)  # a refused change ends nothing
    short = here.post("/account/password", {"current_password": TEST_PASSWORD, "password": "x"})
    assert 'id="new-password-error"' in short.text  # type: ignore[attr-defined]

    changed = here.post(
        "/account/password", {"current_password": TEST_PASSWORD, "password": NEW_PASSWORD}
    )
    assert changed.status_code == 303  # type: ignore[attr-defined]
    assert signed_in(here.client)  # rotated: a new cookie, still logged in
    assert here.client.cookies["verdict_session"] != old_cookie
    assert not signed_in(elsewhere.client)
    assert not signed_in(holding(app, clients, old_cookie))  # the pre-change cookie is dead
    assert login(new_client(app, clients), rater.email, NEW_PASSWORD).status_code == 303  # type: ignore[attr-defined]


def test_password_set_by_an_operator_ends_every_session(
    app: FastAPI, clients: list[TestClient], factory: Factory
) -> None:
    """`verdict user password` (the service's `set_password`) has no session to keep."""
    rater = factory.user("rater")
    browser = Browser(new_client(app, clients), rater)
    assert signed_in(browser.client)
    user = factory.session.get(User, rater.id)
    assert user is not None
    users.set_password(factory.session, user, NEW_PASSWORD)
    factory.session.commit()
    assert not signed_in(browser.client)


def test_deactivation_ends_sessions_for_good(
    app: FastAPI, clients: list[TestClient], factory: Factory
) -> None:
    admin, rater = factory.user("admin"), factory.user("rater")
    browser = Browser(new_client(app, clients), rater)
    cookie = browser.client.cookies["verdict_session"]
    assert signed_in(browser.client)
    users.set_active(factory.session, rater.id, False, actor=admin)
    factory.session.commit()
    assert not signed_in(holding(app, clients, cookie))
    # Reactivated, the old session stays dead: they log in again.
    users.set_active(factory.session, rater.id, True, actor=admin)
    factory.session.commit()
    assert not signed_in(holding(app, clients, cookie))
    fresh = new_client(app, clients)
    assert login(fresh, rater.email, TEST_PASSWORD).status_code == 303  # type: ignore[attr-defined]
    assert signed_in(fresh)


def test_login_throttled_per_account_with_retry_after(
    app: FastAPI, clients: list[TestClient], factory: Factory
) -> None:
    rater, other = factory.user("rater"), factory.user("rater")
    client = new_client(app, clients)
    for _ in range(limits.LOGIN_FAILURES_PER_ACCOUNT):
        assert login(client, rater.email, "wrong password").status_code == 401  # type: ignore[attr-defined]
    # Now even the right password is refused until the window ends, without being checked.
    blocked = login(client, rater.email, TEST_PASSWORD)
    assert blocked.status_code == 429  # type: ignore[attr-defined]
    retry_after = int(blocked.headers["retry-after"])  # type: ignore[attr-defined]
    assert limits.LOGIN_WINDOW_S - 60 < retry_after <= limits.LOGIN_WINDOW_S
    assert "Too many failed logins" in blocked.text  # type: ignore[attr-defined]
    assert "Try again in 15 minutes" in blocked.text  # type: ignore[attr-defined]
    assert not signed_in(client)
    # Another account from the same address is not locked by it.
    assert login(client, other.email, TEST_PASSWORD).status_code == 303  # type: ignore[attr-defined]


def test_success_clears_the_accounts_failures(
    app: FastAPI, clients: list[TestClient], factory: Factory
) -> None:
    rater = factory.user("rater")
    for _ in range(limits.LOGIN_FAILURES_PER_ACCOUNT - 1):
        assert login(new_client(app, clients), rater.email, "wrong").status_code == 401  # type: ignore[attr-defined]
    assert login(new_client(app, clients), rater.email, TEST_PASSWORD).status_code == 303  # type: ignore[attr-defined]
    for _ in range(limits.LOGIN_FAILURES_PER_ACCOUNT - 1):
        assert login(new_client(app, clients), rater.email, "wrong").status_code == 401  # type: ignore[attr-defined]
    assert login(new_client(app, clients), rater.email, TEST_PASSWORD).status_code == 303  # type: ignore[attr-defined]


def test_login_throttled_per_address(
    app: FastAPI, clients: list[TestClient], factory: Factory
) -> None:
    """A spray: one wrong guess per account, from one address (TestClient's "testclient")."""
    victim = factory.user("rater")
    client = new_client(app, clients)
    for n in range(limits.LOGIN_FAILURES_PER_ADDRESS):
        assert login(client, f"nobody{n}@example.com", "guess").status_code == 401  # type: ignore[attr-defined]
    blocked = login(client, victim.email, TEST_PASSWORD)
    assert blocked.status_code == 429  # type: ignore[attr-defined]
    assert int(blocked.headers["retry-after"]) > 0  # type: ignore[attr-defined]
