"""Real Celery workers for the worker tests, on both brokers Verdict supports.

`stack` is one deployment per module and broker: Redis + PostgreSQL (production) or the SQLite
broker + SQLite (the embedded default), with one `--pool=solo` worker process consuming
`gpu,default`, started the way `verdict worker` starts it. Tests talk to it only through the
database and the broker, as the web process does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.core.config import ROOT_DIR, Settings
from app.core.db import make_sessionmaker, unit_of_work
from app.kinds.queues import SOLE_WORKER_ENV
from app.models import Project, Run
from app.services import projects, prompts
from tests.conftest import _unavailable, empty_all_tables, engine_for
from tests.tiny_models import save_tiny_model

# One Redis database per test session (claimed with a lock key, see `_redis_broker`), so two
# test runs on one machine never consume, or flush, each other's task messages.
REDIS_BASE = "redis://127.0.0.1:6379"
# Short, so a killed worker is noticed within seconds (the reaper runs every timeout/3).
HEARTBEAT_TIMEOUT_S = 5
WORKER_READY_TIMEOUT_S = 90


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until `condition()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class CeleryProcess:
    """A `celery worker` or `celery beat` child in its own process group, logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._handle = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "workers.celery_app", *args],
            cwd=ROOT_DIR,
            env=env,
            stdout=self._handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def verdict(cls, args: list[str], env: dict[str, str], log: Path) -> CeleryProcess:
        """A `verdict ARGS` process (for instance `verdict worker --sole`), as users start it."""
        process = cls.__new__(cls)
        process.log = log
        process._handle = log.open("ab")
        process.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            cwd=ROOT_DIR,
            env=env,
            stdout=process._handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return process

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(10)
        self._handle.close()


@dataclass
class Stack:
    broker: str
    database_url: str
    broker_url: str
    var_dir: Path
    model_dir: Path
    env: dict[str, str]
    worker: CeleryProcess | None = None
    extra: list[CeleryProcess] = field(default_factory=list)
    _count: int = 0

    @property
    def settings(self) -> Settings:
        return Settings(
            database_url=self.database_url,
            broker_url=self.broker_url,
            var_dir=self.var_dir,
            worker_heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        )

    def start_worker(self, *, sole: bool = False) -> CeleryProcess:
        """Start the worker (if it is not running) and wait until it consumes. `sole`: it is
        the only worker of its queues (`verdict worker --sole`, as the demo starts them)."""
        if self.worker is not None and self.worker.alive():
            return self.worker
        self._count += 1
        name = f"w{self._count}-{self.broker}@%h"
        worker = CeleryProcess(
            [
                "worker",
                "--pool=solo",
                "-Q",
                "gpu,default",
                "-n",
                name,
                "--loglevel=info",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],  # fmt: skip
            {**self.env, SOLE_WORKER_ENV: "1" if sole else ""},
            self.var_dir / f"worker-{self._count}.log",
        )
        wait_for(
            lambda: " ready." in worker.output() or not worker.alive(),
            WORKER_READY_TIMEOUT_S,
            "the worker to be ready",
            interval=0.2,
        )
        assert worker.alive(), f"worker exited:\n{worker.output()[-3000:]}"
        self.worker = worker
        return worker

    def start_beat(self) -> CeleryProcess:
        beat = CeleryProcess(
            ["beat", f"--schedule={self.var_dir / 'beat-schedule'}", "--loglevel=info"],
            self.env,
            self.var_dir / "beat.log",
        )
        self.extra.append(beat)
        return beat

    def session(self) -> AbstractContextManager[Session]:
        """A unit of work on the stack's database (committed when the block ends).

        Its transactions begin as the app's do (immediate on SQLite): the tests write here
        while the workers write too. No test waits on a worker inside one."""
        return unit_of_work(make_sessionmaker(engine_for(self.database_url, immediate=True)))

    def run_row(self, run_id: int) -> Run:
        with self.session() as s:
            run = s.get(Run, run_id)
            assert run is not None
            return run

    def wait_status(self, run_id: int, statuses: tuple[str, ...], timeout: float = 90) -> Run:
        def check() -> Run | None:
            run = self.run_row(run_id)
            return run if run.status in statuses else None

        run: Run = wait_for(check, timeout, f"run {run_id} to reach {statuses}", interval=0.2)
        return run

    def project(self, n_prompts: int, slug: str = "w", **settings: Any) -> Project:
        settings.setdefault("base_policy", str(self.model_dir))
        settings.setdefault("max_new_tokens", 12)
        with self.session() as s:
            project = projects.create_project(s, slug, slug.upper(), settings=settings)
            records = [
                prompts.PromptRecord(line=i, text=f"Question number {i}: what is {i} + {i}?")
                for i in range(1, n_prompts + 1)
            ]
            prompts.store_prompts(s, project, records, source="test")
            return project

    def stop_all(self) -> None:
        for proc in [*self.extra, *([self.worker] if self.worker else [])]:
            proc.stop()
        self.extra.clear()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


REDIS_DBS = range(8, 16)
LOCK_KEY = "verdict-test-session"


def _redis_broker() -> str:
    """A Redis database of our own: several test sessions share this machine's Redis, and a
    worker of one session must never take another session's messages. Each session claims a
    free database number (8-15) with a lock key, then flushes it."""
    import redis

    if os.environ.get("VERDICT_TEST_REDIS_URL"):
        return os.environ["VERDICT_TEST_REDIS_URL"]
    owner = uuid.uuid4().hex
    for number in REDIS_DBS:
        url = f"{REDIS_BASE}/{number}"
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        try:
            claimed = client.set(LOCK_KEY, owner, nx=True, ex=3600)
        except redis.exceptions.RedisError as exc:
            _unavailable("Redis", exc)
        if claimed:
            client.flushdb()
            client.set(LOCK_KEY, owner, ex=3600)
            return url
    pytest.fail(f"no free Redis database among {REDIS_BASE}/8-15 (all held by other sessions)")


def _release_redis(url: str) -> None:
    import redis

    if not os.environ.get("VERDICT_TEST_REDIS_URL"):
        redis.Redis.from_url(url).flushdb()  # the lock key goes with it


@pytest.fixture(scope="module", params=["redis", "sqlite"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Stack]:
    """Redis broker + PostgreSQL, or SQLite broker + SQLite; one worker, started lazily."""
    var_dir = tmp_path_factory.mktemp(f"stack-{request.param}")
    if request.param == "redis":
        broker_url = _redis_broker()
        database_url: str = request.getfixturevalue("pg_url")
    else:
        broker_url = f"sqla+sqlite:///{var_dir / 'broker.sqlite'}"
        database_url = request.getfixturevalue("sqlite_url")
    env = {
        **os.environ,
        "VERDICT_DATABASE_URL": database_url,
        "VERDICT_BROKER_URL": broker_url,
        "VERDICT_VAR_DIR": str(var_dir),
        "VERDICT_WORKER_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
        "PYTHONUNBUFFERED": "1",
        # The tiny model gains nothing from threads, and the test machine is shared.
        "OMP_NUM_THREADS": "1",
    }
    built = Stack(request.param, database_url, broker_url, var_dir, tiny_model_dir, env)
    yield built
    built.stop_all()
    if request.param == "redis":
        _release_redis(broker_url)


@pytest.fixture
def live(stack: Stack) -> Iterator[Stack]:
    """The stack with its worker running; the tables are emptied after the test."""
    stack.start_worker()
    yield stack
    for proc in stack.extra:
        proc.stop()
    stack.extra.clear()
    with stack.session() as s:
        active = s.scalars(sa.select(Run.id).where(Run.status.in_(("queued", "running"))))
        leftover = list(active)
    for run_id in leftover:  # never leave a run writing into the next test's tables
        stack.wait_status(run_id, ("succeeded", "failed", "cancelled"), timeout=60)
    empty_all_tables(stack.database_url)
