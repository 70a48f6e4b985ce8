"""`verdict runs ...`, `verdict worker` and `verdict scheduler`, and the CLI's way into the
database (`database_session`).

The database layer and the services are imported inside the commands that use them, here and
in `app.cli`: SQLAlchemy, pydantic-settings and the models take ~0.4 s to import on two cores,
which `verdict --help` and the commands that only start another program (worker, scheduler,
serve) would otherwise pay for nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from app.kinds.queues import DEFAULT_QUEUE, GPU_QUEUE, SOLE_WORKER_ENV
from app.services.errors import InvalidInput, ServiceError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.models import Run

runs_app = typer.Typer(help="Runs: generation and training jobs.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

STATUS_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def require_database() -> None:
    """Exit with a clear message unless the configured database exists and is migrated.

    Every command that uses the database calls this before its first session, so a command run
    from the wrong directory neither creates an empty SQLite file nor dies on a missing table.
    """
    from app.core.migrate import DatabaseNotReady, check_database

    try:
        check_database()
    except DatabaseNotReady as exc:
        # soft_wrap: a long path stays on one line, whole, to copy or grep
        err.print(f"[red]error:[/red] {escape(exc.problem)}", highlight=False, soft_wrap=True)
        err.print(exc.hint, highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from None


@contextmanager
def database_session() -> Iterator[Session]:
    """A command's unit of work on the configured database (committed when the command's block
    ends), once `require_database` has found it there and migrated."""
    from app.core.db import unit_of_work

    require_database()
    with unit_of_work() as session:
        yield session


def _fail(exc: ServiceError) -> None:
    err.print(f"[red]error:[/red] {exc.message}", highlight=False)
    if isinstance(exc, InvalidInput):
        for e in exc.errors:
            err.print(f"  {e.field or '-'}: {e.message}", highlight=False, markup=False)
    raise typer.Exit(1)


def _progress_text(run: Run) -> str:
    total = "?" if run.progress_total is None else str(run.progress_total)
    return f"{run.progress_done}/{total}"


@runs_app.command("list")
def list_runs(
    project: Annotated[str, typer.Option(help="project slug")] = "demo",
    status: Annotated[str | None, typer.Option(help="only runs in this status")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
) -> None:
    """List a project's runs, newest first."""
    from app.services import projects, runs

    with database_session() as session:
        try:
            rows = runs.list_runs(
                session, projects.get_project(session, project), status=status, limit=limit
            )
        except ServiceError as exc:
            _fail(exc)
        table = Table("id", "kind", "status", "progress", "trigger", "created", "error")
        for run in rows:
            table.add_row(
                str(run.id),
                run.kind,
                f"[{STATUS_STYLE.get(run.status, '')}]{run.status}[/]",
                _progress_text(run),
                run.trigger,
                f"{run.created_at:%Y-%m-%d %H:%M:%S}",
                (run.error or "")[:60],
            )
    out.print(table)


def run_kind(value: str) -> str:
    """A launchable run kind, checked against the registry (`app.kinds.registry`), which is
    imported only when a kind is given, so other commands do not pay for it."""
    from app.kinds.registry import LAUNCHABLE_KINDS

    if value not in LAUNCHABLE_KINDS:
        raise typer.BadParameter(
            f"unknown run kind {value!r}; use one of {', '.join(LAUNCHABLE_KINDS)}"
        )
    return value


KIND_HELP = "a run kind (`verdict runs kinds` lists them)"


def _settings_from(config: str, assignments: list[str]) -> dict[str, object]:
    """`--config` (a JSON object) with each `--set name=value` on top; a value is read as JSON
    when it parses (numbers, true/false, null, lists), else as a string."""
    try:
        parsed = json.loads(config)
    except json.JSONDecodeError as exc:
        err.print(f"[red]error:[/red] --config is not valid JSON: {exc}")
        raise typer.Exit(1) from exc
    if not isinstance(parsed, dict):
        err.print("[red]error:[/red] --config must be a JSON object")
        raise typer.Exit(1)
    for item in assignments:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            err.print(f"[red]error:[/red] --set {item!r}: write it as name=value")
            raise typer.Exit(1)
        try:
            parsed[name] = json.loads(raw)
        except json.JSONDecodeError:
            parsed[name] = raw
    return parsed


@runs_app.command("start")
def start_run(
    project: Annotated[str, typer.Option(help="project slug")],
    kind: Annotated[str, typer.Option(parser=run_kind, metavar="KIND", help=KIND_HELP)] = (
        "generate"
    ),
    config: Annotated[str, typer.Option(help="the run's knobs as a JSON object")] = "{}",
    set_: Annotated[
        list[str],
        typer.Option("--set", help="one knob as name=value (repeatable; see `runs knobs KIND`)"),
    ] = [],  # noqa: B006 - typer reads the default, it is never mutated
) -> None:
    """Queue a run; prints its id (follow it with `verdict runs watch ID`)."""
    parsed = _settings_from(config, set_)
    from app.core.config import get_settings
    from app.services import projects, runs

    with database_session() as session:
        try:
            run = runs.create_run(
                session,
                projects.get_project(session, project),
                kind,
                parsed,
                settings=get_settings(),
                trigger="cli",
                launchable_only=True,
            )
        except ServiceError as exc:
            _fail(exc)
    typer.echo(f"queued run {run.id} ({run.kind})")


@runs_app.command("kinds")
def list_kinds() -> None:
    """The kinds of run `runs start` can queue."""
    from app.kinds.registry import LAUNCHABLE_KINDS, RUN_KINDS

    table = Table("kind", "what it does", "queue", "resumable")
    for name in LAUNCHABLE_KINDS:
        kind = RUN_KINDS[name]
        table.add_row(name, kind.summary, kind.queue, "yes" if kind.resumable else "no")
    out.print(table)


@runs_app.command("knobs")
def list_knobs(
    kind: Annotated[str, typer.Argument(parser=run_kind, metavar="KIND", help=KIND_HELP)],
) -> None:
    """Every knob of a kind: type, default, bounds and what it does (set with --set)."""
    from app.kinds.knobs import knob_table
    from app.kinds.registry import RUN_KINDS

    table = Table("knob", "type", "default", "bounds", "what it does")
    for row in knob_table(RUN_KINDS[kind].config):
        table.add_row(
            row["name"],
            row["type"] + (" | null" if row["nullable"] else ""),
            json.dumps(row["default"]),
            _bounds(row),
            row["help"] + (f" One of: {', '.join(row['choices'])}." if row["choices"] else ""),
        )
    out.print(table)


def _bounds(row: dict[str, object]) -> str:
    low = (
        ""
        if row["minimum"] is None
        else f"{'>' if row['exclusive_minimum'] else '≥'} {row['minimum']}"
    )
    high = (
        ""
        if row["maximum"] is None
        else f"{'<' if row['exclusive_maximum'] else '≤'} {row['maximum']}"
    )
    return ", ".join(part for part in (low, high) if part)


@runs_app.command("cancel")
def cancel_run(run_id: Annotated[int, typer.Argument(help="run id")]) -> None:
    """Cancel a run (a queued one at once, a running one at its next step)."""
    from app.core.config import get_settings
    from app.services import runs

    with database_session() as session:
        try:
            run = runs.cancel_run(session, runs.get_run(session, run_id), settings=get_settings())
        except ServiceError as exc:
            _fail(exc)
        stopping = " (stopping at its next step)" if run.status == "running" else ""
        typer.echo(f"run {run.id}: {run.status}{stopping}")


def clock(seconds: float | None) -> str:
    """A duration as h:mm:ss ("0:03:07"); "-" when unknown (the shell's plain dash)."""
    from app.services.runs import format_duration

    return format_duration(seconds, unknown="-")


def _elapsed(run: Run) -> float | None:
    from app.services.runs import elapsed_seconds

    return elapsed_seconds(run)


@runs_app.command("watch")
def watch_run(
    run_id: Annotated[int, typer.Argument(help="run id")],
    interval: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
) -> None:
    """Follow a run until it ends: a live progress bar on a terminal, else one line per change
    of progress (for logs and pipes); exit 0 only if it succeeded."""
    from app.core.db import unit_of_work
    from app.services import runs

    require_database()  # once; the polls below open plain sessions
    # A live bar only where it can redraw itself; a pipe or a file gets lines, since rich
    # writes nothing of a live display to a stream that is not interactive until it stops.
    follow = _BarFollower(run_id) if err.is_interactive else _LineFollower(run_id)
    with follow:
        while True:
            with unit_of_work() as session:
                try:
                    run = runs.get_run(session, run_id)
                except ServiceError as exc:
                    follow.close()
                    _fail(exc)
                follow.show(run, runs.eta_seconds(run))
                status, error, result = run.status, run.error, run.result
            if runs.is_finished(run):
                break
            time.sleep(interval)
    if error:
        err.print(f"[red]error:[/red] {error}", highlight=False, markup=False)
    if result:
        out.print(json.dumps(result, indent=2, default=str), highlight=False)
    raise typer.Exit(0 if status == "succeeded" else 1)


class _LineFollower:
    """One plain line on stderr each time the run's status or progress changes:
    `run 12 running 3/10 elapsed 0:00:41 eta 0:01:36`."""

    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        self.last: tuple[str, int, int | None] | None = None

    def __enter__(self) -> _LineFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def show(self, run: Run, eta: float | None) -> None:
        state = (run.status, run.progress_done, run.progress_total)
        if state == self.last:
            return
        self.last = state
        line = (
            f"run {self.run_id} {run.status} {_progress_text(run)}"
            f" elapsed {clock(_elapsed(run))} eta {clock(eta)}"
        )
        typer.echo(line, err=True)  # click flushes: a pipe's reader sees each line at once


class _BarFollower:
    """A rich progress bar on the terminal, with the run's elapsed time and ETA."""

    def __init__(self, run_id: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(
            TextColumn("[bold]run {task.fields[run_id]}[/] {task.fields[status]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[elapsed]}"),
            TextColumn("{task.fields[eta]} {task.fields[line]}"),
            console=err,
            transient=False,
        )
        self.task = self.bar.add_task(
            "run", total=None, run_id=run_id, status="", elapsed="", eta="", line=""
        )

    def __enter__(self) -> _BarFollower:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.bar.stop()

    def show(self, run: Run, eta: float | None) -> None:
        lines = [line for line in run.log_tail.splitlines() if line]
        self.bar.update(
            self.task,
            completed=run.progress_done,
            total=run.progress_total,
            status=f"[{STATUS_STYLE.get(run.status, '')}]{run.status}[/]",
            elapsed=clock(_elapsed(run)),
            eta=f"eta {clock(eta)}" if eta is not None else "",
            line=escape((lines[-1] if lines else "")[:80]),
        )


def worker(
    queues: Annotated[str, typer.Option("--queues", "-Q", help="comma-separated queues")] = (
        f"{GPU_QUEUE},{DEFAULT_QUEUE}"
    ),
    pool: Annotated[
        str, typer.Option(help="solo for model work (never forks after torch is loaded)")
    ] = "solo",
    concurrency: Annotated[int, typer.Option(help="ignored by the solo pool")] = 1,
    beat: Annotated[bool, typer.Option(help="also run the scheduler inside this worker")] = False,
    name: Annotated[
        str | None,
        typer.Option(
            help="node name; default: the queues at the host (gpu@%h, default@%h), so workers of"
            " different queues on one host never share one (%h is the host name)"
        ),
    ] = None,
    sole: Annotated[
        bool,
        typer.Option(
            help="this is the only worker of its queues: at start it requeues their runs still"
            " marked running (left by a stopped deployment) instead of waiting for the reaper"
        ),
    ] = False,
    loglevel: Annotated[str, typer.Option()] = "info",
) -> None:
    """Start a Celery worker (model work: --pool=solo on the gpu queue). At start it sends again
    the message of every queued run of its queues, so nothing stays queued with nobody on it."""
    argv = worker_argv(queues, pool=pool, concurrency=concurrency, name=name, loglevel=loglevel)
    if beat:
        argv += ["--beat", f"--schedule={_schedule_file()}"]
    env = {**os.environ, SOLE_WORKER_ENV: "1" if sole else ""}
    os.execve(sys.executable, argv, env)


def default_node_name(queues: str) -> str:
    """`gpu@%h`, `default@%h`, `gpu-default@%h`: one name per set of queues on a host (Celery
    expands %h). Two workers of one queue on one host still need `--name` (`gpu1@%h`)."""
    names = [q.strip() for q in queues.split(",") if q.strip()]
    return f"{'-'.join(names) or 'celery'}@%h"


def worker_argv(
    queues: str, *, pool: str, concurrency: int, name: str | None, loglevel: str
) -> list[str]:
    """The `celery worker` command line that `verdict worker` runs."""
    return [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        f"--pool={pool}", f"--concurrency={concurrency}", "-Q", queues,
        "-n", name or default_node_name(queues), f"--loglevel={loglevel}",
        # No gossip, mingle or worker events: they need broadcast, which the SQLite broker
        # lacks, and they slow the start of every worker.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def scheduler(loglevel: Annotated[str, typer.Option()] = "info") -> None:
    """Start Celery beat: the periodic reaper of dead runs and the sweep of expired leases."""
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
        f"--schedule={_schedule_file()}", f"--loglevel={loglevel}",
    ]  # fmt: skip
    os.execv(sys.executable, argv)


def _schedule_file() -> str:
    from app.core.config import get_settings

    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    return str(settings.var_dir / "celerybeat-schedule")
