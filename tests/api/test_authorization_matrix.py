"""The authorization matrix, generated from the app's own route table.

Every API route and every page outside the console (those are in tests/console/test_access.py)
declares who may call it next to its decorator (`openapi_extra=access(...)`, `app.api.access`).
A route without a declaration, or one whose declaration disagrees with the dependencies that
actually guard it, fails the first test. The second calls every route as each kind of caller:
anonymous, a rater on the project's staff, another rater (not on its staff, and not the owner of
the assignment or token in the path), a reviewer, an admin, and, for the API, a revoked and an
expired token; by bearer token for the API, by a signed-in browser (with its CSRF token) for
the pages. The outcome follows from the declared level:

* anonymous: 401 (a page: a redirect to the login page, or 401 for an htmx partial and the
  rating forms); a revoked or expired token: 401;
* a signed-in caller below the level, or a token whose scope is too narrow: 403;
* someone else's object under `own` (and `own_or_admin` for a non-admin): 404;
* an allowed caller: neither 401 nor 403 (nor 404 for `own`), and never 5xx; the call may
  still refuse the seeded data or an empty body (404, 409, 422).

One seeded project and one login per role serve the whole matrix (argon2 makes logins slow by
design); failures are collected, so one run names them all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, get_args

from fastapi import APIRouter
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from sqlalchemy.orm import Session

from app.api import deps
from app.api.access import LEVELS, Level, access, declared_level, token_scope
from app.main import create_app
from app.models import Assignment, User, utcnow
from app.services import assignment as assignment_service
from app.services import staffing, users
from app.web import account
from tests.conftest import Factory
from tests.console.conftest import Browser, Seeded, browser_for, seed
from tests.console.test_access import concrete

__all__ = ["browser_for"]  # the fixture, shared with the console's tests


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    route: APIRoute

    @property
    def api(self) -> bool:
        """Served by the API (called with tokens) rather than a page (called by a browser)."""
        return self.route.endpoint.__module__.startswith("app.api.")

    @property
    def level(self) -> Level | None:
        return declared_level(self.route.openapi_extra)

    @property
    def scope(self) -> str:
        return token_scope(self.method, self.route.openapi_extra)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _routes() -> list[Route]:
    """Every route the app serves but the console's (/admin) and the static files."""
    found = [
        Route(method, context.path or "", context.original_route)
        for context in iter_route_contexts(create_app().router.routes)
        if isinstance(context.original_route, APIRoute)
        and not (context.path or "").startswith("/admin")
        for method in context.methods or ()
    ]
    # Logging out ends the browser's session: last, so every other route sees a signed-in one.
    return sorted(found, key=lambda r: (r.path == "/logout", r.path, r.method))


ROUTES = _routes()

# The dependencies that guard routes, to check each declaration against.
ADMIN_POLICY = get_args(deps.AdminUser)[1].dependency
READER_POLICY = get_args(deps.DataReader)[1].dependency
RATING = {deps.get_rater_call, deps.get_rating_user}
AUTHENTICATED = {deps.get_current_user, deps.get_any_scope_user, ADMIN_POLICY, READER_POLICY}
AUTHENTICATED |= RATING | {account._signed_in}  # noqa: SLF001 - the account pages' guard


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _calls(sub)


def _disagreement(route: Route) -> str | None:
    """Why `route`'s declaration does not match the dependencies guarding it (None: it does)."""
    calls = set(_calls(route.route.dependant))
    level = route.level
    if (ADMIN_POLICY in calls) != (level == "admin"):
        return f"declared {level}, AdminUser {'is' if ADMIN_POLICY in calls else 'is not'} used"
    if (READER_POLICY in calls) != (level == "reader"):
        return f"declared {level}, DataReader {'is' if READER_POLICY in calls else 'is not'} used"
    rating = bool(calls & RATING)
    if rating != (route.scope == "rater"):
        used = "used" if rating else "not used"
        return f"token scope {route.scope}, but the rating dependencies are {used}"
    if rating and level not in ("rater", "own"):
        return f"a rating call declared {level}"
    if level == "public" and calls & AUTHENTICATED:
        return "declared public, but it requires a signed-in caller"
    if level != "public" and route.api and not calls & AUTHENTICATED:
        return f"declared {level}, but nothing authenticates the caller"
    if level != "public" and not route.api and not calls & (AUTHENTICATED | {deps.get_web_user}):
        return f"declared {level}, but the page never looks at the caller"
    return None


def test_every_route_declares_who_may_call_it() -> None:
    assert len(ROUTES) > 50, "the route table looks empty"
    undeclared = [str(r) for r in ROUTES if r.level is None]
    assert undeclared == [], "declare them with openapi_extra=access(...) (app/api/access.py)"
    wrong = {str(r): why for r in ROUTES if (why := _disagreement(r)) is not None}
    assert wrong == {}


def test_a_declaration_that_does_not_match_its_dependencies_is_found() -> None:
    router = APIRouter()

    @router.get("/a", openapi_extra=access("public"))
    def a(user: deps.AdminUser) -> None: ...

    @router.post("/b", openapi_extra=access("admin"))
    def b(user: deps.CurrentUser) -> None: ...

    @router.get("/c", openapi_extra=access("user"))
    def c() -> None: ...

    @router.post("/d", openapi_extra=access("own"))
    def d(user: deps.RatingUser) -> None: ...

    made = {
        r.path: Route(next(iter(r.methods or ())), r.path, r)
        for r in router.routes
        if isinstance(r, APIRoute)
    }
    assert _disagreement(made["/a"]) == "declared public, AdminUser is used"
    assert _disagreement(made["/b"]) == "declared admin, AdminUser is not used"
    assert _disagreement(made["/c"]) == "declared user, but the page never looks at the caller"
    assert _disagreement(made["/d"]) == "token scope admin, but the rating dependencies are used"
    assert set(PASSES) == set(LEVELS)


def test_the_openapi_document_tells_who_may_call_what(client: Any) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    operations = {
        f"{method.upper()} {path}": op
        for path, item in paths.items()
        for method, op in item.items()
    }
    assert operations["GET /api/v1/projects/{slug}/runs"]["x-access"] == "reader"
    assert operations["POST /api/v1/assignments/{assignment_id}/judgment"]["x-token-scope"] == (
        "rater"
    )
    assert all(op.get("x-access") in LEVELS for op in operations.values())


# The matrix -----------------------------------------------------------------------------------

SIGNED_IN = ("rater", "other", "reviewer", "admin")
ROLE = {"rater": "rater", "other": "rater", "reviewer": "reviewer", "admin": "admin"}
# Bodies that get a call past validation to its permission checks (the ownership check of a
# rating call is in the service, after the body is read).
BODIES: dict[tuple[str, str], dict[str, object]] = {
    ("POST", "/api/v1/assignments/{assignment_id}/judgment"): {"choice": "a", "strength": 1},
    ("POST", "/api/v1/assignments/{assignment_id}/skip"): {"reason": "cannot judge this"},
    ("POST", "/p/{slug}/rate/{assignment_id}"): {"scale": "1"},
    ("POST", "/p/{slug}/rate/{assignment_id}/skip"): {"reason": "cannot judge this"},
}

# Query parameters a route needs before it looks at anything else (the export's format; a
# reviewer's export is pseudonymised, emails are for admins: tests/api/test_exports.py).
QUERIES = {("GET", "/api/v1/projects/{slug}/export"): "?format=raw-jsonl&pseudonymize=true"}


# Who of the signed-in callers passes each level, and the status the others get. The rater is
# on the project's staff and owns the assignment and the token in the paths; the other rater
# is on no staff and owns neither.
PASSES: dict[Level, tuple[set[str], int]] = {
    "public": (set(SIGNED_IN), 0),
    "user": (set(SIGNED_IN), 0),
    "rater": ({"rater", "reviewer", "admin"}, 403),
    "own": ({"rater"}, 404),
    "own_or_admin": ({"rater", "admin"}, 404),
    "reader": ({"reviewer", "admin"}, 403),
    "admin": ({"admin"}, 403),
}


def expected(route: Route, who: str) -> set[int] | None:
    """The statuses `who`'s call of `route` is refused with; None if it is allowed."""
    level = route.level
    assert level is not None
    if level == "public":
        return None
    if who in ("anonymous", "revoked", "expired"):
        return {401} if route.api or who != "anonymous" else {303, 401}
    if route.api and not users.scope_allows(users.MAX_SCOPE[ROLE[who]], route.scope):
        return {403}
    passes, refusal = PASSES[level]
    return None if who in passes else {refusal}


@dataclass
class Callers:
    """One of each caller, signed in once: browsers for the pages, tokens for the API."""

    browsers: dict[str, Browser]
    tokens: dict[str, str]
    api: Any  # a TestClient without cookies
    paths: dict[str, str]


def _setup(factory: Factory, make: Callable[[User | None], Browser]) -> tuple[Seeded, Callers]:
    seeded = seed(factory)
    s = factory.session
    other = factory.user()
    # The project is staffed: its rater is on the staff, the other rater is not.
    staffing.add_member(s, seeded.project, seeded.rater, actor_id=seeded.admin.id)
    factory.pair(seeded.project, ("left", "right"), prompt="The rater's own comparison?")
    rater = s.get(User, seeded.rater.id)
    assert rater is not None
    held = assignment_service.next_assignment(s, seeded.project, rater)
    assert isinstance(held, Assignment)
    target = users.create_token(s, rater, "the rater's other token").token.id
    s.commit()
    people = {
        "rater": seeded.rater,
        "other": other,
        "reviewer": seeded.reviewer,
        "admin": seeded.admin,
    }
    tokens = {who: factory.token(user, f"matrix {who}") for who, user in people.items()}
    tokens["revoked"] = _revoked_token(s, seeded.admin)
    tokens["expired"] = _expired_token(s, seeded.admin)
    browsers = {who: make(user) for who, user in people.items()}
    anonymous = make(None)
    form = anonymous.client.get("/login").text  # a session with a CSRF token, not signed in
    token = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert token is not None
    anonymous.csrf = token[1]
    browsers["anonymous"] = anonymous
    paths = {
        "token": "x" * 43,  # an invitation link that does not exist
        "assignment_id": str(held.id),
        "token_id": str(target),
        "rater_id": str(seeded.rater.id),
        "response_id": str(seeded.pair.response_a_id),
    }
    return seeded, Callers(browsers, tokens, make(None).client, paths)


def _revoked_token(session: Session, admin: User) -> str:
    issued = users.create_token(session, admin, "revoked")
    users.revoke_token(session, issued.token.id, admin)
    session.commit()
    return issued.secret


def _expired_token(session: Session, admin: User) -> str:
    a_while_ago = utcnow() - timedelta(days=3)
    issued = users.create_token(session, admin, "expired", expires_in_days=1, now=a_while_ago)
    session.commit()
    return issued.secret


def _call(callers: Callers, route: Route, url: str, who: str) -> Any:
    body = BODIES.get((route.method, route.path), {})
    if route.api:
        token = callers.tokens.get(who)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        kwargs: dict[str, Any] = {} if route.method == "GET" else {"json": body}
        return callers.api.request(
            route.method, url, headers=headers, follow_redirects=False, **kwargs
        )
    browser = callers.browsers[who]
    if route.method == "GET":
        return browser.client.get(url, headers={"accept": "text/html"}, follow_redirects=False)
    return browser.client.request(
        route.method,
        url,
        data={"csrf_token": browser.csrf, **body},  # type: ignore[dict-item]
        headers={"accept": "text/html"},
        follow_redirects=False,
    )


def _verdict(route: Route, who: str, response: Any) -> str | None:
    """What is wrong with `response` to `who` calling `route` (None: nothing)."""
    code = response.status_code
    want = expected(route, who)
    # /readyz answers 503 while a check fails (no worker runs here): its declared answer.
    if code >= 500 and not (code == 503 and 503 in route.route.responses):
        return f"{code} (a server error): {response.text[:200]}"
    if want is None:
        refused = {401, 403} | ({404} if route.level in ("own", "own_or_admin") else set())
        return f"refused with {code}: {response.text[:200]}" if code in refused else None
    if code not in want:
        return f"expected {sorted(want)}, got {code}: {response.text[:200]}"
    if code == 303 and not response.headers.get("location", "").startswith("/login"):
        return f"redirected to {response.headers.get('location')!r}, not to the login page"
    return None


def test_every_route_by_every_caller(
    factory: Factory, browser_for: Callable[[User | None], Browser]
) -> None:
    seeded, callers = _setup(factory, browser_for)
    failures: dict[str, str] = {}
    tried = 0
    for route in ROUTES:
        if route.level is None:  # reported by the test above
            continue
        url = concrete(
            re.sub(r"\{(\w+)\}", lambda m: callers.paths.get(m[1], m[0]), route.path), seeded
        ) + QUERIES.get((route.method, route.path), "")
        who_calls = [*SIGNED_IN, "anonymous", *(("revoked", "expired") if route.api else ())]
        for who in who_calls:
            tried += 1
            resp = _call(callers, route, url, who)
            wrong = _verdict(route, who, resp)
            if wrong is not None:
                failures[f"{who:9} {route}"] = wrong
    assert tried > 300
    assert failures == {}, "\n".join(f"{k}: {v}" for k, v in sorted(failures.items()))
