"""Error pages for people: a browser that asks for a page gets HTML with a way back, while the
API (and any client asking for JSON) keeps getting `{"detail": ...}`."""

from __future__ import annotations

from fastapi import Request
from starlette.responses import Response

from app.web.templating import render

TITLES = {
    400: "That did not work",
    401: "Please log in",
    403: "Not for your role",
    404: "Page not found",
    405: "Not allowed here",
    409: "That changed meanwhile",
    413: "That is too large",
    415: "That kind of file is not accepted",
    422: "Something is missing or wrong",
    503: "Busy right now",
}


def wants_html(request: Request) -> bool:
    """A person's browser asking for a page (not the API, not htmx, not a JSON client)."""
    if request.url.path.startswith("/api/") or request.headers.get("hx-request") == "true":
        return False
    return "text/html" in request.headers.get("accept", "")


def error_page(request: Request, status_code: int, message: str) -> Response:
    """The HTML answer to an error: what happened, in words, and a link back."""
    console = request.url.path.startswith("/admin")
    return render(
        request,
        "error.html",
        {
            "status_code": status_code,
            "title": TITLES.get(status_code, "Something went wrong"),
            "message": message
            if status_code != 404 or message != "Not Found"
            else (f"There is no page at {request.url.path}."),
            "back_href": "/admin" if console else "/",
            "back_label": "Back to the console" if console else "Back to the start page",
        },
        status_code,
    )
