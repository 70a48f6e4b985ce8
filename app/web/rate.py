"""The rater workspace: `/p/{slug}/rate` and the htmx partials it swaps in.

Answers come in as screen sides (scale 1-5, 0, aspects left/tie/right); `judgments.from_screen`
turns them into pair terms before the same `judgments.submit` the API uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import RedirectResponse
from markupsafe import Markup
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.responses import Response

from app.api.access import access
from app.api.deps import SessionDep, WebUser, check_csrf
from app.models import Assignment, Project, User
from app.services import assignment as assignment_service
from app.services import generation, judgments, permissions, projects, runs
from app.services.errors import FieldError, InvalidInput, PermissionDenied, ServiceError
from app.services.projects import project_settings
from app.services.prompts import prompt_messages
from app.services.rendering import render_markdown
from app.web.templating import render

router = APIRouter(include_in_schema=False)

SCALE_LABELS = [
    (1, "A much better"),
    (2, "A better"),
    (3, "About the same"),
    (4, "B better"),
    (5, "B much better"),
    (0, "Both bad"),
]
FLAG_LABELS = [("unsafe", "Unsafe"), ("personal_data", "Personal data"), ("broken", "Broken")]
SKIP_REASONS = [
    "I cannot judge this topic",
    "The responses do not load or are unreadable",
    "The prompt is unclear",
]


@dataclass
class Turn:
    role: str
    html: Markup


@dataclass
class TaskView:
    """What the task partial shows: screen sides only, nothing about gold or pair order."""

    assignment_id: int
    turns: list[Turn]
    left_html: Markup
    right_html: Markup
    left_truncated: bool
    right_truncated: bool
    aspects: list[str]
    require_rationale: bool


def task_view(assignment: Assignment, project: Project) -> TaskView:
    pair = assignment.pair
    left, right = (pair.response_a, pair.response_b)
    if assignment.shown_left == "b":
        left, right = right, left
    settings = project_settings(project)
    return TaskView(
        assignment_id=assignment.id,
        turns=[
            Turn(m["role"], render_markdown(m["content"])) for m in prompt_messages(pair.prompt)
        ],
        left_html=render_markdown(left.text),
        right_html=render_markdown(right.text),
        left_truncated=left.truncated,
        right_truncated=right.truncated,
        aspects=settings.aspects,
        require_rationale=settings.require_rationale,
    )


def _context(
    session: Session, project: Project, user: User, *, message: str | None = None
) -> dict[str, Any]:
    assignment = assignment_service.next_assignment(session, project, user)
    counts = assignment_service.rater_counts(session, project, user)
    writing = None if assignment else generation.active_generation(session, project)
    return {
        "user": user,
        "project": project,
        "task": task_view(assignment, project) if assignment else None,
        "counts": counts,
        "scale": SCALE_LABELS,
        "flag_labels": FLAG_LABELS,
        "skip_reasons": SKIP_REASONS,
        "message": message,
        "writing": writing,
        "writing_eta": None if writing is None else runs.eta_seconds(writing),
    }


def _rater(user: User | None) -> User:
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "your session ended: log in again")
    if not permissions.can_rate(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "your account cannot rate")
    return user


@router.get("/p/{slug}/rate", openapi_extra=access("rater"))
def rate_page(request: Request, slug: str, session: SessionDep, user: WebUser) -> Response:
    if user is None:
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
    rater = _rater(user)
    project = projects.get_project(session, slug)
    try:
        ctx = _context(session, project, rater)
    except PermissionDenied as exc:  # a staffed project, and the rater is not on its staff
        return render(
            request,
            "error.html",
            {"status_code": 403, "title": "Not on this project's staff", "message": exc.message,
             "back_href": "/", "back_label": "Back to your projects"},
            status.HTTP_403_FORBIDDEN,
        )  # fmt: skip
    ctx["guidelines_html"] = render_markdown(project.guidelines or "")
    return render(request, "rate.html", ctx)


@router.get("/p/{slug}/rate/next", openapi_extra=access("rater"))
def rate_next(request: Request, slug: str, session: SessionDep, user: WebUser) -> Response:
    """The task partial (and counts) for htmx: after a 409, or "check again" when done."""
    rater = _rater(user)
    project = projects.get_project(session, slug)
    return render(request, "partials/rate_next.html", _context(session, project, rater))


def _form_answer(form: FormData, shown_left: str, aspects: list[str]) -> judgments.JudgmentInput:
    raw_scale = str(form.get("scale") or "")
    if not raw_scale.isdigit():
        hint = "pick a verdict first: keys 1-5, or 0 for both bad"
        raise InvalidInput(hint, [FieldError(None, "scale", hint)])
    raw_active = str(form.get("active_ms") or "")
    return judgments.from_screen(
        shown_left,
        int(raw_scale),
        aspects={
            name: str(form[f"aspect.{name}"]) for name in aspects if form.get(f"aspect.{name}")
        },
        rationale=str(form.get("rationale") or ""),
        flags=[str(v) for v in form.getlist("flags")],
        active_ms=int(raw_active) if raw_active.isdigit() else None,
    )


def _submit(
    session: Session, project: Project, rater: User, assignment_id: int, form: FormData
) -> None:
    assignment = assignment_service.get_own_assignment(session, assignment_id, rater)
    if assignment.project_id != project.id:
        raise InvalidInput("this comparison belongs to another project")
    answer = _form_answer(form, assignment.shown_left, project_settings(project).aspects)
    judgments.submit(session, assignment_id, rater, answer)


def _skip(
    session: Session, project: Project, rater: User, assignment_id: int, form: FormData
) -> None:
    reason = str(form.get("reason") or "")
    if reason == "other":
        reason = str(form.get("other_reason") or "")
    assignment_service.skip_assignment(session, assignment_id, rater, reason)


Action = Callable[[Session, Project, User, int, FormData], None]


async def _act(
    request: Request,
    slug: str,
    assignment_id: int,
    session: Session,
    user: User | None,
    action: Action,
) -> Response:
    """Shared by submit and skip: CSRF, the action, then the next task or the error in place."""
    form = await request.form()
    htmx = request.headers.get("hx-request") == "true"
    try:
        check_csrf(request, request.headers.get("x-csrf-token") or str(form.get("csrf_token", "")))
        rater = _rater(user)
        project = await run_in_threadpool(projects.get_project, session, slug)
        await run_in_threadpool(action, session, project, rater, assignment_id, form)
    except (ServiceError, HTTPException) as exc:
        # The answer is an error page, not an exception: end the request's work here.
        await run_in_threadpool(session.rollback)
        message = exc.message if isinstance(exc, ServiceError) else str(exc.detail)
        code = exc.status_code
        if isinstance(exc, InvalidInput) and exc.errors:
            message = "; ".join(e.message for e in exc.errors)
        # The form stays as the rater left it: only the status line is replaced.
        response = render(
            request,
            "partials/rate_status.html",
            {"message": message, "slug": slug, "show_next": code == status.HTTP_409_CONFLICT},
            code,
        )
        response.headers["HX-Retarget"] = "#task-status"
        response.headers["HX-Reswap"] = "outerHTML"
        return response
    if not htmx:
        return RedirectResponse(f"/p/{quote(slug)}/rate", status_code=303)
    ctx = await run_in_threadpool(_context, session, project, rater)
    return render(request, "partials/rate_next.html", ctx)


@router.post("/p/{slug}/rate/{assignment_id}", openapi_extra=access("own"))
async def rate_submit(
    request: Request, slug: str, assignment_id: int, session: SessionDep, user: WebUser
) -> Response:
    return await _act(request, slug, assignment_id, session, user, _submit)


@router.post("/p/{slug}/rate/{assignment_id}/skip", openapi_extra=access("own"))
async def rate_skip(
    request: Request, slug: str, assignment_id: int, session: SessionDep, user: WebUser
) -> Response:
    return await _act(request, slug, assignment_id, session, user, _skip)
