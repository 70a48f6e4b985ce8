"""API rate limits per token and the limiter's stores: in-process, real Redis shared by two
apps (two web processes), and Redis down (a closed port): the API fails open with a warning,
login throttling falls back to the in-process counters."""

from __future__ import annotations

import logging
import re
import statistics
import time
from collections.abc import Iterator

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core import limits
from app.core.config import Settings
from app.main import create_app
from tests.conftest import TEST_PASSWORD, Factory, bearer
from tests.workers.conftest import _redis_broker, _release_redis

# Nothing listens here (the port range of this suite's access tests): "Redis is down".
CLOSED_REDIS = "redis://127.0.0.1:18599/0"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = _redis_broker()
    yield url
    _release_redis(url)


def app_with(settings: Settings, **changes: object) -> FastAPI:
    return create_app(settings.model_copy(update=changes))


@pytest.fixture
def make_client() -> Iterator[object]:
    made: list[tuple[FastAPI, TestClient]] = []

    def make(app: FastAPI) -> TestClient:
        client = TestClient(app)
        client.__enter__()
        made.append((app, client))
        return client

    yield make
    for app, client in made:
        client.__exit__(None, None, None)
        app.state.engine.dispose()


def test_api_limit_per_token_answers_429_with_retry_after(
    settings: Settings, make_client: object, factory: Factory
) -> None:
    client = make_client(app_with(settings, api_rate_limit_per_min=3))  # type: ignore[operator]
    rater = factory.user("rater")
    first, second = bearer(factory.token(rater)), bearer(factory.token(rater))
    assert [client.get("/api/v1/me", headers=first).status_code for _ in range(3)] == [200] * 3
    limited = client.get("/api/v1/me", headers=first)
    assert limited.status_code == 429
    assert 0 < int(limited.headers["retry-after"]) <= limits.API_WINDOW_S
    assert limited.json()["detail"].startswith("rate limit: at most 3 requests a minute per token")
    # Per token: another token of the same user is counted on its own.
    assert client.get("/api/v1/me", headers=second).status_code == 200
    # Browser sessions are not counted (people clicking).
    assert client.get("/api/v1/me").status_code == 401


def test_zero_turns_the_api_limit_off(
    settings: Settings, make_client: object, factory: Factory
) -> None:
    client = make_client(app_with(settings, api_rate_limit_per_min=0))  # type: ignore[operator]
    headers = bearer(factory.token(factory.user("rater")))
    assert {client.get("/api/v1/me", headers=headers).status_code for _ in range(30)} == {200}
    default = Settings.model_fields["api_rate_limit_per_min"].default
    assert default == limits.API_RATE_LIMIT_PER_MIN_DEFAULT == 600


def test_redis_counts_are_shared_by_every_web_process(
    settings: Settings, make_client: object, factory: Factory, redis_url: str
) -> None:
    one = make_client(app_with(settings, api_rate_limit_per_min=4, redis_url=redis_url))  # type: ignore[operator]
    two = make_client(app_with(settings, api_rate_limit_per_min=4, redis_url=redis_url))  # type: ignore[operator]
    headers = bearer(factory.token(factory.user("rater")))
    token_id = factory.token_row(headers["Authorization"].split()[1]).id
    redis.Redis.from_url(redis_url).delete(f"{limits.KEY_PREFIX}api:{token_id}")
    codes = [
        (one if n % 2 else two).get("/api/v1/me", headers=headers).status_code for n in range(6)
    ]
    assert codes == [200, 200, 200, 200, 429, 429]
    ttl = redis.Redis.from_url(redis_url).ttl(f"{limits.KEY_PREFIX}api:{token_id}")
    assert 0 < ttl <= limits.API_WINDOW_S


def test_login_throttle_is_shared_through_redis(
    settings: Settings, make_client: object, factory: Factory, redis_url: str
) -> None:
    rater = factory.user("rater")
    apps = [app_with(settings, redis_url=redis_url) for _ in range(2)]
    clients = [make_client(a) for a in apps]  # type: ignore[operator]
    codes = [login(clients[n % 2], rater.email, "wrong") for n in range(5)]
    assert codes == [401] * 5
    assert login(clients[0], rater.email, TEST_PASSWORD) == 429
    assert login(clients[1], rater.email, TEST_PASSWORD) == 429
    apps[0].state.limits.login_succeeded(rater.email)  # what a success (or an operator) does
    assert login(clients[1], rater.email, TEST_PASSWORD) == 303


def login(client: TestClient, email: str, password: str) -> int:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    data = {"email": email, "password": password, "csrf_token": token[1]}
    return client.post("/login", data=data, follow_redirects=False).status_code


def test_redis_down_api_fails_open_and_logins_stay_throttled(
    settings: Settings,
    make_client: object,
    factory: Factory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = make_client(app_with(settings, api_rate_limit_per_min=2, redis_url=CLOSED_REDIS))  # type: ignore[operator]
    rater = factory.user("rater")
    headers = bearer(factory.token(rater))
    with caplog.at_level(logging.WARNING, logger="app.core.limits"):
        started = time.perf_counter()
        codes = {client.get("/api/v1/me", headers=headers).status_code for _ in range(10)}
        elapsed = time.perf_counter() - started
    assert codes == {200}  # over the limit of 2, but Redis cannot count: rating goes on
    warnings = [r.getMessage() for r in caplog.records if r.name == "app.core.limits"]
    assert len(warnings) == 1  # once per REDIS_RETRY_AFTER_S, not once per request
    assert "Redis unreachable" in warnings[0] and "fail open" in warnings[0]
    assert elapsed < 5
    # Logins: this process's counters hold the line.
    assert [login(client, rater.email, "wrong") for _ in range(5)] == [401] * 5
    assert login(client, rater.email, TEST_PASSWORD) == 429


def test_redis_back_after_the_pause_is_used_again(redis_url: str) -> None:
    limiter = limits.Limits(CLOSED_REDIS, api_per_min=1)
    assert limiter.api_request(1) is None and limiter.api_request(1) is None  # open: down
    limiter.redis = limits.RedisCounters(redis_url)  # Redis "restarted" at this address
    redis.Redis.from_url(redis_url).delete(f"{limits.KEY_PREFIX}api:1")
    assert limiter.api_request(1) is None  # still inside the pause: not counted, not refused
    limiter._redis_skip_until = 0.0  # the pause is over
    assert limiter.api_request(1) is None
    assert limiter.api_request(1) is not None  # counted in Redis again


def test_memory_counters_window_and_bound() -> None:
    counters = limits.MemoryCounters(max_keys=10)
    assert counters.hit("a", 60) == (1, 60)
    assert counters.hit("a", 60)[0] == 2
    assert counters.peek(["a", "b"]) == [(2, 60), (0, 0)]
    counters.clear("a")
    assert counters.peek(["a"]) == [(0, 0)]
    assert counters.hit("short", 0)[0] == 1  # an expired window starts over
    assert counters.hit("short", 0)[0] == 1
    for n in range(100):
        counters.hit(f"spray{n}", 60)
    assert len(counters._windows) <= 10


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_the_limiter_costs_well_under_a_millisecond(
    store: str, request: pytest.FixtureRequest
) -> None:
    """The rater hot path pays one `api_request` per call."""
    url = request.getfixturevalue("redis_url") if store == "redis" else ""
    limiter = limits.Limits(url, api_per_min=10**9)
    timings = []
    for n in range(500):
        started = time.perf_counter()
        assert limiter.api_request(n % 50) is None
        timings.append(time.perf_counter() - started)
    median = statistics.median(timings)
    print(f"limiter {store}: median {median * 1e6:.0f} us, p95 {sorted(timings)[474] * 1e6:.0f} us")
    assert median < (0.00005 if store == "memory" else 0.001)
