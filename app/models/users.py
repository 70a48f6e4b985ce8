"""People and programs that act on Verdict: users, their API tokens, and invitations."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, String, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.models.base import Base, utcnow

ROLES = ("admin", "reviewer", "rater")
# What an API token may do, narrowest first (enforced in `app.api.deps`): `read` GETs only;
# `rater` also the rating calls (next, judgment, skip); `admin` everything its user's role allows.
TOKEN_SCOPES = ("read", "rater", "admin")


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("role IN ('admin', 'reviewer', 'rater')", name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    is_active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None]
    # Bumped by a password change or a deactivation: a browser session (a signed cookie, so
    # nothing server-side to delete) carries the version it was made at and dies when it differs.
    session_version: Mapped[int] = mapped_column(default=0, server_default=text("0"))

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class ApiToken(Base):
    """A bearer token. Only its SHA-256 is stored; `prefix` lets a person recognise it."""

    __tablename__ = "api_tokens"
    __table_args__ = (CheckConstraint("scope IN ('read', 'rater', 'admin')", name="scope"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]  # None: never expires
    # Tokens made before scopes existed keep the full access they had (the migration's default).
    scope: Mapped[str] = mapped_column(String(16), default="admin", server_default="admin")

    user: Mapped[User] = relationship(back_populates="tokens")


class Invite(Base):
    """A single-use link that lets its holder create an account with a set role.

    Only the SHA-256 of the link's secret is stored (the link is shown once, like a token).
    """

    __tablename__ = "invites"
    __table_args__ = (CheckConstraint("role IN ('admin', 'reviewer', 'rater')", name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(String(200), default="")
    project_id: Mapped[int | None] = mapped_column(ForeignKey("projects.id", ondelete="SET NULL"))
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    used_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    revoked_at: Mapped[datetime | None]
