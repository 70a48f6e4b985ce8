"""Who may call each route, declared where the route is.

Every API route and every page outside the console says who may call it, in its decorator:

    @router.get("/projects/{slug}/runs", openapi_extra=access("reader"))

`access` puts the level in the route's `openapi_extra`, so it is part of the route object
(read by `tests/api/test_authorization_matrix.py`, which fails on a route without one and then
calls every route as every kind of caller) and, for the API, of `/openapi.json`: a client reads
`x-access` (and `x-token-scope`) on each operation to know who may call it. The console's own
routes declare theirs with `console_route(..., access=...)` (`app.web.console.common`).

The levels, from open to narrow; the refusal is the same everywhere:

* `public`: anyone, signed in or not (the health checks, the login and invitation pages);
* `user`: any signed-in account, whatever its role;
* `rater`: whoever may rate this project: an admin or reviewer, or a rater if the project is
  open to every rater or they are on its staff (`services/staffing.py`);
* `own`: the caller's own object (their assignment, their token), whatever the role;
* `own_or_admin`: the caller's own object, or anyone's for an admin;
* `reader`: admins and reviewers (project data, runs, models, quality, audit);
* `admin`: admins only (every write that changes a project, its data or its models).

A caller without a valid token or session gets 401 (a page: a redirect to the login page, or 401
for an htmx partial); a signed-in caller below the level 403; someone else's object under `own`
404 (its existence is not told). A bearer token is also held to its scope: `read` for a GET,
`admin` for any other write, unless the route declares `x-token-scope` (the rating calls:
`rater`); a scope that is too narrow is 403 too (`app.api.deps`).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Level = Literal["public", "user", "rater", "own", "own_or_admin", "reader", "admin"]
LEVELS: tuple[Level, ...] = get_args(Level)
TokenScope = Literal["read", "rater", "admin"]

ACCESS_KEY = "x-access"
SCOPE_KEY = "x-token-scope"


def access(
    level: Level, *, token_scope: TokenScope | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `openapi_extra` of a route that `level` may call; `token_scope` where a token needs
    other than the default (`read` for a GET, `admin` for a write); `extra`: the route's other
    OpenAPI additions (a hand-written request body)."""
    declared: dict[str, Any] = {**(extra or {}), ACCESS_KEY: level}
    if token_scope is not None:
        declared[SCOPE_KEY] = token_scope
    return declared


def declared_level(openapi_extra: dict[str, Any] | None) -> Level | None:
    """The level a route declares (its `openapi_extra`), or None for an undeclared route."""
    level = (openapi_extra or {}).get(ACCESS_KEY)
    return level if level in LEVELS else None


def token_scope(method: str, openapi_extra: dict[str, Any] | None) -> TokenScope:
    """The scope a bearer token needs for this route: the declared one, else by method."""
    declared = (openapi_extra or {}).get(SCOPE_KEY)
    if declared in ("read", "rater", "admin"):
        return declared
    return "read" if method in ("GET", "HEAD", "OPTIONS") else "admin"
