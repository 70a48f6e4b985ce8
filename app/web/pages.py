"""Pages that are not the rater workspace: home, API docs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from app.api.access import access
from app.api.deps import SessionDep, WebUser
from app.services import staffing
from app.web.templating import render

router = APIRouter(include_in_schema=False)


@router.get("/", openapi_extra=access("user"))
def home(request: Request, user: WebUser, session: SessionDep) -> Response:
    if user is None:
        return RedirectResponse("/login", status_code=303)
    # A rater sees the projects open to every rater and those they are staffed on.
    rateable = staffing.rateable_projects(session, user)
    return render(request, "home.html", {"user": user, "projects": rateable})


@router.get("/favicon.ico", openapi_extra=access("public"))
def favicon() -> Response:
    """Browsers ask for /favicon.ico whatever the page says; send them to the icon."""
    return RedirectResponse("/static/favicon.svg", status_code=301)


@router.get("/docs", openapi_extra=access("public"))
def api_docs(request: Request) -> Response:
    return render(request, "swagger.html", {})
