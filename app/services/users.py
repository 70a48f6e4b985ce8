"""Users, their API tokens, and invitations; what admins change about people."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NoReturn

from sqlalchemy import String, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from app.core import security
from app.models import ApiToken, Invite, Project, User, utcnow
from app.models.users import ROLES, TOKEN_SCOPES
from app.services import audit, staffing
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound, ServiceError

MIN_PASSWORD_LENGTH = 8
# Writing last_used_at on every request would turn every API read into a write.
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)


def normalize_email(email: str) -> str:
    return email.strip().lower()


def create_user(
    session: Session, email: str, password: str, role: str, actor_id: int | None = None
) -> User:
    """Create a user with an Argon2-hashed password. Raises Conflict if the email is taken."""
    email = normalize_email(email)
    if role not in ROLES:
        _refuse("role", f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if "@" not in email:
        _refuse("email", f"{email!r} is not an email address")
    if len(email) > MAX_EMAIL:
        _refuse("email", f"longer than {MAX_EMAIL} characters")
    _check_password(password)
    user = User(email=email, password_hash=security.hash_password(password), role=role)
    try:
        with session.begin_nested():
            session.add(user)
    except IntegrityError as exc:
        raise Conflict(f"a user with email {email} already exists") from exc
    audit.record(session, "user.create", actor_id=actor_id, target=("user", user.id), role=role)
    return user


def get_user_by_email(session: Session, email: str) -> User | None:
    return session.scalar(select(User).where(User.email == normalize_email(email)))


def authenticate(session: Session, email: str, password: str) -> User | None:
    """The active user with this email and password, or None (same cost either way)."""
    user = get_user_by_email(session, email)
    if user is None or not user.is_active:
        security.verify_password(security.DUMMY_PASSWORD_HASH, password)
        return None
    if not security.verify_password(user.password_hash, password):
        return None
    if security.password_needs_rehash(user.password_hash):
        user.password_hash = security.hash_password(password)
    user.last_login_at = utcnow()
    audit.record(session, "user.login", actor_id=user.id, target=("user", user.id))
    return user


def _refuse(field: str, message: str) -> NoReturn:
    """InvalidInput with the message at its form field (the console and invite pages show it
    there; the API sends it in `errors`)."""
    raise InvalidInput(message, [FieldError(None, field, message)])


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        _refuse("password", f"password must be at least {MIN_PASSWORD_LENGTH} characters")


def set_password(session: Session, user: User, password: str) -> None:
    """Set a new password; every browser session of the user ends (`end_sessions`). The web
    page that changes your own password then rotates yours, so you stay logged in."""
    _check_password(password)
    user.password_hash = security.hash_password(password)
    end_sessions(user)
    audit.record(session, "user.password", actor_id=user.id, target=("user", user.id))


def change_own_password(session: Session, user: User, current: str, new: str) -> None:
    """The account page's change: the current password first (a left-open browser must not be
    enough to lock its owner out), then `set_password`. Refused at the field it is about."""
    if not security.verify_password(user.password_hash, current):
        _refuse("current_password", "that is not your current password")
    if new == current:
        _refuse("password", "the new password is the same as the current one")
    set_password(session, user, new)


def end_sessions(user: User) -> None:
    """End every browser session of `user`: sessions carry the version they were made at
    (`session_version`) and `app.api.deps` refuses one that differs. A signed cookie cannot be
    deleted server-side, so this is how it is revoked."""
    user.session_version = (user.session_version or 0) + 1


@dataclass
class IssuedToken:
    """A freshly created token. `secret` is shown once and never stored."""

    token: ApiToken
    secret: str


TOKEN_DAYS_MAX = 3650
MAX_TOKEN_NAME = 200  # api_tokens.name is a VARCHAR(200)
MAX_EMAIL = 320  # users.email is a VARCHAR(320) (RFC 5321's limit)
SCOPE_RANK = {scope: rank for rank, scope in enumerate(TOKEN_SCOPES)}
# The widest scope each role may give a token. A rater's role allows reading and rating and
# nothing more, so "admin" (everything the role allows) would claim what the role does not
# have: refused rather than silently narrowed. Reviewers have rights beyond rating.
MAX_SCOPE = {"admin": "admin", "reviewer": "admin", "rater": "rater"}
SCOPE_HELP = {
    "read": "GET requests only, no rating",
    "rater": "read, plus the rating calls (next, judgment, skip)",
    "admin": "everything your role allows",
}


def scopes_for(user: User) -> list[str]:
    """The scopes `user` may give a token, narrowest first."""
    widest = SCOPE_RANK[MAX_SCOPE[user.role]]
    return [scope for scope in TOKEN_SCOPES if SCOPE_RANK[scope] <= widest]


def scope_allows(scope: str, needed: str) -> bool:
    """Whether a token of `scope` may make a call that needs `needed`."""
    return SCOPE_RANK.get(scope, -1) >= SCOPE_RANK[needed]


def create_token(
    session: Session,
    user: User,
    name: str,
    *,
    scope: str | None = None,
    expires_in_days: int | str | None = None,
    now: datetime | None = None,
) -> IssuedToken:
    """Issue an API token for `user`; only its hash and a short prefix are stored.

    `scope` (default: the widest the role allows) may not exceed the role (`MAX_SCOPE`);
    `expires_in_days` (1 to TOKEN_DAYS_MAX; None or empty: never) sets an expiry. Each problem
    is refused at its field.
    """
    now = now or utcnow()
    name = name.strip()
    errors: list[FieldError] = []
    if not name:
        errors.append(FieldError(None, "name", "a token needs a name"))
    elif len(name) > MAX_TOKEN_NAME:
        errors.append(FieldError(None, "name", f"longer than {MAX_TOKEN_NAME} characters"))
    scope = (scope or "").strip() or MAX_SCOPE[user.role]
    if scope not in TOKEN_SCOPES:
        errors.append(FieldError(None, "scope", f"scope must be one of {', '.join(TOKEN_SCOPES)}"))
    elif scope not in scopes_for(user):
        errors.append(
            FieldError(None, "scope", f"a {user.role}'s token can have scope"
                       f" {' or '.join(scopes_for(user))}, not {scope}: a token never has more"
                       " rights than its owner")
        )  # fmt: skip
    expires_at = None
    if expires_in_days is not None and str(expires_in_days).strip():
        days = str(expires_in_days).strip()
        if not days.isdigit() or not 1 <= int(days) <= TOKEN_DAYS_MAX:
            errors.append(
                FieldError(None, "expires_in_days",
                           f"a whole number of days, 1 to {TOKEN_DAYS_MAX}, or empty for never")
            )  # fmt: skip
        else:
            expires_at = now + timedelta(days=int(days))
    if errors:
        message = errors[0].message if len(errors) == 1 else "the token is not valid"
        raise InvalidInput(message, errors)
    secret = security.new_api_token()
    token = ApiToken(
        user_id=user.id,
        name=name,
        prefix=security.token_display_prefix(secret),
        token_hash=security.hash_api_token(secret),
        created_at=now,
        scope=scope,
        expires_at=expires_at,
    )
    session.add(token)
    session.flush()
    audit.record(
        session, "token.create", actor_id=user.id, target=("api_token", token.id), scope=scope,
        expires_at=expires_at.isoformat() if expires_at else None,
    )  # fmt: skip
    return IssuedToken(token=token, secret=secret)


# Built once, like the other statements every API call runs (see app/services/assignment.py):
# building and cache-keying this select cost about as much CPU as running it. The user as an
# entity, the token as plain columns: loading a second entity costs CPU nothing here needs.
_USER_FOR_TOKEN = (
    select(
        User,
        ApiToken.id,
        ApiToken.revoked_at,
        ApiToken.last_used_at,
        ApiToken.expires_at,
        ApiToken.scope,
    )
    .join(User, User.id == ApiToken.user_id)
    .where(ApiToken.token_hash == bindparam("token_hash", type_=String))
)
_TOUCH_TOKEN = (
    update(ApiToken)
    .where(ApiToken.id == bindparam("token_id"))
    .values(last_used_at=bindparam("now"))
    .execution_options(synchronize_session=False)
)


class TokenExpired(ServiceError):
    """A token past its `expires_at` (401: the caller needs a new token, not another role)."""

    status_code = 401

    def __init__(self, expires_at: datetime) -> None:
        super().__init__(f"this token expired on {expires_at:%Y-%m-%d %H:%M} UTC: create a new one")
        self.expires_at = expires_at


@dataclass(frozen=True)
class TokenCaller:
    """Who a bearer token authenticates, and what the token may do."""

    user: User
    token_id: int
    scope: str


def caller_for_token(
    session: Session, secret: str, *, now: datetime | None = None
) -> TokenCaller | None:
    """The active user a bearer token belongs to with its scope, or None if the token is
    unknown, revoked or its user inactive; TokenExpired past its expiry."""
    # One round trip for token and user: this runs on every API request.
    row = session.execute(_USER_FOR_TOKEN, {"token_hash": security.hash_api_token(secret)}).first()
    if row is None:
        return None
    user, token_id, revoked_at, last_used_at, expires_at, scope = row
    if revoked_at is not None or not user.is_active:
        return None
    now = now or utcnow()
    if expires_at is not None and expires_at <= now:
        raise TokenExpired(expires_at)
    if last_used_at is None or now - last_used_at > TOKEN_TOUCH_INTERVAL:
        session.execute(_TOUCH_TOKEN, {"token_id": token_id, "now": now})
    return TokenCaller(user, token_id, scope)


def user_for_token(session: Session, secret: str) -> User | None:
    """The active user of a live (not revoked, not expired) token, or None."""
    try:
        caller = caller_for_token(session, secret)
    except TokenExpired:
        return None
    return caller.user if caller else None


def list_tokens(session: Session, user: User) -> list[ApiToken]:
    return list(
        session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))
    )


def revoke_token(
    session: Session, token_id: int, actor: User, *, only_own: bool = False
) -> ApiToken:
    """Revoke a token. Users revoke their own; admins may revoke anyone's, except with
    `only_own` (the account page, where another's token is NotFound for everyone)."""
    token = session.get(ApiToken, token_id)
    others_allowed = actor.role == "admin" and not only_own
    if token is None or (token.user_id != actor.id and not others_allowed):
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        audit.record(session, "token.revoke", actor_id=actor.id, target=("api_token", token.id))
        session.flush()
    return token


# People: the console's list, roles and deactivation ------------------------------------------

PEOPLE_PAGE_SIZE = 100


@dataclass(frozen=True)
class Person:
    """A row of the People page."""

    user: User
    tokens: int  # live (not revoked) API tokens
    projects: list[Project]  # the projects they are staffed on


@dataclass(frozen=True)
class PeoplePage:
    people: list[Person]
    next_after: str | None  # the email to continue after, None on the last page


def people(
    session: Session, *, after: str = "", role: str = "", limit: int = PEOPLE_PAGE_SIZE
) -> PeoplePage:
    """Users by email, `limit` at a time after the email `after` (keyset), optionally of one
    role, with their live token count and staffed projects. Three queries per page, however
    many rows it shows."""
    live_tokens = (
        select(func.count())
        .select_from(ApiToken)
        .where(ApiToken.user_id == User.id, ApiToken.revoked_at.is_(None))
        .scalar_subquery()
    )
    stmt = select(User, live_tokens).order_by(User.email).limit(limit + 1)
    if after:
        stmt = stmt.where(User.email > after)
    if role in ROLES:
        stmt = stmt.where(User.role == role)
    rows = session.execute(stmt).all()
    more = len(rows) > limit
    rows = rows[:limit]
    projects = staffing.staffed_on(session, [user.id for user, _ in rows])
    return PeoplePage(
        people=[Person(user, tokens or 0, projects[user.id]) for user, tokens in rows],
        next_after=rows[-1][0].email if more and rows else None,
    )


def _person(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def _refuse_removing_last_admin(session: Session, target: User, what: str) -> None:
    """Conflict if `target` is the only active admin left (then nobody could manage Verdict).

    The active admins' rows are locked first: two admins demoting each other at the same
    moment are serialized, and the second sees that only one is left (SQLite serializes every
    write transaction anyway).
    """
    admins = session.scalars(
        select(User.id)
        .where(User.role == "admin", User.is_active.is_(True))
        .order_by(User.id)
        .with_for_update()
    ).all()
    if list(admins) == [target.id]:
        raise Conflict(
            f"{target.email} is the last active admin: make someone else an admin before you"
            f" {what}, so that someone can still manage Verdict."
        )


def set_role(session: Session, user_id: int, role: str, *, actor: User) -> User:
    """Give a user another role. An admin cannot change their own role, nor take the admin
    role from the last active admin (Conflict, said in words). Audited."""
    if role not in ROLES:
        _refuse("role", f"pick a role: {', '.join(ROLES)}")
    user = _person(session, user_id)
    if user.role == role:
        return user
    if user.id == actor.id:
        raise Conflict("You cannot change your own role: ask another admin to do it.")
    if user.role == "admin" and user.is_active:
        _refuse_removing_last_admin(session, user, "make them a " + role)
    before = user.role
    user.role = role
    audit.record(
        session, "user.role", actor_id=actor.id, target=("user", user.id), before=before,
        after=role,
    )  # fmt: skip
    session.flush()
    return user


def set_active(session: Session, user_id: int, active: bool, *, actor: User) -> User:
    """Deactivate or reactivate a user; repeating is harmless. Audited.

    A deactivated user is refused at once everywhere: every request re-reads the user, and a
    browser session (`api.deps._session_user`) or an API token (`caller_for_token`) of an
    inactive user authenticates nobody. Deactivating also ends their browser sessions for good
    (`end_sessions`): reactivated, they log in again. Their tokens are not revoked, so
    reactivating gives those back. An admin cannot deactivate themself, nor the last active
    admin (Conflict).
    """
    user = _person(session, user_id)
    if user.is_active == active:
        return user
    if not active:
        if user.id == actor.id:
            raise Conflict("You cannot deactivate yourself: ask another admin to do it.")
        if user.role == "admin":
            _refuse_removing_last_admin(session, user, "deactivate them")
    user.is_active = active
    if not active:
        end_sessions(user)
    action = "user.reactivate" if active else "user.deactivate"
    audit.record(session, action, actor_id=actor.id, target=("user", user.id))
    session.flush()
    return user


# Invitations ------------------------------------------------------------------------------

INVITE_DAYS_DEFAULT = 7
INVITE_DAYS_MAX = 30
MAX_INVITE_NOTE_CHARS = 200


class InviteGone(ServiceError):
    """An invite link that was good once: used, revoked or expired (410 Gone)."""

    status_code = 410

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # "used", "revoked" or "expired"


@dataclass
class IssuedInvite:
    """A freshly created invite. `secret` is shown once and never stored."""

    invite: Invite
    secret: str

    @property
    def path(self) -> str:
        return f"/invite/{self.secret}"


@dataclass(frozen=True)
class PendingInvite:
    """A row of the People page's pending invites (never the link: only its hash is kept)."""

    invite: Invite
    project: Project | None
    created_by: str | None  # the inviting admin's email


def create_invite(
    session: Session,
    *,
    role: str,
    note: str = "",
    project_slug: str = "",
    expires_in_days: int | str = INVITE_DAYS_DEFAULT,
    actor: User,
    now: datetime | None = None,
) -> IssuedInvite:
    """An invite link for a new account with `role`, optionally staffing a rater on a project,
    good once for `expires_in_days` (1 to INVITE_DAYS_MAX). Each problem is refused at its
    field. Only the SHA-256 of the link's secret is stored. Audited."""
    now = now or utcnow()
    errors: list[FieldError] = []
    if role not in ROLES:
        errors.append(FieldError(None, "role", f"pick a role: {', '.join(ROLES)}"))
    note = note.strip()
    if len(note) > MAX_INVITE_NOTE_CHARS:
        errors.append(FieldError(None, "note", f"at most {MAX_INVITE_NOTE_CHARS} characters"))
    days = int(expires_in_days) if str(expires_in_days).strip().isdigit() else None
    if days is None or not 1 <= days <= INVITE_DAYS_MAX:
        errors.append(
            FieldError(None, "expires_in_days", f"a whole number of days, 1 to {INVITE_DAYS_MAX}")
        )
    project = None
    if project_slug.strip():
        project = session.scalar(select(Project).where(Project.slug == project_slug.strip()))
        if project is None:
            errors.append(FieldError(None, "project", f"no project {project_slug!r}"))
        elif role in ROLES and role != "rater":
            errors.append(
                FieldError(None, "project", "only raters are staffed on projects: admins and"
                           " reviewers rate every project")
            )  # fmt: skip
    if errors:
        raise InvalidInput("the invite is not valid", errors)
    assert days is not None
    secret = secrets.token_urlsafe(32)  # 256 random bits, like an API token
    invite = Invite(
        token_hash=security.hash_api_token(secret),
        role=role,
        note=note,
        project_id=project.id if project else None,
        created_by_id=actor.id,
        created_at=now,
        expires_at=now + timedelta(days=days),
    )
    session.add(invite)
    session.flush()
    audit.record(
        session, "invite.create", actor_id=actor.id, target=("invite", invite.id), role=role,
        project_id_staffed=invite.project_id, expires_at=invite.expires_at.isoformat(),
    )  # fmt: skip
    return IssuedInvite(invite, secret)


def pending_invites(session: Session, *, now: datetime | None = None) -> list[PendingInvite]:
    """Invites not used, revoked or expired, newest first, with their project and creator
    (one query)."""
    now = now or utcnow()
    creator = aliased(User)
    rows = session.execute(
        select(Invite, Project, creator.email)
        .outerjoin(Project, Project.id == Invite.project_id)
        .outerjoin(creator, creator.id == Invite.created_by_id)
        .where(Invite.used_at.is_(None), Invite.revoked_at.is_(None), Invite.expires_at > now)
        .order_by(Invite.created_at.desc(), Invite.id.desc())
    ).all()
    return [PendingInvite(invite, project, email) for invite, project, email in rows]


def revoke_invite(
    session: Session, invite_id: int, *, actor: User, now: datetime | None = None
) -> Invite:
    """Revoke an invite so its link no longer works; repeating is harmless. A used invite
    cannot be revoked (Conflict: deactivate the account it made instead). Audited."""
    invite = session.get(Invite, invite_id)
    if invite is None:
        raise NotFound(f"invite {invite_id} not found")
    if invite.used_at is not None:
        raise Conflict("this invite was already used; deactivate the account it made instead")
    if invite.revoked_at is None:
        invite.revoked_at = now or utcnow()
        audit.record(session, "invite.revoke", actor_id=actor.id, target=("invite", invite.id))
        session.flush()
    return invite


def _gone(invite: Invite, now: datetime) -> InviteGone | None:
    """Why this invite can no longer be used, or None while it can."""
    if invite.used_at is not None:
        return InviteGone("This invite was already used: each invite makes one account.", "used")
    if invite.revoked_at is not None:
        return InviteGone("This invite was revoked by an admin.", "revoked")
    if invite.expires_at <= now:
        return InviteGone(
            f"This invite expired on {invite.expires_at:%Y-%m-%d %H:%M} UTC.", "expired"
        )
    return None


def open_invite(session: Session, secret: str, *, now: datetime | None = None) -> Invite:
    """The invite a link's secret names, while it can still be used: NotFound for a link that
    never was one, InviteGone (410) for one used, revoked or expired."""
    invite = session.scalar(
        select(Invite).where(Invite.token_hash == security.hash_api_token(secret))
    )
    if invite is None:
        raise NotFound("This invite link is not valid: check that you copied all of it.")
    gone = _gone(invite, now or utcnow())
    if gone is not None:
        raise gone
    return invite


@dataclass(frozen=True)
class InviteOffer:
    """What an invite link offers its holder: a role, and the project it staffs them on."""

    invite: Invite
    project: Project | None


def invite_offer(session: Session, secret: str, *, now: datetime | None = None) -> InviteOffer:
    """The offer of a link that can still be used (errors as `open_invite`)."""
    invite = open_invite(session, secret, now=now)
    project = session.get(Project, invite.project_id) if invite.project_id else None
    return InviteOffer(invite, project)


def accept_invite(
    session: Session, secret: str, email: str, password: str, *, now: datetime | None = None
) -> User:
    """Create the account an invite offers (its role; staffed on its project if it names one)
    and use the invite up. Email and password follow `create_user`'s rules, refused at their
    field; a taken email too. Audited.

    Single use under concurrency: the invite is claimed by one conditional UPDATE (unused,
    unrevoked, unexpired), so of two simultaneous acceptances one gets InviteGone. Everything
    runs in a savepoint: a refusal leaves the invite unused and no account behind.
    """
    now = now or utcnow()
    invite = open_invite(session, secret, now=now)
    if get_user_by_email(session, email) is not None:
        _refuse("email", "an account with this email already exists: log in instead")
    with session.begin_nested():
        claimed = session.execute(
            update(Invite)
            .where(
                Invite.id == invite.id,
                Invite.used_at.is_(None),
                Invite.revoked_at.is_(None),
                Invite.expires_at > now,
            )
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        )
        if not claimed.rowcount:  # type: ignore[attr-defined]
            session.refresh(invite)
            raise _gone(invite, now) or InviteGone("This invite was already used.", "used")
        try:
            user = create_user(session, email, password, invite.role)
        except Conflict:
            _refuse("email", "an account with this email already exists: log in instead")
        user.last_login_at = now
        session.refresh(invite)
        invite.used_by_id = user.id
        if invite.project_id is not None:
            project = session.get(Project, invite.project_id)
            if project is not None:
                staffing.add_member(session, project, user, actor_id=invite.created_by_id)
        audit.record(
            session, "invite.accept", actor_id=user.id, target=("invite", invite.id),
            role=invite.role, project_id_staffed=invite.project_id,
        )  # fmt: skip
        session.flush()
    return user
