from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field

from app.api.access import access
from app.api.deps import AdminUser, AnyScopeUser, CurrentUser, SessionDep
from app.api.schemas import InputModel
from app.services import users

router = APIRouter(prefix="/api/v1", tags=["users"])


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    role: str
    is_active: bool
    created_at: datetime


class UserCreate(InputModel):
    email: str
    password: str
    role: str = "rater"


class TokenCreate(InputModel):
    name: str
    scope: Literal["read", "rater", "admin"] | None = Field(
        None,
        description="read: GET only; rater: read plus the rating calls (next, judgment, skip);"
        " admin: everything your role allows. Default: the widest your role allows; never"
        " wider than your role (a rater's admin-scoped token is refused)",
    )
    expires_in_days: int | None = Field(
        None, ge=1, le=users.TOKEN_DAYS_MAX, description="days until it stops working; null: never"
    )


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    expires_at: datetime | None
    scope: str


class IssuedTokenOut(TokenOut):
    token: str


@router.get("/me", openapi_extra=access("user"))
def me(user: CurrentUser) -> UserOut:
    return UserOut.model_validate(user)


@router.post("/users", status_code=status.HTTP_201_CREATED, openapi_extra=access("admin"))
def create_user(body: UserCreate, session: SessionDep, admin: AdminUser) -> UserOut:
    user = users.create_user(session, body.email, body.password, body.role, actor_id=admin.id)
    return UserOut.model_validate(user)


@router.post("/tokens", status_code=status.HTTP_201_CREATED, openapi_extra=access("user"))
def create_token(body: TokenCreate, session: SessionDep, user: CurrentUser) -> IssuedTokenOut:
    """Create a token for yourself. The secret appears in this answer only. Creating one with
    a token needs an admin-scoped token (a write), so a narrow token cannot mint a wider one."""
    issued = users.create_token(
        session, user, body.name, scope=body.scope, expires_in_days=body.expires_in_days
    )
    return IssuedTokenOut(**TokenOut.model_validate(issued.token).model_dump(), token=issued.secret)


@router.get("/tokens", openapi_extra=access("user"))
def list_tokens(session: SessionDep, user: CurrentUser) -> list[TokenOut]:
    return [TokenOut.model_validate(t) for t in users.list_tokens(session, user)]


@router.delete("/tokens/{token_id}", openapi_extra=access("own_or_admin"))
def revoke_token(
    token_id: int, request: Request, session: SessionDep, user: AnyScopeUser
) -> TokenOut:
    """Revoke a token. A token of any scope may revoke itself (a leaked token can be killed
    with itself); revoking another one with a token needs an admin-scoped token."""
    used = getattr(request.state, "token_id", None)
    scope = getattr(request.state, "token_scope", "admin")
    if used is not None and used != token_id and not users.scope_allows(scope, "admin"):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"this token's scope ({scope}) may revoke only itself: revoking another token"
            " needs a token with scope admin",
        )
    return TokenOut.model_validate(users.revoke_token(session, token_id, user))
