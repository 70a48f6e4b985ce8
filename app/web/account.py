"""Pages every signed-in user has, whatever the role: their own API tokens; and, for any
visitor, accepting an invitation.

    GET  /account/tokens                    your tokens (anonymous: to the login page)
    POST /account/tokens                    create one (name, scope, expiry); the secret is
                                            shown in this answer only
    POST /account/tokens/{token_id}/revoke  your own only: another's is 404, also for an admin
    POST /account/password                  change your password: your other browser sessions
                                            end, this one is rotated and stays
    GET  /invite/{token}                    its form; 404 unknown, 410 used, revoked or expired
    POST /invite/{token}                    create the account, log in as it, go to /
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request, status
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.api.access import access
from app.api.deps import SAFE_METHODS, SessionDep, WebUser, begin_session, check_csrf
from app.models import User, utcnow
from app.services import users
from app.services.errors import FieldError, InvalidInput, NotFound, ServiceError
from app.web.console.common import LoginRequired, done, login_redirect_target
from app.web.templating import render

router = APIRouter(include_in_schema=False)


async def _signed_in(request: Request, user: WebUser) -> User:
    """The logged-in user, any role; a visitor goes to the login page and comes back. A write
    carries the session's CSRF token (the form's, or the htmx header)."""
    if user is None:
        raise LoginRequired(login_redirect_target(request))
    if request.method not in SAFE_METHODS:
        submitted = request.headers.get("x-csrf-token")
        if not submitted:
            submitted = str((await request.form()).get("csrf_token", ""))
        check_csrf(request, submitted)
    return user


SignedIn = Annotated[User, Depends(_signed_in)]


def _tokens(
    request: Request,
    session: Session,
    user: User,
    *,
    status_code: int = 200,
    **extra: Any,
) -> Response:
    context = {
        "user": user,
        "tokens": users.list_tokens(session, user),
        "now": utcnow(),
        "scopes": [(scope, users.SCOPE_HELP[scope]) for scope in users.scopes_for(user)],
        "issued": None,
        "form": {"name": "", "scope": users.MAX_SCOPE[user.role], "expires_in_days": ""},
        "errors": {},
        "password_errors": {},
        "min_password": users.MIN_PASSWORD_LENGTH,
        "flashes": request.session.pop("flash", []),
        **extra,
    }
    return render(request, "account/tokens.html", context, status_code)


def _by_field(exc: InvalidInput, default: str) -> dict[str, str]:
    by_field: dict[str, str] = {}
    for error in exc.errors or [FieldError(None, default, exc.message)]:
        by_field.setdefault(error.field or default, error.message)
    return by_field


@router.get("/account/tokens", openapi_extra=access("user"))
def tokens_page(request: Request, session: SessionDep, user: SignedIn) -> Response:
    return _tokens(request, session, user)


@router.post("/account/tokens", openapi_extra=access("user"))
def create_token(
    request: Request,
    session: SessionDep,
    user: SignedIn,
    name: Annotated[str, Form()] = "",
    scope: Annotated[str, Form()] = "",
    expires_in_days: Annotated[str, Form()] = "",
) -> Response:
    form = {"name": name.strip(), "scope": scope, "expires_in_days": expires_in_days.strip()}
    try:
        issued = users.create_token(
            session, user, name, scope=scope, expires_in_days=expires_in_days
        )
    except InvalidInput as exc:
        errors = _by_field(exc, "name")
        return _tokens(request, session, user, status_code=422, form=form, errors=errors)
    # The page itself, not a redirect: the secret exists only in this answer.
    return _tokens(request, session, user, status_code=201, issued=issued)


@router.post("/account/tokens/{token_id}/revoke", openapi_extra=access("own"))
def revoke_token(request: Request, token_id: int, session: SessionDep, user: SignedIn) -> Response:
    token = users.revoke_token(session, token_id, user, only_own=True)
    return done(request, "/account/tokens", f"Token {token.name!r} revoked: it no longer works.")


@router.post("/account/password", openapi_extra=access("user"))
def change_password(
    request: Request,
    session: SessionDep,
    user: SignedIn,
    current_password: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
) -> Response:
    try:
        users.change_own_password(session, user, current_password, password)
    except InvalidInput as exc:
        errors = _by_field(exc, "password")
        return _tokens(request, session, user, status_code=422, password_errors=errors)
    # Every session of the user ended with the version bump; this one starts afresh.
    begin_session(request, user)
    return done(
        request, "/account/tokens", "Password changed: your other browser sessions are logged out."
    )


# Invitations --------------------------------------------------------------------------------

GONE_TITLES = {
    "used": "This invite was already used",
    "revoked": "This invite was revoked",
    "expired": "This invite has expired",
}


def _invite_refusal(request: Request, exc: ServiceError) -> Response:
    """The page for a link that cannot be used: which of unknown, used, revoked, expired."""
    reason = exc.reason if isinstance(exc, users.InviteGone) else "unknown"
    return render(
        request,
        "account/invite_gone.html",
        {"title": GONE_TITLES.get(reason, "This invite link is not valid"), "message": exc.message,
         "reason": reason},
        exc.status_code,
    )  # fmt: skip


def _invite_form(
    request: Request,
    offer: users.InviteOffer,
    token: str,
    user: User | None,
    *,
    status_code: int = 200,
    email: str = "",
    errors: dict[str, str] | None = None,
) -> Response:
    context = {
        "invite": offer.invite,
        "project": offer.project,
        "token": token,
        "signed_in_as": user,
        "email": email,
        "errors": errors or {},
        "min_password": users.MIN_PASSWORD_LENGTH,
    }
    return render(request, "account/invite.html", context, status_code)


@router.get("/invite/{token}", openapi_extra=access("public"))
def invite_page(request: Request, token: str, session: SessionDep, user: WebUser) -> Response:
    try:
        offer = users.invite_offer(session, token)
    except (NotFound, users.InviteGone) as exc:
        return _invite_refusal(request, exc)
    return _invite_form(request, offer, token, user)


@router.post("/invite/{token}", openapi_extra=access("public"))
def accept_invite(
    request: Request,
    token: str,
    session: SessionDep,
    user: WebUser,
    email: Annotated[str, Form()] = "",
    password: Annotated[str, Form()] = "",
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    check_csrf(request, csrf_token)
    email = email.strip()
    try:
        new_user = users.accept_invite(session, token, email, password)
    except (NotFound, users.InviteGone) as exc:
        return _invite_refusal(request, exc)
    except InvalidInput as exc:
        # The invite is still good (the refusal left nothing): the form again, errors at fields.
        offer = users.invite_offer(session, token)
        return _invite_form(
            request, offer, token, user, status_code=422, email=email,
            errors=_by_field(exc, "email"),
        )  # fmt: skip
    # A new session (and CSRF token), as at login: a planted session id is useless.
    begin_session(request, new_user)
    return RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
