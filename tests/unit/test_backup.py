"""`scripts/backup.py`, run as an operator runs it (a subprocess with the app's environment):
back up a project, wipe the database and the artifacts directory, restore, and find the
project whole; and the refusals: a damaged backup, a target that is not empty, the wrong
artifacts directory, a database that is not Verdict's.

Each test gets an installation of its own (a database created for it, not the shared test
database, since a restore drops and recreates tables), on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.core.config import ROOT_DIR, Settings
from app.core.db import make_engine, make_sessionmaker
from app.core.migrate import upgrade_database
from app.main import create_app
from app.models import Judgment, ModelVersion, User
from app.services import assignment, judgments, registry
from app.services.judgments import JudgmentInput
from tests.conftest import PG_ADMIN_URL, Factory, _unavailable, bearer

pytestmark = pytest.mark.slow  # 30-70 s on two cores: every step is a fresh process

SCRIPT = ROOT_DIR / "scripts" / "backup.py"
ARTIFACT_BYTES = os.urandom(256 * 1024)  # incompressible, like weights


@dataclass
class Site:
    """One installation: its database, var/ and artifacts directory, and the environment the
    app (and so the script) reads them from."""

    backend: str
    url: str
    root: Path
    pg_name: str = ""  # the PostgreSQL database made for the test

    @property
    def var_dir(self) -> Path:
        return self.root / "var"

    @property
    def artifacts(self) -> Path:
        return self.root / "shared" / "artifacts"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VERDICT_")}
        env.update(
            VERDICT_DATABASE_URL=self.url,
            VERDICT_VAR_DIR=str(self.var_dir),
            VERDICT_ARTIFACTS_DIR=str(self.artifacts),
        )
        env.update(extra)
        return env

    def settings(self) -> Settings:
        return Settings(database_url=self.url, var_dir=self.var_dir, artifacts_dir=self.artifacts)

    def script(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(SCRIPT), *args],
            env=self.env(**env),
            cwd=self.root,  # no stray .env: the settings come from the environment above
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def engine(self) -> sa.Engine:
        return make_engine(self.url, sqlite_immediate=False)


class PgAdmin:
    def __init__(self) -> None:
        self.engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def create(self, name: str) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop(self, name: str) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    if request.param == "sqlite":
        made = Site("sqlite", f"sqlite:///{tmp_path / 'var' / 'verdict.db'}", tmp_path)
        upgrade_database(made.settings())
        yield made
        return
    admin = PgAdmin()
    name = f"verdict_backup_{uuid.uuid4().hex[:10]}"
    try:
        admin.create(name)
    except sa.exc.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    made = Site("postgresql", url, tmp_path, pg_name=name)
    try:
        upgrade_database(made.settings())
        yield made
    finally:
        admin.drop(name)
        admin.engine.dispose()


def wipe(site: Site) -> None:
    """Lose everything: the database (dropped and created empty, or the file deleted), the
    artifacts directory and var/'s generated secret."""
    if site.backend == "postgresql":
        admin = PgAdmin()
        admin.drop(site.pg_name)
        admin.create(site.pg_name)
        admin.engine.dispose()
    else:
        for suffix in ("", "-wal", "-shm"):
            Path(str(site.var_dir / "verdict.db") + suffix).unlink(missing_ok=True)
    shutil.rmtree(site.artifacts)
    (site.var_dir / "secret_key").unlink(missing_ok=True)


@dataclass
class Built:
    slug: str
    token: str
    prompts: list[str]
    artifact: Path


def build_project(site: Site) -> Built:
    """A project with prompts, pairs, judgments by two raters, an API token and a trained
    reward model version whose weights file lives in the artifacts directory."""
    engine = site.engine()
    session = make_sessionmaker(engine)()
    try:
        factory = Factory(session)
        admin = factory.user("admin")
        token = factory.token(admin)
        project = factory.project(overlap=2)
        prompts = [f"Question {i}: why is the sky blue?" for i in range(4)]
        for text in prompts:
            factory.pair(project, prompt=text)
        for n, rater in enumerate([factory.user("rater"), factory.user("rater")]):
            while (lease := assignment.next_assignment(session, project, rater)) is not None:
                choice = "ab"[(lease.pair_id + n) % 2]
                judgments.submit(session, lease.id, rater, JudgmentInput(choice, strength=2))
                session.commit()
        where = registry.artifact_dir(site.settings(), project, "reward", 1)
        where.mkdir(parents=True)
        (where / "model.safetensors").write_bytes(ARTIFACT_BYTES)
        session.add(
            ModelVersion(
                project_id=project.id, kind="reward", version=1, name="reward v1",
                base_model="tiny", artifact_path=str(where), status="candidate",
            )
        )  # fmt: skip
        session.commit()
        return Built(project.slug, token, prompts, where / "model.safetensors")
    finally:
        session.close()
        engine.dispose()


def row_counts(site: Site) -> dict[str, int]:
    engine = site.engine()
    try:
        with engine.connect() as conn:
            names = sa.inspect(conn).get_table_names()
            return {t: int(conn.scalar(sa.text(f'SELECT count(*) FROM "{t}"')) or 0) for t in names}
    finally:
        engine.dispose()


def judgment_rows(site: Site) -> list[tuple[Any, ...]]:
    engine = site.engine()
    try:
        with engine.connect() as conn:
            query = sa.select(
                Judgment.id, Judgment.pair_id, Judgment.rater_id, Judgment.choice,
                Judgment.strength, Judgment.created_at,
            ).order_by(Judgment.id)  # fmt: skip
            return [tuple(row) for row in conn.execute(query)]
    finally:
        engine.dispose()


def make_backup(site: Site) -> Path:
    done = site.script("backup", "--to", str(site.root / "backups"))
    assert done.returncode == 0, done.stderr
    made = Path(done.stdout.strip())
    assert made.parent == site.root / "backups" and made.name.startswith("verdict-backup-")
    return made


def test_backup_wipe_restore_gives_the_project_back_whole(site: Site) -> None:
    built = build_project(site)
    site.settings().resolved_secret_key()  # the embedded default's generated key, in var/
    secret = (site.var_dir / "secret_key").read_bytes()
    counts, rows = row_counts(site), judgment_rows(site)
    assert counts["judgments"] == 8 and counts["comparison_pairs"] == 4
    made = make_backup(site)
    manifest = json.loads((made / "manifest.json").read_text())
    assert manifest["tables"] == counts
    assert manifest["backend"] == site.backend
    assert set(manifest["files"]) == {
        "database.dump" if site.backend == "postgresql" else "verdict.db",
        "artifacts.tar",
        "secret_key",
    }
    assert oct(made.stat().st_mode & 0o777) == "0o700"

    wipe(site)
    assert not site.artifacts.exists()
    done = site.script("restore", str(made))
    assert done.returncode == 0, done.stderr
    assert "as in the backup" in done.stderr

    assert row_counts(site) == counts
    assert judgment_rows(site) == rows
    assert built.artifact.read_bytes() == ARTIFACT_BYTES
    assert (site.var_dir / "secret_key").read_bytes() == secret
    assert not [p for p in site.artifacts.iterdir() if p.name.startswith(".")]  # no staging
    settings = Settings(database_url=site.url, var_dir=site.var_dir, artifacts_dir=site.artifacts)
    app = create_app(settings)
    try:
        with TestClient(app) as client:
            # The token made before the backup still works (its hash came back with the rows).
            got = client.get(f"/api/v1/projects/{built.slug}/prompts", headers=bearer(built.token))
    finally:
        app.state.engine.dispose()
    assert got.status_code == 200, got.text
    assert sorted(p["text"] for p in got.json()["items"]) == sorted(built.prompts)
    # The sequences came back too: a new row gets a fresh id, not one already taken.
    engine = site.engine()
    try:
        session = make_sessionmaker(engine)()
        newcomer = Factory(session).user("rater")
        session.close()
    finally:
        engine.dispose()
    assert newcomer.id > max(counts["users"], 0)


def test_restore_refuses_a_damaged_backup_and_changes_nothing(site: Site) -> None:
    build_project(site)
    made = make_backup(site)
    wipe(site)
    archive = made / "artifacts.tar"
    data = bytearray(archive.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size, other bytes
    archive.write_bytes(bytes(data))

    for command in ("verify", "restore"):
        done = site.script(command, str(made))
        assert done.returncode == 1
        assert "artifacts.tar does not match its SHA-256 checksum" in done.stderr
    assert not site.artifacts.exists()
    assert row_counts(site).get("users", 0) == 0

    (made / "manifest.json").unlink()
    done = site.script("restore", str(made))
    assert done.returncode == 1 and "not a Verdict backup" in done.stderr


def test_restore_refuses_a_target_that_is_not_empty_unless_forced(site: Site) -> None:
    build_project(site)
    counts = row_counts(site)
    made = make_backup(site)
    # Life goes on after the backup: a user, a file, and (PostgreSQL) a table the backup lacks.
    engine = site.engine()
    session = make_sessionmaker(engine)()
    Factory(session).user("rater", email="later@example.com")
    session.close()
    if site.backend == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE leftover (id int)"))
    engine.dispose()
    (site.artifacts / "later.bin").write_bytes(b"new")

    done = site.script("restore", str(made))
    assert done.returncode == 1
    assert "not empty" in done.stderr and "--force" in done.stderr
    assert row_counts(site)["users"] == counts["users"] + 1  # untouched
    assert (site.artifacts / "later.bin").exists()

    done = site.script("restore", "--force", str(made))
    assert done.returncode == 0, done.stderr
    assert row_counts(site) == counts  # the later user and the leftover table are gone
    assert not (site.artifacts / "later.bin").exists()
    engine = site.engine()
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.select(User.id).where(User.email == "later@example.com")) is None
    finally:
        engine.dispose()


def test_restore_refuses_another_artifacts_dir_and_backup_refuses_an_unmigrated_database(
    site: Site,
) -> None:
    build_project(site)
    made = make_backup(site)
    (site.artifacts / "base" / "smollm2").mkdir(parents=True)
    (site.artifacts / "base" / "smollm2" / "model.safetensors").write_bytes(b"cache")
    done = site.script("backup", "--without-base-cache", "--to", str(site.root / "lean"))
    assert done.returncode == 0, done.stderr
    with tarfile.open(Path(done.stdout.strip()) / "artifacts.tar") as tar:
        names = tar.getnames()
    assert "projects" in names and not [n for n in names if n.startswith("base")]

    wipe(site)
    elsewhere = str(site.root / "elsewhere")
    done = site.script("restore", str(made), VERDICT_ARTIFACTS_DIR=elsewhere)
    assert done.returncode == 1
    assert f"VERDICT_ARTIFACTS_DIR={site.artifacts}" in done.stderr
    assert not Path(elsewhere).exists()

    # The wiped database has no schema (PostgreSQL) or no file (SQLite): nothing to back up,
    # and no half backup left behind.
    done = site.script("backup", "--to", str(site.root / "more"))
    assert done.returncode == 1
    assert "nothing to back up" in done.stderr
    assert not (site.root / "more").exists() or not list((site.root / "more").iterdir())
