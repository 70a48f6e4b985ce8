"""Migrations: applying them (`verdict db upgrade`), and checking that a database is migrated.

Every CLI command that uses the database calls `check_database` first, so that a command run
from the wrong directory, or against a database nobody migrated, says which database it looked
at and what to run, instead of creating an empty SQLite file and failing on a missing table.

The check stays off Alembic's runtime (a few hundred milliseconds to import): it reads the
`alembic_version` table with one query and finds the head revision by parsing the migration
files, each time (so nothing can fall out of step with them).
"""

from __future__ import annotations

import ast
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.core.config import ROOT_DIR, Settings, get_settings
from app.core.db import get_engine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = ROOT_DIR / "migrations"

WHAT_TO_RUN = (
    "Run `verdict db upgrade` to create or migrate it (`make demo` sets up and starts the"
    " embedded default), or point Verdict at your database: set VERDICT_DATABASE_URL, or run"
    " from the project directory."
)


class DatabaseNotReady(Exception):
    """The configured database is missing, unreachable or not migrated to the latest revision."""

    def __init__(self, problem: str, *, hint: str = WHAT_TO_RUN) -> None:
        super().__init__(f"{problem}\n{hint}")
        self.problem = problem
        self.hint = hint


def alembic_config(database_url: str) -> Config:
    from alembic.config import Config

    cfg = Config(str(ROOT_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = database_url
    return cfg


def upgrade_database(settings: Settings) -> None:
    """Apply every migration to the settings' database (creating a SQLite file if missing)."""
    from alembic import command

    command.upgrade(alembic_config(settings.database_url), "head")


def migration_graph(versions_dir: Path = MIGRATIONS_DIR / "versions") -> dict[str, set[str]]:
    """Each revision id and the ids it builds on, read from the migration files' top-level
    `revision` and `down_revision` assignments (without importing them or Alembic)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(versions_dir.glob("*.py")):
        values: dict[str, object] = {}
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, value = node.targets[0], node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target, value = node.target, node.value
            else:
                continue
            if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
                values[target.id] = ast.literal_eval(value)
        revision, down = values.get("revision"), values.get("down_revision")
        if isinstance(revision, str):
            # down_revision: None for the first migration, a tuple of ids for a merge
            parents = [down] if isinstance(down, str) else down if isinstance(down, tuple) else ()
            graph[revision] = {str(parent) for parent in parents}
    return graph


def head_revisions(graph: dict[str, set[str]] | None = None) -> set[str]:
    """The revisions no other migration builds on: one normally, several before a merge."""
    graph = migration_graph() if graph is None else graph
    return set(graph) - set().union(*graph.values())


def sqlite_path(database_url: str) -> Path | None:
    """The absolute path of a SQLite database file; None for other backends and in-memory ones.

    A relative path is relative to the current directory, as SQLite itself resolves it.
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.query.get("uri") in ("true", "1"):  # a `file:` URI, which only SQLite should parse
        return None
    return Path(url.database).resolve()


def describe_database(database_url: str) -> str:
    """The URL with any password hidden and, for a SQLite file, its absolute path."""
    shown = _hidden_password(database_url)
    path = sqlite_path(database_url)
    return f"{shown} (file {path})" if path is not None else shown


def _hidden_password(database_url: str) -> str:
    return make_url(database_url).render_as_string(hide_password=True)


def check_database(database_url: str | None = None) -> None:
    """Raise `DatabaseNotReady` unless the database exists and is at the head revision.

    `None` means the configured database, read on the process's shared engine so that the
    command which follows reuses the connection. The check creates and changes nothing: a
    missing SQLite file is reported before anything connects (connecting would create it), and
    an existing one is read through a plain connection of its own that may not create the file
    (`mode=rw`), because the app's engine switches every file it opens to WAL mode, a lasting
    change to a file that may not even be Verdict's.
    """
    url = database_url or get_settings().database_url
    where = describe_database(url)
    path = sqlite_path(url)
    if path is None:
        current = _recorded_revisions(get_engine(database_url), where)
    elif path.is_file():
        current = _recorded_sqlite_revisions(path, where)
    else:
        raise DatabaseNotReady(
            f"no database file at {path} (database URL {_hidden_password(url)})."
        )
    graph = migration_graph()
    heads = head_revisions(graph)
    if current == heads:
        return
    if not current:
        raise DatabaseNotReady(f"the database {where} is not migrated (no revision recorded).")
    shown, expected = ", ".join(sorted(current)), ", ".join(sorted(heads))
    if not current <= set(graph):
        raise DatabaseNotReady(
            f"the database {where} is at revision {shown}, which this version of Verdict does not"
            f" know (its latest is {expected}): a newer Verdict migrated it.",
            hint="Run the Verdict version that migrated it, or set VERDICT_DATABASE_URL to"
            " another database.",
        )
    raise DatabaseNotReady(f"the database {where} is at revision {shown}, not {expected}.")


_VERSION_QUERY = "SELECT version_num FROM alembic_version"


def _recorded_revisions(engine: Engine, where: str) -> set[str]:
    try:
        conn = engine.connect()
    except DBAPIError as exc:
        raise _unreachable(where, exc.orig) from exc
    with conn:
        try:
            return set(conn.scalars(text(_VERSION_QUERY)))
        except DBAPIError as exc:  # no such table, or one we may not read
            raise _not_migrated(where, exc.orig) from exc
        finally:
            conn.rollback()  # leave no transaction open (nor an aborted one, on PostgreSQL)


def _recorded_sqlite_revisions(path: Path, where: str) -> set[str]:
    try:
        # rw, not ro: closing the last connection to a WAL database then removes its -wal and
        # -shm files, which a read-only one leaves behind.
        conn = sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise _unreachable(where, exc) from exc
    try:
        return {str(version) for (version,) in conn.execute(_VERSION_QUERY)}
    except sqlite3.Error as exc:  # no such table, or not a SQLite file at all
        raise _not_migrated(where, exc) from exc
    finally:
        conn.close()


def _unreachable(where: str, exc: BaseException | None) -> DatabaseNotReady:
    return DatabaseNotReady(
        f"cannot open the database {where}: {_first_line(exc)}",
        hint="Check VERDICT_DATABASE_URL, that the server is running and the database exists.",
    )


def _not_migrated(where: str, exc: BaseException | None) -> DatabaseNotReady:
    return DatabaseNotReady(
        f"the database {where} is not migrated: its alembic_version table cannot be read"
        f" ({_first_line(exc)})."
    )


def _first_line(exc: BaseException | None) -> str:
    message = str(exc).strip()
    return message.splitlines()[0] if message else type(exc).__name__
