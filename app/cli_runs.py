"""`verdict runs ...`, `verdict worker` and `verdict scheduler`."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.core.config import get_settings
from app.core.db import session_scope
from app.models import Run
from app.services import projects, runs
from app.services.dispatch import DEFAULT_QUEUE, GPU_QUEUE
from app.services.errors import InvalidInput, ServiceError

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
    with session_scope() as session:
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


@runs_app.command("start")
def start_run(
    project: Annotated[str, typer.Option(help="project slug")],
    kind: Annotated[str, typer.Option(help="generate (reward, ppo, dpo: later)")] = "generate",
    config: Annotated[str, typer.Option(help="run config as a JSON object")] = "{}",
) -> None:
    """Queue a run; prints its id (follow it with `verdict runs watch ID`)."""
    try:
        parsed = json.loads(config)
    except json.JSONDecodeError as exc:
        err.print(f"[red]error:[/red] --config is not valid JSON: {exc}")
        raise typer.Exit(1) from exc
    with session_scope() as session:
        try:
            run = runs.create_run(
                session,
                projects.get_project(session, project),
                kind,
                parsed,
                settings=get_settings(),
                trigger="cli",
            )
        except ServiceError as exc:
            _fail(exc)
        typer.echo(f"queued run {run.id} ({run.kind})")


@runs_app.command("cancel")
def cancel_run(run_id: Annotated[int, typer.Argument(help="run id")]) -> None:
    """Cancel a run (a queued one at once, a running one at its next step)."""
    with session_scope() as session:
        try:
            run = runs.cancel_run(session, runs.get_run(session, run_id), settings=get_settings())
        except ServiceError as exc:
            _fail(exc)
        stopping = " (stopping at its next step)" if run.status == "running" else ""
        typer.echo(f"run {run.id}: {run.status}{stopping}")


@runs_app.command("watch")
def watch_run(
    run_id: Annotated[int, typer.Argument(help="run id")],
    interval: Annotated[float, typer.Option(help="seconds between polls")] = 1.0,
) -> None:
    """Show a live progress bar until the run ends; exit 0 only if it succeeded."""
    columns = (
        TextColumn("[bold]run {task.fields[run_id]}[/] {task.fields[status]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[eta]} {task.fields[line]}"),
    )
    last_line = ""
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("run", total=None, run_id=run_id, status="", eta="", line="")
        while True:
            with session_scope() as session:
                try:
                    run = runs.get_run(session, run_id)
                except ServiceError as exc:
                    bar.stop()
                    _fail(exc)
                eta = runs.eta_seconds(run)
                lines = [line for line in run.log_tail.splitlines() if line]
                last_line = lines[-1] if lines else ""
                bar.update(
                    task,
                    completed=run.progress_done,
                    total=run.progress_total,
                    status=f"[{STATUS_STYLE.get(run.status, '')}]{run.status}[/]",
                    eta=f"eta {eta:.0f}s" if eta is not None else "",
                    line=last_line[:80],
                )
                status, error, result = run.status, run.error, run.result
            if runs.is_finished(run):
                break
            time.sleep(interval)
    if error:
        err.print(f"[red]error:[/red] {error}", highlight=False, markup=False)
    if result:
        out.print(json.dumps(result, indent=2, default=str), highlight=False)
    raise typer.Exit(0 if status == "succeeded" else 1)


def worker(
    queues: Annotated[str, typer.Option(help="comma-separated queues")] = (
        f"{GPU_QUEUE},{DEFAULT_QUEUE}"
    ),
    pool: Annotated[
        str, typer.Option(help="solo for model work (never forks after torch is loaded)")
    ] = "solo",
    concurrency: Annotated[int, typer.Option(help="ignored by the solo pool")] = 1,
    beat: Annotated[bool, typer.Option(help="also run the scheduler inside this worker")] = False,
    loglevel: Annotated[str, typer.Option()] = "info",
) -> None:
    """Start a Celery worker (model work: --pool=solo on the gpu queue)."""
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        f"--pool={pool}", f"--concurrency={concurrency}", "-Q", queues,
        f"--loglevel={loglevel}",
        # No gossip, mingle or worker events: they need broadcast, which the SQLite broker
        # lacks, and they slow the start of every worker.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    if beat:
        argv += ["--beat", f"--schedule={_schedule_file()}"]
    os.execv(sys.executable, argv)


def scheduler(loglevel: Annotated[str, typer.Option()] = "info") -> None:
    """Start Celery beat: the periodic reaper of dead runs and the sweep of expired leases."""
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
        f"--schedule={_schedule_file()}", f"--loglevel={loglevel}",
    ]  # fmt: skip
    os.execv(sys.executable, argv)


def _schedule_file() -> str:
    settings = get_settings()
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    return str(settings.var_dir / "celerybeat-schedule")
