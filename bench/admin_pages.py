"""Console render times on a big project: p50/p95 of the overview, the prompt browser (with
search and filters) and a run page, on PostgreSQL.

    .venv/bin/python bench/admin_pages.py                  # 100,000 prompts, 1,000,000 judgments
    .venv/bin/python bench/admin_pages.py --write-docs     # and update docs/benchmarks.md
    .venv/bin/python bench/admin_pages.py --prompts 2000 --judgments 20000   # a quick look

Creates a fresh PostgreSQL database (dropped afterwards), migrates it, and seeds one project in
SQL (`generate_series`, so a million judgments take seconds): the prompts with two answers and
one comparison pair each, the judgments spread over ten raters (a snapshot covering 90 % of
them, as a project that trains has), flags on one judgment in fifty, a PPO run with 2,000
steps of five metrics and a log, a few model versions. Then, in one process (the app in-process
through its ASGI interface, an admin's session), each page is requested `--repeat` times after
two warm-up requests and its wall time per request is recorded. Target: p95 ≤ 300 ms each.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.config import Settings  # noqa: E402
from app.core.db import make_engine, make_sessionmaker, unit_of_work  # noqa: E402
from app.core.migrate import upgrade_database  # noqa: E402
from app.main import create_app  # noqa: E402
from app.services import projects, users  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "VERDICT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
SECTION = "## Console pages"
PASSWORD = "bench password"
RATERS = 10


def seed(url: str, prompts: int, judgments: int) -> dict[str, int | str]:
    """The big project, written in SQL; returns the ids the pages need."""
    with unit_of_work(make_sessionmaker(make_engine(url))) as s:
        users.create_user(s, "admin@bench.example", PASSWORD, "admin")
        raters = [
            users.create_user(s, f"rater{i}@bench.example", PASSWORD, "rater")
            for i in range(RATERS)
        ]
        project = projects.create_project(
            s, "big", "Big project", settings={"overlap": 3, "reward_retrain_threshold": 500}
        )
        s.flush()
        pid, first_rater = project.id, raters[0].id
    engine = sa.create_engine(url)
    per_pair = max(1, min(RATERS, judgments // max(1, prompts)))
    pairs_judged = judgments // per_pair
    with engine.begin() as conn:
        run = conn.execute(
            sa.text(
                "INSERT INTO prompts (project_id, external_id, text, metadata, source, created_at)"
                " SELECT :p, 'q' || g, 'Question ' || g || ': how do I do thing number ' || g"
                " || ' well?', '{}', CASE WHEN g % 7 = 0 THEN 'import' ELSE 'upload' END,"
                " now() - (:n - g) * interval '1 second' FROM generate_series(1, :n) g"
            ),
            {"p": pid, "n": prompts},
        )
        del run
        conn.execute(
            sa.text(
                "INSERT INTO responses (prompt_id, text, model_name, truncated,"
                " generation_params, created_at)"
                " SELECT id, 'Answer ' || side || ' to prompt ' || id, 'base', side = 'b' AND"
                " id % 9 = 0, '{}', now() FROM prompts, (VALUES ('a'), ('b')) v(side)"
                " WHERE project_id = :p ORDER BY id, side"
            ),
            {"p": pid},
        )
        conn.execute(
            sa.text(
                "INSERT INTO comparison_pairs (project_id, prompt_id, response_a_id,"
                " response_b_id, required_judgments, judgment_count, priority, kind, created_at)"
                " SELECT :p, r.prompt_id, min(r.id), max(r.id), 3, 0, 0, 'standard', now()"
                " FROM responses r JOIN prompts q ON q.id = r.prompt_id"
                " WHERE q.project_id = :p GROUP BY r.prompt_id"
            ),
            {"p": pid},
        )
        conn.execute(
            sa.text(
                "INSERT INTO judgments (project_id, pair_id, rater_id, choice, strength,"
                " aspects, rationale, flags, shown_left, time_on_task_ms, active_ms, source,"
                " extra, created_at)"
                " SELECT :p, c.id, :r0 + k, CASE WHEN (c.id + k) % 3 = 0 THEN 'b' ELSE 'a' END,"
                " 1 + (c.id + k) % 2, '{}', '', CASE WHEN (c.id * 7 + k) % 50 = 0"
                " THEN '[\"unsafe\"]' ELSE '[]' END::jsonb,"
                " CASE WHEN k % 2 = 0 THEN 'a' ELSE 'b' END,"
                " 12000, 9000, 'rater', '{}', now() - ((c.id + k) % 86400) * interval '1 second'"
                " FROM (SELECT id FROM comparison_pairs WHERE project_id = :p ORDER BY id"
                " LIMIT :pairs) c, generate_series(0, :per - 1) k"
            ),
            {"p": pid, "r0": first_rater, "pairs": pairs_judged, "per": per_pair},
        )
        conn.execute(
            sa.text(
                "UPDATE comparison_pairs c SET judgment_count = j.n FROM (SELECT pair_id,"
                " count(*) n FROM judgments GROUP BY pair_id) j WHERE j.pair_id = c.id"
            )
        )
        max_judgment = conn.scalar(sa.text("SELECT max(id) FROM judgments")) or 0
        conn.execute(
            sa.text(
                "INSERT INTO dataset_snapshots (project_id, judgment_ids, content_hash, config,"
                " stats, max_judgment_id, created_at) VALUES (:p, '[]', repeat('0', 64), '{}',"
                " '{}', :m, now())"
            ),
            {"p": pid, "m": int(max_judgment * 0.9)},
        )
        run_id = conn.scalar(
            sa.text(
                "INSERT INTO runs (project_id, kind, status, config, trigger, progress_done,"
                " progress_total, log_tail, result, attempts, cancel_requested, created_at,"
                " started_at, heartbeat_at, worker) VALUES (:p, 'ppo', 'running', '{}',"
                " 'auto', 1200, 2000, :log, '{}', 1, false, now(), now() - interval '1 hour',"
                " now(), 'bench@host') RETURNING id"
            ),
            {"p": pid, "log": "\n".join(f"10:00:{i:02d} step {i}" for i in range(40))},
        )
        conn.execute(
            sa.text(
                "INSERT INTO run_metrics (run_id, step, name, value, created_at)"
                " SELECT :r, g, name, sin(g / 50.0) + length(name), now()"
                " FROM generate_series(0, 1999) g, (VALUES ('objective/kl'),"
                " ('objective/scores'), ('loss/policy'), ('loss/value'),"
                " ('policy/response_length')) m(name)"
            ),
            {"r": run_id},
        )
        conn.execute(
            sa.text(
                "INSERT INTO model_versions (project_id, kind, version, name, base_model,"
                " status, metrics, created_at) VALUES (:p, 'policy', 0, 'base', 'smollm2',"
                " 'active', '{}', now()), (:p, 'reward', 0, 'reward v0', 'smollm2', 'active',"
                " '{\"best_val_accuracy\": 0.7}', now())"
            ),
            {"p": pid},
        )
    with sa.create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()
    return {"slug": "big", "run": int(run_id)}


def login(client: TestClient) -> None:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    done = client.post(
        "/login",
        data={"email": "admin@bench.example", "password": PASSWORD, "csrf_token": token[1]},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text


def time_page(client: TestClient, path: str, repeat: int) -> list[float]:
    for _ in range(2):
        assert client.get(path).status_code == 200, path
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100_000)
    parser.add_argument("--judgments", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30, help="timed requests per page")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    name = f"verdict_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade_database(Settings(database_url=url))
        started = time.perf_counter()
        ids = seed(url, args.prompts, args.judgments)
        seeded_s = time.perf_counter() - started
        settings = Settings(
            database_url=url, var_dir=Path("/tmp") / name, broker_url="memory://",
            secret_key="bench-secret-" + "x" * 32,
        )  # fmt: skip
        app = create_app(settings)
        slug = ids["slug"]
        pages = [
            ("overview", "/admin"),
            ("prompt browser", f"/admin/projects/{slug}/data"),
            ("prompt browser, next page", f"/admin/projects/{slug}/data?after=50000"),
            ("prompt browser, search", f"/admin/projects/{slug}/data?q=number+4242"),
            ("prompt browser, filters", f"/admin/projects/{slug}/data?flagged=yes&judged=yes"),
            ("prompt browser, held out", f"/admin/projects/{slug}/data?heldout=yes"),
            ("prompt browser, not judged", f"/admin/projects/{slug}/data?judged=no"),
            ("run page", f"/admin/runs/{ids['run']}"),
            ("run page, live fragment", f"/admin/runs/{ids['run']}/live"),
            ("run metrics (charts)", f"/admin/runs/{ids['run']}/metrics.json"),
        ]
        rows = []
        with TestClient(app) as client:
            login(client)
            for label, path in pages:
                times = time_page(client, path, args.repeat)
                rows.append((label, path, statistics.median(times), percentile(times, 95)))
                print(f"{label:30s} p50 {rows[-1][2]:7.1f} ms   p95 {rows[-1][3]:7.1f} ms")
        app.state.engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    table = "\n".join(
        f"| {label} | `{path}` | {p50:.1f} | {p95:.1f} | {'met' if p95 <= 300 else 'MISSED'} |"
        for label, path, p50, p95 in rows
    )
    text = f"""{SECTION}

Console pages on a big project in PostgreSQL: {args.prompts:,} prompts (two answers and a pair
each), {args.judgments:,} judgments by {RATERS} raters, a PPO run with 2,000 steps of five
metrics. Each page requested {args.repeat} times after two warm-up requests, in-process (the
app's ASGI interface, an admin's session): wall time per request, which is the server's
render time plus the in-process client. Target: p95 ≤ 300 ms each. Seeding took
{seeded_s:.0f} s.

    {shlex.join([".venv/bin/python", "bench/admin_pages.py", *sys.argv[1:]])}

| page | path | p50 ms | p95 ms | target |
|---|---|---:|---:|---|
{table}

Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},
PostgreSQL on the same machine, load average {os.getloadavg()[0]:.1f} at the end.
"""
    if args.write_docs:
        write_section(SECTION, text)
        print("written to docs/benchmarks.md")
    else:
        print(text)


if __name__ == "__main__":
    main()
