"""Typed dependencies shared by the API and web routes.

Authentication lives here. A bearer token is resolved with its scope and expiry, counted
against the API rate limit (`app.core.limits`), then held to what the call needs: `read` for a
GET, `rater` for the rating calls (`RaterCall`), `admin` (everything the role allows) for any
other write. The role's policy is checked after, as before: a scope only ever narrows a role.
A browser session carries the user's `session_version` from its login and ends when the
version moves (password change, deactivation).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import unit_of_work
from app.core.limits import limits_for
from app.core.security import new_csrf_token, same_token
from app.models import Project, User
from app.services import permissions, projects, users


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """The request's unit of work: committed when the endpoint returns, rolled back if it
    raises (`scope="function"`: before the response is sent, so a failed commit is the answer)."""
    with unit_of_work(request.app.state.sessionmaker) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]

UNAUTHORIZED = HTTPException(
    status.HTTP_401_UNAUTHORIZED,
    detail="authentication required: send 'Authorization: Bearer <token>' or log in",
    headers={"WWW-Authenticate": "Bearer"},
)

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def _session_user(request: Request, session: Session) -> User | None:
    user_id = request.session.get("user_id")
    if not isinstance(user_id, int):
        return None
    user = session.get(User, user_id)
    # A session from before session versions existed has none: version 0, the column's start.
    if (
        user is None
        or not user.is_active
        or request.session.get("session_version", 0) != user.session_version
    ):
        request.session.clear()
        return None
    return user


def begin_session(request: Request, user: User) -> None:
    """Log `user` in on this browser: a new session and CSRF token (so a planted session id
    is useless), stamped with the user's session version. Also how a password change keeps
    its own session while every other one ends."""
    request.session.clear()
    request.session["user_id"] = user.id
    request.session["session_version"] = user.session_version
    request.session["csrf"] = new_csrf_token()


def check_csrf(request: Request, submitted: str | None) -> None:
    """Reject a state-changing cookie-authenticated request without the session's CSRF token."""
    if request.method in SAFE_METHODS:
        return
    if not same_token(submitted, request.session.get("csrf")):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="missing or invalid CSRF token")


def get_current_user(request: Request, session: SessionDep) -> User:
    """The caller: a bearer token's user, or the logged-in browser user (with CSRF on writes)."""
    return authenticate(request, session)


def authenticate(request: Request, session: Session, needs: str | None = None) -> User:
    """`get_current_user`'s check, for callers that open their own session (`RaterCall`).

    `needs` is the token scope the call needs; by default `read` for a GET, `admin` for a write.
    """
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise UNAUTHORIZED
        return _token_user(request, session, secret.strip(), needs)
    user = _session_user(request, session)
    if user is None:
        raise UNAUTHORIZED
    check_csrf(request, request.headers.get("x-csrf-token"))
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def get_any_scope_user(request: Request, session: SessionDep) -> User:
    """Like `get_current_user`, but a token of any scope passes: for an endpoint that checks
    `request.state.token_scope` itself."""
    return authenticate(request, session, needs="read")


AnyScopeUser = Annotated[User, Depends(get_any_scope_user)]


def _token_user(request: Request, session: Session, secret: str, needs: str | None) -> User:
    """A bearer token's user: live, within the rate limit, and of a scope the call allows."""
    try:
        caller = users.caller_for_token(session, secret)
    except users.TokenExpired as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail=exc.message, headers={"WWW-Authenticate": "Bearer"}
        ) from exc
    if caller is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="invalid or revoked token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    wait = limits_for(request.app.state).api_request(caller.token_id)
    if wait is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"rate limit: at most {request.app.state.settings.api_rate_limit_per_min}"
            f" requests a minute per token; try again in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    # For an endpoint that narrows further by itself (a token revoking itself).
    request.state.token_id, request.state.token_scope = caller.token_id, caller.scope
    needs = needs or ("read" if request.method in SAFE_METHODS else "admin")
    if not users.scope_allows(caller.scope, needs):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"this token's scope ({caller.scope}) does not allow this call: it needs a"
            f" token with scope {needs}" + (" or admin" if needs != "admin" else ""),
        )
    return caller.user


def require(policy: Callable[[User], bool], what: str) -> Callable[[User], Awaitable[User]]:
    """A dependency that lets the request through only if `policy(user)` holds."""

    # async: a policy is a pure check on the loaded user, so it runs on the event loop rather
    # than costing every API call a hop to the thread pool and back, as a sync dependency does.
    async def dependency(user: CurrentUser) -> User:
        if not policy(user):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, detail=f"your role ({user.role}) cannot {what}"
            )
        return user

    return dependency


AdminUser = Annotated[User, Depends(require(permissions.is_admin, "do this (admin only)"))]
DataReader = Annotated[
    User, Depends(require(permissions.can_read_data, "read project data (admin or reviewer)"))
]


def get_project_dep(slug: str, session: SessionDep, user: CurrentUser) -> Project:
    if not permissions.can_view_project(user):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="inactive user")
    return projects.get_project(session, slug)


ProjectDep = Annotated[Project, Depends(get_project_dep)]


class RaterCall:
    """The rater hot path's session and caller, opened in the endpoint's own thread.

    `SessionDep`, `CurrentUser` and a policy are three dependencies, and FastAPI runs each sync
    one in the thread pool (a sync generator twice: open and close): `next` made five thread
    hand-offs per call, a measurable share of its CPU. The endpoints a rater calls in a loop
    take this instead (built on the event loop, no I/O) and open everything in one block, in
    the one thread their own body runs in. The checks are the same: bearer token (of scope
    `rater` or wider, within the rate limit) or session cookie with CSRF on writes, then
    `permissions.can_rate`.
    """

    def __init__(self, request: Request) -> None:
        self.request = request

    @contextmanager
    def open(self) -> Iterator[tuple[Session, User]]:
        """The call's unit of work and the authenticated rater: committed on leaving the block,
        rolled back if it raises."""
        with unit_of_work(self.request.app.state.sessionmaker) as session:
            user = authenticate(self.request, session, needs="rater")
            if not permissions.can_rate(user):
                raise HTTPException(
                    status.HTTP_403_FORBIDDEN,
                    detail=f"your role ({user.role}) cannot rate comparisons",
                )
            yield session, user


def get_rating_user(request: Request, session: SessionDep) -> User:
    """The caller of a rating call that does not need `RaterCall`'s one-thread shortcut
    (skip): a token needs scope `rater`, then `permissions.can_rate`."""
    user = authenticate(request, session, needs="rater")
    if not permissions.can_rate(user):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail=f"your role ({user.role}) cannot rate comparisons"
        )
    return user


RatingUser = Annotated[User, Depends(get_rating_user)]


async def get_rater_call(request: Request) -> RaterCall:
    return RaterCall(request)


RaterCallDep = Annotated[RaterCall, Depends(get_rater_call)]


def get_web_user(request: Request, session: SessionDep) -> User | None:
    return _session_user(request, session)


WebUser = Annotated[User | None, Depends(get_web_user)]
