from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict

from app.api.deps import AdminUser, CurrentUser, SessionDep
from app.services import users

router = APIRouter(prefix="/api/v1", tags=["users"])


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    role: str
    is_active: bool
    created_at: datetime


class UserCreate(BaseModel):
    email: str
    password: str
    role: str = "rater"


class TokenCreate(BaseModel):
    name: str


class TokenOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class IssuedTokenOut(TokenOut):
    token: str


@router.get("/me")
def me(user: CurrentUser) -> UserOut:
    return UserOut.model_validate(user)


@router.post("/users", status_code=status.HTTP_201_CREATED)
def create_user(body: UserCreate, session: SessionDep, admin: AdminUser) -> UserOut:
    user = users.create_user(session, body.email, body.password, body.role, actor_id=admin.id)
    return UserOut.model_validate(user)


@router.post("/tokens", status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, session: SessionDep, user: CurrentUser) -> IssuedTokenOut:
    """Create a token for yourself. The secret appears in this answer only."""
    issued = users.create_token(session, user, body.name)
    return IssuedTokenOut(**TokenOut.model_validate(issued.token).model_dump(), token=issued.secret)


@router.get("/tokens")
def list_tokens(session: SessionDep, user: CurrentUser) -> list[TokenOut]:
    return [TokenOut.model_validate(t) for t in users.list_tokens(session, user)]


@router.delete("/tokens/{token_id}")
def revoke_token(token_id: int, session: SessionDep, user: CurrentUser) -> TokenOut:
    return TokenOut.model_validate(users.revoke_token(session, token_id, user))
