"""Scale: the rater hot path on a database of 1,000,000 judgments against one of 1,000 pairs.

    .venv/bin/python bench/scale.py                          # seed, measure, drop
    .venv/bin/python bench/scale.py --keep                   # keep the big database (name printed)
    .venv/bin/python bench/scale.py --reuse verdict_scale_x  # measure a kept one again
    .venv/bin/python bench/scale.py --write-docs             # update docs/benchmarks.md

Two databases, migrated with `app.core.migrate.upgrade_database` and seeded by the same SQL
(`INSERT ... SELECT generate_series`, every constraint and foreign key in force) in the same
shape (the small one with more room left):

* large: 50,000 prompts with 5 responses each, 200,000 pairs (4 per prompt, 1 % gold), overlap
  6; 80 % of the pairs fully judged (6 judgments), 10 % with 2, 10 % untouched; 1,000,000
  judgments by 200 raters (about 5,000 each), each through its own submitted assignment, over
  the last 30 days;
* small: 250 prompts, 1,000 pairs, 1,000 judgments by 200 raters (5 each; 10 % of the pairs
  fully judged, 20 % with 2, so that the measured raters' rounds do not run it dry).

Each is measured the same way: `uvicorn --workers 2` (as `bench/rater_hot_path.py` starts it)
and `--raters` seeded raters (each with their whole history in the project) judging in a closed
loop with a short think time (`bench/load.py`'s client), so the figures are latency, not
queueing. The rounds alternate small and large. Then one next + submit of another rater runs
in-process with every statement recorded (an SQLAlchemy event listener) and rolled back, and
the recorded statements are replayed under `EXPLAIN (ANALYZE, BUFFERS)` in one transaction,
rolled back too: the plans of exactly what the hot path runs, on the large database.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from load import Ledger, Phase, closed_loop, new_client, run_client, start_server, stop
from rater_hot_path import PG_ADMIN_URL, free_port, percentile
from sections import DOCS, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.config import Settings  # noqa: E402
from app.core.db import make_engine, make_sessionmaker  # noqa: E402
from app.core.migrate import upgrade_database  # noqa: E402
from app.core.security import hash_password  # noqa: E402
from app.models import User  # noqa: E402
from app.services import assignment as assignment_service  # noqa: E402
from app.services import judgments, projects, users  # noqa: E402

SECTION = "## Scale"
SLUG = "bench"  # bench/load.py's client asks for this project
OVERLAP = 6
RATERS = 200
TARGET_RATIO = 1.5


@dataclass(frozen=True)
class Shape:
    """How much one database holds."""

    prompts: int
    pairs: int
    judgments: int
    full_share: float = 0.8  # of the pairs, fully judged

    @property
    def full(self) -> int:  # pairs with OVERLAP judgments
        return int(self.pairs * self.full_share)

    @property
    def partial(self) -> int:  # pairs with 2
        return (self.judgments - OVERLAP * self.full) // 2


LARGE = Shape(prompts=50_000, pairs=200_000, judgments=1_000_000)
# Room left for the measured raters' rounds (1,000 pairs at the large one's 80 % full would
# run dry in the first): 10 % fully judged, 20 % with 2 judgments.
SMALL = Shape(prompts=250, pairs=1_000, judgments=1_000, full_share=0.1)


# --------------------------------------------------------------------------- seeding


def seed(url: str, shape: Shape) -> None:
    """One project in `shape`, every row valid (see the module docstring)."""
    assert shape.pairs % shape.prompts == 0 and shape.pairs // shape.prompts == 4
    assert OVERLAP * shape.full + 2 * shape.partial == shape.judgments
    assert shape.full + shape.partial <= shape.pairs
    engine = sa.create_engine(url)
    with sa.orm.Session(engine) as session:
        project = projects.create_project(
            session, SLUG, "Scale", settings={"overlap": OVERLAP, "gold_rate": 0.05}
        )
        password = hash_password("not-used-by-anyone")
        session.add_all(
            User(email=f"rater{i}@bench.example", password_hash=password, role="rater")
            for i in range(RATERS)
        )
        session.commit()
        project_id = project.id
    params = {
        "project": project_id,
        "prompts": shape.prompts,
        "pairs": shape.pairs,
        "full": shape.full,
        "partial": shape.partial,
        "overlap": OVERLAP,
        "raters": RATERS,
        # Judgments spread over the last 30 days, in pair order.
        "step_s": 30 * 86_400 / (shape.pairs * OVERLAP),
    }
    statements = [
        # Prompts 1..P; responses 5 per prompt (ids 5p-4 .. 5p); pairs 4 per prompt.
        """INSERT INTO prompts (id, project_id, text, metadata, source, created_at)
           SELECT g, %(project)s, 'Question ' || g || ': explain item ' || g || ' in a few lines.',
                  '{}', 'bench', now() - interval '31 days'
           FROM generate_series(1, %(prompts)s) g""",
        """INSERT INTO responses (id, prompt_id, text, model_name, generation_params, truncated,
                                  created_at)
           SELECT 5 * (p - 1) + r, p, repeat('Answer ' || r || ' to question ' || p || '. ', 8),
                  'bench', '{}', false, now() - interval '31 days'
           FROM generate_series(1, %(prompts)s) p, generate_series(1, 5) r""",
        # Pair i (0-based) of prompt i / 4: responses (1,2), (1,3), (2,3), (4,5) of it.
        """INSERT INTO comparison_pairs (id, project_id, prompt_id, response_a_id, response_b_id,
                                         required_judgments, judgment_count, gold_choice,
                                         priority, kind, created_at)
           SELECT i + 1, %(project)s, i / 4 + 1,
                  5 * (i / 4) + (ARRAY[1, 1, 2, 4])[i %% 4 + 1],
                  5 * (i / 4) + (ARRAY[2, 3, 3, 5])[i %% 4 + 1],
                  %(overlap)s,
                  CASE WHEN i < %(full)s THEN %(overlap)s
                       WHEN i < %(full)s + %(partial)s THEN 2 ELSE 0 END,
                  CASE WHEN i %% 100 = 7 THEN 'a' END,
                  0, 'standard', now() - interval '31 days' + i * interval '1 millisecond'
           FROM generate_series(0, %(pairs)s - 1) i""",
        # Judgment k of pair i by rater (i + 31 k) mod R: 31 k mod 200 differs for k < 7, so a
        # pair's raters are distinct.
        """INSERT INTO assignments (project_id, pair_id, rater_id, status, shown_left, leased_at,
                                    expires_at, completed_at)
           SELECT %(project)s, p.id, r.ids[1 + (p.id - 1 + 31 * k) %% %(raters)s], 'submitted',
                  CASE WHEN (p.id + k) %% 2 = 0 THEN 'a' ELSE 'b' END,
                  t.at, t.at + interval '600 seconds', t.at + interval '40 seconds'
           FROM comparison_pairs p
           CROSS JOIN generate_series(0, %(overlap)s - 1) k
           CROSS JOIN (SELECT array_agg(id ORDER BY id) AS ids FROM users
                       WHERE email LIKE 'rater%%@bench.example') r
           CROSS JOIN LATERAL (SELECT now() - interval '30 days'
                               + ((p.id - 1) * %(overlap)s + k) * %(step_s)s
                                 * interval '1 second' AS at) t
           WHERE p.project_id = %(project)s AND k < p.judgment_count
           ORDER BY p.id, k""",
        """INSERT INTO judgments (project_id, pair_id, rater_id, assignment_id, choice, strength,
                                  aspects, rationale, flags, shown_left, time_on_task_ms,
                                  active_ms, gold_correct, source, extra, created_at)
           SELECT a.project_id, a.pair_id, a.rater_id, a.id,
                  (ARRAY['a', 'b', 'a', 'tie', 'b', 'both_bad'])[a.id %% 6 + 1],
                  (ARRAY[1, 2, 2, NULL, 1, NULL])[a.id %% 6 + 1],
                  '{"honesty": "a"}', '', '[]', a.shown_left, 40000, 30000,
                  CASE WHEN p.gold_choice IS NOT NULL
                       THEN (ARRAY['a', 'b', 'a', 'tie', 'b', 'both_bad'])[a.id %% 6 + 1]
                            = p.gold_choice END,
                  'rater', '{}', a.completed_at
           FROM assignments a JOIN comparison_pairs p ON p.id = a.pair_id
           WHERE a.project_id = %(project)s
           ORDER BY a.id""",
        # Explicit ids above: move the sequences past them.
        "SELECT setval(pg_get_serial_sequence('prompts', 'id'), (SELECT max(id) FROM prompts))",
        "SELECT setval(pg_get_serial_sequence('responses', 'id'), (SELECT max(id) FROM responses))",
        "SELECT setval(pg_get_serial_sequence('comparison_pairs', 'id'),"
        " (SELECT max(id) FROM comparison_pairs))",
    ]
    with engine.begin() as conn:
        for sql in statements:
            conn.exec_driver_sql(sql, params)
    engine.dispose()
    # As autovacuum would leave a database in use: statistics and the visibility map.
    maintenance = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with maintenance.connect() as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE)")
    maintenance.dispose()


def issue_tokens(url: str, raters: range) -> list[str]:
    """A fresh bearer token for each of these seeded raters (by index)."""
    engine = sa.create_engine(url)
    with sa.orm.Session(engine) as session:
        tokens = []
        for i in raters:
            user = session.scalars(
                sa.select(User).where(User.email == f"rater{i}@bench.example")
            ).one()
            tokens.append(users.create_token(session, user, "scale bench").secret)
        session.commit()
    engine.dispose()
    return tokens


def facts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        out = {
            table: int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())
            for table in ("prompts", "responses", "comparison_pairs", "assignments", "judgments")
        }
        out["database MB"] = int(
            conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one()
            // 2**20
        )
    engine.dispose()
    return out


@contextmanager
def database(name: str | None, shape: Shape, keep: bool) -> Iterator[str]:
    """The url of a seeded database: `name` as it is, or a fresh one (dropped unless `keep`)."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    fresh = name is None
    name = name or f"verdict_scale_{uuid.uuid4().hex[:8]}"
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    try:
        if fresh:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            t0 = time.monotonic()
            upgrade_database(Settings(database_url=url))
            seed(url, shape)
            print(f"seeded {name} ({shape.judgments:,} judgments) in {time.monotonic() - t0:.0f} s")
        else:  # kept from an earlier run: bring its schema up to this checkout's
            upgrade_database(Settings(database_url=url))
        yield url
    finally:
        if fresh and not keep:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        elif fresh:
            print(f"kept {name}: measure it again with --reuse {name}")
        admin.dispose()


# --------------------------------------------------------------------------- measuring


def measure(url: str, tokens: list[str], args: argparse.Namespace) -> Phase:
    """The hot path's latency on `url`: a closed loop of len(tokens) raters over HTTP."""
    port = free_port()
    with tempfile.TemporaryDirectory() as var_dir:
        server = start_server(url, port, var_dir, args.workers)
        try:
            return run_client(_loop(f"http://127.0.0.1:{port}", tokens, args))
        finally:
            stop(server)


async def _loop(base: str, tokens: list[str], args: argparse.Namespace) -> Phase:
    async with new_client(base, len(tokens)) as client:
        await closed_loop(client, tokens, args.warmup, Ledger(), "warm-up", args.think_s)
        return await closed_loop(client, tokens, args.seconds, Ledger(), "measured", args.think_s)


# --------------------------------------------------------------------------- plans


def hot_path_statements(url: str, token: str) -> list[tuple[str, dict[str, Any]]]:
    """What one API next + submit runs (token auth included), recorded and rolled back."""
    engine = make_engine(url)
    recorded: list[tuple[str, dict[str, Any]]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        recorded.append((statement, dict(parameters or {})))

    sa.event.listen(engine, "before_cursor_execute", record)
    session = make_sessionmaker(engine)()
    try:
        # The calls `RaterCall` and the two endpoints make, in one transaction.
        user = users.user_for_token(session, token)
        assert user is not None
        leased = assignment_service.next_assignment(session, SLUG, user)
        assert leased is not None, "the queue is empty"
        data = judgments.JudgmentInput(choice="a", strength=1, aspects={"honesty": "a"})
        judgments.submit(session, leased.id, user, data)
    finally:
        session.rollback()
        session.close()
        engine.dispose()
    return recorded


def explain(
    url: str, statements: list[tuple[str, dict[str, Any]]], *, seqscan: bool = True
) -> list[tuple[str, str]]:
    """`EXPLAIN (ANALYZE, BUFFERS)` of each statement, in order, in one rolled-back transaction.

    The lease the replayed claim inserts gets a new id: the statements after it are given that
    id instead of the recorded one, so they find (and lock, and update) the same rows. With
    `seqscan=False` the planner is told to avoid sequential scans (`enable_seqscan = off`):
    the plan it would take for a table once it outgrows a few pages.
    """
    engine = sa.create_engine(url)
    plans = []
    lease_id: int | None = None
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            if not seqscan:
                conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
            for sql, params in statements:
                if lease_id is not None and "assignment_id" in params:
                    params = {**params, "assignment_id": lease_id}
                rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                plans.append((sql, "\n".join(r[0] for r in rows)))
                if sql.startswith("INSERT INTO assignments"):
                    lease_id = conn.exec_driver_sql(
                        "SELECT max(id) FROM assignments WHERE rater_id = %(rater_id)s",
                        params,
                    ).scalar_one()
        finally:
            trans.rollback()
    engine.dispose()
    return plans


def table_rows(url: str) -> dict[str, int]:
    """Every table's row count as the planner knows it (pg_class.reltuples)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT relname, greatest(reltuples, 0)::bigint FROM pg_class"
            " WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
        ).all()
    engine.dispose()
    return {str(name): int(n) for name, n in rows}


SEQ_SCAN = re.compile(r"Seq Scan on (\w+)")
INDEX_SCAN = re.compile(r"(?:Index Only Scan|Index Scan|Bitmap Index Scan) using (\w+) on (\w+)")
# The tables that grow with the data; a sequential scan of one of them is a failure.
GROWING = {"prompts", "responses", "comparison_pairs", "assignments", "judgments"}


def seq_scan_tables(plans: list[tuple[str, str]]) -> set[str]:
    return {table for _, plan in plans for table in SEQ_SCAN.findall(plan)}


def indexes_used(plans: list[tuple[str, str]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for _, plan in plans:
        for index, table in INDEX_SCAN.findall(plan):
            found.setdefault(table, set()).add(index)
    return found


# --------------------------------------------------------------------------- the report


def latencies(phases: list[Phase]) -> tuple[list[float], list[float]]:
    """Next and submit latencies of every round."""
    return [v for p in phases for v in p.next_ms], [v for p in phases for v in p.submit_ms]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reuse", metavar="NAME", help="measure this seeded large database")
    parser.add_argument("--keep", action="store_true", help="keep the large database seeded here")
    parser.add_argument("--raters", type=int, default=4, help="concurrent raters measured")
    parser.add_argument("--think-s", type=float, default=0.1, help="mean think time per judgment")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating small/large rounds")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument(
        "--divide", type=int, default=1, help="seed the large database this many times smaller"
    )
    args = parser.parse_args()
    large = Shape(*(n // args.divide for n in (LARGE.prompts, LARGE.pairs, LARGE.judgments)))

    load_before = f"{os.getloadavg()[0]:.1f}"
    measured = range(args.raters)  # raters 0..n-1 judge; the next one is recorded for plans
    results: dict[str, list[Phase]] = {"small": [], "large": []}
    with (
        database(args.reuse, large, args.keep) as large_url,
        database(None, SMALL, keep=False) as small_url,
    ):
        tokens = {
            "small": issue_tokens(small_url, measured),
            "large": issue_tokens(large_url, measured),
        }
        urls = {"small": small_url, "large": large_url}
        for _ in range(args.rounds):
            for which in ("small", "large"):
                results[which].append(measure(urls[which], tokens[which], args))
                print(which, f"{results[which][-1].judgments} judgments")
        sizes = {"small": facts(small_url), "large": facts(large_url)}
        (explainer,) = issue_tokens(large_url, range(args.raters, args.raters + 1))
        statements = hot_path_statements(large_url, explainer)
        plans = explain(large_url, statements)
        forced = explain(large_url, statements, seqscan=False)
        rows_by_table = table_rows(large_url)
        engine = sa.create_engine(large_url)
        with engine.connect() as conn:
            pg_version = f"PostgreSQL {conn.exec_driver_sql('SHOW server_version').scalar()}"
        engine.dispose()
    report = summarize(results, sizes, plans, forced, rows_by_table)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" {pg_version}; {args.workers} uvicorn worker processes; {args.raters} raters, think"
        f" {args.think_s:g} s; {args.rounds} rounds of {args.seconds:g} s per database after"
        f" {args.warmup:g} s warm-up; load average (1 min) before {load_before}, after"
        f" {os.getloadavg()[0]:.1f}"
    )
    print(report)
    print(f"\nMachine: {machine}.")
    plans_text = format_plans(plans)
    print(plans_text)
    if args.write_docs:
        write_docs(report, plans_text, machine)


def summarize(
    results: dict[str, list[Phase]],
    sizes: dict[str, dict[str, int]],
    plans: list[tuple[str, str]],
    forced: list[tuple[str, str]],
    rows_by_table: dict[str, int],
) -> str:
    rows = {which: latencies(phases) for which, phases in results.items()}
    table = [
        "| database | judgments measured | next p50 / p99 ms | submit p50 / p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for which, (nxt, sub) in rows.items():
        table.append(
            f"| {which} ({sizes[which]['judgments']:,} judgments) | {len(sub)} |"
            f" {statistics.median(nxt):.1f} / {percentile(nxt, 99):.1f} |"
            f" {statistics.median(sub):.1f} / {percentile(sub, 99):.1f} |"
        )
    ratios = {
        call: percentile(rows["large"][i], 99) / percentile(rows["small"][i], 99)
        for call, i in (("next", 0), ("submit", 1))
    }
    scanned = seq_scan_tables(plans)
    growing = sorted(scanned & GROWING)
    instead = indexes_used(forced)
    lines = [
        *table,
        "",
        "- rows: "
        + "; ".join(
            f"{which}: " + ", ".join(f"{k} {v:,}" for k, v in size.items())
            for which, size in sizes.items()
        ),
        "- p99 large / small: "
        + ", ".join(
            f"{call} {r:.2f}x ({'met' if r <= TARGET_RATIO else 'MISSED'})"
            for call, r in ratios.items()
        )
        + f" (target <= {TARGET_RATIO}x)",
        f"- hot-path statements: {len(plans)} (plans below); indexes they use on the large"
        " database: "
        + "; ".join(
            f"{t} ({', '.join(sorted(ix))})" for t, ix in sorted(indexes_used(plans).items())
        ),
        "- sequential scans on the tables that grow with the data ("
        + ", ".join(sorted(GROWING))
        + f"): **{len(growing)}**"
        + (f" ({', '.join(growing)})" if growing else ""),
        "- sequential scans on small tables, which PostgreSQL reads whole because that is cheaper"
        " than an index at their size: "
        + (
            "; ".join(
                f"{t} ({rows_by_table.get(t, 0):,} rows; with `enable_seqscan = off`:"
                f" {', '.join(sorted(instead.get(t, set()))) or 'no index scan'})"
                for t in sorted(scanned - GROWING)
            )
            or "none"
        ),
    ]
    return "\n".join(lines)


def format_plans(plans: list[tuple[str, str]]) -> str:
    """Each statement and its plan, as the doc shows them."""
    out = []
    for i, (sql, plan) in enumerate(plans, 1):
        out += [
            f"{i}. `{' '.join(sql.split())[:90]}...`",
            "",
            *("       " + line for line in plan.splitlines()),
            "",
        ]
    return "\n".join(out)


def write_docs(report: str, plans: str, machine: str) -> None:
    command = "    " + shlex.join([".venv/bin/python", "bench/scale.py", *sys.argv[1:]])
    section = "\n".join(
        [
            SECTION,
            "",
            *INTRO,
            "",
            command,
            "",
            report,
            "",
            f"Machine: {machine}.",
            "",
            *FINDINGS,
            "",
            "The hot path's statements on the large database, in the order one next + submit runs",
            "them, with their plans:",
            "",
            plans,
        ]
    )
    write_section(SECTION, section)
    print(f"wrote {DOCS.relative_to(ROOT)} ({SECTION})")


INTRO = [
    "`bench/scale.py`: the rater hot path (`next` and submit over HTTP, `uvicorn --workers 2`",
    "as in `## Load`) on a database of 1,000,000 judgments against the same calls on one of",
    "1,000 pairs. Both are seeded by the same SQL (`INSERT ... SELECT generate_series` after",
    "the migrations, every constraint and foreign key checked): the large one",
    "has 50,000 prompts with 5 responses each, 200,000 pairs (4 per prompt, 1 % gold), overlap",
    "6, 80 % of the pairs fully judged, 10 % with 2 judgments, 10 % untouched, and 1,000,000",
    "judgments by 200 raters (about 5,000 each), each through its own submitted assignment; the",
    "small one has 1,000 pairs and 1,000 judgments (5 per rater; 10 % of its pairs full, so the",
    "measured rounds do not run it dry). The measured raters",
    "are seeded raters, so on the large database each brings a history of about 5,000",
    "judgments. Rounds alternate small and large. The plans are those of one next + submit",
    "(token auth included) recorded by an SQLAlchemy event listener in-process, rolled back, and",
    "replayed under `EXPLAIN (ANALYZE, BUFFERS)` in one transaction, rolled back too. Target:",
    "p99 on the large database within 1.5x of the small one's, index use and no sequential",
    "scan on the hot path.",
]
FINDINGS = [
    "What scale changed, and the fix (migration 0007): the claim leaves out every pair the",
    "rater was ever assigned or judged (`_untouched_by`, two hashed subplans over the rater's",
    "assignments and judgments in the project). Through the old indexes, `ix_assignments_rater`",
    "(rater_id, status) and `ix_judgments_rater_id`, each of the rater's rows cost a heap page:",
    "on the large database the claim read 9,983 buffers and took 47.6 ms for a rater with",
    "5,000 judgments (`Bitmap Heap Scan` on both tables), and `next` p99 was 182.1 ms against",
    "39.9 ms on the small database (4.57x; submit 95.5 against 39.7 ms, 2.41x; first run of this",
    "script, 1 round of 10 s, load average 4.7-6.3). With `ix_assignments_rater_history` and",
    "`ix_judgments_rater_history` on (rater_id, project_id, pair_id) both subplans are index-only",
    "scans (a few heap fetches for pages changed since the last vacuum; the claim's time is",
    "in its plan below). The work still grows with the rater's own history (two index-only",
    "scans of about 0.1 ms per 1,000 of their judgments each), not with the database.",
    "Building the two indexes on the large database took 3.5 s.",
    "",
    "Sequential scans in the plans are on the small tables only: users (200 rows), api_tokens,",
    "projects (1 row) and project_members (empty), where reading the table is cheaper than an",
    "index; the line above names the index each would use with `enable_seqscan = off`, the plan",
    "PostgreSQL takes once such a table outgrows a few pages. The latency figures are from a",
    "machine shared with other engineers' test runs (load average above), so a single p99 moves",
    "by tens of milliseconds between runs; more `--rounds` narrow it.",
]


if __name__ == "__main__":
    main()
