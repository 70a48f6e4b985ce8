"""Rater hot path: N simulated raters doing next -> submit over HTTP against PostgreSQL.

    .venv/bin/python bench/rater_hot_path.py                    # 20 raters, as deployed
    .venv/bin/python bench/rater_hot_path.py --write-docs       # and update docs/benchmarks.md

Creates a fresh database (dropped afterwards), migrates it with `app.core.migrate.upgrade_database`,
seeds one project (overlap 3, gold rate 0.1) with enough pairs that the queue never runs dry,
starts `uvicorn app.main:create_app --factory --workers 2` as a subprocess (the worker count of
`verdict serve --workers 2` in docker-compose.yml, the production layout) and drives it with
one `httpx.Client` per rater thread. Each rater loops GET `/assignments/next` then POST
`/judgment` (bearer token auth, the API programmatic raters use).

Two phases, because latency and throughput are different questions:

* paced: each rater pauses `--think-s` after a submit (reading the next comparison; a person
  takes far longer). Latency p50/p99 at N concurrent raters is measured here.
* saturated: no pause at all. With zero think time a closed loop always saturates the server,
  so latency there is just concurrency / throughput (Little's law); this phase measures
  judgments/s, and the same threads then call `/healthz` (no database, no auth) for the
  bare-endpoint baseline: hot-path requests/s as a share of the bare endpoint's.

Client and server share the machine, as they would in a load test. So that the figures say
where the CPU goes, each saturated phase also reports CPU milliseconds per request of the
server processes, of the PostgreSQL server (all its processes: run it when nothing else uses
that PostgreSQL) and of the client.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa
from sections import DOCS, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.config import Settings  # noqa: E402
from app.core.db import make_engine  # noqa: E402
from app.core.migrate import upgrade_database  # noqa: E402
from app.core.security import hash_password  # noqa: E402
from app.models import ComparisonPair, Prompt, Response, User  # noqa: E402
from app.services import projects, users  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "VERDICT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SECTION = "## Rater hot path"


@dataclass
class Samples:
    next_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    bare_ms: list[float] = field(default_factory=list)
    empty: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(url: str, pairs: int, raters: int) -> tuple[str, list[str]]:
    engine = make_engine(url)
    with sa.orm.Session(engine) as session:
        project = projects.create_project(
            session, "bench", "Bench", settings={"overlap": 3, "gold_rate": 0.1}
        )
        prompts = [
            Prompt(project_id=project.id, text=f"Question {i}: explain item {i}.", source="bench")
            for i in range(pairs)
        ]
        session.add_all(prompts)
        session.flush()
        responses = []
        for p in prompts:
            responses.append(Response(prompt_id=p.id, text=f"Answer A to {p.id}. " * 20))
            responses.append(Response(prompt_id=p.id, text=f"Answer B to {p.id}. " * 20))
        session.add_all(responses)
        session.flush()
        session.add_all(
            ComparisonPair(
                project_id=project.id,
                prompt_id=p.id,
                response_a_id=responses[2 * i].id,
                response_b_id=responses[2 * i + 1].id,
                required_judgments=3,
                gold_choice="a" if i % 10 == 0 else None,
            )
            for i, p in enumerate(prompts)
        )
        password = hash_password(secrets.token_urlsafe(12))  # one hash: nobody logs in
        rows = [
            User(email=f"rater{i}@bench.example", password_hash=password, role="rater")
            for i in range(raters)
        ]
        session.add_all(rows)
        session.commit()
        tokens = [users.create_token(session, row, "bench").secret for row in rows]
        session.commit()
    engine.dispose()
    # Fresh planner statistics, as autovacuum would have them on a database in use.
    stats = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with stats.connect() as conn:
        conn.exec_driver_sql("ANALYZE")
    stats.dispose()
    return "bench", tokens


def start_server(url: str, port: int, var_dir: str, workers: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "VERDICT_DATABASE_URL": url,
        "VERDICT_SECRET_KEY": secrets.token_urlsafe(48),
        "VERDICT_VAR_DIR": var_dir,
        # The per-token rate limit runs (its cost is part of the hot path) but never refuses:
        # these raters are far faster than the default of 600 a minute allows.
        "VERDICT_API_RATE_LIMIT_PER_MIN": "1000000000",
    }
    cmd = [
        sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def server_pids(server: subprocess.Popen[bytes]) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True)
    return [server.pid, *(int(p) for p in found.stdout.split())]


def postgres_cpu_seconds(admin: sa.Engine) -> float:
    """CPU seconds of the whole PostgreSQL server so far: every live process, plus what its
    exited children (connections the pool closed) used, which the postmaster has collected."""
    with admin.connect() as conn:
        backend = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
    postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    exited = (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    found = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True)
    return exited + cpu_seconds([postmaster, *(int(p) for p in found.stdout.split())])


@dataclass
class CpuMeter:
    """CPU used by the server processes, PostgreSQL and the client during a phase."""

    server: subprocess.Popen[bytes]
    admin: sa.Engine

    def read(self) -> tuple[float, float, float]:
        return (
            cpu_seconds(server_pids(self.server)),
            postgres_cpu_seconds(self.admin),
            time.process_time(),  # this process: every client thread
        )

    @staticmethod
    def per_request(before: tuple[float, ...], after: tuple[float, ...], n: int) -> list[float]:
        return [(b - a) * 1000 / max(n, 1) for a, b in zip(before, after, strict=True)]


def rater_loop(
    base: str, slug: str, token: str, until: float, out: Samples, think_s: float = 0.0
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    body = {"choice": "a", "strength": 1, "aspects": {"honesty": "a"}, "active_ms": 1000}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        if think_s:
            # Paced raters are mid-think when the phase starts, as in the steady state the
            # phase measures (the remaining think time is again exponential); otherwise all of
            # them would fire in the same millisecond and the phase would open with a burst.
            time.sleep(random.expovariate(1 / think_s))
        while time.monotonic() < until:
            t0 = time.perf_counter()
            got = client.get(f"/api/v1/projects/{slug}/assignments/next")
            t1 = time.perf_counter()
            if got.status_code == 204:
                with out.lock:
                    out.empty += 1
                continue
            if got.status_code != 200:
                out.errors.append(f"next {got.status_code} {got.text[:200]}")
                continue
            sent = client.post(f"/api/v1/assignments/{got.json()['id']}/judgment", json=body)
            t2 = time.perf_counter()
            if sent.status_code != 200:
                out.errors.append(f"submit {sent.status_code} {sent.text[:200]}")
                continue
            with out.lock:
                out.next_ms.append((t1 - t0) * 1000)
                out.submit_ms.append((t2 - t1) * 1000)
            if think_s:
                # Random pauses (mean think_s), so raters do not move in lockstep bursts.
                time.sleep(random.expovariate(1 / think_s))


def bare_loop(base: str, until: float, out: Samples) -> None:
    with httpx.Client(base_url=base, timeout=30) as client:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            got = client.get("/healthz")
            t1 = time.perf_counter()
            if got.status_code != 200:
                out.errors.append(f"healthz {got.status_code}")
                continue
            with out.lock:
                out.bare_ms.append((t1 - t0) * 1000)


def run_threads(target: Callable[..., None], args: list[tuple[object, ...]]) -> None:
    threads = [threading.Thread(target=target, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--raters", type=int, default=20, help="concurrent raters (threads)")
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="length of each saturated phase"
    )
    parser.add_argument(
        "--paced-seconds", type=float, default=60.0, help="length of the paced phase"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument("--pairs", type=int, default=5000, help="pairs seeded (x3 judgments)")
    parser.add_argument(
        "--think-s", type=float, default=3.0, help="paced phase: mean pause after each submit"
    )
    parser.add_argument(
        "--workers", type=int, default=2, help="uvicorn worker processes (production: 2)"
    )
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args()

    load_before = f"{os.getloadavg()[0]:.1f}"
    name = f"verdict_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    server = None
    try:
        upgrade_database(Settings(database_url=url))
        slug, tokens = seed(url, args.pairs, args.raters)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryDirectory() as var_dir:
            server = start_server(url, port, var_dir, args.workers)
            meter = CpuMeter(server, admin)
            warm = Samples()
            until = time.monotonic() + args.warmup
            run_threads(rater_loop, [(base, slug, t, until, warm) for t in tokens])
            paced = Samples()
            until = time.monotonic() + args.paced_seconds
            run_threads(rater_loop, [(base, slug, t, until, paced, args.think_s) for t in tokens])
            hot = Samples()
            cpu_before = meter.read()
            t_start = time.monotonic()
            until = t_start + args.seconds
            run_threads(rater_loop, [(base, slug, t, until, hot) for t in tokens])
            hot_elapsed = time.monotonic() - t_start
            hot_cpu = meter.per_request(cpu_before, meter.read(), 2 * len(hot.submit_ms))
            bare = Samples()
            cpu_before = meter.read()
            t_start = time.monotonic()
            until = t_start + args.seconds
            run_threads(bare_loop, [(base, until, bare)] * args.raters)
            bare_elapsed = time.monotonic() - t_start
            bare_cpu = meter.per_request(cpu_before, meter.read(), len(bare.bare_ms))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=20)
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    errors = paced.errors + hot.errors + bare.errors
    judgments = len(hot.submit_ms)
    hot_rps = (len(hot.next_ms) + len(hot.submit_ms)) / hot_elapsed
    bare_rps = len(bare.bare_ms) / bare_elapsed
    rows = [
        (f"GET next (paced, think {args.think_s:g} s)", paced.next_ms),
        (f"POST judgment (paced, think {args.think_s:g} s)", paced.submit_ms),
        ("GET next (saturated)", hot.next_ms),
        ("POST judgment (saturated)", hot.submit_ms),
        ("GET /healthz (bare, saturated)", bare.bare_ms),
    ]
    table = [
        "| call | requests | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | {len(v)} | {statistics.median(v):.1f} | {percentile(v, 99):.1f} |"
            for label, v in rows
        ),
    ]
    summary = [
        f"- paced phase: {len(paced.submit_ms) / args.paced_seconds:.1f} judgments/s offered by"
        f" {args.raters} raters",
        f"- saturated judgments/s: **{judgments / hot_elapsed:.1f}** ({judgments} in"
        f" {hot_elapsed:.1f} s)",
        f"- hot-path requests/s (next + submit): {hot_rps:.1f}; bare endpoint requests/s:"
        f" {bare_rps:.1f}; ratio **{hot_rps / bare_rps:.0%}**",
        "- CPU ms per request (server processes / PostgreSQL / client), saturated:"
        f" hot path {' / '.join(f'{v:.2f}' for v in hot_cpu)} (total {sum(hot_cpu):.2f}),"
        f" bare endpoint {' / '.join(f'{v:.2f}' for v in bare_cpu)} (total {sum(bare_cpu):.2f})",
        f"- 204 (nothing left) answers: {hot.empty}; errors: {len(errors)}",
        "- target (p99 <= 50 ms each, ratio >= 40 %): "
        + ", ".join(
            f"{label} {'met' if ok else 'MISSED'}"
            for label, ok in (
                ("next p99", percentile(paced.next_ms, 99) <= 50),
                ("submit p99", percentile(paced.submit_ms, 99) <= 50),
                ("throughput ratio", hot_rps / bare_rps >= 0.4),
            )
        ),
    ]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {args.raters} raters, {args.workers} uvicorn worker processes, paced phase"
        f" {args.paced_seconds:.0f} s, saturated phases {args.seconds:.0f} s each, after"
        f" {args.warmup:.0f} s warm-up,"
        f" load average before {load_before}, after {os.getloadavg()[0]:.1f}"
    )
    report = "\n".join([*table, "", *summary, "", f"Machine: {machine}."])
    print(report)
    for e in errors[:10]:
        print("error:", e)
    if args.write_docs:
        write_docs(report, args)


def write_docs(report: str, args: argparse.Namespace) -> None:
    command = "    " + shlex.join([".venv/bin/python", "bench/rater_hot_path.py", *sys.argv[1:]])
    section = "\n".join(
        [
            SECTION,
            "",
            "N simulated raters doing `GET /api/v1/projects/{slug}/assignments/next` then",
            "`POST /api/v1/assignments/{id}/judgment` over HTTP (bearer tokens) against",
            "PostgreSQL, served as in production: `uvicorn app.main:create_app --factory",
            "--workers 2` (the worker count of `verdict serve --workers 2` in docker-compose.yml;",
            "access log off). Each rater is a thread with its own `httpx.Client`. Latency is",
            "measured with raters that pause a random time (mean `--think-s`) after each submit",
            "and before their first request, so the phase does not open with all raters firing",
            "at once (paced); throughput with no pause at all (saturated), where a closed loop's",
            "latency is only concurrency / throughput. The same threads then call `/healthz` (no",
            "database, no auth) as the bare-endpoint baseline: same client, same concurrency.",
            "Target: next and submit p99 <= 50 ms at 20 raters, and saturated hot-path",
            "requests/s >= 40 % of the bare endpoint's.",
            "",
            command,
            "",
            report,
            "",
            "The client threads run on the same 2 cores as the server, so every figure includes",
            "the client's own CPU; the load average before and after the run is printed above.",
            "Run it when nothing else is busy (benchmarks share `flock /tmp/verdict-bench.lock`):",
            "the PostgreSQL CPU figure counts the whole PostgreSQL server.",
            "",
            "Reading the throughput ratio: with both cores saturated, requests/s is about",
            "2 CPU-seconds / CPU per request, so the ratio is about the bare endpoint's CPU per",
            "request over the hot path's (client, server and PostgreSQL together, the CPU line",
            "above). 40 % means a hot-path call may cost at most 2.5 times a `/healthz` call.",
            "",
            "What a call does now: `next` runs five statements and a commit (token auth, rater",
            "row lock that also reads the project's id and settings by slug, current lease, the",
            "claim, the lease insert); the claim walks `ix_comparison_pairs_queue` (project,",
            "judgment count, priority DESC, created, id) and stops at the first pair it may",
            "lease, loading the prompt and both responses in the same statement, and the lease",
            "insert re-checks the room (`INSERT ... SELECT ... WHERE`). `submit` runs five and a",
            "commit (token auth, assignment locked with its project's settings, counter `UPDATE",
            "... RETURNING`, judgment insert, assignment update). Current lease, lease insert and",
            "submit's three writes run in Core. Each call makes one thread hand-off (`RaterCall`",
            "opens session and auth in the endpoint's thread; the endpoint serializes its own",
            "response), where it made six (`next`) and five (`submit`), FastAPI's validation",
            "of the returned model included. `/healthz` runs no statement, in one hand-off.",
            "Both also pay the pool's pre-ping and the BEGIN.",
            "",
            "What would close the gap, largest first (py-spy with `--gil`, per-process CPU):",
            "",
            "- Server CPU: the ORM entity loads left on the path, the claim's four entities",
            "  (pair, prompt, two responses, `populate_existing`), the token auth's user and",
            "  submit's locked assignment. Core rows straight into the response models (the",
            "  service handing the API a plain record instead of ORM objects) would cut most",
            "  of that; a statement through the ORM costs about 0.2-0.3 ms of CPU, in Core",
            "  about 0.1 ms. The one thread hand-off left per call goes only with async",
            "  endpoints on psycopg's async driver.",
            "- PostgreSQL CPU: the claim is planned on every call (its generic plan is far",
            "  slower, so PostgreSQL keeps custom plans); about half of that planning is the",
            "  three content joins. Every call also commits, and a submit updates three indexed",
            "  tables.",
            "- The client: `httpx` costs about 1 ms of CPU per request (the CPU line), the same",
            "  for both endpoints, so a leaner client would lower the ratio, not raise it.",
            "",
        ]
    )
    write_section(SECTION, section)
    print(f"wrote {DOCS.relative_to(ROOT)} ({SECTION})")


if __name__ == "__main__":
    main()
