"""Users and API tokens."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import String, bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core import security
from app.models import ApiToken, User, utcnow
from app.models.users import ROLES
from app.services import audit
from app.services.errors import Conflict, InvalidInput, NotFound

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
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if "@" not in email:
        raise InvalidInput(f"{email!r} is not an email address")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
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


def set_password(session: Session, user: User, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    user.password_hash = security.hash_password(password)
    audit.record(session, "user.password", actor_id=user.id, target=("user", user.id))


@dataclass
class IssuedToken:
    """A freshly created token. `secret` is shown once and never stored."""

    token: ApiToken
    secret: str


def create_token(session: Session, user: User, name: str) -> IssuedToken:
    """Issue an API token for `user`; only its hash and a short prefix are stored."""
    name = name.strip()
    if not name:
        raise InvalidInput("a token needs a name")
    secret = security.new_api_token()
    token = ApiToken(
        user_id=user.id,
        name=name,
        prefix=security.token_display_prefix(secret),
        token_hash=security.hash_api_token(secret),
    )
    session.add(token)
    session.flush()
    audit.record(session, "token.create", actor_id=user.id, target=("api_token", token.id))
    return IssuedToken(token=token, secret=secret)


# Built once, like the other statements every API call runs (see app/services/assignment.py):
# building and cache-keying this select cost about as much CPU as running it. The user as an
# entity, the token as plain columns: loading a second entity costs CPU nothing here needs.
_USER_FOR_TOKEN = (
    select(User, ApiToken.id, ApiToken.revoked_at, ApiToken.last_used_at)
    .join(User, User.id == ApiToken.user_id)
    .where(ApiToken.token_hash == bindparam("token_hash", type_=String))
)
_TOUCH_TOKEN = (
    update(ApiToken)
    .where(ApiToken.id == bindparam("token_id"))
    .values(last_used_at=bindparam("now"))
    .execution_options(synchronize_session=False)
)


def user_for_token(session: Session, secret: str) -> User | None:
    """The active user a bearer token belongs to, or None if unknown, revoked or inactive."""
    # One round trip for token and user: this runs on every API request.
    row = session.execute(_USER_FOR_TOKEN, {"token_hash": security.hash_api_token(secret)}).first()
    if row is None:
        return None
    user, token_id, revoked_at, last_used_at = row
    if revoked_at is not None or not user.is_active:
        return None
    now = utcnow()
    if last_used_at is None or now - last_used_at > TOKEN_TOUCH_INTERVAL:
        session.execute(_TOUCH_TOKEN, {"token_id": token_id, "now": now})
    return user


def list_tokens(session: Session, user: User) -> list[ApiToken]:
    return list(
        session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))
    )


def revoke_token(session: Session, token_id: int, actor: User) -> ApiToken:
    """Revoke a token. Users revoke their own; admins may revoke anyone's."""
    token = session.get(ApiToken, token_id)
    if token is None or (token.user_id != actor.id and actor.role != "admin"):
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        audit.record(session, "token.revoke", actor_id=actor.id, target=("api_token", token.id))
        session.flush()
    return token
