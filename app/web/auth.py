"""Login and logout pages.

Failed logins are throttled per account and per client address (`app.core.limits`): once
either has used its failures, the page answers 429 with `Retry-After` without checking the
password. The address is the one uvicorn reports: behind a reverse proxy, run it with
`--forwarded-allow-ips` so that it is the client's, not the proxy's.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from app.api.access import access
from app.api.deps import SessionDep, WebUser, begin_session, check_csrf
from app.core.limits import limits_for
from app.services import users
from app.web.templating import render

router = APIRouter(include_in_schema=False)


def _safe_next(target: str | None) -> str:
    # Only same-site paths: an open redirect would let a link log someone in elsewhere.
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return "/"


@router.get("/login", openapi_extra=access("public"))
def login_page(request: Request, user: WebUser, next: str | None = None) -> Response:
    if user is not None:
        return RedirectResponse(_safe_next(next), status_code=303)
    return render(request, "login.html", {"next": _safe_next(next), "error": None, "email": ""})


@router.post("/login", openapi_extra=access("public"))
def login(
    request: Request,
    session: SessionDep,
    email: Annotated[str, Form()],
    password: Annotated[str, Form()],
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",
) -> Response:
    check_csrf(request, csrf_token)
    limits = limits_for(request.app.state)
    address = request.client.host if request.client else "unknown"
    wait = limits.login_blocked(email, address)
    if wait is not None:
        minutes = max(1, round(wait / 60))
        response = render(
            request,
            "login.html",
            {"next": _safe_next(next), "email": email,
             "error": "Too many failed logins for this account or from this address. Try again"
                      f" in {minutes} minute{'s' if minutes != 1 else ''}, or ask an admin to"
                      " reset your password."},
            status_code=429,
        )  # fmt: skip
        response.headers["Retry-After"] = str(wait)
        return response
    user = users.authenticate(session, email, password)
    if user is None:
        limits.login_failed(email, address)
        return render(
            request,
            "login.html",
            {"next": _safe_next(next), "error": "Wrong email or password.", "email": email},
            status_code=401,
        )
    limits.login_succeeded(email)
    begin_session(request, user)
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout", openapi_extra=access("public"))
def logout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, csrf_token)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)
