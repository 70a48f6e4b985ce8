"""Who may rate which project: per-project staffing.

The rule (also on `app.models.ProjectMember`):

- a project with no members is open to every rater, as it was before staffing existed;
- once it has members, only its members rate it, and only they see it on the start page;
- admins and reviewers may rate every project, staffed or not (`permissions.rates_unstaffed`).

So removing a project's last member opens it to every rater again. The rater hot path does not
ask this module a question per call: `open_to` is an SQL condition that `assignment.next` and
`judgments.submit` evaluate inside the statements they run anyway (see those modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, exists, func, literal, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import QueryableAttribute, Session

from app.models import Judgment, Project, ProjectMember, User
from app.services import audit, permissions
from app.services.errors import FieldError, InvalidInput, NotFound, PermissionDenied

_IntColumn = ColumnElement[int] | QueryableAttribute[int]


def open_to(project_id: _IntColumn, user_id: _IntColumn) -> ColumnElement[bool]:
    """SQL: the project's staffing lets this user rate it (no members at all, or a member).

    Two EXISTS probes of `uq_project_members_project_id_user_id` (project first): cheap enough
    to ride along in every `next` and `submit`. The user's role is not part of it; admins and
    reviewers pass whatever it says (see `permissions.rates_unstaffed`).
    """
    staffed = exists().where(ProjectMember.project_id == project_id)
    member = exists().where(
        ProjectMember.project_id == project_id, ProjectMember.user_id == user_id
    )
    return or_(~staffed, member)


def not_staffed(project: Project | str | None = None) -> PermissionDenied:
    """The refusal a rater gets for a staffed project they are not a member of."""
    slug = project.slug if isinstance(project, Project) else project
    name = f"project {slug!r}" if slug else "this project"
    return PermissionDenied(
        f"you are not on the staff of {name}: only its members rate it. Ask an admin to add"
        " you on the project's Staff tab."
    )


def may_rate(session: Session, project: Project, user: User) -> bool:
    """Whether `user` may rate `project` now (one query; none for admins and reviewers)."""
    if not permissions.can_rate(user):
        return False
    if permissions.rates_unstaffed(user):
        return True
    return bool(session.scalar(select(open_to(literal(project.id), literal(user.id)))))


def rateable_projects(session: Session, user: User) -> list[Project]:
    """The projects `user` may rate, in creation order: every one for admins and reviewers,
    the open ones and those they are staffed on for a rater (one query)."""
    if not permissions.can_rate(user):
        return []
    stmt = select(Project).order_by(Project.id)
    if not permissions.rates_unstaffed(user):
        stmt = stmt.where(open_to(Project.id, literal(user.id)))
    return list(session.scalars(stmt))


@dataclass(frozen=True)
class Member:
    """A row of a project's Staff tab."""

    user: User
    added_at: datetime
    judgments: int


def members(session: Session, project: Project) -> list[Member]:
    """The project's members with the judgments each stored in it, by email (two queries,
    whatever the number of members: the counts are one grouped query)."""
    rows = session.execute(
        select(User, ProjectMember.created_at)
        .join(ProjectMember, ProjectMember.user_id == User.id)
        .where(ProjectMember.project_id == project.id)
        .order_by(User.email)
    ).all()
    if not rows:
        return []
    counts = dict(
        session.execute(
            select(Judgment.rater_id, func.count())
            .where(
                Judgment.project_id == project.id,
                Judgment.rater_id.in_([user.id for user, _ in rows]),
            )
            .group_by(Judgment.rater_id)
        ).all()
    )
    return [Member(user, added_at, counts.get(user.id, 0)) for user, added_at in rows]


# The Staff tab's select lists this many; beyond it, an admin types the email.
CANDIDATES_SHOWN = 500


def candidates(session: Session, project: Project, *, limit: int = CANDIDATES_SHOWN) -> list[User]:
    """Active raters not yet on the project's staff, by email, at most `limit` (the Staff tab's
    select; one more than `limit` rows tells the page that there are others)."""
    member = exists().where(
        ProjectMember.project_id == project.id, ProjectMember.user_id == User.id
    )
    return list(
        session.scalars(
            select(User)
            .where(User.role == "rater", User.is_active.is_(True), ~member)
            .order_by(User.email)
            .limit(limit + 1)
        )
    )


def _rater_to_staff(session: Session, email: str, user_id: str) -> User:
    """The user named by the form: its email field, else its select (a user id)."""
    email = email.strip().lower()  # as users.normalize_email stores it
    if email:
        user = session.scalar(select(User).where(User.email == email))
        if user is None:
            raise InvalidInput(
                "no such user", [FieldError(None, "email", f"no user has the email {email}")]
            )
    elif user_id.strip().isdigit():
        user = session.get(User, int(user_id))
        if user is None:
            raise InvalidInput("no such user", [FieldError(None, "user_id", "no such user")])
    else:
        message = "type a rater's email or pick one from the list"
        raise InvalidInput(message, [FieldError(None, "email", message)])
    field = "email" if email else "user_id"
    if user.role != "rater":
        raise InvalidInput(
            "not a rater",
            [FieldError(None, field, f"{user.email} is a {user.role}: admins and reviewers"
                        " rate every project, only raters are staffed")],
        )  # fmt: skip
    if not user.is_active:
        raise InvalidInput(
            "deactivated",
            [FieldError(None, field, f"{user.email} is deactivated: reactivate them first")],
        )
    return user


def add_member(
    session: Session, project: Project, user: User, *, actor_id: int | None = None
) -> ProjectMember:
    """Staff `user` on `project`; adding a member again returns the existing row. Audited."""
    existing = session.scalar(
        select(ProjectMember).where(
            ProjectMember.project_id == project.id, ProjectMember.user_id == user.id
        )
    )
    if existing is not None:
        return existing
    member = ProjectMember(project_id=project.id, user_id=user.id, added_by_id=actor_id)
    try:
        with session.begin_nested():  # a concurrent add of the same rater: keep theirs
            session.add(member)
    except IntegrityError:
        row = session.scalar(
            select(ProjectMember).where(
                ProjectMember.project_id == project.id, ProjectMember.user_id == user.id
            )
        )
        if row is None:  # the user or the project was deleted meanwhile
            raise NotFound(f"user {user.id} or project {project.slug!r} is gone") from None
        return row
    audit.record(
        session, "project.staff.add", actor_id=actor_id, project_id=project.id,
        target=("user", user.id),
    )  # fmt: skip
    return member


def staff(
    session: Session, project: Project, *, email: str = "", user_id: str = "", actor: User
) -> User:
    """Add the rater named by the Staff tab's form (an email, else a user id from the select)
    to `project`'s staff. InvalidInput at the field for an unknown user, a non-rater or a
    deactivated one."""
    user = _rater_to_staff(session, email, user_id)
    add_member(session, project, user, actor_id=actor.id)
    return user


@dataclass(frozen=True)
class Removal:
    user: User
    members_left: int  # 0: the project is open to every rater again


def remove_member(session: Session, project: Project, user_id: int, *, actor: User) -> Removal:
    """Take a member off `project`'s staff (NotFound if they are not on it). Audited. Removing
    the last member opens the project to every rater again."""
    row = session.scalar(
        select(ProjectMember).where(
            ProjectMember.project_id == project.id, ProjectMember.user_id == user_id
        )
    )
    user = session.get(User, user_id)
    if row is None or user is None:
        raise NotFound(f"user {user_id} is not on the staff of {project.slug!r}")
    session.delete(row)
    session.flush()
    audit.record(
        session, "project.staff.remove", actor_id=actor.id, project_id=project.id,
        target=("user", user_id),
    )  # fmt: skip
    left = session.scalar(
        select(func.count())
        .select_from(ProjectMember)
        .where(ProjectMember.project_id == project.id)
    )
    return Removal(user, left or 0)


def staffed_on(session: Session, user_ids: list[int]) -> dict[int, list[Project]]:
    """The projects each of these users is staffed on, by project name (one query)."""
    out: dict[int, list[Project]] = {user_id: [] for user_id in user_ids}
    if not user_ids:
        return out
    rows = session.execute(
        select(ProjectMember.user_id, Project)
        .join(Project, Project.id == ProjectMember.project_id)
        .where(ProjectMember.user_id.in_(user_ids))
        .order_by(Project.name)
    ).all()
    for user_id, project in rows:
        out[user_id].append(project)
    return out
