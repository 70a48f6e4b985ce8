"""Console pages: people (users, invitations, roles, deactivation) and a project's staff.

    GET  /admin/people                              everyone and the pending invites (reader)
    POST /admin/people/invites                      create an invite; its link shown once
    POST /admin/people/invites/{invite_id}/revoke
    POST /admin/people/{user_id}/role
    POST /admin/people/{user_id}/deactivate | reactivate
    GET  /admin/projects/{slug}/staff               the project's members (reader)
    POST /admin/projects/{slug}/staff               add a rater (email, or from the list)
    POST /admin/projects/{slug}/staff/{user_id}/remove

A refused action (the last admin, yourself) re-renders the page with the reason at the top and
at the person's row, with the status of the refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.api.deps import SessionDep
from app.models import Project, User
from app.models.users import ROLES
from app.services import projects, staffing, users
from app.services.errors import FieldError, InvalidInput, ServiceError
from app.web.console.common import (
    Admin,
    ProjectPage,
    Reader,
    console_route,
    done,
    page,
)

router = APIRouter(prefix="/admin")

FormText = Annotated[str, Form()]
INVITE_FIELDS = ("role", "note", "project", "expires_in_days")


def _people(
    request: Request,
    session: Session,
    user: User,
    *,
    status_code: int = 200,
    after: str = "",
    role: str = "",
    **extra: Any,
) -> Response:
    listing = users.people(session, after=after, role=role)
    context = {
        "listing": listing,
        "invites": users.pending_invites(session),
        "projects": projects.list_projects(session),
        "roles": ROLES,
        "role_filter": role if role in ROLES else "",
        "after": after,
        "invite_values": {"role": "rater", "expires_in_days": users.INVITE_DAYS_DEFAULT},
        "invite_errors": {},
        "days_max": users.INVITE_DAYS_MAX,
        "note_max": users.MAX_INVITE_NOTE_CHARS,
        "issued": None,
        "refusal": None,
        "refused_user_id": None,
        **extra,
    }
    return page(
        request, "console/people/people.html", user, context, section="people",
        status_code=status_code,
    )  # fmt: skip


def _by_field(exc: InvalidInput, known: tuple[str, ...]) -> dict[str, str]:
    """Each error at its field; one that names no known field goes to the first."""
    out: dict[str, str] = {}
    for error in exc.errors or [FieldError(None, known[0], exc.message)]:
        name = error.field if error.field in known else known[0]
        out.setdefault(str(name), error.message)
    return out


@console_route(router, "GET", "/people", access="reader")
def people_page(
    request: Request, session: SessionDep, user: Reader, after: str = "", role: str = ""
) -> Response:
    return _people(request, session, user, after=after, role=role)


@console_route(router, "POST", "/people/invites", access="admin")
def create_invite(
    request: Request,
    session: SessionDep,
    user: Admin,
    role: FormText = "",
    note: FormText = "",
    project: FormText = "",
    expires_in_days: FormText = "",
) -> Response:
    values = {"role": role, "note": note, "project": project, "expires_in_days": expires_in_days}
    values = {name: value.strip() for name, value in values.items()}
    try:
        issued = users.create_invite(
            session,
            role=values["role"],
            note=values["note"],
            project_slug=values["project"],
            expires_in_days=values["expires_in_days"],
            actor=user,
        )
    except InvalidInput as exc:
        return _people(
            request, session, user, status_code=422, invite_values=values,
            invite_errors=_by_field(exc, INVITE_FIELDS),
        )  # fmt: skip
    # The page itself, not a redirect: the link exists only in this answer (its hash is kept).
    url = str(request.base_url).rstrip("/") + issued.path
    return _people(request, session, user, status_code=201, issued=issued, invite_url=url)


@console_route(router, "POST", "/people/invites/{invite_id}/revoke", access="admin")
def revoke_invite(request: Request, invite_id: int, session: SessionDep, user: Admin) -> Response:
    try:
        users.revoke_invite(session, invite_id, actor=user)
    except ServiceError as exc:
        return _people(request, session, user, status_code=exc.status_code, refusal=exc.message)
    return done(request, "/admin/people", "Invite revoked: its link no longer works.")


def _change(
    request: Request,
    session: Session,
    user: User,
    user_id: int,
    change: Callable[[], User],
    message: Callable[[User], str],
) -> Response:
    """A change to one person: done with a message, or the page with the refusal at their row."""
    try:
        person = change()
    except ServiceError as exc:
        reason = exc.message
        if isinstance(exc, InvalidInput) and exc.errors:
            reason = exc.errors[0].message
        return _people(
            request, session, user, status_code=exc.status_code, refusal=reason,
            refused_user_id=user_id,
        )  # fmt: skip
    return done(request, "/admin/people", message(person))


@console_route(router, "POST", "/people/{user_id}/role", access="admin")
def change_role(
    request: Request, user_id: int, session: SessionDep, user: Admin, role: FormText = ""
) -> Response:
    return _change(
        request, session, user, user_id,
        lambda: users.set_role(session, user_id, role, actor=user),
        lambda person: f"{person.email} is now a {person.role}.",
    )  # fmt: skip


@console_route(router, "POST", "/people/{user_id}/deactivate", access="admin")
def deactivate(request: Request, user_id: int, session: SessionDep, user: Admin) -> Response:
    return _change(
        request, session, user, user_id,
        lambda: users.set_active(session, user_id, False, actor=user),
        lambda person: f"{person.email} is deactivated: their sessions and API tokens stopped"
        " working.",
    )  # fmt: skip


@console_route(router, "POST", "/people/{user_id}/reactivate", access="admin")
def reactivate(request: Request, user_id: int, session: SessionDep, user: Admin) -> Response:
    return _change(
        request, session, user, user_id,
        lambda: users.set_active(session, user_id, True, actor=user),
        lambda person: f"{person.email} is active again.",
    )  # fmt: skip


# A project's staff ------------------------------------------------------------------------


def _staff(
    request: Request,
    session: Session,
    user: User,
    project: Project,
    *,
    status_code: int = 200,
    **extra: Any,
) -> Response:
    context = {
        "tab": "staff",
        "members": staffing.members(session, project),
        "candidates": staffing.candidates(session, project),
        "candidates_shown": staffing.CANDIDATES_SHOWN,
        "values": {"email": "", "user_id": ""},
        "errors": {},
        **extra,
    }
    return page(
        request, "console/people/staff.html", user, context, section="project", project=project,
        status_code=status_code,
    )  # fmt: skip


@console_route(router, "GET", "/projects/{slug}/staff", access="reader")
def staff_page(
    request: Request, session: SessionDep, user: Reader, project: ProjectPage
) -> Response:
    return _staff(request, session, user, project)


@console_route(router, "POST", "/projects/{slug}/staff", access="admin")
def add_member(
    request: Request,
    session: SessionDep,
    user: Admin,
    project: ProjectPage,
    email: FormText = "",
    user_id: FormText = "",
) -> Response:
    values = {"email": email.strip(), "user_id": user_id.strip()}
    try:
        added = staffing.staff(
            session, project, email=values["email"], user_id=values["user_id"], actor=user
        )
    except InvalidInput as exc:
        return _staff(
            request, session, user, project, status_code=422, values=values,
            errors=_by_field(exc, ("email", "user_id")),
        )  # fmt: skip
    return done(
        request, f"/admin/projects/{project.slug}/staff",
        f"{added.email} is on the staff of {project.name}.",
    )  # fmt: skip


@console_route(router, "POST", "/projects/{slug}/staff/{user_id}/remove", access="admin")
def remove_member(
    request: Request, user_id: int, session: SessionDep, user: Admin, project: ProjectPage
) -> Response:
    removed = staffing.remove_member(session, project, user_id, actor=user)
    opened = "" if removed.members_left else " It has no staff now: every rater may rate it."
    return done(
        request, f"/admin/projects/{project.slug}/staff",
        f"{removed.user.email} is off the staff of {project.name}.{opened}",
    )  # fmt: skip
