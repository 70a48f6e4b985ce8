"""Pages that are not the rater workspace: home, API docs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse
from starlette.responses import Response

from app.api.deps import SessionDep, WebUser
from app.services import projects
from app.web.templating import render

router = APIRouter(include_in_schema=False)


@router.get("/")
def home(request: Request, user: WebUser, session: SessionDep) -> Response:
    if user is None:
        return RedirectResponse("/login", status_code=303)
    return render(request, "home.html", {"user": user, "projects": projects.list_projects(session)})


@router.get("/docs")
def api_docs(request: Request) -> Response:
    return render(request, "swagger.html", {})
