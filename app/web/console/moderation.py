"""Console page: a project's moderation queue and its excluded raters.

    GET  /admin/projects/{slug}/moderation                       the queue (reader); ?state=
                                                                  open|moderated, ?flag=, ?offset=
    POST /admin/projects/{slug}/moderation/pairs/{pair_id}       resolve, exclude, remove or
                                                                  restore the pair, its prompt's
                                                                  pairs or a response's pairs
    POST /admin/projects/{slug}/moderation/exclusions            exclude a rater (email, reason)
    POST /admin/projects/{slug}/moderation/exclusions/{user_id}/lift

The actions are the services' (`services/moderation.py`, `services/exclusions.py`), audited
there. A refused action re-renders the page with the reason at the form it came from.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Form, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.api.deps import SessionDep
from app.models import Project, User
from app.services import browse, exclusions, moderation
from app.services.errors import InvalidInput, ServiceError
from app.services.judgments import FLAGS
from app.services.rendering import render_markdown
from app.web.console.common import Admin, ProjectPage, Reader, console_route, done, page

router = APIRouter(prefix="/admin")

FormText = Annotated[str, Form()]
# Prompt and response texts longer than this are shown clipped, with a "Show all" toggle.
CLIP_CHARS = 600
# What an action may cover, as the form's scope select names it.
SCOPES = ("pair", "prompt", "response_a", "response_b")
ACTION_LABELS = {
    "resolve": "Resolved",
    "exclude": "Excluded from training",
    "remove": "Removed from rating",
    "restore": "Restored",
}


def _view(state: str, flag: str, offset: str | int) -> dict[str, str]:
    """The queue's filters as given (unknown values fall back to the defaults)."""
    offset_text = str(offset).strip()
    return {
        "state": state if state in moderation.STATES else "open",
        "flag": flag if flag in FLAGS else "",
        "offset": offset_text if offset_text.isdigit() else "0",
    }


def _url(project: Project, view: dict[str, str], **changes: Any) -> str:
    params = {**view, **{k: str(v) for k, v in changes.items()}}
    query = {k: v for k, v in params.items() if v and not (k == "offset" and v == "0")}
    if query.get("state") == "open":
        del query["state"]
    base = f"/admin/projects/{project.slug}/moderation"
    return f"{base}?{urlencode(query)}" if query else base


def _page(
    request: Request,
    session: Session,
    user: User,
    project: Project,
    view: dict[str, str],
    *,
    status_code: int = 200,
    **extra: Any,
) -> Response:
    queue = moderation.queue(
        session, project, state=view["state"], flag=view["flag"] or None,
        offset=int(view["offset"]), limit=moderation.PAGE_SIZE,
    )  # fmt: skip
    history = exclusions.exclusion_history(session, project)
    context = {
        "tab": "moderation",
        "queue": queue,
        "view": view,
        "flags": FLAGS,
        "clip_chars": CLIP_CHARS,
        "markdown": render_markdown,
        "live_exclusions": [h for h in history if h.live],
        "lifted_exclusions": [h for h in history if not h.live],
        "url": lambda **changes: _url(project, view, **changes),
        "action_error": None,  # (pair id, message)
        "action_values": {},
        "exclude_values": {"email": "", "reason": ""},
        "exclude_errors": {},
        "lift_error": None,  # (user id, message)
        **extra,
    }
    return page(
        request, "console/moderation/moderation.html", user, context, section="project",
        project=project, status_code=status_code,
    )  # fmt: skip


@console_route(router, "GET", "/projects/{slug}/moderation", access="reader")
def moderation_page(
    request: Request,
    session: SessionDep,
    user: Reader,
    project: ProjectPage,
    state: str = "open",
    flag: str = "",
    offset: str = "0",
) -> Response:
    return _page(request, session, user, project, _view(state, flag, offset))


def _target(
    session: Session, project: Project, pair_id: int, scope: str
) -> tuple[moderation.TargetKind, int]:
    """The object the form's scope names, from the pair it was sent from."""
    if scope not in SCOPES:
        raise InvalidInput(f"scope is one of {', '.join(SCOPES)}")
    if scope == "pair":
        return ("pair", pair_id)
    pair = browse.project_pair(session, project, pair_id)
    if scope == "prompt":
        return ("prompt", pair.prompt_id)
    return ("response", pair.response_a_id if scope == "response_a" else pair.response_b_id)


@console_route(router, "POST", "/projects/{slug}/moderation/pairs/{pair_id}", access="admin")
def moderate(
    request: Request,
    pair_id: int,
    session: SessionDep,
    user: Admin,
    project: ProjectPage,
    action: FormText = "",
    reason: FormText = "",
    scope: FormText = "pair",
    state: FormText = "open",
    flag: FormText = "",
    offset: FormText = "0",
) -> Response:
    view = _view(state, flag, offset)
    try:
        target = _target(session, project, pair_id, scope)
        out = moderation.moderate(session, project, target, action, reason=reason, actor=user)
    except ServiceError as exc:
        message = exc.errors[0].message if isinstance(exc, InvalidInput) and exc.errors else ""
        return _page(
            request, session, user, project, view, status_code=exc.status_code,
            action_error=(pair_id, message or exc.message),
            action_values={"reason": reason, "scope": scope},
        )  # fmt: skip
    kind, target_id = out.target
    what = (
        f"pair {pair_id}"
        if kind == "pair"
        else f"{kind} {target_id} ({len(out.pair_ids)} pair{'s' if len(out.pair_ids) != 1 else ''})"
    )
    return done(request, _url(project, view), f"{ACTION_LABELS[out.action]}: {what}.")


@console_route(router, "POST", "/projects/{slug}/moderation/exclusions", access="admin")
def exclude_rater(
    request: Request,
    session: SessionDep,
    user: Admin,
    project: ProjectPage,
    email: FormText = "",
    reason: FormText = "",
) -> Response:
    values = {"email": email.strip(), "reason": reason}
    try:
        rater = exclusions.find_rater(session, email=values["email"])
        exclusions.exclude_rater(session, project, rater.id, reason=reason, actor=user)
    except ServiceError as exc:
        errors: dict[str, str] = {}
        if isinstance(exc, InvalidInput):
            for error in exc.errors:
                name = "email" if error.field in ("email", "rater_id") else "reason"
                errors.setdefault(name, error.message)
        else:
            errors["email"] = exc.message
        return _page(
            request, session, user, project, _view("open", "", 0),
            status_code=exc.status_code, exclude_values=values, exclude_errors=errors,
        )  # fmt: skip
    return done(
        request, f"/admin/projects/{project.slug}/moderation#exclusions",
        f"{rater.email} is excluded from training: snapshots from now on leave out their"
        " judgments.",
    )  # fmt: skip


@console_route(
    router, "POST", "/projects/{slug}/moderation/exclusions/{user_id}/lift", access="admin"
)
def lift_exclusion(
    request: Request,
    user_id: int,
    session: SessionDep,
    user: Admin,
    project: ProjectPage,
    reason: FormText = "",
) -> Response:
    try:
        exclusions.lift_exclusion(session, project, user_id, reason=reason, actor=user)
    except ServiceError as exc:
        message = exc.errors[0].message if isinstance(exc, InvalidInput) and exc.errors else ""
        return _page(
            request, session, user, project, _view("open", "", 0),
            status_code=exc.status_code, lift_error=(user_id, message or exc.message),
        )  # fmt: skip
    rater = session.get(User, user_id)
    who = rater.email if rater is not None else f"user {user_id}"
    return done(
        request, f"/admin/projects/{project.slug}/moderation#exclusions",
        f"{who}'s judgments are back in: snapshots from now on use them again.",
    )  # fmt: skip
