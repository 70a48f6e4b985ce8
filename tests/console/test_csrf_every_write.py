"""CSRF on every cookie-authenticated write, generated from the app's route table: each POST,
PUT, PATCH and DELETE route, API and pages alike, called by a signed-in admin's browser session
without the session's CSRF token (and with a wrong one) answers 403 and changes nothing. The API
accepts a browser session as well as a token, so its writes are covered too. (The console's own
routes are also tried by role in test_access.py.)"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy.orm import Session

from app.main import create_app
from app.models import AuditEvent, User
from tests.conftest import TEST_PASSWORD
from tests.console.conftest import Browser, Seeded
from tests.console.test_access import concrete

WRITES = sorted(
    (method, context.path)
    for context in iter_route_contexts(create_app().router.routes)
    if isinstance(context.original_route, APIRoute)
    for method in context.methods or ()
    if method in ("POST", "PUT", "PATCH", "DELETE")
)
# Writes made before there is a signed-in session: they check the token of the session the
# login (or invite) form was served in, tried signed out below.
SIGNED_OUT = {("POST", "/login"), ("POST", "/invite/{token}")}
# Writes whose body is validated before the CSRF token is (the rater hot path checks the caller
# inside the call; the login form needs its fields): a valid body, so the CSRF check answers.
BODIES: dict[tuple[str, str], dict[str, object]] = {
    ("POST", "/api/v1/assignments/{assignment_id}/judgment"): {"choice": "a", "strength": 1},
    ("POST", "/login"): {"email": "admin@example.com", "password": TEST_PASSWORD},
}


def test_the_write_list_is_the_route_table() -> None:
    paths = {path for _, path in WRITES}
    assert len(WRITES) > 40
    assert {"/api/v1/projects", "/p/{slug}/rate/{assignment_id}", "/logout"} <= paths


def test_a_cookie_write_without_its_csrf_token_is_refused(
    seeded: Seeded, browser_for: Callable[..., Browser]
) -> None:
    # One signed-in session and one seeded project for all the routes (signing in is slow by
    # design: argon2); every route's failures are collected, so one run names them all.
    admin, signed_out = browser_for(seeded.admin), browser_for(None)
    signed_out.client.get("/login")  # a session with a CSRF token of its own
    more = {
        "token": "x" * 43,
        "assignment_id": "1",
        "token_id": str(_a_token_id(admin, seeded)),
        "rater_id": str(seeded.rater.id),
        "response_id": str(seeded.pair.response_a_id),
    }
    failures: dict[str, str] = {}
    for method, path in WRITES:
        who = signed_out if (method, path) in SIGNED_OUT else admin
        url = concrete(re.sub(r"\{(\w+)\}", lambda m: more.get(m[1], m[0]), path), seeded)
        before = _audit_count(who)
        for token in ("", "not-the-token"):
            response = _write(who, method, path, url, token)
            if response.status_code != 403 or "CSRF" not in response.text:
                failures[f"{method} {path}"] = f"{response.status_code}: {response.text[:200]}"
        if _audit_count(who) != before:  # every write is audited: something was done
            failures[f"{method} {path}"] = "it wrote"
    assert len(WRITES) > 40
    assert failures == {}


def _write(who: Browser, method: str, path: str, url: str, token: str) -> Any:
    headers = {"accept": "text/html", **({"x-csrf-token": token} if token else {})}
    body = BODIES.get((method, path), {})
    if path.startswith("/api/"):
        return who.client.request(method, url, json=body, headers=headers)
    return who.client.request(
        method, url, data={**body, "csrf_token": token}, headers=headers, follow_redirects=False
    )


def _a_token_id(who: Browser, seeded: Seeded) -> int:
    """The id of an API token of the admin (for the token revocation routes)."""
    from app.services import users

    engine = who.client.app.state.engine  # type: ignore[attr-defined]
    with Session(engine) as session:
        admin = session.get(User, seeded.admin.id)
        assert admin is not None
        issued = users.create_token(session, admin, "csrf")
        session.commit()
        return issued.token.id


def _audit_count(who: Browser) -> int:
    engine = who.client.app.state.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        return int(conn.scalar(sa.select(sa.func.count()).select_from(AuditEvent)) or 0)
