"""What every console page shares: who may open it, how it is declared, how it renders.

Every console route is declared with `console_route(router, method, path, access=...)`, which
records its access rule in `ACCESS`: `reader` (admins and reviewers: every page; raters get a
403 page) or `admin` (admins only: every form action). `tests/web/test_console_access.py`
walks the app's route table and fails on a console route without a declaration, then checks
each one with every role.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from app.api.deps import SAFE_METHODS, SessionDep, WebUser, check_csrf
from app.models import Project, User
from app.services import permissions, projects
from app.web.templating import render

Access = Literal["reader", "admin"]
# (method, path template) -> who may use it; filled by `console_route` as the modules load.
ACCESS: dict[tuple[str, str], Access] = {}

F = TypeVar("F", bound=Callable[..., Any])
# Room for a form's other fields and multipart boundaries next to the largest accepted file.
FORM_OVERHEAD_BYTES = 64 * 1024


class LoginRequired(Exception):
    """Raised by a console dependency for a visitor who is not logged in: the app answers a
    redirect to the login page that comes back here."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def login_redirect_target(request: Request) -> str:
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return f"/login?next={quote(path)}"


def console_route(router: APIRouter, method: str, path: str, *, access: Access) -> Callable[[F], F]:
    """Declare a console route and who may use it (see the module docstring)."""

    def register(endpoint: F) -> F:
        ACCESS[(method, (router.prefix or "") + path)] = access
        router.add_api_route(path, endpoint, methods=[method], include_in_schema=False)
        return endpoint

    return register


def _reader(request: Request, user: WebUser) -> User:
    if user is None:
        raise LoginRequired(login_redirect_target(request))
    if not permissions.can_read_data(user):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"the console is for admins and reviewers; your role is {user.role}",
        )
    return user


async def _admin(request: Request, user: Annotated[User, Depends(_reader)]) -> User:
    if not permissions.is_admin(user):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"only admins can do this; your role ({user.role}) can look, not change",
        )
    if request.method not in SAFE_METHODS:
        # Refused before the body is read: reading the form below spools an upload to disk.
        limit = request.app.state.settings.max_upload_bytes + FORM_OVERHEAD_BYTES
        if int(request.headers.get("content-length") or 0) > limit:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"the request is larger than the upload limit of {limit:,} bytes"
                " (VERDICT_MAX_UPLOAD_BYTES)",
            )
        # A console write carries the session's CSRF token: the htmx header, or the form's.
        submitted = request.headers.get("x-csrf-token")
        if not submitted:
            submitted = str((await request.form()).get("csrf_token", ""))
        check_csrf(request, submitted)
    return user


Reader = Annotated[User, Depends(_reader)]
Admin = Annotated[User, Depends(_admin)]


def project_of(session: SessionDep, slug: str) -> Project:
    """The project a console page is about (404 page when there is none)."""
    return projects.get_project(session, slug)


ProjectPage = Annotated[Project, Depends(project_of)]


def page(
    request: Request,
    template: str,
    user: User,
    context: dict[str, Any] | None = None,
    *,
    section: str = "",
    project: Project | None = None,
    status_code: int = 200,
) -> Response:
    """Render a console page: the template with the user, the active navigation section and
    the project it is about (which shows the project's tabs)."""
    ctx = {
        "user": user,
        "section": section,
        "project": project,
        "can_act": permissions.is_admin(user),
        "flashes": request.session.pop("flash", []),
        **(context or {}),
    }
    return render(request, template, ctx, status_code)


def flash(request: Request, message: str, *, bad: bool = False) -> None:
    """A one-line message for the next page this browser shows ("Run 12 queued.")."""
    # A new list, not an append: the session only notices that it changed on assignment.
    request.session["flash"] = [*request.session.get("flash", []), {"message": message, "bad": bad}]


def done(request: Request, url: str, message: str) -> RedirectResponse:
    """The answer to a successful form: a flash message, then the page to look at (303)."""
    flash(request, message)
    return RedirectResponse(url, status_code=status.HTTP_303_SEE_OTHER)


def htmx(request: Request) -> bool:
    """Whether the request came from htmx (it wants a fragment, not a page)."""
    return request.headers.get("hx-request") == "true"


def plain(value: Any) -> str:
    """A metric value as text: numbers to four significant digits, lists shortened."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) < 1e15:
            return f"{int(value):,}"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, list):
        shown = ", ".join(plain(v) for v in value[:8])
        return f"{shown}, … ({len(value)} in all)" if len(value) > 8 else shown or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {plain(v)}" for k, v in value.items())
    return "—" if value is None else str(value)


def metric_text(key: str, value: Any) -> str:
    """`plain`, except that an interval (a key ending `_ci95` or `_interval`) reads as its two
    ends."""
    if key.endswith(("_ci95", "_interval")) and isinstance(value, list) and len(value) == 2:
        return f"{plain(float(value[0]))} to {plain(float(value[1]))}"
    return plain(value)
