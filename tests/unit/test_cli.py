"""The `verdict` command line, run as a real subprocess against the test databases."""

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory

from app.core.migrate import alembic_config, head_revisions
from app.models import Prompt
from tests.conftest import PG_ADMIN_URL, Factory, _unavailable, run_verdict


def verdict(db_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VERDICT_DATABASE_URL": db_url, "VERDICT_VAR_DIR": str(tmp_path / "var")}
    return run_verdict(*args, env=env)


def test_user_token_project_and_import(db_url: str, tmp_path: Path, factory: Factory) -> None:
    created = verdict(
        db_url,
        tmp_path,
        "user",
        "create",
        "--email",
        "Ops@Example.com",
        "--password",
        "long enough pw",
        "--role",
        "admin",
    )
    assert created.returncode == 0, created.stderr
    assert "ops@example.com" in created.stdout

    token = verdict(
        db_url, tmp_path, "token", "create", "--email", "ops@example.com", "--name", "ci"
    )
    assert token.returncode == 0, token.stderr
    last_line = token.stdout.strip().splitlines()[-1]
    assert last_line.startswith("vd_") and " " not in last_line

    project = verdict(db_url, tmp_path, "project", "create", "--slug", "cli", "--name", "CLI")
    assert project.returncode == 0, project.stderr

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "hi", "external_id": "g1"}) + "\n")
    imported = verdict(db_url, tmp_path, "prompts", "import", str(good), "--project", "cli")
    assert imported.returncode == 0, imported.stderr
    assert "created 1, duplicates 0" in imported.stdout
    assert factory.count(Prompt) == 1


def test_import_reports_errors_with_line_numbers_and_stores_nothing(
    db_url: str, tmp_path: Path, factory: Factory
) -> None:
    factory.project("cli")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": ""}\n{"messages": [{"role": "bot"}]}\n')
    result = verdict(db_url, tmp_path, "prompts", "import", str(bad), "--project", "cli")
    assert result.returncode == 1
    assert "line 2, prompt: must not be empty" in result.stderr
    assert "line 3, messages[0].role: unknown role 'bot'" in result.stderr
    assert factory.count(Prompt) == 0


def test_errors_are_clear_not_tracebacks(db_url: str, tmp_path: Path, factory: Factory) -> None:
    factory.user("rater", email="taken@example.com")
    dup = verdict(
        db_url,
        tmp_path,
        "user",
        "create",
        "--email",
        "taken@example.com",
        "--password",
        "long enough pw",
    )
    assert dup.returncode == 1 and "already exists" in dup.stderr
    assert "Traceback" not in dup.stderr
    missing = verdict(
        db_url, tmp_path, "token", "create", "--email", "nobody@example.com", "--name", "x"
    )
    assert missing.returncode == 1 and "no user" in missing.stderr


# --- a database that is missing or not migrated ------------------------------------------------


def verdict_without_config(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`verdict ARGS` run from `cwd` with no VERDICT_* setting but those in `env`, as a user
    would run it from a directory that is not the project's."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VERDICT_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_missing_sqlite_database_is_reported_and_not_created(tmp_path: Path) -> None:
    result = verdict_without_config(tmp_path, "runs", "list")
    assert result.returncode == 1
    assert f"no database file at {(tmp_path / 'var' / 'verdict.db').resolve()}" in result.stderr
    assert "sqlite:///var/verdict.db" in result.stderr
    assert "verdict db upgrade" in result.stderr and "make demo" in result.stderr
    assert "VERDICT_DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no var/, no database file


@pytest.mark.parametrize(
    "args",
    [
        ("user", "create", "--email", "a@example.com", "--password", "long enough pw"),
        ("user", "password", "--email", "a@example.com", "--password", "long enough pw"),
        ("token", "create", "--email", "a@example.com", "--name", "ci"),
        ("project", "create", "--slug", "p", "--name", "P"),
        ("prompts", "import", "{file}", "--project", "p"),
        ("import", "{file}", "--project", "p"),
        ("runs", "list"),
        ("runs", "start", "--project", "p"),
        ("runs", "cancel", "1"),
        ("runs", "watch", "1"),
    ],
    ids=lambda args: " ".join(a for a in args[:2] if not a.startswith("{")),
)
def test_every_database_command_checks_first(tmp_path: Path, args: tuple[str, ...]) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"prompt": "hi"}) + "\n")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    result = verdict_without_config(cwd, *(a.format(file=file) for a in args))
    assert result.returncode == 1, result.stderr
    assert "no database file at" in result.stderr and "Traceback" not in result.stderr
    assert list(cwd.iterdir()) == []


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An existing, empty database: a 0-byte SQLite file (in a folder whose name needs quoting
    in a URI), or a new PostgreSQL database, dropped afterwards."""
    if request.param == "sqlite":
        folder = tmp_path / "a folder#1"
        folder.mkdir()
        (folder / "empty.db").touch()
        yield f"sqlite:///{folder / 'empty.db'}"
        return
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"verdict_empty_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    yield sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def shown(url: str) -> str:
    """How the message names a database: the URL, password hidden, and a SQLite file's path."""
    where = sa.make_url(url).render_as_string(hide_password=True)
    database = sa.make_url(url).database or ""
    return f"{where} (file {Path(database).resolve()})" if url.startswith("sqlite") else where


def test_a_database_that_is_not_migrated_is_reported(tmp_path: Path, unmigrated_url: str) -> None:
    result = verdict_without_config(tmp_path, "runs", "list", VERDICT_DATABASE_URL=unmigrated_url)
    assert result.returncode == 1
    assert f"the database {shown(unmigrated_url)} is not migrated" in result.stderr
    assert "verdict db upgrade" in result.stderr
    assert "Traceback" not in result.stderr
    if unmigrated_url.startswith("sqlite"):
        folder = Path(sa.make_url(unmigrated_url).database or "").parent
        assert [(p.name, p.stat().st_size) for p in folder.iterdir()] == [("empty.db", 0)]


def test_a_database_behind_the_migrations_is_reported(tmp_path: Path, unmigrated_url: str) -> None:
    command.upgrade(alembic_config(unmigrated_url), "0001")
    result = verdict_without_config(
        tmp_path, "project", "create", "--slug", "p", "--name", "P",
        VERDICT_DATABASE_URL=unmigrated_url,
    )  # fmt: skip
    assert result.returncode == 1
    heads = ", ".join(sorted(head_revisions()))
    assert f"{shown(unmigrated_url)} is at revision 0001, not {heads}" in result.stderr
    assert "verdict db upgrade" in result.stderr and "Traceback" not in result.stderr


def test_head_revisions_agree_with_alembic() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert head_revisions() == set(script.get_heads())
