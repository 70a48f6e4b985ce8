"""`verdict demo`: the whole product on the embedded default (SQLite under var/).

One command starts the web server, a model worker (``--pool=solo``, queue ``gpu``), a
housekeeping worker (queue ``default``: the periodic checks) and the scheduler as child
processes, seeds the demo project and queues generation with SmolLM2, so that the first pair is
ready to judge about a minute after a fresh start. One Ctrl-C stops everything: each child runs
in its own process group and gets SIGTERM, then SIGKILL after a grace period. A second start
reuses the database and the converted model under var/.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from sqlalchemy import func, select

from app.core.config import Settings, get_settings
from app.core.db import unit_of_work
from app.core.migrate import upgrade_database
from app.core.security import new_one_time_password
from app.demo_data import DEMO_GUIDELINES, DEMO_PROMPTS
from app.kinds.queues import DEFAULT_QUEUE, GPU_QUEUE
from app.models import ComparisonPair, Project, Prompt, Run, User
from app.services import projects, prompts, runs, users
from app.services.errors import NotFound

DEMO_ADMIN_EMAIL = "admin@verdict.local"
DEMO_SLUG = "demo"
# SmolLM2 on two CPU cores writes ~10 tokens/s per sequence: short answers keep the rater
# queue filling at a useful pace (the project setting can be raised later).
DEMO_SETTINGS = {"max_new_tokens": 96}
# One prompt first, so its pair lands after a single short decode; then 4 prompts (8 rows)
# per batch, where batching pays off without delaying each stored pair too long.
DEMO_RUN_CONFIG = {"first_batch_prompts": 1, "batch_size": 8}
STOP_GRACE_S = 10.0

READY_MARK = "first comparison ready"


def seed_demo() -> str | None:
    """Create the demo admin and project if missing. Returns the admin's new password, if any."""
    password: str | None = None
    with unit_of_work() as session:
        if users.get_user_by_email(session, DEMO_ADMIN_EMAIL) is None:
            password = new_one_time_password()
            users.create_user(session, DEMO_ADMIN_EMAIL, password, "admin")
        admin = session.scalar(select(User).where(User.email == DEMO_ADMIN_EMAIL))
        try:
            project = projects.get_project(session, DEMO_SLUG)
        except NotFound:
            project = projects.create_project(
                session,
                DEMO_SLUG,
                "Demo: helpful answers",
                guidelines=DEMO_GUIDELINES,
                settings=DEMO_SETTINGS,
                actor_id=admin.id if admin else None,
            )
        has_prompts = session.scalar(select(Prompt.id).where(Prompt.project_id == project.id))
        if has_prompts is None:
            records = [
                prompts.PromptRecord(line=i, text=text, external_id=f"demo-{i:03d}")
                for i, text in enumerate(DEMO_PROMPTS, 1)
            ]
            prompts.store_prompts(session, project, records, source="demo")
    return password


def queue_demo_generation(settings: Settings) -> Run | None:
    """Queue generation unless a generation run is queued or running already.

    Runs a stopped demo left behind are picked up by its workers when they start: each is the
    only worker of its queue (`--sole`), so it requeues their runs still marked running and sends
    every queued run's message again (`app.jobs.runner.recover_at_start`).
    """
    with unit_of_work() as session:
        project = projects.get_project(session, DEMO_SLUG)
        return runs.create_run_if_idle(
            session, project, "generate", DEMO_RUN_CONFIG, settings=settings, trigger="demo"
        )


def first_pair_ready(project_slug: str = DEMO_SLUG) -> bool:
    with unit_of_work() as session:
        count = session.scalar(
            select(func.count())
            .select_from(ComparisonPair)
            .join(Project, Project.id == ComparisonPair.project_id)
            .where(Project.slug == project_slug)
        )
    return bool(count)


# --- child processes ------------------------------------------------------------------------


def _die_with_parent() -> None:
    # Linux: if the demo process itself is killed (SIGKILL), its children get SIGTERM instead
    # of running on as orphans.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        # A new session: the terminal's Ctrl-C reaches only the demo process, which then stops
        # the children in order instead of every process reacting on its own.
        self.proc = subprocess.Popen(
            self.argv,
            cwd=Path.cwd(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def close(self) -> None:
        if self._log is not None:
            self._log.close()

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _worker(name: str, queue: str, node: str, logs: Path) -> Child:
    """A solo worker consuming one queue, started the way `verdict worker` starts one; it is
    the only worker of that queue (`--sole`). Like every worker it sizes torch to
    `VERDICT_TORCH_THREADS` (1: the demo's web server and second worker share the cores, see
    docs/operations.md, "Worker sizing"), in `workers.celery_app`."""
    return Child(
        name,
        [
            sys.executable, "-m", "app.cli", "worker", "--pool=solo", "-Q", queue,
            "--name", f"{node}@%h", "--sole",
        ],
        logs / f"{name}.log",
    )  # fmt: skip


def demo_children(settings: Settings, host: str, port: int) -> list[Child]:
    """Model worker first (it is the slowest to be useful), the housekeeping worker, the web
    server, then beat."""
    logs = settings.var_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    return [
        _worker("worker", GPU_QUEUE, "demo", logs),
        # Housekeeping (the reaper, lease sweep, reward-run trigger) on its own small worker,
        # so a long model run never holds back an expired lease or a stale-run check.
        _worker("housekeeping", DEFAULT_QUEUE, "demo-housekeeping", logs),
        Child(
            "web",
            [
                py, "-m", "uvicorn", "app.main:create_app", "--factory",
                "--host", host, "--port", str(port), "--log-level", "info",
            ],
            logs / "web.log",
        ),
        Child(
            "scheduler",
            [
                py, "-m", "celery", "-A", "workers.celery_app", "beat",
                f"--schedule={settings.var_dir / 'celerybeat-schedule'}", "--loglevel=info",
            ],
            logs / "scheduler.log",
        ),
    ]  # fmt: skip


def stop_children(children: list[Child], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every child's process group, wait up to `grace_s`, then SIGKILL what is left.

    The worker's warm shutdown lets a generation run stop at its next batch and go back to the
    queue; a run still going at the deadline is recovered at the next start.
    """
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        if not child.wait(max(0.0, deadline - time.monotonic())):
            print(f"  {child.name} did not stop within {grace_s:.0f}s; killing it", flush=True)
            child.signal(signal.SIGKILL)
            child.wait(5)
        child.close()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def run_demo(host: str, port: int) -> None:
    """Seed, queue generation, start web + worker + scheduler, and supervise until Ctrl-C."""
    started = time.monotonic()
    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    if not _port_free(host, port):
        print(f"error: {host}:{port} is in use; pass --port to choose another", file=sys.stderr)
        raise SystemExit(1)
    upgrade_database(settings)
    password = seed_demo()
    run = queue_demo_generation(settings)

    print()
    print(f"  Verdict demo: http://{host}:{port}/   (the console: http://{host}:{port}/admin)")
    print(f"  admin email:  {DEMO_ADMIN_EMAIL}")
    if password:
        print(f"  password:     {password}   (shown once)")
        print(f"  change it:    verdict user password --email {DEMO_ADMIN_EMAIL}")
    else:
        print(
            "  password:     printed at the first start; reset: "
            f"verdict user password --email {DEMO_ADMIN_EMAIL}"
        )
    if run is not None:
        print(f"  generation:   run {run.id} queued (SmolLM2); watch: verdict runs watch {run.id}")
    print(f"  logs:         {settings.var_dir / 'logs'}/{{web,worker,housekeeping,scheduler}}.log")
    print("  Ctrl-C stops everything.")
    print(flush=True)

    stopping = False

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C: no more waiting
            for child in children:
                child.signal(signal.SIGKILL)
        stopping = True

    children = demo_children(settings, host, port)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    exit_code = 0
    try:
        for child in children:
            child.start()
        announced = first_pair_ready()
        while not stopping:
            dead = [c for c in children if not c.running()]
            if dead:
                for child in dead:
                    print(f"  {child.name} exited unexpectedly; its log ends with:", flush=True)
                    print(child.tail(), flush=True)
                exit_code = 1
                break
            if not announced and first_pair_ready():
                announced = True
                print(
                    f"  {READY_MARK} after {time.monotonic() - started:.0f}s:"
                    f" http://{host}:{port}/",
                    flush=True,
                )
            time.sleep(0.5)
    finally:
        print("  stopping web, worker and scheduler...", flush=True)
        stop_children(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("  stopped.", flush=True)
    if exit_code:
        raise SystemExit(exit_code)
