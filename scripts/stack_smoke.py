"""`make stack-smoke`: the production compose stack, without Docker, through one closed loop.

Docker cannot run on the machine this project is built on, so this runs what
docker-compose.yml runs: the commands and the environment of its services are read from the
file (through `scripts/stack_compose.py`, the reader the compose test uses too), and started
as local processes, each in its own process group:

    migrate      `verdict db upgrade`, once, before anything else
    web          `verdict serve --workers 2` (the file's command; host and port made local)
    worker-gpu   `verdict worker -Q gpu --pool solo --name gpu0@%h`
    worker-cpu   `verdict worker -Q default --pool solo --name cpu@%h`
    beat         `verdict scheduler`

Only what a container has of its own is replaced: the database (a fresh PostgreSQL database on
this machine, created here and dropped at the end), the broker (a Redis database among 1-7,
claimed with a lock key the way the worker tests claim theirs), the artifacts, var and metrics
directories (a temporary directory), and the base policy (a tiny random Llama, as the tests
build it). `VERDICT_REWARD_TRIGGER_INTERVAL_S` is shortened so that beat starts the reward run
within seconds. Everything else — production mode, JSON logs, the torch threads — is the
file's own.

Then a whole loop, through the HTTP API only (the admin and the tokens come from the CLI, as an
operator would make them): create a project in automatic mode, upload prompts (which queues
the generation), wait for it; a rater judges every pair through /assignments; beat's trigger
(on the default-queue worker) queues the reward run, after which automatic mode runs PPO,
evaluates the candidate, promotes it and generates the next round with it; the promoted
version is checked through /models. Each step is printed with its time. Any failure exits 1
with the tail of every process's log. Whatever happens (a failure, Ctrl-C, SIGTERM), every
process group started here is stopped and the database is dropped.

    .venv/bin/python -m scripts.stack_smoke [--keep]    # --keep: leave the temp dir (logs)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from scripts.stack_compose import (
    COMPOSE_FILE,
    ROOT,
    as_argv,
    environment,
    healthcheck_argv,
    interpolate_tree,
    load_compose,
    option_value,
    with_option,
)

# The closed-loop test's project (one definition of it): tiny random models learn little, so
# the promotion rule is opened wide and the loop must carry a candidate through every step.
from tests.workers.test_closed_loop import N_PROMPTS
from tests.workers.test_closed_loop import SETTINGS as PROJECT_SETTINGS

MIGRATE = "migrate"
LONG_RUNNING = ("web", "worker-gpu", "worker-cpu", "beat")
PORTS = range(18100, 18200)
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_BASE = "redis://127.0.0.1:6379"
REDIS_DBS = range(1, 8)
LOCK_KEY = "verdict-test-session"  # the worker tests' lock key (they claim 8-15)
READY_TIMEOUT_S = 150
RUN_TIMEOUT_S = 180
FINISHED = ("succeeded", "failed", "cancelled")


class SmokeFailure(Exception):
    """A step did not give what it should have."""


START = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {message}", flush=True)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SmokeFailure(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# --- the machine's services: a database, a Redis db, a port -------------------------------------


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A PostgreSQL database of our own; dropped at the end, connections and all."""
    import psycopg

    name = f"verdict_stack_smoke_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        say(f"dropped database {name}")


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """A Redis database of our own among 1-7 (claimed with a lock key), flushed at the end."""
    import redis

    owner = uuid.uuid4().hex
    for number in REDIS_DBS:
        url = f"{REDIS_BASE}/{number}"
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        if client.set(LOCK_KEY, owner, nx=True, ex=3600):
            client.flushdb()
            client.set(LOCK_KEY, owner, ex=3600)
            try:
                yield url
            finally:
                client.flushdb()  # the lock key goes with it
                say(f"flushed {url}")
            return
    raise SmokeFailure(f"no free Redis database among {REDIS_BASE}/1-7")


def free_port() -> int:
    for port in PORTS:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SmokeFailure(f"no free port in {PORTS.start}-{PORTS.stop - 1}")


# --- the compose file's services as local processes ---------------------------------------------


def local_argv(argv: list[str]) -> list[str]:
    """A container's `verdict ...` as this checkout's: the virtualenv's console script."""
    if argv[0] != "verdict":
        raise SmokeFailure(f"{argv[0]!r}: only verdict commands run outside a container")
    script = Path(sys.executable).with_name("verdict")
    head = [str(script)] if script.exists() else [sys.executable, "-m", "app.cli"]
    return [*head, *argv[1:]]


class Stack:
    """The compose file's services with their locations made local, and the processes."""

    def __init__(self, workdir: Path, database_url: str, broker_url: str, model_dir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.secret = secrets.token_urlsafe(48)
        # What compose would substitute from .env: only the two values it requires, so every
        # other variable takes the file's default (WEB_WORKERS=2), whatever the caller's shell
        # holds. The database password is not used here (the URL is replaced by the local
        # one), but the file requires one.
        interpolation = {
            "VERDICT_SECRET_KEY": self.secret,
            "POSTGRES_PASSWORD": "not-used-by-the-smoke",
        }
        self.services: dict[str, Any] = interpolate_tree(load_compose(), interpolation)["services"]
        self.local = {
            "VERDICT_DATABASE_URL": database_url,
            "VERDICT_BROKER_URL": broker_url,
            "VERDICT_ARTIFACTS_DIR": str(workdir / "artifacts"),
            "VERDICT_BASE_POLICY": str(model_dir),
            "VERDICT_REWARD_TRIGGER_INTERVAL_S": "2",
        }
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def env(self, name: str) -> dict[str, str]:
        """The service's environment from the file, over this process's (less any VERDICT_*
        of the caller's shell), with the container-owned locations made local."""
        own = environment(self.services[name])
        env = {k: v for k, v in os.environ.items() if not k.startswith("VERDICT_")}
        env.update(own)
        env.update(self.local)
        env["VERDICT_VAR_DIR"] = str(self.workdir / f"var-{name}")
        if "VERDICT_METRICS_DIR" in own:
            env["VERDICT_METRICS_DIR"] = str(self.workdir / f"metrics-{name}")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def argv(self, name: str) -> list[str]:
        argv = as_argv(self.services[name]["command"])
        if name == "web":  # the container's 0.0.0.0:8000 is this machine's 127.0.0.1:PORT
            argv = with_option(with_option(argv, "--host", "127.0.0.1"), "--port", str(self.port))
        return local_argv(argv)

    def run_once(self, name: str, argv: list[str] | None = None) -> str:
        """Run a one-shot command with a service's environment; its output, or a failure."""
        argv = argv or self.argv(name)
        done = subprocess.run(
            argv, cwd=ROOT, env=self.env(name), capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise SmokeFailure(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}")
        return done.stdout

    def healthcheck(self, name: str) -> None:
        """Run a worker's own compose health check (`celery inspect ping -d <node>`) here:
        `$HOSTNAME` is this machine's name, as Celery's `%h` is."""
        argv = healthcheck_argv(self.services[name]["healthcheck"]["test"])
        if argv[0] != "celery":
            raise SmokeFailure(f"{name}: its health check is not a celery command: {argv}")
        celery = Path(sys.executable).with_name("celery")
        argv = [str(celery), *argv[1:]]
        hostname = socket.gethostname()
        argv = [part.replace("$HOSTNAME", hostname) for part in argv]
        self.run_once(name, argv)

    def start(self, name: str) -> None:
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs[name] = log
        argv = self.argv(name)
        with log.open("ab") as handle:
            self.processes[name] = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env(name),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: uvicorn's workers go with it
            )
        say(f"started {name}: {' '.join(as_argv(self.services[name]['command']))}")

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise SmokeFailure(f"{name} exited with {proc.returncode}")

    def stop(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after 20 s."""
        for proc in self.processes.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for name, proc in self.processes.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop in 20 s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also any child left in the group
            proc.wait(10)
        if self.processes:
            say(f"stopped {', '.join(self.processes)}")
        self.processes.clear()

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for name, log in self.logs.items():
            tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            parts.append(f"--- {name} ({log}) ---\n" + "\n".join(tail))
        return "\n".join(parts)


# --- the loop, through the API -----------------------------------------------------------------


class Api:
    def __init__(self, base_url: str, stack: Stack) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=60)
        self.stack = stack

    def call(self, method: str, path: str, token: str, expect: int = 200, **kw: Any) -> Any:
        response = self.http.request(
            method, path, headers={"Authorization": f"Bearer {token}"}, **kw
        )
        if response.status_code != expect:
            raise SmokeFailure(
                f"{method} {path}: {response.status_code} (wanted {expect}): {response.text}"
            )
        return response.json() if response.content else None

    def finished(self, run_id: int, token: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            self.stack.check_alive()
            body: dict[str, Any] = self.call("GET", f"/api/v1/runs/{run_id}", token)
            return body if body["status"] in FINISHED else None

        body: dict[str, Any] = wait_for(check, RUN_TIMEOUT_S, f"run {run_id} to finish")
        if body["status"] != "succeeded":
            raise SmokeFailure(
                f"run {run_id} {body['status']}: {body['error']}\n{body['log_tail']}"
            )
        return body


def wait_until_ready(stack: Stack, http: httpx.Client) -> None:
    """/healthz answers, then /readyz: the database, the broker, a worker of each queue."""
    last: list[str] = ["no answer"]

    def ready() -> bool:
        stack.check_alive()
        try:
            response = http.get("/readyz", timeout=5)
        except httpx.HTTPError as exc:
            last[0] = type(exc).__name__
            return False
        last[0] = f"{response.status_code} {response.text}"
        return response.status_code == 200

    try:
        wait_for(ready, READY_TIMEOUT_S, "/readyz to answer 200", interval=1)
    except SmokeFailure as exc:
        raise SmokeFailure(f"{exc}; last answer: {last[0]}") from None
    say(f"ready: /readyz {last[0]}")


def judge_everything(api: Api, slug: str, token: str) -> int:
    """The rater prefers the shorter answer (the first when they are as long)."""
    done = 0
    while True:
        response = api.http.get(
            f"/api/v1/projects/{slug}/assignments/next",
            headers={"Authorization": f"Bearer {token}"},
        )
        if response.status_code == 204:
            return done
        if response.status_code != 200:
            raise SmokeFailure(f"assignments/next: {response.status_code} {response.text}")
        item = response.json()
        a, b = item["response_a"]["text"], item["response_b"]["text"]
        api.call(
            "POST",
            f"/api/v1/assignments/{item['id']}/judgment",
            token,
            json={"choice": "a" if len(a) <= len(b) else "b", "strength": 1},
        )
        done += 1


def progress(run: dict[str, Any]) -> str:
    """A finished run's steps and final metrics, as the log line shows them."""
    metrics = ", ".join(f"{k} {v:.3g}" for k, v in sorted(run["latest_metrics"].items())[:3])
    return f"{run['progress_done']}/{run['progress_total']} steps; {metrics}"


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise SmokeFailure(what)


def drive_loop(stack: Stack) -> None:
    stack.run_once(MIGRATE)
    say("migrate: database is at the latest revision")
    admin_email, rater_email, password = "admin@smoke.example", "rater@smoke.example", "x" * 16
    stack.run_once(
        MIGRATE,
        local_argv(["verdict", "user", "create", "--email", admin_email, "--password", password,
                    "--role", "admin"]),
    )  # fmt: skip
    admin = (
        stack.run_once(
            MIGRATE, local_argv(["verdict", "token", "create", "--email", admin_email,
                                 "--name", "stack-smoke"])
        ).strip().splitlines()[-1]
    )  # fmt: skip
    say("CLI: admin and its token created")

    for name in LONG_RUNNING:
        stack.start(name)
    api = Api(f"http://127.0.0.1:{stack.port}", stack)
    wait_until_ready(stack, api.http)
    health = api.http.get("/healthz")
    expect(health.status_code == 200, f"/healthz: {health.status_code}")
    for name in ("worker-gpu", "worker-cpu"):
        stack.healthcheck(name)
    wanted = int(option_value(as_argv(stack.services["web"]["command"]), "--workers") or 1)
    wait_for(
        lambda: stack.log("web").count("Started server process") >= wanted,
        30,
        f"web's {wanted} uvicorn worker processes",
    )
    say(f"health checks pass: web /healthz ({wanted} uvicorn workers), the workers' ping")

    api.call("POST", "/api/v1/users", admin, 201,
             json={"email": rater_email, "password": password, "role": "rater"})  # fmt: skip
    rater = (
        stack.run_once(
            MIGRATE, local_argv(["verdict", "token", "create", "--email", rater_email,
                                 "--name", "stack-smoke"])
        ).strip().splitlines()[-1]
    )  # fmt: skip
    slug = "smoke"
    api.call("POST", "/api/v1/projects", admin, 201,
             json={"slug": slug, "name": "Stack smoke", "settings": PROJECT_SETTINGS})  # fmt: skip
    say("API: rater and project created")

    upload = api.call(
        "POST",
        f"/api/v1/projects/{slug}/prompts",
        admin,
        json={"prompts": [{"prompt": f"What is {i} plus {i}?"} for i in range(N_PROMPTS)]},
    )
    expect(upload["generation_run_id"] is not None, f"the upload queued no generation: {upload}")
    say(f"uploaded {N_PROMPTS} prompts; generation run {upload['generation_run_id']} queued")
    generation = api.finished(upload["generation_run_id"], admin)
    expect(generation["result"]["pairs"] == N_PROMPTS, f"generation: {generation['result']}")
    say(f"generation succeeded: {generation['result']['pairs']} pairs")

    judged = judge_everything(api, slug, rater)
    expect(judged == N_PROMPTS, f"judged {judged} pairs, wanted {N_PROMPTS}")
    say(f"rater judged {judged} pairs through /assignments")

    def runs_of(kind: str) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = api.call(
            "GET", f"/api/v1/projects/{slug}/runs?kind={kind}", admin
        )
        return list(reversed(listed))  # oldest first

    reward_id = wait_for(lambda: runs_of("reward"), 60, "beat to trigger a reward run")[0]["id"]
    say(f"beat's trigger queued reward run {reward_id}")
    reward = api.finished(reward_id, admin)
    expect(reward["trigger"] == "auto", f"reward run trigger {reward['trigger']}")
    ppo_id = reward["result"]["policy_run_id"]
    expect(ppo_id is not None, f"the reward run queued no PPO run: {reward['log_tail']}")
    say(f"reward run succeeded ({progress(reward)}); PPO run {ppo_id} queued")
    ppo = api.finished(ppo_id, admin)
    say(f"PPO succeeded ({progress(ppo)}); evaluate run {ppo['result']['evaluate_run_id']} queued")
    evaluate = api.finished(ppo["result"]["evaluate_run_id"], admin)
    expect(
        bool(evaluate["result"]["rule_passed"] and evaluate["result"]["promoted"]),
        f"the candidate was not promoted: {evaluate['result']}",
    )
    say("evaluate succeeded; candidate promoted")
    next_round = api.finished(evaluate["result"]["generation_run_id"], admin)
    for run, parent in ((ppo, reward), (evaluate, ppo), (next_round, evaluate)):
        expect(run["trigger"] == "auto", f"run {run['id']} trigger {run['trigger']}")
        expect(run["parent_run_id"] == parent["id"], f"run {run['id']} parent is wrong")
    model = api.call("GET", f"/api/v1/models/{ppo['result']['model_version_id']}", admin)
    expect((model["version"], model["status"]) == (1, "active"), f"model {model}")
    expect(next_round["result"]["policy_version"] == 1, f"next round {next_round['result']}")
    say(
        f"policy v1 active; it wrote the next round ({next_round['result']['responses']} responses)"
    )

    metrics = api.http.get("/metrics", timeout=10)
    expect(metrics.status_code == 200, f"/metrics: {metrics.status_code}")
    say(f"/metrics: {len(metrics.text.splitlines())} lines")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C, a kill and a closed terminal all end in the same clean-up. SIGINT is set too,
    # since a shell starts a background job with it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, terminate)
    workdir = Path(tempfile.mkdtemp(prefix="verdict-stack-smoke-"))
    stack: Stack | None = None
    code = 1
    say(f"reading {COMPOSE_FILE.relative_to(ROOT)}; working in {workdir}")
    try:
        with fresh_database() as database_url, redis_database() as broker_url:
            sys.path.insert(0, str(ROOT))
            from tests.tiny_models import save_tiny_model

            model_dir = save_tiny_model(workdir / "tiny-model")
            say(f"database {database_url.rsplit('/', 1)[-1]}, broker {broker_url}, tiny model")
            stack = Stack(workdir, database_url, broker_url, model_dir)
            try:
                drive_loop(stack)
                code = 0
            except SmokeFailure as exc:
                say(f"FAILED: {exc}")
                print(stack.log_tails(), file=sys.stderr)
            finally:
                stack.stop()
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    finally:
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say("stack smoke passed" if code == 0 else "stack smoke FAILED")
    return code


if __name__ == "__main__":
    sys.exit(main())
