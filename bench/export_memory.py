"""Exports in constant memory: the peak RSS of exporting every format of a project with
10,000 judgments and of one with 1,000,000, through the exports service, on PostgreSQL (and
SQLite with `--backends`).

    .venv/bin/python bench/export_memory.py                       # 10k and 1M, PostgreSQL
    .venv/bin/python bench/export_memory.py --write-docs          # and update docs/benchmarks.md
    .venv/bin/python bench/export_memory.py --sizes 10000 100000 --backends sqlite postgresql

Each size gets a fresh database (PostgreSQL: created and dropped; SQLite: a file in a temporary
directory), migrated, and one project seeded in SQL (a recursive series, so a million
judgments take seconds): a prompt with two answers and one comparison pair per four
judgments, four raters on every pair, choices mostly decisive with some ties, strengths 1 and
2, every 50th judgment flagged. Then each format is exported in a fresh child process
(`prepare_export` + `stream_export` into /dev/null, the current state: what a new snapshot
would take, or every judgment for the raw formats), which reports its peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), the rows it wrote and the time it took. A child
that only imports and prepares gives the baseline every export starts from. Memory is flat
when the peak at 1M is the peak at 10k.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.config import Settings  # noqa: E402
from app.core.migrate import upgrade_database  # noqa: E402

PG_ADMIN_URL = os.environ.get(
    "VERDICT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
FORMATS = ("trl", "hh", "raw-jsonl", "raw-csv")
RATERS = 4
HEADING = "## Exports: memory and speed"


def series(n: int) -> str:
    """A recursive CTE of 1..n as `s(g)`, the same SQL on PostgreSQL and SQLite."""
    return f"WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < {int(n)})"


def seed(url: str, judgments: int) -> None:
    """One project, `slug` "big", with `judgments` judgments (see the module docstring)."""
    upgrade_database(Settings(database_url=url))
    engine = sa.create_engine(url)
    pairs = -(-judgments // RATERS)
    pg = engine.dialect.name == "postgresql"
    json_type = "jsonb" if pg else "text"
    when: Any = datetime(2026, 11, 1, 9, tzinfo=UTC) if pg else "2026-11-01 09:00:00.000000"
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO projects (slug, name, guidelines, settings, created_at)"
                " VALUES ('big', 'Big', '', '{}', :t)"
            ),
            {"t": when},
        )
        pid = conn.scalar(sa.text("SELECT id FROM projects WHERE slug = 'big'"))
        for i in range(RATERS):
            conn.execute(
                sa.text(
                    "INSERT INTO users (email, password_hash, role, is_active, created_at)"
                    " VALUES (:e, 'x', 'rater', true, :t)"
                ),
                {"e": f"rater{i}@bench.example", "t": when},
            )
        first_rater = conn.scalar(sa.text("SELECT min(id) FROM users"))
        conn.execute(
            sa.text(
                series(pairs) + " INSERT INTO prompts (project_id, external_id, text, metadata,"
                " source, created_at) SELECT :p, 'q' || g, 'Question ' || g || ': how would you"
                " explain thing number ' || g || ' to a new engineer, briefly and kindly?',"
                " '{}', 'upload', :t FROM s"
            ),
            {"p": pid, "t": when},
        )
        for side in ("a", "b"):
            conn.execute(
                sa.text(
                    "INSERT INTO responses (prompt_id, text, model_name, truncated,"
                    " generation_params, created_at) SELECT id, 'Answer " + side + " to prompt '"
                    " || id || '. It walks through the idea step by step, gives an example and"
                    " ends with a short summary of what to remember. ' || external_id,"
                    " 'base', false, '{}', :t FROM prompts WHERE project_id = :p ORDER BY id"
                ),
                {"p": pid, "t": when},
            )
        conn.execute(
            sa.text(
                "INSERT INTO comparison_pairs (project_id, prompt_id, response_a_id,"
                " response_b_id, required_judgments, judgment_count, priority, kind, created_at)"
                " SELECT :p, r.prompt_id, min(r.id), max(r.id), :k, :k, 0, 'standard', :t"
                " FROM responses r GROUP BY r.prompt_id ORDER BY r.prompt_id"
            ),
            {"p": pid, "k": RATERS, "t": when},
        )
        conn.execute(
            sa.text(
                series(RATERS) + " INSERT INTO judgments (project_id, pair_id, rater_id, choice,"
                " strength, aspects, rationale, flags, shown_left, time_on_task_ms, active_ms,"
                " source, extra, created_at)"
                " SELECT :p, c.id, :r0 + s.g - 1,"
                " CASE WHEN (c.id + s.g) % 11 = 0 THEN 'tie' WHEN (c.id + s.g) % 3 = 0 THEN 'b'"
                " ELSE 'a' END,"
                " CASE WHEN (c.id + s.g) % 11 = 0 THEN NULL ELSE 1 + (c.id + s.g) % 2 END,"
                " '{}', 'Clearer, and it answers the question.',"
                " CAST(CASE WHEN (c.id * 4 + s.g) % 50 = 0 THEN '[\"unsafe\"]' ELSE '[]' END AS "
                + json_type
                + "),"
                " CASE WHEN s.g % 2 = 0 THEN 'a' ELSE 'b' END, 12000, 9000, 'rater', '{}', :t"
                " FROM comparison_pairs c, s WHERE c.project_id = :p"
                " ORDER BY c.id, s.g LIMIT :n"
            ),
            {"p": pid, "r0": first_rater, "t": when, "n": judgments},
        )
    if pg:
        with sa.create_engine(url, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()


def child(url: str, fmt: str | None) -> None:
    """Export `fmt` of project "big" into /dev/null (or, with no format, only prepare one) and
    print what it cost as one JSON line."""
    from app.core.db import make_engine, make_sessionmaker
    from app.services import exports, projects

    session = make_sessionmaker(make_engine(url, sqlite_immediate=False))()
    start = time.perf_counter()
    plan = exports.prepare_export(
        session, projects.get_project(session, "big"), fmt or "trl", secret_key="bench"
    )
    size = lines = 0
    if fmt is not None:
        with open(os.devnull, "wb") as sink:
            for chunk in exports.stream_export(session, plan):
                sink.write(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mb": peak_mb, "seconds": seconds, "bytes": size, "lines": lines}))


def measure(url: str, fmt: str | None) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", url, "--format", fmt or "-"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def database(backend: str, tmp: Path) -> tuple[str, Any]:
    """A fresh database URL and a function that removes it."""
    if backend == "sqlite":
        path = tmp / f"export-{uuid.uuid4().hex[:8]}.db"
        return f"sqlite:///{path}", lambda: path.unlink(missing_ok=True)
    name = f"verdict_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return url, drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--backends", nargs="+", default=["postgresql"])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--child", metavar="URL")
    parser.add_argument("--format")
    args = parser.parse_args()
    if args.child:
        child(args.child, None if args.format == "-" else args.format)
        return
    rows: list[tuple[str, int, str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            for size in args.sizes:
                url, drop = database(backend, Path(tmp))
                try:
                    start = time.perf_counter()
                    seed(url, size)
                    print(f"{backend} {size:,}: seeded in {time.perf_counter() - start:.1f} s")
                    base = measure(url, None)
                    rows.append((backend, size, "(prepare only)", base))
                    for fmt in args.formats:
                        result = measure(url, fmt)
                        rows.append((backend, size, fmt, result))
                        print(
                            f"  {fmt}: peak {result['peak_mb']:.0f} MB, {result['lines']:,}"
                            f" lines in {result['seconds']:.1f} s", flush=True
                        )  # fmt: skip
                finally:
                    drop()
    table = render(rows)
    print(table)
    if args.write_docs:
        command = "python bench/export_memory.py " + shlex.join(sys.argv[1:])
        write_section(HEADING, doc(table, command.replace(" --write-docs", "")))


def render(rows: list[tuple[str, int, str, dict[str, Any]]]) -> str:
    lines = [
        "| backend | judgments | format | peak RSS | rows written | time | rows/s | file size |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for backend, size, fmt, r in rows:
        rate = f"{r['lines'] / r['seconds']:,.0f}" if r["lines"] else "—"
        lines.append(
            f"| {backend} | {size:,} | {fmt} | {r['peak_mb']:.0f} MB | {r['lines']:,} |"
            f" {r['seconds']:.1f} s | {rate} | {r['bytes'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines)


def doc(table: str, command: str) -> str:
    cpu = platform.processor() or platform.machine()
    return f"""{HEADING}

`{command}` ({cpu}, {os.cpu_count()} cores shared with other work; PostgreSQL on the same
machine). Each export runs in a fresh process through the exports service into /dev/null and
reports its peak RSS; "(prepare only)" is a process that imports the app and checks the
parameters without streaming, the floor every export starts from. The current state is
exported (trl and hh: the judgments a new default snapshot would take, ties left out; raw:
every judgment, ties included). Rows are read in keyset batches of 1,000 (pair-complete for
trl and hh, so aggregations see a pair's judgments together) and the read transaction ends
after each batch.

{table}

What is not flat, by design: a snapshot export keeps the snapshot's judgment ids as a packed
array (8 bytes a judgment, 8 MB for a million) and first re-reads the snapshot to check its
content hash (one more pass, the check a training run makes); a `reliability` aggregation
holds the votes the reliability model is fitted to (one small object a decisive judgment).
"""


if __name__ == "__main__":
    main()
