"""The console's start page: every project's loop state, and what needs attention."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import SessionDep, SettingsDep
from app.services import overview
from app.web.console.common import Reader, console_route, page

router = APIRouter(prefix="/admin")


@console_route(router, "GET", "", access="reader")
def overview_page(
    request: Request, session: SessionDep, settings: SettingsDep, user: Reader
) -> Response:
    states = overview.project_states(session, settings)
    attention = [(s.project, a) for s in states for a in s.attention]
    return page(
        request, "console/overview.html", user, {"states": states, "attention": attention},
        section="overview",
    )  # fmt: skip
