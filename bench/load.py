"""Load: many simulated raters (asyncio + httpx) doing next -> think -> submit against PostgreSQL.

    .venv/bin/python bench/load.py                     # the figures in docs/benchmarks.md
    .venv/bin/python bench/load.py --write-docs        # and update its `## Load` section
    .venv/bin/python bench/load.py --profile           # one profiled worker: where the time goes
    .venv/bin/python bench/load.py --client raw        # a bare HTTP/1.1 client instead of httpx

Creates a fresh database (dropped afterwards), seeds it with `bench/rater_hot_path.py`'s
`seed` (one project, overlap 3, gold rate 0.1, one bearer token per rater) and starts the
server the way `bench/rater_hot_path.py` does: `uvicorn app.main:create_app --factory
--workers 2`, the process layout of `verdict serve --workers 2` in docker-compose.yml.

The client is one asyncio event loop with one `httpx.AsyncClient` (or, `--client raw`, the
bare HTTP/1.1 client `RawClient`, which leaves the shared cores to the server). Three phases:

* open loop (paced): judgments *arrive* at a fixed offered rate (Poisson arrivals at 25, 50
  and 100 judgments/s by default), whatever the server's latency; each arrival takes an idle
  rater, calls `next`, thinks (`--think-s`, exponential), submits, and gives the rater back.
  A closed loop would slow its own arrivals down whenever the server slows down, and so hide
  the latency a real crowd meets (coordinated omission); an open loop does not. The p50/p99 of
  each call are taken here; an arrival that finds every rater busy is counted, not queued.
* saturated: `--saturate-raters` raters in a closed loop with no think time: judgments/s the
  server sustains at its limit.
* checks: with the server stopped, SQL over the database the run left: no standard pair over
  its overlap (judgments, and judgments plus live leases), no duplicate (pair, rater) in
  judgments or assignments, every submit answered 2xx stored as the judgment the client was
  told (same id, assignment and rater), no judgment stored that the client was not told of,
  every pair's `judgment_count` equal to its judgment rows, and every submitted assignment
  with exactly one judgment.

`--profile` runs one server process instead of two, with cProfile in every thread on that
thread's own CPU clock (`ThreadProfiles`; py-spy is not available here), and an SQLAlchemy
event listener that times every statement from send to result. The saturated phase then
reports where a request's server CPU goes, by package and by function
(`## Load: where the time goes` with `--write-docs`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import json
import os
import platform
import pstats
import random
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
from rater_hot_path import PG_ADMIN_URL, CpuMeter, free_port, percentile, seed
from sections import DOCS, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.config import Settings  # noqa: E402
from app.core.migrate import upgrade_database  # noqa: E402

SECTION = "## Load"
BODY = {"choice": "a", "strength": 1, "aspects": {"honesty": "a"}, "active_ms": 1000}
_T = TypeVar("_T")
TARGET_SUSTAINED = 150.0  # judgments/s
TARGET_P99_MS = 100.0  # at 100 judgments/s offered
SLUG = "bench"


def run_client(main: Coroutine[Any, Any, _T]) -> _T:
    """Run the client's event loop: uvloop (uvicorn's own loop here), about 10 % less client
    CPU per request than asyncio's default loop, which matters with client and server sharing
    the cores; asyncio's loop where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# --------------------------------------------------------------------------- the client


@dataclass
class Phase:
    """What one phase saw: latencies per call, answers by status, what the client was told."""

    name: str
    next_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    # How late an open-loop arrival started against its schedule (the client's own lag).
    lag_ms: list[float] = field(default_factory=list)
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    no_idle_rater: int = 0
    arrivals: int = 0
    planned_s: float = 0.0  # an open loop's length of arrivals (elapsed adds the drain)
    elapsed_s: float = 0.0

    @property
    def judgments(self) -> int:
        return len(self.submit_ms)


@dataclass
class Ledger:
    """Every judgment a 2xx submit reported: judgment id -> (assignment id, rater token index)."""

    stored: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Submits without an answer (transport error or timeout): their fate is unknown to the
    # client, so a row for one is not "stored without a 2xx".
    unanswered: set[int] = field(default_factory=set)


def new_client(base: str, connections: int, kind: str = "httpx") -> Client:
    """The one client of a run, with up to a connection per rater: `httpx.AsyncClient`, or
    with `kind="raw"` the bare HTTP/1.1 client below (`--client raw`)."""
    if kind == "raw":
        return RawClient(base)
    # Idle connections are let go before uvicorn's keep-alive timeout (5 s) closes them:
    # reusing one just as the server closes it is a ReadError that no server fault caused.
    limits = httpx.Limits(
        max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=3
    )
    return httpx.AsyncClient(base_url=base, timeout=30, limits=limits)


@dataclass
class RawResponse:
    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


class RawClient:
    """HTTP/1.1 keep-alive over asyncio streams, the least client CPU per request there is.

    With client and server on the same two cores, httpx's own CPU (about 2 ms per request
    here) is taken from the server; this client costs a fraction of that, so a saturated run
    with it says what the server sustains. Only what the benchmark sends: GET, POST with a
    JSON body, answers with Content-Length or without a body (204). A connection that the
    server closed while idle is reconnected once and the request sent again (both calls are
    safe to repeat: `next` hands back the lease held, a submit returns the stored judgment).
    """

    def __init__(self, base: str) -> None:
        url = httpx.URL(base)
        self.host, self.port = url.host, url.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for _reader, writer, _since in self.idle:
            writer.close()
        self.idle.clear()

    async def get(self, path: str, headers: dict[str, str] | None = None) -> RawResponse:
        return await self._request("GET", path, headers or {}, b"")

    async def post(self, path: str, json: Any, headers: dict[str, str]) -> RawResponse:
        body = globals()["json"].dumps(json).encode()
        return await self._request(
            "POST", path, {**headers, "Content-Type": "application/json"}, body
        )

    async def _request(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> RawResponse:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        message = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        for attempt in (1, 2):
            reader, writer, reused = await self._connection()
            try:
                writer.write(message)
                status, content = await self._read(reader)
            except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
                writer.close()
                if reused and attempt == 1:
                    continue  # closed by the server while idle
                raise httpx.ReadError(str(exc)) from exc
            self.idle.append((reader, writer, time.monotonic()))
            return RawResponse(status, content)
        raise AssertionError("unreachable")

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        while self.idle:
            reader, writer, since = self.idle.pop()
            if time.monotonic() - since < 3:  # uvicorn closes idle connections after 5 s
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return reader, writer, False

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await reader.readexactly(length) if length else b""


Client = httpx.AsyncClient | RawClient


async def judge_once(
    client: Client, rater: int, token: str, think_s: float, phase: Phase, ledger: Ledger
) -> None:
    """One judgment: next, think, submit. Records latencies and every non-2xx by status."""
    headers = {"Authorization": f"Bearer {token}"}
    t0 = time.perf_counter()
    try:
        got = await client.get(f"/api/v1/projects/{SLUG}/assignments/next", headers=headers)
    except httpx.HTTPError as exc:
        phase.statuses[f"next {type(exc).__name__}"] += 1
        return
    next_ms = (time.perf_counter() - t0) * 1000
    phase.statuses[f"next {got.status_code}"] += 1
    if got.status_code != 200:
        return
    assignment_id = int(got.json()["id"])
    if think_s:
        await asyncio.sleep(random.expovariate(1 / think_s))
    t1 = time.perf_counter()
    try:
        sent = await client.post(
            f"/api/v1/assignments/{assignment_id}/judgment", json=BODY, headers=headers
        )
    except httpx.HTTPError as exc:
        phase.statuses[f"submit {type(exc).__name__}"] += 1
        ledger.unanswered.add(assignment_id)
        return
    submit_ms = (time.perf_counter() - t1) * 1000
    phase.statuses[f"submit {sent.status_code}"] += 1
    if sent.status_code != 200:
        return
    ledger.stored[int(sent.json()["id"])] = (assignment_id, rater)
    phase.next_ms.append(next_ms)
    phase.submit_ms.append(submit_ms)


async def open_loop(
    client: Client,
    tokens: list[str],
    rate: float,
    seconds: float,
    think_s: float,
    ledger: Ledger,
) -> Phase:
    """Judgments arriving at `rate` per second (Poisson) for `seconds`, each by an idle rater."""
    phase = Phase(f"open loop {rate:g}/s", planned_s=seconds)
    idle = list(range(len(tokens)))
    random.shuffle(idle)
    tasks: set[asyncio.Task[None]] = set()

    async def arrival(rater: int) -> None:
        try:
            await judge_once(client, rater, tokens[rater], think_s, phase, ledger)
        finally:
            idle.append(rater)

    start = time.perf_counter()
    due = start
    while True:
        due += random.expovariate(rate)
        if due - start >= seconds:
            break
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        phase.lag_ms.append((time.perf_counter() - due) * 1000)
        phase.arrivals += 1
        if not idle:
            phase.no_idle_rater += 1
            continue
        task = asyncio.create_task(arrival(idle.pop()))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    phase.elapsed_s = time.perf_counter() - start
    return phase


async def closed_loop(
    client: Client,
    tokens: list[str],
    seconds: float,
    ledger: Ledger,
    name: str,
    think_s: float = 0.0,
) -> Phase:
    """Each rater judging back to back (no think time unless `think_s`), for `seconds`."""
    phase = Phase(name)
    start = time.perf_counter()
    until = start + seconds

    async def rater_loop(rater: int) -> None:
        while time.perf_counter() < until:
            await judge_once(client, rater, tokens[rater], think_s, phase, ledger)

    await asyncio.gather(*(rater_loop(i) for i in range(len(tokens))))
    phase.elapsed_s = time.perf_counter() - start
    return phase


# --------------------------------------------------------------------------- the checks


def invariant_checks(url: str, ledger: Ledger, tokens_user_ids: list[int]) -> dict[str, int]:
    """Violations found by SQL over what the run left (each must be 0)."""
    engine = sa.create_engine(url)
    counts: dict[str, int] = {}
    queries = {
        "standard pairs over their overlap (judgments)": """
            SELECT count(*) FROM comparison_pairs
            WHERE gold_choice IS NULL AND judgment_count > required_judgments""",
        "standard pairs over their overlap (judgments + live leases)": """
            SELECT count(*) FROM comparison_pairs p
            WHERE p.gold_choice IS NULL AND p.judgment_count + (
                SELECT count(*) FROM assignments a
                WHERE a.pair_id = p.id AND a.status = 'leased' AND a.expires_at > now()
            ) > p.required_judgments""",
        "duplicate (pair, rater) judgments": """
            SELECT count(*) FROM (SELECT 1 FROM judgments WHERE rater_id IS NOT NULL
                                  GROUP BY pair_id, rater_id HAVING count(*) > 1) d""",
        "duplicate (pair, rater) assignments": """
            SELECT count(*) FROM (SELECT 1 FROM assignments
                                  GROUP BY pair_id, rater_id HAVING count(*) > 1) d""",
        "pairs whose judgment_count differs from their judgment rows": """
            SELECT count(*) FROM comparison_pairs p
            WHERE p.judgment_count <> (SELECT count(*) FROM judgments j WHERE j.pair_id = p.id)""",
        "submitted assignments without exactly one judgment": """
            SELECT count(*) FROM assignments a WHERE a.status = 'submitted'
            AND (SELECT count(*) FROM judgments j WHERE j.assignment_id = a.id) <> 1""",
        "judgments whose assignment is not submitted": """
            SELECT count(*) FROM judgments j JOIN assignments a ON a.id = j.assignment_id
            WHERE a.status <> 'submitted' OR a.rater_id IS DISTINCT FROM j.rater_id
               OR a.pair_id <> j.pair_id""",
    }
    with engine.connect() as conn:
        for label, sql in queries.items():
            counts[label] = int(conn.exec_driver_sql(sql).scalar_one())
        rows = {
            r.id: (r.assignment_id, r.rater_id)
            for r in conn.exec_driver_sql(
                "SELECT id, assignment_id, rater_id FROM judgments WHERE source = 'rater'"
            )
        }
    engine.dispose()
    told = {jid: (aid, tokens_user_ids[rater]) for jid, (aid, rater) in ledger.stored.items()}
    counts["2xx submits not stored as answered (lost)"] = sum(
        1 for jid, want in told.items() if rows.get(jid) != want
    )
    counts["judgments stored without a 2xx answer"] = sum(
        1 for jid, (aid, _) in rows.items() if jid not in told and aid not in ledger.unanswered
    )
    return counts


# --------------------------------------------------------------------------- the profiler


class ThreadProfiles:
    """cProfile in every thread of this process, on each thread's own CPU clock.

    cProfile profiles only the thread that enables it, and the endpoints run in the thread
    pool: `threading.setprofile` hands each new thread a one-shot hook that starts a profiler
    of its own there. The clock is `time.thread_time`, so time a thread spends waiting (on
    PostgreSQL, on the GIL, on the pool's queue) counts nothing: the figures are CPU.
    """

    def __init__(self) -> None:
        self.profiles: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.setprofile(self._bootstrap)
        self._new()  # the event loop's thread

    def _new(self) -> None:
        profile = cProfile.Profile(time.thread_time)
        with self._lock:
            self.profiles.append(profile)
        profile.enable()

    def _bootstrap(self, *_: Any) -> None:
        sys.setprofile(None)
        self._new()

    def reset(self) -> None:
        with self._lock:
            for profile in self.profiles:
                profile.clear()

    def report(self, requests: int) -> dict[str, Any]:
        with self._lock:
            stats = pstats.Stats(self.profiles[0])
            for profile in self.profiles[1:]:
                stats.add(profile)
        per = 1000 / max(requests, 1)  # seconds in total -> ms per request
        raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]]
        raw = stats.stats  # type: ignore[attr-defined]
        total = sum(tt for _, _, tt, _, _ in raw.values())
        by_package: collections.defaultdict[str, float] = collections.defaultdict(float)
        self_time: collections.defaultdict[str, float] = collections.defaultdict(float)
        inclusive: collections.defaultdict[str, float] = collections.defaultdict(float)
        for (filename, _, name), (_, _, tt, ct, _) in raw.items():
            by_package[_package(filename)] += tt * per
            self_time[f"{_short(filename)}:{name}"] += tt * per
            if filename.startswith(str(ROOT / "app")):
                inclusive[f"{_short(filename)}:{name}"] += ct * per
        return {
            "requests": requests,
            "cpu_ms_per_request": total * per,
            "by_package": _top(by_package, 12),
            "self": _top(self_time, 25),
            "app_inclusive": _top(inclusive, 25),
        }


def _top(values: dict[str, float], n: int) -> list[tuple[str, float]]:
    return sorted(values.items(), key=lambda kv: -kv[1])[:n]


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/python3", str(ROOT) + "/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _package(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1].split("/", 1)[0]
    if filename.startswith(str(ROOT)):
        return "app (verdict)"
    if "/lib/python3" in filename:
        return "stdlib: " + filename.rsplit("/", 1)[1]
    return filename


@dataclass
class StatementTimer:
    """Wall time of every statement from send to result, grouped by its first words."""

    ms: collections.defaultdict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list)
    )

    def attach(self, engine: sa.Engine) -> None:
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, conn: Any, _cursor: Any, _stmt: str, *_: Any) -> None:
        conn.info.setdefault("t0", []).append(time.perf_counter())

    def _after(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.ms[_label(statement)].append((time.perf_counter() - conn.info["t0"].pop()) * 1000)

    def report(self, requests: int) -> list[tuple[str, int, float, float]]:
        return sorted(
            (
                (label, len(v), sum(v) / max(requests, 1), statistics.median(v))
                for label, v in self.ms.items()
            ),
            key=lambda r: -r[2],
        )


def _label(statement: str) -> str:
    words = " ".join(statement.split())
    for table in (
        "assignments",
        "comparison_pairs",
        "judgments",
        "api_tokens",
        "users",
        "projects",
    ):
        if table in words:
            return f"{words[:40]}... [{table}]"
    return words[:60]


def serve_profiled(url: str, port: int, out: str) -> None:
    """One uvicorn server process, profiled; writes its report to `out` on SIGTERM."""
    import uvicorn

    from app.main import create_app

    app = create_app(Settings(database_url=url))
    timer = StatementTimer()
    timer.attach(app.state.engine)
    profiles = ThreadProfiles()
    requests = 0

    class Count:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            nonlocal requests
            if scope["type"] == "http" and scope["path"] != "/profile/reset":
                requests += 1
            elif scope["type"] == "http":  # the client's signal: the measured phase starts
                requests = 0
                profiles.reset()
                timer.ms.clear()
                await send({"type": "http.response.start", "status": 204, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            await self.inner(scope, receive, send)

    config = uvicorn.Config(
        Count(app), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the SIGTERM it shut down on once it is done: a no-op handler lets this
    # process go on to write its report instead of dying of it.
    signal.signal(signal.SIGTERM, lambda *_: None)
    profiles.start()
    server.run()
    report = profiles.report(requests)
    report["statements"] = timer.report(requests)
    Path(out).write_text(json.dumps(report, indent=1))


def start_server(
    url: str, port: int, var_dir: str, workers: int, *, profile_to: str | None = None
) -> subprocess.Popen[bytes]:
    """`uvicorn app.main:create_app --factory --workers N` (as `bench/rater_hot_path.py` runs
    it), or with `profile_to` one profiled server process; returns once it answers.

    Waits on `/healthz`, not `/readyz`: readiness also wants Celery workers, which this
    benchmark does not start. The server leads its own process group, so that `stop` ends its
    worker processes too, also when it never came up.
    """
    env = {
        **os.environ,
        "VERDICT_DATABASE_URL": url,
        "VERDICT_SECRET_KEY": secrets.token_urlsafe(48),
        "VERDICT_VAR_DIR": var_dir,
        # The per-token rate limit runs (its cost is part of the hot path) but never refuses:
        # these raters are far faster than the default of 600 a minute allows.
        "VERDICT_API_RATE_LIMIT_PER_MIN": "1000000000",
    }
    if profile_to:
        cmd = [sys.executable, __file__, "--serve-profiled", url, str(port), profile_to]
    else:
        cmd = [
            sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
            "--log-level", "warning", "--no-access-log",
        ]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    stop(server)
    raise SystemExit("the server did not start")


async def drive_profiled(base: str, tokens: list[str], args: argparse.Namespace) -> Phase:
    ledger = Ledger()
    async with new_client(base, len(tokens), args.client) as client:
        saturating = tokens[: args.saturate_raters]
        await closed_loop(client, saturating, args.warmup, ledger, "warm-up")
        await client.get("/profile/reset")
        return await closed_loop(client, saturating, args.duration, ledger, "profiled")


def in_process_cpu(url: str, token: str, judgments_n: int) -> dict[str, float]:
    """CPU ms of this process per call for what the two endpoints' bodies do, without HTTP.

    The same unit of work, token auth, service call, commit and response JSON as
    `app/api/assignments.py`, in one thread with no profiler: what is left of the server's
    CPU per request (`## Load`) is uvicorn, Starlette's middleware, FastAPI's routing and
    dependencies, and the thread hand-off. PostgreSQL's own CPU is not in these figures.
    """
    from app.api.assignments import AssignmentOut, JudgmentOut
    from app.core.db import make_engine, make_sessionmaker, unit_of_work
    from app.services import assignment as assignment_service
    from app.services import judgments, users

    engine = make_engine(url)
    maker = make_sessionmaker(engine)
    data = judgments.JudgmentInput(choice="a", strength=1, aspects={"honesty": "a"})
    spent = {"auth": 0.0, "next": 0.0, "submit": 0.0}
    counted = 0
    for i in range(judgments_n + 20):  # the first 20 warm the caches up
        t0 = time.process_time()
        with unit_of_work(maker) as session:
            user = users.user_for_token(session, token)
            assert user is not None
            t1 = time.process_time()
            leased = assignment_service.next_assignment(session, SLUG, user)
            assert leased is not None, "the queue ran dry"
            session.commit()
            body = AssignmentOut.of(leased, SLUG).model_dump_json()
        t2 = time.process_time()
        with unit_of_work(maker) as session:
            user = users.user_for_token(session, token)
            assert user is not None
            t3 = time.process_time()
            judgment = judgments.submit(session, leased.id, user, data)
            session.commit()
            body = JudgmentOut.of(judgment).model_dump_json()
        t4 = time.process_time()
        del body
        if i >= 20:
            counted += 1
            spent["auth"] += (t1 - t0) + (t3 - t2)
            spent["next"] += t2 - t1
            spent["submit"] += t4 - t3
    engine.dispose()
    return {
        "auth (unit of work opened, token statement), per request": spent["auth"] * 500 / counted,
        "next: claim and lease, commit, response JSON": spent["next"] * 1000 / counted,
        "submit: judgment stored, commit, response JSON": spent["submit"] * 1000 / counted,
    }


def format_in_process(costs: dict[str, float]) -> str:
    auth, *bodies = costs.values()
    return "\n".join(
        [
            "| the endpoints' bodies in-process, no HTTP, no profiler | CPU ms |",
            "|---|---:|",
            *(f"| {k} | {v:.2f} |" for k, v in costs.items()),
            f"| per judgment (two requests) | {2 * auth + sum(bodies):.2f} |",
        ]
    )


def format_profile(report: dict[str, Any], phase: Phase) -> str:
    lines = [
        f"Profiled: {phase.judgments / phase.elapsed_s:.1f} judgments/s on one server process,"
        f" {report['requests']} requests; server CPU {report['cpu_ms_per_request']:.2f} ms per"
        " request (under cProfile)",
        "",
        "| server CPU by package (leaf frame) | ms / request |",
        "|---|---:|",
        *(f"| {k} | {v:.3f} |" for k, v in report["by_package"]),
        "",
        "| Verdict function (inclusive) | ms / request |",
        "|---|---:|",
        *(f"| `{k}` | {v:.3f} |" for k, v in report["app_inclusive"][:15]),
        "",
        "| hottest functions (self) | ms / request |",
        "|---|---:|",
        *(f"| `{k}` | {v:.3f} |" for k, v in report["self"][:15]),
        "",
        "| statement (send to result, wall) | count | ms / request | p50 ms |",
        "|---|---:|---:|---:|",
        *(f"| `{k}` | {n} | {per:.3f} | {p50:.2f} |" for k, n, per, p50 in report["statements"]),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run


@contextmanager
def bench_database(pairs: int, raters: int) -> Iterator[tuple[str, list[str], list[int]]]:
    """A fresh migrated and seeded database (dropped on leaving): url, tokens, their user ids."""
    name = f"verdict_load_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_database(Settings(database_url=url))
        _, tokens = seed(url, pairs, raters)
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            by_email = {
                email: int(user_id)
                for email, user_id in conn.exec_driver_sql("SELECT email, id FROM users")
            }
        engine.dispose()
        ids = [int(by_email[f"rater{i}@bench.example"]) for i in range(raters)]
        yield url, tokens, ids
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (uvicorn and its workers), then wait for it."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def summarize(phases: list[Phase], checks: dict[str, int], cpu: list[float], args: Any) -> str:
    paced = [p for p in phases if p.name.startswith("open loop")]
    sat = phases[-1]
    table = [
        "| phase | offered /s | judgments stored /s | next p50 / p99 ms | submit p50 / p99 ms |"
        " client lag p99 ms | no idle rater |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in [*paced, sat]:
        lag = f"{percentile(p.lag_ms, 99):.1f}" if p.lag_ms else "-"
        table.append(
            f"| {p.name} | {f'{p.arrivals / p.planned_s:.1f}' if p.planned_s else '-'} |"
            f" {p.judgments / (p.planned_s or p.elapsed_s):.1f} |"
            f" {_p(p.next_ms, 50)} / {_p(p.next_ms, 99)} |"
            f" {_p(p.submit_ms, 50)} / {_p(p.submit_ms, 99)} | {lag} | {p.no_idle_rater or '-'} |"
        )
    statuses: collections.Counter[str] = collections.Counter()
    for p in phases:
        statuses.update(p.statuses)
    errors = {k: v for k, v in sorted(statuses.items()) if not k.endswith((" 200", " 204"))}
    top = next((p for p in paced if p.name == "open loop 100/s"), None)
    p99 = max(percentile(top.next_ms, 99), percentile(top.submit_ms, 99)) if top else None
    sustained = sat.judgments / sat.elapsed_s
    violations = sum(checks.values())
    lines = [
        *table,
        "",
        f"- sustained at saturation ({args.saturate_raters} raters, no think time):"
        f" **{sustained:.1f} judgments/s**",
        "- CPU ms per judgment at saturation (server processes / PostgreSQL / client):"
        f" {' / '.join(f'{v:.2f}' for v in cpu)} (total {sum(cpu):.2f}); the same machine"
        " with the client elsewhere, 2 CPU-seconds / (server + PostgreSQL):"
        f" {2000 / max(cpu[0] + cpu[1], 1e-9):.0f} judgments/s",
        f"- answers: {', '.join(f'{k} x{v}' for k, v in sorted(statuses.items()))}",
        f"- errors (non-2xx, transport) by status: {errors or 'none'}",
        "- invariant checks (violations): "
        + "; ".join(f"{label}: {n}" for label, n in checks.items()),
        "- targets: "
        + ", ".join(
            [
                f"sustained >= {TARGET_SUSTAINED:g}/s "
                + ("met" if sustained >= TARGET_SUSTAINED else f"MISSED ({sustained:.1f})"),
                f"p99 <= {TARGET_P99_MS:g} ms at 100/s offered "
                + (
                    "not run"
                    if p99 is None
                    else ("met" if p99 <= TARGET_P99_MS else f"MISSED ({p99:.1f})")
                ),
                "zero lost or duplicated judgments "
                + ("met" if violations == 0 else f"MISSED ({violations})"),
            ]
        ),
    ]
    return "\n".join(lines)


def _p(values: list[float], q: float) -> str:
    return f"{percentile(values, q):.1f}" if values else "-"


def machine_line(args: argparse.Namespace, load_before: str, pg_version: str) -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {pg_version}; {args.workers} uvicorn worker processes; {args.raters} raters for the"
        f" open loop (think {args.think_s:g} s, exponential), {args.saturate_raters} at"
        f" saturation; {args.duration:g} s per phase after {args.warmup:g} s warm-up;"
        f" {args.pairs} pairs; load average (1 min) before {load_before},"
        f" after {os.getloadavg()[0]:.1f}"
    )


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-profiled":
        serve_profiled(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raters", type=int, default=200, help="raters (tokens) seeded")
    parser.add_argument(
        "--saturate-raters", type=int, default=24, help="raters in the saturated closed loop"
    )
    parser.add_argument(
        "--rates",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[25.0, 50.0, 100.0],
        help="offered judgments/s of the open-loop phases, comma-separated ('' for none)",
    )
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument("--think-s", type=float, default=0.5, help="mean think time (open loop)")
    parser.add_argument("--pairs", type=int, default=8000, help="pairs seeded (x3 judgments)")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument(
        "--client",
        choices=("httpx", "raw"),
        default="httpx",
        help="httpx.AsyncClient, or a bare HTTP/1.1 client that leaves the cores to the server",
    )
    parser.add_argument("--profile", action="store_true", help="profile one server process")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()
    args.saturate_raters = min(args.saturate_raters, args.raters)

    load_before = f"{os.getloadavg()[0]:.1f}"
    with bench_database(args.pairs, args.raters) as (url, tokens, user_ids):
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            pg_version = "PostgreSQL " + str(conn.exec_driver_sql("SHOW server_version").scalar())
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as var_dir:
            if args.profile:
                out = str(Path(var_dir) / "profile.json")
                server = start_server(url, port, var_dir, 1, profile_to=out)
                try:
                    phase = run_client(drive_profiled(base, tokens, args))
                finally:
                    stop(server)
                report = json.loads(Path(out).read_text())
                text = format_profile(report, phase)
                text += "\n\n" + format_in_process(in_process_cpu(url, tokens[-1], 300))
                print(text)
                admin.dispose()
                if args.write_docs:
                    write_profile_docs(text, machine_line(args, load_before, pg_version))
                return
            server = start_server(url, port, var_dir, args.workers)
            meter = CpuMeter(server, admin)
            try:
                phases, ledger, cpu = run_client(measured(base, tokens, args, meter))
            finally:
                stop(server)
        admin.dispose()
        checks = invariant_checks(url, ledger, user_ids)
    report = summarize(phases, checks, cpu, args)
    machine = machine_line(args, load_before, pg_version)
    print(report)
    print(f"\nMachine: {machine}.")
    if args.write_docs:
        if args.client == "raw":
            write_raw_docs(report, machine)
        else:
            write_docs(report, machine)


async def measured(
    base: str, tokens: list[str], args: argparse.Namespace, meter: CpuMeter
) -> tuple[list[Phase], Ledger, list[float]]:
    """`drive`, with the CPU of server, PostgreSQL and client read around the saturated phase."""
    ledger = Ledger()
    async with new_client(base, len(tokens), args.client) as client:
        saturating = tokens[: args.saturate_raters]
        await closed_loop(client, saturating, args.warmup, ledger, "warm-up")
        phases = []
        for rate in args.rates:
            phases.append(
                await open_loop(client, tokens, rate, args.duration, args.think_s, ledger)
            )
        before = meter.read()
        sat = await closed_loop(client, saturating, args.duration, ledger, "saturated")
        cpu = meter.per_request(before, meter.read(), sat.judgments)
        phases.append(sat)
    return phases, ledger, cpu


def write_docs(report: str, machine: str) -> None:
    command = "    " + shlex.join([".venv/bin/python", "bench/load.py", *sys.argv[1:]])
    section = "\n".join(
        [
            SECTION,
            "",
            "`bench/load.py`: simulated raters doing `GET",
            "/api/v1/projects/{slug}/assignments/next`, a think time, then `POST",
            "/api/v1/assignments/{id}/judgment` (bearer tokens) over HTTP against PostgreSQL,",
            "served as in production: `uvicorn app.main:create_app --factory --workers 2`",
            "(`verdict serve --workers 2` in docker-compose.yml; access log off). The client is",
            "one asyncio loop with one `httpx.AsyncClient` on the same machine. Open-loop phases:",
            "judgments arrive at a fixed rate (Poisson) whatever the latency, each taken by an",
            "idle rater (next, think, submit), so a slow server meets the same demand instead of",
            "slowing its own clients down; p50/p99 per call are from these. Saturated phase: a",
            "closed loop with no think time, for judgments/s at the limit. Then SQL checks over",
            "what the run left (each must be 0). Targets: >= 150 judgments/s sustained, p99 <=",
            "100 ms at 100 judgments/s offered, zero lost or duplicated judgments.",
            "",
            command,
            "",
            report,
            "",
            f"Machine: {machine}.",
            "",
            'Reading it: "client lag" is how late the client started an arrival against its',
            'schedule (its own CPU share on the 2 cores); "no idle rater" counts arrivals that',
            "found every rater busy and were dropped (0 means the offered rate was really",
            "offered). The CPU line is measured around the saturated phase from /proc: the",
            "uvicorn processes, the whole PostgreSQL server (every database: on a shared machine",
            "it counts other people's work too) and this client process, divided by the judgments",
            "stored. With both cores busy, judgments/s is about 2,000 ms / total CPU ms per",
            "judgment, so the client's own share is taken from the server; the last figure of",
            "that line is the rate without it; `## Load: with a bare HTTP client` is the same run",
            "with a client of almost no CPU. Where the server's CPU goes: `## Load: where the",
            "time goes`. A load average well above 1 in the Machine line means other work shared",
            "the cores and every figure is below what the code allows: the figures committed",
            "here were taken on a machine shared with other engineers' test runs; run it again",
            "on a quiet machine for the code's own figures.",
            "",
        ]
    )
    write_section(SECTION, section)
    print(f"wrote {DOCS.relative_to(ROOT)} ({SECTION})")


RAW_SECTION = "## Load: with a bare HTTP client"


def write_raw_docs(report: str, machine: str) -> None:
    command = "    " + shlex.join([".venv/bin/python", "bench/load.py", *sys.argv[1:]])
    section = "\n".join(
        [
            RAW_SECTION,
            "",
            "The same run as `## Load` with `--client raw`: the raters speak HTTP/1.1 over",
            "asyncio streams (`RawClient` in bench/load.py: keep-alive connections, nothing",
            "else) instead of `httpx.AsyncClient`, whose own CPU (the client figure of the CPU",
            "line in `## Load`) is taken from the server on these two shared cores. What this",
            "run sustains is closer to what the server does with its clients elsewhere.",
            "",
            command,
            "",
            report,
            "",
            f"Machine: {machine}.",
            "",
        ]
    )
    write_section(RAW_SECTION, section)
    print(f"wrote {DOCS.relative_to(ROOT)} ({RAW_SECTION})")


PROFILE_SECTION = "## Load: where the time goes"
PROFILE_FINDINGS = [
    "What it says. The endpoints' bodies (the last table: unit of work, token auth, service",
    "call, commit, response JSON, in-process with no profiler) cost about 3.9 ms of CPU per",
    "judgment, about half of the server's CPU per judgment in `## Load` (7.5 ms on a quiet",
    "machine during this work). The other half is the request around them: uvicorn's HTTP",
    "handling, the middleware stack (sessions, security headers, metrics, the per-token rate",
    "limit), FastAPI's routing over every route of the app (`fastapi/routing.py:matches` is",
    "among the hottest functions) and its dependencies, and the one thread hand-off. Inside the",
    "bodies, the profile gives SQLAlchemy the largest share (about 30 % of the server's CPU:",
    "executing statements, turning rows into ORM entities: the claim's pair, prompt and two",
    "responses, the token's user, submit's locked assignment), then psycopg (about 25 %), and",
    "Verdict's own code about 5 %. A `next` makes 8 round trips to PostgreSQL (the pool's",
    "pre-ping, BEGIN, token auth, rater lock, current lease, claim, lease insert, COMMIT) and a",
    "submit 8 (pre-ping, BEGIN, token auth, assignment lock, counter, judgment insert,",
    "assignment update, COMMIT); no one statement dominates the statement table (the token",
    "auth line, first in each request, also carries the connection checkout).",
    "",
    "So no single hot spot is left in the hot path's own code. What would lower the CPU per",
    "judgment, largest first: the per-request framework cost (the rater endpoints on a lean",
    "path: a mounted `/api/v1` application with only the middleware it needs and a handful of",
    "routes to match; async endpoints on psycopg's async driver instead of the thread",
    "hand-off); Core rows instead of ORM entities for the claim, the token's user and the locked",
    "assignment; fewer round trips (submit's three writes as one statement on PostgreSQL; the",
    "pool's pre-ping is only about 0.03 ms of CPU per request, measured apart). The client is",
    "the other large item: `httpx.AsyncClient` costs about 2 ms of CPU per request here",
    "(measured against `/healthz`; uvloop saves about 10 %), half of what the server spends,",
    "on the same two cores; in production the raters' browsers are elsewhere.",
]


def write_profile_docs(text: str, machine: str) -> None:
    command = "    " + shlex.join([".venv/bin/python", "bench/load.py", *sys.argv[1:]])
    section = "\n".join(
        [
            PROFILE_SECTION,
            "",
            "`bench/load.py --profile`: the saturated phase against one server process run",
            "under cProfile in every thread (`threading.setprofile` starts a profiler in each",
            "thread-pool thread; cProfile alone sees only the thread that enabled it), each on its",
            "thread's own CPU clock (`time.thread_time`), so waiting on PostgreSQL, the GIL or the",
            "pool counts nothing. py-spy is not installed here. cProfile's own cost inflates every",
            "figure (about 3-4x; a Python call costs the most), so read the shares, not the",
            "milliseconds; the unprofiled CPU per request is in `## Load`. Statement times are",
            "wall time from send to result, measured by an SQLAlchemy event listener: the round",
            "trip, PostgreSQL's work, and, with several threads in one process, the wait for the",
            "GIL after the answer arrived.",
            "",
            command,
            "",
            text,
            "",
            f"Machine: {machine}.",
            "",
            *PROFILE_FINDINGS,
            "",
        ]
    )
    write_section(PROFILE_SECTION, section)
    print(f"wrote {DOCS.relative_to(ROOT)} ({PROFILE_SECTION})")


if __name__ == "__main__":
    main()
