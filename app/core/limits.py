"""Login throttling and API rate limits: fixed-window counters, in Redis or in this process.

Two things are counted:

- **Failed logins**, per account (`LOGIN_FAILURES_PER_ACCOUNT` in `LOGIN_WINDOW_S`) and per
  client address (`LOGIN_FAILURES_PER_ADDRESS`, same window). Once either is reached the login
  page answers 429 with `Retry-After` until the window ends, without checking the password, so
  guessing costs the attacker the window and the server no Argon2 hash. A successful login
  clears its account's count (not the address's: one good password must not reset a spray).
- **API requests per token**: `Settings.api_rate_limit_per_min` (default 600, 0 = off) in a
  60-second window; over it, 429 with `Retry-After`. Only bearer-token calls are counted;
  browser pages are people clicking.

Storage. With `VERDICT_REDIS_URL` set, the counters live in Redis (one pipelined round trip of
`SET NX EX` + `INCR` + `TTL` per count), shared by every web process. Without it (the embedded
default: one web process) they live in this process's memory; `verdict serve --workers N`
without Redis therefore allows N times the limits, one set of counters per process.

Redis down (a restart, a network blip) is decided explicitly, not left to an exception:

- the API rate limit **fails open** (the request goes through, a warning is logged at most once
  per `REDIS_RETRY_AFTER_S`): rating must continue while Redis restarts;
- login throttling **falls back to the in-process counters**, so it still holds, per process.

After a Redis error the limiter does not try Redis again for `REDIS_RETRY_AFTER_S`, so a Redis
that hangs costs each request nothing rather than a connect timeout.

Fixed windows (not sliding): one key per (what, who) that expires with its window. Simple and
O(1); at a window's edge a client can spend up to twice the limit within a short span, which is
acceptable for limits meant to stop floods and guessing, not to meter.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

logger = logging.getLogger(__name__)

LOGIN_FAILURES_PER_ACCOUNT = 5
LOGIN_FAILURES_PER_ADDRESS = 20
LOGIN_WINDOW_S = 15 * 60
API_WINDOW_S = 60
API_RATE_LIMIT_PER_MIN_DEFAULT = 600
REDIS_RETRY_AFTER_S = 5.0
# Short: a limiter waiting on a Redis that does not answer would stall every API call.
REDIS_TIMEOUT_S = 0.25
KEY_PREFIX = "verdict:limit:"
# The in-process store forgets expired windows once it holds this many keys (each failed
# login from a new address or email adds one): memory stays bounded under a spray.
MEMORY_MAX_KEYS = 50_000
# What "Redis is down" looks like: refused or reset connections, timeouts, a Redis loading.
REDIS_ERRORS = (redis.RedisError, OSError)


class Counters(Protocol):
    """Fixed-window counters: `hit` adds one and says the count and seconds left in its window;
    `peek` says the same without adding; `clear` forgets a key."""

    def hit(self, key: str, window_s: int) -> tuple[int, int]: ...
    def peek(self, keys: list[str]) -> list[tuple[int, int]]: ...
    def clear(self, key: str) -> None: ...


@dataclass
class MemoryCounters:
    """This process's counters: a dict of key -> [window end (monotonic), count] under a lock."""

    max_keys: int = MEMORY_MAX_KEYS
    _windows: dict[str, list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hit(self, key: str, window_s: int) -> tuple[int, int]:
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None or window[0] <= now:
                if len(self._windows) >= self.max_keys:
                    self._forget_expired(now)
                window = self._windows[key] = [now + window_s, 0]
            window[1] += 1
            return int(window[1]), math.ceil(window[0] - now)

    def peek(self, keys: list[str]) -> list[tuple[int, int]]:
        now = time.monotonic()
        with self._lock:
            found = [self._windows.get(key) for key in keys]
        return [
            (int(w[1]), math.ceil(w[0] - now)) if w is not None and w[0] > now else (0, 0)
            for w in found
        ]

    def clear(self, key: str) -> None:
        with self._lock:
            self._windows.pop(key, None)

    def _forget_expired(self, now: float) -> None:
        for key in [k for k, w in self._windows.items() if w[0] <= now]:
            del self._windows[key]
        if len(self._windows) >= self.max_keys:
            # Still full of live windows (a spray from many addresses): drop the oldest half
            # (insertion order) rather than grow without bound.
            for key in list(self._windows)[: self.max_keys // 2]:
                del self._windows[key]


class RedisCounters:
    """Counters in Redis, shared by every web process. Raises `redis.RedisError` when Redis
    cannot be reached; `Limits` decides what that means."""

    def __init__(self, url: str) -> None:
        self.client: Any = redis.Redis.from_url(
            url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
        )

    def hit(self, key: str, window_s: int) -> tuple[int, int]:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, 0, ex=window_s, nx=True)  # a new window, unless one is open
        pipe.incr(key)
        pipe.ttl(key)
        _, count, ttl = pipe.execute()
        return int(count), max(int(ttl), 1)

    def peek(self, keys: list[str]) -> list[tuple[int, int]]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
            pipe.ttl(key)
        answers = pipe.execute()
        return [
            (int(count), max(int(ttl), 1)) if count is not None else (0, 0)
            for count, ttl in zip(answers[::2], answers[1::2], strict=True)
        ]

    def clear(self, key: str) -> None:
        self.client.delete(key)


def _account_key(email: str) -> str:
    # Hashed: the counters never hold an email address (Redis may be shared or dumped).
    digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    return f"{KEY_PREFIX}login:account:{digest}"


def _address_key(address: str) -> str:
    return f"{KEY_PREFIX}login:address:{address}"


class Limits:
    """The web app's limiter: one per app (`limits_for`), thread-safe."""

    def __init__(self, redis_url: str = "", api_per_min: int = API_RATE_LIMIT_PER_MIN_DEFAULT):
        self.api_per_min = api_per_min
        self.memory = MemoryCounters()
        self.redis: RedisCounters | None = RedisCounters(redis_url) if redis_url else None
        self._redis_skip_until = 0.0

    # Redis or not ------------------------------------------------------------------------

    def _shared(self) -> Counters | None:
        """Redis, unless it is not configured or failed less than REDIS_RETRY_AFTER_S ago."""
        if self.redis is None or time.monotonic() < self._redis_skip_until:
            return None
        return self.redis

    def _redis_failed(self, exc: Exception, consequence: str) -> None:
        first = time.monotonic() >= self._redis_skip_until
        self._redis_skip_until = time.monotonic() + REDIS_RETRY_AFTER_S
        if first:
            logger.warning(
                "rate limiter: Redis unreachable (%s: %s); %s for the next %.0f s",
                type(exc).__name__, exc, consequence, REDIS_RETRY_AFTER_S,
            )  # fmt: skip

    # API -----------------------------------------------------------------------------------

    def api_request(self, token_id: int) -> int | None:
        """Count one API call of a token: None to let it through, or the seconds to wait."""
        if self.api_per_min <= 0:
            return None
        key = f"{KEY_PREFIX}api:{token_id}"
        store = self._shared()
        if store is None and self.redis is not None:
            return None  # Redis configured but down: fail open
        try:
            count, left = (store or self.memory).hit(key, API_WINDOW_S)
        except REDIS_ERRORS as exc:
            self._redis_failed(exc, "API rate limits are off (fail open)")
            return None
        return left if count > self.api_per_min else None

    # Logins --------------------------------------------------------------------------------

    def login_blocked(self, email: str, address: str) -> int | None:
        """Seconds until this account or address may try again, or None if it may now."""
        keys = [_account_key(email), _address_key(address)]
        limits = [LOGIN_FAILURES_PER_ACCOUNT, LOGIN_FAILURES_PER_ADDRESS]
        counts = self._login_call(lambda store: store.peek(keys))
        pairs = zip(counts, limits, strict=True)
        waits = [left for (count, left), limit in pairs if count >= limit]
        return max(waits) if waits else None

    def login_failed(self, email: str, address: str) -> None:
        """Count a failed login against the account and the address."""

        def count(store: Counters) -> None:
            store.hit(_account_key(email), LOGIN_WINDOW_S)
            store.hit(_address_key(address), LOGIN_WINDOW_S)

        self._login_call(count)

    def login_succeeded(self, email: str) -> None:
        """Forget the account's failures (the address's stay)."""
        self._login_call(lambda store: store.clear(_account_key(email)))

    def _login_call(self, call: Any) -> Any:
        """`call(store)` on Redis, or on the in-process counters when Redis is down."""
        store = self._shared()
        if store is not None:
            try:
                return call(store)
            except REDIS_ERRORS as exc:
                self._redis_failed(exc, "login throttling uses this process's counters")
        return call(self.memory)


_create_lock = threading.Lock()


def limits_for(state: Any) -> Limits:
    """The app's limiter (`app.state.limits`), made from its settings on first use."""
    found: Limits | None = getattr(state, "limits", None)
    if found is None:
        with _create_lock:
            found = getattr(state, "limits", None)
            if found is None:
                settings = state.settings
                found = Limits(settings.redis_url, settings.api_rate_limit_per_min)
                state.limits = found
    return found
