"""Password hashing (Argon2), API tokens and CSRF tokens."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()

TOKEN_PREFIX = "vd_"
TOKEN_SHOWN_CHARS = 10


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def password_needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


# A hash to verify against when the email is unknown, so both paths cost one Argon2 verify.
# Made on first use (module `__getattr__`), not at import: one Argon2 hash costs 100-250 ms,
# which every process importing this module, each CLI command included, would pay up front.
DUMMY_PASSWORD_HASH: str


def __getattr__(name: str) -> str:
    if name == "DUMMY_PASSWORD_HASH":
        value = hash_password(secrets.token_urlsafe(16))
        globals()[name] = value  # later lookups find it without calling this again
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def new_api_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_api_token(token: str) -> str:
    # Tokens carry 256 random bits, so a plain SHA-256 is enough; Argon2 would only slow lookups.
    return hashlib.sha256(token.encode()).hexdigest()


def token_display_prefix(token: str) -> str:
    return token[:TOKEN_SHOWN_CHARS]


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


def new_one_time_password() -> str:
    return secrets.token_urlsafe(12)
