"""The infrastructure going wrong under a running deployment: a broker that redelivers a long
task, a Redis restarted while raters work, a PostgreSQL restarted under the web app, and a run
row read by its worker the moment its message arrives.

Redis and PostgreSQL are restarted only as PRIVATE instances started here (ports 18610 and
18620), never the machine's shared ones. PostgreSQL refuses to run as root: as root the cluster
is created and run as the `postgres` user (`runuser`), in a temp directory it owns.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.core.config import ROOT_DIR, Settings
from app.core.db import unit_of_work
from app.core.migrate import upgrade_database
from app.kinds.queues import SOLE_WORKER_ENV
from app.main import create_app
from app.models import ComparisonPair, Judgment, Project, Prompt, Response, Run
from app.services import projects, runs, users
from tests.conftest import bearer, empty_all_tables
from tests.workers.conftest import HEARTBEAT_TIMEOUT_S, CeleryProcess, Stack, wait_for

pytestmark = pytest.mark.worker

FINISHED = ("succeeded", "failed", "cancelled")
REDIS_SERVER = "/usr/bin/redis-server"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_PORT = 18610
PG_PORT = 18620
VISIBILITY_ENV = "VERDICT_TEST_VISIBILITY_TIMEOUT_S"  # read by tests/workers/short_visibility.py


# --- private servers ------------------------------------------------------------------------


class PrivateRedis:
    """A throwaway `redis-server` (no persistence: a restart forgets every key, as a Redis
    without AOF or RDB does)."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--daemonize", "no"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 20, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        self.proc = None


class PrivatePostgres:
    """A throwaway PostgreSQL 15 cluster, run by `pg_ctl` as the current user (or `postgres`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="verdict-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                pytest.skip("running as root without runuser: cannot start PostgreSQL")
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "--no-sync")  # fmt: skip

    def ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                  str(self.root / "server.log"), "-w", "-m", "fast", action)  # fmt: skip

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.ctl("stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip(f"{REDIS_SERVER} is not installed")
    server = PrivateRedis(REDIS_PORT, tmp_path / "redis.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL 15 is not installed in {PG_BIN}")
    server = PrivatePostgres(PG_PORT)
    try:
        server.init()
        server.ctl("start")
        yield server
    finally:
        server.remove()


# --- helpers ----------------------------------------------------------------------------------


def _worker(stack: Stack, app_module: str, name: str, env: dict[str, str]) -> CeleryProcess:
    """A solo worker of `app_module` (like `Stack.start_worker`, with another Celery app)."""
    process = CeleryProcess.__new__(CeleryProcess)
    process.log = stack.var_dir / f"{name}.log"
    process._handle = process.log.open("ab")
    process.proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", app_module, "worker", "--pool=solo",
         "-Q", "gpu,default", "-n", f"{name}@%h", "--loglevel=info", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=ROOT_DIR, env={**stack.env, **env}, stdout=process._handle,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    stack.extra.append(process)
    wait_for(lambda: " ready." in process.output() or not process.alive(), 90, f"{name} ready")
    assert process.alive(), process.output()[-3000:]
    return process


def _pairs(stack: Stack, project: Project, n: int) -> None:
    with stack.session() as s:
        for i in range(n):
            prompt = Prompt(project_id=project.id, text=f"Question {i}?", source="test")
            s.add(prompt)
            s.flush()
            a = Response(prompt_id=prompt.id, text=f"answer {i} a")
            b = Response(prompt_id=prompt.id, text=f"answer {i} b")
            s.add_all([a, b])
            s.flush()
            s.add(
                ComparisonPair(
                    project_id=project.id, prompt_id=prompt.id, response_a_id=a.id,
                    response_b_id=b.id, required_judgments=1,
                )
            )  # fmt: skip


def _judge_one(client: TestClient, slug: str, headers: dict[str, str]) -> None:
    got = client.get(f"/api/v1/projects/{slug}/assignments/next", headers=headers)
    assert got.status_code == 200, got.text
    done = client.post(
        f"/api/v1/assignments/{got.json()['id']}/judgment",
        json={"choice": "a", "strength": 1},
        headers=headers,
    )
    assert done.status_code == 200, done.text


def _token(stack: Stack, email: str, role: str) -> dict[str, str]:
    with stack.session() as s:
        user = users.create_user(s, email, "long enough pw", role)
        return bearer(users.create_token(s, user, "t").secret)


# --- the tests ------------------------------------------------------------------------------


VISIBILITY_S = 2.0


@pytest.mark.parametrize("stack", ["redis"], indirect=True)
def test_a_run_longer_than_the_visibility_timeout_runs_once(stack: Stack) -> None:
    """Redis hands the unacknowledged message of a long run to the idle worker; that delivery
    finds the run claimed and is skipped, and the run ends after one attempt."""
    env = {VISIBILITY_ENV: str(VISIBILITY_S), SOLE_WORKER_ENV: ""}
    try:
        workers = [_worker(stack, "tests.workers.short_visibility", n, env) for n in ("a", "b")]
        # Long enough to outlast the visibility timeout (and the redelivery's margin) on a
        # quiet, fast machine too: 40 prompts took 3.4 s on one.
        stack.project(n_prompts=160, slug="long", max_new_tokens=32)
        with stack.session() as s:
            project = projects.get_project(s, "long")
            run = runs.create_run(
                s, project, "generate", {"batch_size": 2}, settings=stack.settings
            )
        row = stack.wait_status(run.id, FINISHED, timeout=400)
        assert row.status == "succeeded", (row.error, row.log_tail)
        assert row.started_at is not None and row.finished_at is not None
        took = (row.finished_at - row.started_at).total_seconds()
        assert took > VISIBILITY_S + 2, f"the run took only {took:.1f}s: no redelivery due"

        def logs() -> str:
            return "".join(w.output() for w in workers)

        # The other worker got the message again while the run went on, and skipped it.
        skipped = f"run {run.id}: delivery of task {run.task_id} skipped, the run is running"
        wait_for(lambda: skipped in logs(), 30, "the redelivery")
        assert row.attempts == 1
        assert logs().count(f"run {run.id}: started on") == 1
    finally:
        for process in stack.extra:
            process.stop()
        stack.extra.clear()
        empty_all_tables(stack.database_url)


def test_rating_goes_on_through_a_redis_restart_and_workers_reconnect(
    private_redis: PrivateRedis, pg_url: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Redis is the broker and the rate limiter's store. Judgments go on being stored while it
    is down and after it is back (the rate limit fails open); then a run is queued and the
    worker, connected before the restart, runs it."""
    env = {
        **os.environ,
        "VERDICT_DATABASE_URL": pg_url,
        "VERDICT_BROKER_URL": private_redis.url,
        "VERDICT_REDIS_URL": private_redis.url,
        "VERDICT_VAR_DIR": str(tmp_path),
        "VERDICT_WORKER_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    stack = Stack("redis", pg_url, private_redis.url, tmp_path, tiny_model_dir, env)
    settings = stack.settings.model_copy(update={"redis_url": private_redis.url})
    app = create_app(settings)
    try:
        worker = stack.start_worker()
        project = stack.project(n_prompts=0, slug="rate")
        _pairs(stack, project, 9)
        rater = _token(stack, "rater@example.com", "rater")
        admin = _token(stack, "admin@example.com", "admin")
        with TestClient(app) as client:
            for _ in range(3):
                _judge_one(client, "rate", rater)
            private_redis.stop()
            for _ in range(3):  # Redis down
                _judge_one(client, "rate", rater)
            private_redis.start()
            for _ in range(3):
                _judge_one(client, "rate", rater)
            with stack.session() as s:
                assert s.scalar(sa.select(sa.func.count()).select_from(Judgment)) == 9

            # The web process's producer and the worker's consumer both find the new Redis.
            def queued() -> int | None:
                response = client.post(
                    "/api/v1/projects/rate/runs", json={"kind": "generate"}, headers=admin
                )
                assert response.status_code in (201, 503), response.text
                return response.json()["id"] if response.status_code == 201 else None

            run_id = wait_for(queued, 30, "a run to be queued after the restart", interval=1)
        row = stack.wait_status(run_id, FINISHED, timeout=120)
        assert row.status == "succeeded", (row.error, row.log_tail)
        assert worker.alive() and row.worker is not None and "w1-redis" in row.worker
    finally:
        app.state.engine.dispose()
        stack.stop_all()
        empty_all_tables(pg_url)


def test_the_web_app_recovers_from_a_postgresql_restart(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    admin_engine = sa.create_engine(private_postgres.admin_url, isolation_level="AUTOCOMMIT")
    with admin_engine.connect() as conn:
        conn.execute(sa.text("CREATE DATABASE verdict"))
    admin_engine.dispose()
    url = private_postgres.admin_url.rsplit("/", 1)[0] + "/verdict"
    settings = Settings(database_url=url, var_dir=tmp_path)
    upgrade_database(settings)
    with unit_of_work(url) as s:
        admin = users.create_user(s, "admin@example.com", "long enough pw", "admin")
        headers = bearer(users.create_token(s, admin, "t").secret)
        projects.create_project(s, "pg", "PG")
    app = create_app(settings)
    try:
        with TestClient(app) as client:
            for _ in range(3):  # connections in the pool, each to the server about to go
                assert client.get("/api/v1/projects", headers=headers).status_code == 200
            private_postgres.ctl("restart")
            # The very first request after the restart is answered: the pool tests a
            # connection before handing it out (pool_pre_ping) and replaces a dead one.
            for _ in range(5):
                response = client.get("/api/v1/projects", headers=headers)
                assert response.status_code == 200, response.text
                assert [p["slug"] for p in response.json()] == ["pg"]
    finally:
        app.state.engine.dispose()


@pytest.mark.parametrize("stack", ["redis"], indirect=True)
def test_a_run_sent_right_after_its_row_is_created_always_finds_it(live: Stack) -> None:
    """The message goes out after the commit (`send_after_commit`): however long the
    creating transaction stays open after `create_run`, the worker never misses the row.
    PostgreSQL only: on SQLite the worker's claim waits for the write lock, so a message sent
    too early would still find the row and the test could not fail."""
    project = live.project(n_prompts=0, slug="quick")
    created: list[int] = []
    for hold_s in (0.0, 0.3) * 4:
        # The app's own unit of work (on SQLite: BEGIN IMMEDIATE, as a route's).
        with unit_of_work(live.database_url) as s:
            fresh = s.get(Project, project.id)
            assert fresh is not None
            created.append(runs.create_run(s, fresh, "generate", {}, settings=live.settings).id)
            time.sleep(hold_s)  # the transaction is still open: no message may be out yet
    for run_id in created:
        row = live.wait_status(run_id, FINISHED, timeout=60)
        assert row.status == "succeeded", (row.error, row.log_tail)
        assert row.attempts == 1
    assert live.worker is not None
    assert "the run is missing" not in live.worker.output()
    with live.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(Run)) == len(created)
