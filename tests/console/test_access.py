"""Every console route × every role, generated from the app's own route table: a route that
does not declare who may use it (`console_route(..., access=...)`) fails here, and each
declared one is tried as anonymous, rater, reviewer and admin, and without a CSRF token."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.routing import APIRoute, iter_route_contexts

from app.main import create_app
from app.web.console.common import ACCESS
from tests.console.conftest import Browser, Seeded

# The console's routes as the app serves them: every route under /admin.
ROUTES = sorted(
    (method, context.path)
    for context in iter_route_contexts(create_app().router.routes)
    if isinstance(context.original_route, APIRoute) and context.path.startswith("/admin")
    for method in context.methods or ()
)


def concrete(path: str, seeded: Seeded) -> str:
    """The route's path with real ids of the seeded rows."""
    values = {
        "slug": seeded.project.slug,
        "run_id": seeded.run.id,
        "version_id": seeded.policy.id,
        "user_id": seeded.rater.id,
        "prompt_id": seeded.prompt.id,
        "pair_id": seeded.pair.id,
        "kind": "reward",
        "invite_id": seeded.invite.id,
    }
    return re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]), path)


def test_every_console_route_declares_who_may_use_it() -> None:
    assert ROUTES, "no console routes found"
    undeclared = [f"{m} {p}" for m, p in ROUTES if (m, p) not in ACCESS]
    assert undeclared == []
    assert all(access in ("reader", "admin") for access in ACCESS.values())
    assert all(ACCESS[(m, p)] == "admin" for m, p in ROUTES if m != "GET"), "writes are admin"


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_route_by_role(
    method: str, path: str, seeded: Seeded, browser_for: Callable[..., Browser]
) -> None:
    url = concrete(path, seeded)
    access = ACCESS[(method, path)]

    def call(who: Browser, **kwargs: object) -> int:
        if method == "GET":
            return int(who.get(url, follow_redirects=False).status_code)  # type: ignore[attr-defined]
        return int(who.post(url, **kwargs).status_code)  # type: ignore[attr-defined]

    anonymous = browser_for(None)
    assert call(anonymous) == 303  # to the login page, coming back here afterwards
    assert call(browser_for(seeded.rater)) == 403
    reviewer = call(browser_for(seeded.reviewer))
    if access == "reader":
        assert reviewer == 200
    else:
        assert reviewer == 403
    admin = browser_for(seeded.admin)
    if method == "GET":
        assert call(admin) == 200
    else:
        no_csrf = admin.client.post(url, data={}, headers={"accept": "text/html"})
        assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
        # With the token, the action is allowed (it may still refuse an empty form: 4xx).
        assert call(admin) not in (401, 403) and call(admin) < 500
