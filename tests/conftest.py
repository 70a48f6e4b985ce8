"""Shared fixtures: a fresh PostgreSQL database and a SQLite file per test run, both migrated
with Alembic; tests that take `db_url` run once on each backend, and the tables are emptied
after every test. With CI=true a missing PostgreSQL fails the run instead of skipping."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import make_engine, make_sessionmaker
from app.core.migrate import upgrade_database
from app.main import create_app
from app.models import ApiToken, Base, ComparisonPair, Project, Prompt, Response, User
from app.services import projects, users

PG_ADMIN_URL = os.environ.get(
    "VERDICT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TEST_PASSWORD = "correct horse battery"

# Property tests (Hypothesis, Schemathesis) draw the same examples on every run by default, so
# a run passes or fails for the code, not for the draw; VERDICT_HYPOTHESIS_PROFILE=explore draws
# new ones each run (with a seed printed on failure) to look for more.
hypothesis.settings.register_profile("repeatable", derandomize=True)
hypothesis.settings.register_profile("explore", derandomize=False)
hypothesis.settings.load_profile(os.environ.get("VERDICT_HYPOTHESIS_PROFILE", "repeatable"))


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable ({type(exc).__name__}: {exc})"
    if IN_CI:
        pytest.fail(message + " - CI requires it", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"verdict_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    upgrade_database(Settings(database_url=url))
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'verdict.db'}"
    upgrade_database(Settings(database_url=url))
    return url


_engines: dict[tuple[str, bool], sa.Engine] = {}


def engine_for(url: str, *, immediate: bool = False) -> sa.Engine:
    """The tests' own engine. On SQLite its transactions are deferred by default, so a test
    session that has only read never holds the write lock the app under test needs.

    `immediate=True` begins them as the app does (BEGIN IMMEDIATE), for sessions that write
    while other processes write too: a deferred transaction that has read cannot take the
    write lock once another connection has committed since its read (SQLite answers
    "database is locked" at once, without waiting out the busy timeout)."""
    key = (url, immediate)
    if key not in _engines:
        _engines[key] = make_engine(url, sqlite_immediate=immediate)
    return _engines[key]


def empty_all_tables(url: str) -> None:
    engine = engine_for(url)
    tables = [t.name for t in Base.metadata.sorted_tables]
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for name in reversed(tables):
                conn.execute(sa.text(f"DELETE FROM {name}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    url: str = request.getfixturevalue(f"{'pg' if request.param == 'postgresql' else 'sqlite'}_url")
    yield url
    empty_all_tables(url)


@pytest.fixture
def pg_only_url(pg_url: str) -> Iterator[str]:
    """For tests about PostgreSQL behaviour (row locks, concurrency) only."""
    yield pg_url
    empty_all_tables(pg_url)


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    s = make_sessionmaker(engine_for(db_url))()
    yield s
    s.close()


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        var_dir=tmp_path / "var",
        secret_key="test-secret-key-" + "x" * 32,
        max_upload_bytes=64 * 1024,
        max_upload_records=100,
        # Off: one test's token may make far more than 600 calls a minute (Schemathesis, the
        # concurrency tests). The limit is tested with its own settings in tests/api/test_limits.py.
        api_rate_limit_per_min=0,
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    application = create_app(settings)
    yield application
    application.state.engine.dispose()


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


class Factory:
    """Rows for tests, committed, with readable defaults.

    Each method first ends the session's current transaction, so rows the app wrote since the
    last call are visible and a stale SQLite read snapshot never blocks a write; then it commits
    what it made (services never commit: the caller owns the transaction).
    """

    _seq = itertools.count(1)

    def __init__(self, session: Session) -> None:
        self.session = session

    def user(self, role: str = "rater", email: str | None = None) -> User:
        self.session.commit()
        email = email or f"{role}{next(self._seq)}@example.com"
        user = users.create_user(self.session, email, TEST_PASSWORD, role)
        self.session.commit()
        return user

    def token(self, user: User, name: str = "test") -> str:
        self.session.commit()
        secret = users.create_token(self.session, user, name).secret
        self.session.commit()
        return secret

    def token_row(self, secret: str) -> ApiToken:
        from app.core.security import hash_api_token

        self.session.commit()
        row = self.session.scalar(
            sa.select(ApiToken).where(ApiToken.token_hash == hash_api_token(secret))
        )
        assert row is not None
        self.session.commit()
        return row

    def project(self, slug: str | None = None, **settings: Any) -> Project:
        self.session.commit()
        slug = slug or f"proj-{next(self._seq)}"
        project = projects.create_project(self.session, slug, slug.title(), settings=settings)
        self.session.commit()
        return project

    def pair(
        self,
        project: Project,
        texts: tuple[str, str] = ("Answer A", "Answer B"),
        prompt: str = "A question?",
        **fields: Any,
    ) -> ComparisonPair:
        self.session.commit()
        p = Prompt(project_id=project.id, text=prompt, source="test")
        self.session.add(p)
        self.session.flush()
        a = Response(prompt_id=p.id, text=texts[0], model_name="m1")
        b = Response(prompt_id=p.id, text=texts[1], model_name="m2")
        self.session.add_all([a, b])
        self.session.flush()
        fields.setdefault("required_judgments", projects.project_settings(project).overlap)
        pair = ComparisonPair(
            project_id=project.id, prompt_id=p.id, response_a_id=a.id, response_b_id=b.id, **fields
        )
        self.session.add(pair)
        self.session.commit()
        return pair

    def count(self, model: type[Base]) -> int:
        self.session.commit()
        n = self.session.scalar(sa.select(sa.func.count()).select_from(model)) or 0
        self.session.commit()
        return n


@pytest.fixture
def factory(session: Session) -> Factory:
    return Factory(session)


def run_verdict(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`verdict ARGS` as a user runs it: a fresh `python -m app.cli` process."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- where the suite's time goes -----------------------------------------------------------------

_seconds_by_file: dict[str, float] = {}
SLOWEST_FILES = 15


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    _seconds_by_file[path] = _seconds_by_file.get(path, 0.0) + report.duration


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The test files that took longest (setup, call and teardown summed), last in the report
    so that a log's tail shows them: what to look at when the suite grows slow."""
    if not _seconds_by_file:
        return
    total = sum(_seconds_by_file.values())
    terminalreporter.write_sep("=", f"slowest {SLOWEST_FILES} test files of {total:.0f}s")
    ranked = sorted(_seconds_by_file.items(), key=lambda kv: -kv[1])[:SLOWEST_FILES]
    for path, seconds in ranked:
        terminalreporter.write_line(f"{seconds:8.1f}s {seconds / total:6.1%}  {path}")
