"""Back up and restore a Verdict installation: its database and its artifacts directory.

    python scripts/backup.py backup [--to DIR] [--without-base-cache]
    python scripts/backup.py verify BACKUP
    python scripts/backup.py restore BACKUP [--force]

It reads the same settings as the app (``VERDICT_*`` variables and ``.env`` in the current
directory), so run it where the app runs, with the app's environment.

A backup is one directory, ``verdict-backup-<UTC time>``, made under ``<DIR>.partial`` and
renamed only when complete (never a half backup under its final name), holding:

* the database: ``database.dump`` (``pg_dump --format=custom``) on PostgreSQL, or
  ``verdict.db`` on SQLite, copied with SQLite's online backup API (a consistent copy while the
  app writes; ``cp`` of a live WAL database is not one);
* ``artifacts.tar``: the artifacts directory (trained models, checkpoints), uncompressed
  (safetensors barely compress, and gzip on a small machine is slower than the disk);
* ``secret_key``, when the app uses a generated key kept in ``var/`` (no VERDICT_SECRET_KEY):
  without it a restore would log everyone out and change the default export pseudonyms;
* ``manifest.json``: the Alembic revision, the row count of every table, the artifacts
  directory the model versions' paths point into, and each file's size and SHA-256.

The row counts and the dump come from one snapshot: on PostgreSQL the script exports a snapshot
from a REPEATABLE READ transaction and hands it to ``pg_dump --snapshot``; on SQLite it counts
in the copy. So a restore can check that it got back exactly what was backed up. The database
is dumped before the artifacts are archived: every artifact a dumped row names is already on
disk when the archive is made (an artifact written afterwards is only an extra file).

A restore changes nothing until it has verified every checksum, the backend, the revision (one
this Verdict knows) and the target (an empty database and artifacts directory, unless
``--force``). Then it unpacks the artifacts into a staging directory inside the artifacts
directory, restores the database in one transaction (PostgreSQL: the ``pg_restore --clean
--if-exists --no-owner`` script, applied by ``psql --single-transaction``; SQLite: the backup API
into the target file), swaps the staged artifacts in, and checks the revision and every row
count against the manifest. Any failure exits non-zero and says what was and was not changed.
Stop the web app, the workers and beat before restoring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from app.core.config import Settings
from app.core.migrate import head_revisions, migration_graph, sqlite_path

FORMAT = 1
MANIFEST = "manifest.json"
PG_DUMP_FILE = "database.dump"
SQLITE_FILE = "verdict.db"
ARTIFACTS_FILE = "artifacts.tar"
SECRET_FILE = "secret_key"
NAME_PREFIX = "verdict-backup-"
# Entries of the artifacts directory that a restore creates while it works, never archived.
STAGING_PREFIXES = (".restore-", ".replaced-")
BASE_CACHE = "base"  # the SmolLM2 safetensors cache: rebuilt from the installed package
VERSION_TABLE = "alembic_version"
CHUNK = 1 << 20


class Failure(Exception):
    """What went wrong, in words for the operator; the script prints it and exits 1."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- files and checksums --------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def utc_stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


# --- the database: PostgreSQL ---------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL database as the libpq tools want it: a URL without the SQLAlchemy driver
    suffix (``+psycopg``) and without the password, which travels in PGPASSWORD instead of on a
    command line every user of the host can read."""

    sqlalchemy_url: str
    libpq_url: str
    env: dict[str, str]

    @classmethod
    def from_url(cls, url: str) -> Postgres:
        parsed = make_url(url)
        libpq = URL.create(
            "postgresql",
            username=parsed.username,
            host=parsed.host,
            port=parsed.port,
            database=parsed.database,
            query=parsed.query,
        ).render_as_string(hide_password=False)
        env = dict(os.environ)
        if parsed.password is not None:
            env["PGPASSWORD"] = str(parsed.password)
        return cls(url, libpq, env)

    def tool(self, name: str) -> str:
        found = shutil.which(name)
        if found is None:
            raise Failure(
                f"{name} is not on PATH: install the PostgreSQL client tools (the same major"
                " version as the server, or newer)"
            )
        return found

    def run(self, argv: Sequence[str], what: str) -> None:
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip() or f"exit status {done.returncode}"
            raise Failure(f"{what} failed: {detail}")

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        engine = create_engine(self.sqlalchemy_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                yield conn
        except SQLAlchemyError as exc:
            where = describe_url(self.sqlalchemy_url)
            raise Failure(f"cannot use the database {where}: {exc}") from exc
        finally:
            engine.dispose()


def pg_tables(conn: Connection) -> list[str]:
    return list(
        conn.scalars(
            text(
                "SELECT tablename FROM pg_catalog.pg_tables"
                " WHERE schemaname = current_schema() ORDER BY tablename"
            )
        )
    )


def row_counts(conn: Connection, tables: Sequence[str]) -> dict[str, int]:
    quote = conn.dialect.identifier_preparer.quote
    return {t: int(conn.scalar(text(f"SELECT count(*) FROM {quote(t)}")) or 0) for t in tables}


def revisions_in(conn: Connection, tables: Sequence[str]) -> list[str]:
    if VERSION_TABLE not in tables:
        return []
    return sorted(str(r) for r in conn.scalars(text(f"SELECT version_num FROM {VERSION_TABLE}")))


def backup_postgres(db: Postgres, into: Path) -> tuple[list[str], dict[str, int]]:
    """Dump the database into `into` and return its revisions and row counts, both read in the
    snapshot the dump was taken from."""
    pg_dump = db.tool("pg_dump")
    with db.connect() as conn:
        conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            conn.execute(text("SET TRANSACTION READ ONLY"))
            snapshot = conn.scalar(text("SELECT pg_catalog.pg_export_snapshot()"))
            tables = pg_tables(conn)
            revisions = revisions_in(conn, tables)
            if not revisions:
                raise Failure(
                    f"the database {describe_url(db.sqlalchemy_url)} is not a migrated Verdict"
                    " database (no alembic_version): nothing to back up"
                )
            counts = row_counts(conn, tables)
            # The snapshot lives as long as this transaction: pg_dump must run inside it.
            db.run(
                [
                    pg_dump, "--format=custom", "--no-password", f"--snapshot={snapshot}",
                    f"--file={into / PG_DUMP_FILE}", f"--dbname={db.libpq_url}",
                ],
                "pg_dump",
            )  # fmt: skip
    return revisions, counts


def pg_target_state(db: Postgres) -> tuple[list[str], dict[str, int]]:
    """The target's tables and the rows of each (alembic_version aside)."""
    with db.connect() as conn, conn.begin():
        tables = pg_tables(conn)
        return tables, row_counts(conn, [t for t in tables if t != VERSION_TABLE])


def restore_postgres(db: Postgres, dump: Path, extra_tables: Sequence[str]) -> None:
    """Replace the database's contents with the dump's, in one transaction.

    `pg_restore --clean --if-exists` drops and recreates what the dump holds; tables the dump
    lacks (a target migrated further than the backup) are dropped first in the same
    transaction, else a later `verdict db upgrade` would trip over them. `--no-owner
    --no-privileges`: the target's roles need not be the source's.
    """
    pg_restore, psql = db.tool("pg_restore"), db.tool("psql")
    with tempfile.TemporaryDirectory(prefix="verdict-restore-") as tmp:
        script = Path(tmp) / "restore.sql"
        db.run(
            [
                pg_restore, "--clean", "--if-exists", "--no-owner", "--no-privileges",
                f"--file={script}", str(dump),
            ],
            "pg_restore",
        )  # fmt: skip
        drops = [f'DROP TABLE IF EXISTS "{t}" CASCADE;' for t in extra_tables]
        db.run(
            [
                psql, "--no-psqlrc", "--quiet", "--no-password", "--single-transaction",
                "--set=ON_ERROR_STOP=1", f"--dbname={db.libpq_url}",
                *(arg for drop in drops for arg in ("--command", drop)),
                f"--file={script}",
            ],
            "applying the dump (rolled back: the database is unchanged)",
        )  # fmt: skip


# --- the database: SQLite -------------------------------------------------------------------


def sqlite_connect(path: Path, mode: str) -> sqlite3.Connection:
    """A plain connection that cannot create the file (`mode=rw`/`ro`) or may (`rwc`)."""
    try:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode={mode}", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise Failure(f"cannot open the SQLite database {path}: {exc}") from exc


def sqlite_state(conn: sqlite3.Connection) -> tuple[list[str], list[str], dict[str, int]]:
    """Tables, revisions and row counts of a SQLite database."""
    tables = [
        str(name)
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"
            " AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    revisions = (
        sorted(str(r) for (r,) in conn.execute(f"SELECT version_num FROM {VERSION_TABLE}"))
        if VERSION_TABLE in tables
        else []
    )
    counts = {t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in tables}
    return tables, revisions, counts


def backup_sqlite(source: Path, into: Path) -> tuple[list[str], dict[str, int]]:
    """Copy the live database with the online backup API and count rows in the copy."""
    if not source.is_file():
        raise Failure(f"no SQLite database at {source}: nothing to back up")
    target = into / SQLITE_FILE
    # rw, not ro: a read-only connection to a WAL database may not be able to read it.
    with closing(sqlite_connect(source, "rw")) as src, closing(sqlite3.connect(target)) as dst:
        try:
            src.backup(dst)
        except sqlite3.Error as exc:
            raise Failure(f"copying {source} failed: {exc}") from exc
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        _, revisions, counts = sqlite_state(dst)
    if not revisions:
        raise Failure(f"{source} is not a migrated Verdict database (no alembic_version)")
    return revisions, counts


def restore_sqlite(copy: Path, target: Path) -> None:
    """Write the copy over the target with the backup API: one write transaction on the target,
    which SQLite's journal rolls back if it is cut short (a `cp` over a WAL database whose -wal
    file survives would corrupt it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite_connect(copy, "ro")) as src, closing(sqlite_connect(target, "rwc")) as dst:
        try:
            src.backup(dst)
        except sqlite3.Error as exc:
            raise Failure(f"restoring {target} failed (it is unchanged): {exc}") from exc


# --- the artifacts directory ----------------------------------------------------------------


def archive_artifacts(root: Path, archive: Path, *, without_base: bool) -> tuple[int, int]:
    """Tar the artifacts directory (paths relative to it); returns (files, bytes) archived.

    A file that disappears while it is archived was a run's temporary file, renamed into place
    or removed meanwhile (checkpoints are written to a temp file and renamed): it is skipped.
    """
    files = size = 0
    with tarfile.open(archive, "w") as tar:
        if not root.is_dir():
            return 0, 0
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(STAGING_PREFIXES) or (
                without_base and entry.name == BASE_CACHE
            ):
                continue
            for path in [entry, *sorted(entry.rglob("*"))] if entry.is_dir() else [entry]:
                try:
                    info = tar.gettarinfo(path, arcname=str(path.relative_to(root)))
                    if info is None:  # a socket or the like: nothing to keep
                        continue
                    if info.isreg():
                        with path.open("rb") as f:
                            tar.addfile(info, f)
                        files, size = files + 1, size + info.size
                    else:
                        tar.addfile(info)
                except FileNotFoundError:
                    continue
    return files, size


def artifact_entries(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(STAGING_PREFIXES))


def stage_artifacts(archive: Path, root: Path, stamp: str) -> Path:
    """Unpack the archive into a staging directory inside the artifacts directory (same
    filesystem, so the swap is renames; and it works when the directory is a mount point)."""
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".restore-{stamp}"
    staging.mkdir()
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")  # refuses absolute and escaping paths
    except (OSError, tarfile.TarError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise Failure(f"unpacking {archive.name} failed (nothing was changed): {exc}") from exc
    return staging


def swap_in(staging: Path, root: Path, stamp: str) -> None:
    """Move the current entries aside, the staged ones in, then delete the old ones."""
    replaced = root / f".replaced-{stamp}"
    replaced.mkdir()
    try:
        for name in artifact_entries(root):
            os.replace(root / name, replaced / name)
        for entry in staging.iterdir():
            os.replace(entry, root / entry.name)
    except OSError as exc:
        raise Failure(
            f"the database was restored, but swapping in the artifacts failed: {exc}. The"
            f" restored files are in {staging}, the previous ones in {replaced}: move them by"
            " hand, or restore again"
        ) from exc
    staging.rmdir()
    shutil.rmtree(replaced)


# --- backup ---------------------------------------------------------------------------------


def describe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def generated_secret(settings: Settings) -> Path | None:
    """The generated secret key file the app uses, if it uses one (no VERDICT_SECRET_KEY)."""
    path = settings.var_dir / SECRET_FILE
    return path if not settings.secret_key and path.is_file() else None


def backup(settings: Settings, to: Path, *, without_base: bool) -> Path:
    """Make one complete backup directory under `to` and return its path."""
    final = to / f"{NAME_PREFIX}{utc_stamp()}"
    partial = final.with_name(final.name + ".partial")
    if final.exists() or partial.exists():
        raise Failure(f"{final} already exists: wait a second and run again")
    to.mkdir(parents=True, exist_ok=True)
    partial.mkdir(mode=0o700)  # it holds password and token hashes, maybe the secret key
    try:
        path = sqlite_path(settings.database_url)
        if path is None:
            backend = "postgresql"
            revisions, counts = backup_postgres(Postgres.from_url(settings.database_url), partial)
        else:
            backend = "sqlite"
            revisions, counts = backup_sqlite(path, partial)
        say(f"database: {sum(counts.values())} rows in {len(counts)} tables, revision"
            f" {', '.join(revisions)}")  # fmt: skip
        files, size = archive_artifacts(
            settings.artifacts_dir, partial / ARTIFACTS_FILE, without_base=without_base
        )
        say(f"artifacts: {files} files, {size} bytes from {settings.artifacts_dir}")
        secret = generated_secret(settings)
        if secret is not None:
            shutil.copyfile(secret, partial / SECRET_FILE)
        for item in partial.iterdir():
            item.chmod(0o600)
        manifest = {
            "format": FORMAT,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "backend": backend,
            "database": describe_url(settings.database_url),
            "alembic_revisions": revisions,
            "tables": counts,
            "artifacts_dir": str(settings.artifacts_dir),
            "artifacts_excluded": [BASE_CACHE] if without_base else [],
            "files": {item.name: describe_file(item) for item in sorted(partial.iterdir())},
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (partial / MANIFEST).chmod(0o600)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


# --- verify and restore ---------------------------------------------------------------------


@dataclass
class Backup:
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]


def verify(path: Path) -> Backup:
    """Read the manifest and check every file it lists: present, same size, same SHA-256."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise Failure(f"{path} is not a Verdict backup: no {MANIFEST}") from None
    except (OSError, ValueError) as exc:
        raise Failure(f"cannot read {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise Failure(f"{manifest_path}: not a format-{FORMAT} Verdict backup manifest")
    problems = []
    for name, expected in manifest["files"].items():
        item = path / name
        if not item.is_file():
            problems.append(f"{name} is missing")
        elif item.stat().st_size != expected["bytes"]:
            problems.append(f"{name} is {item.stat().st_size} bytes, not {expected['bytes']}")
        elif sha256_of(item) != expected["sha256"]:
            problems.append(f"{name} does not match its SHA-256 checksum")
    database_file = PG_DUMP_FILE if manifest["backend"] == "postgresql" else SQLITE_FILE
    for needed in (database_file, ARTIFACTS_FILE):
        if needed not in manifest["files"]:
            problems.append(f"the manifest lists no {needed}")
    if problems:
        raise Failure(f"the backup {path} is damaged: {'; '.join(problems)}. Nothing was changed")
    return Backup(path, manifest)


def check_compatible(found: Backup, settings: Settings) -> None:
    """Refuse a backup this installation cannot take, before anything is changed."""
    manifest = found.manifest
    backend = "sqlite" if sqlite_path(settings.database_url) is not None else "postgresql"
    if manifest["backend"] != backend:
        raise Failure(
            f"the backup is of a {manifest['backend']} database; VERDICT_DATABASE_URL"
            f" ({describe_url(settings.database_url)}) is {backend}"
        )
    unknown = set(manifest["alembic_revisions"]) - set(migration_graph())
    if unknown:
        raise Failure(
            f"the backup is at revision {', '.join(sorted(unknown))}, which this version of"
            " Verdict does not know: restore it with the version that made it"
        )
    if manifest["artifacts_dir"] != str(settings.artifacts_dir):
        raise Failure(
            f"the backup's model versions name files under {manifest['artifacts_dir']}, but"
            f" VERDICT_ARTIFACTS_DIR is {settings.artifacts_dir}: restore with"
            f" VERDICT_ARTIFACTS_DIR={manifest['artifacts_dir']} (mount the volume there)"
        )


def target_contents(settings: Settings, found: Backup) -> list[str]:
    """What a restore would overwrite: rows in the database, entries in the artifacts
    directory, a different generated secret key. Empty: nothing."""
    found_in: list[str] = []
    path = sqlite_path(settings.database_url)
    if path is None:
        _, counts = pg_target_state(Postgres.from_url(settings.database_url))
    elif path.is_file():
        with closing(sqlite_connect(path, "rw")) as conn:
            _, _, counts = sqlite_state(conn)
        counts.pop(VERSION_TABLE, None)
    else:
        counts = {}
    full = {t: n for t, n in counts.items() if n}
    if full:
        shown = ", ".join(f"{t} {n}" for t, n in sorted(full.items()))
        found_in.append(f"the database has rows ({shown})")
    entries = artifact_entries(settings.artifacts_dir)
    if entries:
        more = "…" if len(entries) > 5 else ""
        found_in.append(f"{settings.artifacts_dir} is not empty ({', '.join(entries[:5])}{more})")
    secret = generated_secret(settings)
    backed_up = found.file(SECRET_FILE) if found.has(SECRET_FILE) else None
    if (
        secret is not None
        and backed_up is not None
        and secret.read_bytes() != backed_up.read_bytes()
    ):
        found_in.append(f"{secret} holds another secret key")
    return found_in


def restored_state(settings: Settings) -> tuple[list[str], dict[str, int]]:
    path = sqlite_path(settings.database_url)
    if path is None:
        db = Postgres.from_url(settings.database_url)
        with db.connect() as conn, conn.begin():
            tables = pg_tables(conn)
            return revisions_in(conn, tables), row_counts(conn, tables)
    with closing(sqlite_connect(path, "rw")) as lite:
        _, revisions, counts = sqlite_state(lite)
        return revisions, counts


def restore(settings: Settings, path: Path, *, force: bool) -> None:
    found = verify(path)
    manifest = found.manifest
    check_compatible(found, settings)
    in_the_way = target_contents(settings, found)
    if in_the_way and not force:
        raise Failure(
            "the target is not empty: " + "; ".join(in_the_way) + ". Nothing was changed;"
            " pass --force to replace it with the backup"
        )
    stamp = utc_stamp()
    staging = stage_artifacts(found.file(ARTIFACTS_FILE), settings.artifacts_dir, stamp)
    try:
        db_path = sqlite_path(settings.database_url)
        if db_path is None:
            db = Postgres.from_url(settings.database_url)
            tables, _ = pg_target_state(db)
            extra = [t for t in tables if t not in manifest["tables"]]
            restore_postgres(db, found.file(PG_DUMP_FILE), extra)
        else:
            restore_sqlite(found.file(SQLITE_FILE), db_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say("database restored")
    swap_in(staging, settings.artifacts_dir, stamp)
    say(f"artifacts restored into {settings.artifacts_dir}")
    if found.has(SECRET_FILE) and not settings.secret_key:
        secret = settings.var_dir / SECRET_FILE
        secret.parent.mkdir(parents=True, exist_ok=True)
        part = secret.with_name(SECRET_FILE + ".part")
        shutil.copyfile(found.file(SECRET_FILE), part)
        part.chmod(0o600)
        os.replace(part, secret)
        say(f"generated secret key restored into {secret}")
    check_restored(settings, manifest)


def check_restored(settings: Settings, manifest: dict[str, Any]) -> None:
    """The restored database must hold what the manifest says: same revision, same rows."""
    revisions, counts = restored_state(settings)
    if revisions != manifest["alembic_revisions"]:
        raise Failure(
            f"the restored database is at revision {', '.join(revisions) or 'none'}, not"
            f" {', '.join(manifest['alembic_revisions'])}: the restore is incomplete"
        )
    differ = [
        f"{t}: {counts.get(t)} rows, not {n}"
        for t, n in manifest["tables"].items()
        if counts.get(t) != n
    ]
    if differ:
        raise Failure(f"the restored database differs from the backup: {'; '.join(differ)}")
    say(f"checked: revision {', '.join(revisions)}, {sum(counts.values())} rows in"
        f" {len(counts)} tables, as in the backup")  # fmt: skip
    heads = head_revisions()
    if set(revisions) != heads:
        say(f"this Verdict is at revision {', '.join(sorted(heads))}: run `verdict db upgrade`"
            " before starting it")  # fmt: skip


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/backup.py",
        description="Back up and restore Verdict's database and artifacts directory.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("backup", help="write a new backup directory")
    make.add_argument(
        "--to", type=Path, default=Path("backups"), help="where to put it (default: backups)"
    )
    make.add_argument(
        "--without-base-cache",
        action="store_true",
        help=f"leave out artifacts/{BASE_CACHE}/ (the SmolLM2 cache, rebuilt on first use)",
    )
    check = commands.add_parser("verify", help="check a backup's files against its manifest")
    check.add_argument("backup", type=Path)
    put = commands.add_parser("restore", help="restore a backup into the configured database")
    put.add_argument("backup", type=Path)
    put.add_argument(
        "--force", action="store_true", help="replace a database or artifacts that are not empty"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings()
        if args.command == "backup":
            made = backup(settings, args.to, without_base=args.without_base_cache)
            print(made)  # alone on stdout: `dir=$(python scripts/backup.py backup)`
        elif args.command == "verify":
            found = verify(args.backup)
            say(f"{args.backup}: {len(found.manifest['files'])} files match the manifest")
        else:
            restore(settings, args.backup, force=args.force)
            say(f"restored {args.backup}")
    except Failure as exc:
        say(f"error: {exc}")
        return 1
    except ValueError as exc:  # a setting pydantic refused
        say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
