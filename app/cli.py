"""The `verdict` command line.

Commands import the database layer and the services when they run, not at the top: see
`app.cli_runs`, which also holds `database_session`, the check-then-open every database
command starts with.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Console

from app.cli_runs import database_session, runs_app, scheduler, worker
from app.services.errors import InvalidInput, ServiceError

app = typer.Typer(help="Verdict: a self-hosted RLHF workbench.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
user_app = typer.Typer(help="Users.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
project_app = typer.Typer(help="Projects.", no_args_is_help=True)
prompts_app = typer.Typer(help="Prompts.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")
app.add_typer(project_app, name="project")
app.add_typer(prompts_app, name="prompts")
app.add_typer(runs_app, name="runs")
app.command()(worker)
app.command()(scheduler)

err = Console(stderr=True)


def fail(exc: ServiceError) -> None:
    err.print(f"[red]error:[/red] {exc.message}", highlight=False)
    if isinstance(exc, InvalidInput):
        for e in exc.errors:
            where = ", ".join(
                part for part in (f"line {e.line}" if e.line else "", e.field or "") if part
            )
            err.print(f"  {where or '-'}: {e.message}", highlight=False, markup=False)
    raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply all migrations to the configured database."""
    from app.core.config import get_settings
    from app.core.migrate import upgrade_database

    upgrade_database(get_settings())
    typer.echo("database is at the latest revision")


@user_app.command("create")
def user_create(
    email: Annotated[str, typer.Option(help="login email")],
    password: Annotated[str, typer.Option(help="at least 8 characters")],
    role: Annotated[str, typer.Option(help="admin, reviewer or rater")] = "rater",
) -> None:
    """Create a user."""
    from app.services import users

    with database_session() as session:
        try:
            user = users.create_user(session, email, password, role)
        except ServiceError as exc:
            fail(exc)
        typer.echo(f"created {user.role} {user.email} (id {user.id})")


@user_app.command("password")
def user_password(
    email: Annotated[str, typer.Option()],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True)],
) -> None:
    """Set a user's password."""
    from app.services import users

    with database_session() as session:
        user = users.get_user_by_email(session, email)
        if user is None:
            err.print(f"[red]error:[/red] no user with email {email}")
            raise typer.Exit(1)
        try:
            users.set_password(session, user, password)
        except ServiceError as exc:
            fail(exc)
        typer.echo(f"password changed for {user.email}")


@token_app.command("create")
def token_create(
    email: Annotated[str, typer.Option(help="the token's owner")],
    name: Annotated[str, typer.Option(help="what the token is for")],
    scope: Annotated[
        str,
        typer.Option(
            help="read, rater or admin (everything the role allows); empty: the widest"
            " the owner's role allows"
        ),
    ] = "",
    expires_in_days: Annotated[
        int | None, typer.Option(help="days until it stops working; omitted: never", min=1)
    ] = None,
) -> None:
    """Create an API token; the token alone is the last line of output."""
    from app.services import users

    with database_session() as session:
        user = users.get_user_by_email(session, email)
        if user is None:
            err.print(f"[red]error:[/red] no user with email {email}")
            raise typer.Exit(1)
        try:
            issued = users.create_token(
                session, user, name, scope=scope, expires_in_days=expires_in_days
            )
        except ServiceError as exc:
            fail(exc)
        expiry = issued.token.expires_at
        until = f"until {expiry:%Y-%m-%d %H:%M} UTC" if expiry else "no expiry"
        typer.echo(
            f"token {issued.token.prefix}… for {user.email} (scope {issued.token.scope}, {until});"
            " it is shown only now:"
        )
        typer.echo(issued.secret)


@project_app.command("create")
def project_create(
    slug: Annotated[str, typer.Option()],
    name: Annotated[str, typer.Option()],
    guidelines: Annotated[Path | None, typer.Option(help="a markdown file")] = None,
) -> None:
    """Create a project."""
    from app.services import projects

    with database_session() as session:
        try:
            project = projects.create_project(
                session, slug, name, guidelines=guidelines.read_text() if guidelines else ""
            )
        except ServiceError as exc:
            fail(exc)
        typer.echo(f"created project {project.slug} (id {project.id})")


@prompts_app.command("import")
def prompts_import(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL or CSV")],
    project: Annotated[str, typer.Option(help="project slug")],
) -> None:
    """Import prompts from a file, with the same validation and report as the API."""
    from rich.progress import Progress

    from app.core.config import get_settings
    from app.services import generation, projects, prompts

    settings = get_settings()
    size = file.stat().st_size
    if size > settings.max_upload_bytes:
        err.print(
            f"[red]error:[/red] {file} is {size} bytes; the limit is {settings.max_upload_bytes}"
            " (VERDICT_MAX_UPLOAD_BYTES)"
        )
        raise typer.Exit(1)
    with database_session() as session, Progress(console=err, transient=True) as bar:
        task = bar.add_task("validating", total=None)
        try:
            target = projects.get_project(session, project)
            records = prompts.parse_upload(
                file.read_bytes(),
                file.name,
                None,
                settings.max_upload_records,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
            bar.update(task, description="storing")
            result = prompts.store_prompts(session, target, records, source="cli")
            run = generation.queue_generation_after_upload(
                session, target, result.prompt_ids, settings=settings
            )
        except ServiceError as exc:
            bar.stop()
            fail(exc)
    typer.echo(
        f"created {result.created}, duplicates {result.duplicates}, errors 0,"
        f" responses {result.responses_created}, pairs {result.pairs_created}"
    )
    if run is not None:
        typer.echo(f"queued generation run {run.id} (follow it: verdict runs watch {run.id})")


@app.command("import")
def import_preferences(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL, gzip or not")],
    project: Annotated[str, typer.Option(help="project slug")],
    format: Annotated[str, typer.Option(help="hh-rlhf, trl or auto")] = "auto",
    source: Annotated[str, typer.Option(help="name the judgments are attributed to")] = "hh-rlhf",
) -> None:
    """Import preference pairs (HH-RLHF or TRL format) as complete comparisons."""
    from app.core.config import get_settings
    from app.services import imports, projects

    settings = get_settings()
    if format not in imports.FORMATS:
        err.print(f"[red]error:[/red] --format must be one of {', '.join(imports.FORMATS)}")
        raise typer.Exit(1)
    with database_session() as session:
        try:
            target = projects.get_project(session, project)
            records, skipped = imports.parse_preferences(
                file.read_bytes(),
                cast(imports.Format, format),
                settings.max_upload_records,
                settings.max_upload_bytes,
            )
            result = imports.store_preferences(
                session, target, records, source=source, skipped=skipped
            )
        except ServiceError as exc:
            fail(exc)
    for item in result.skipped:
        err.print(f"  skipped line {item['line']}: {item['reason']}", highlight=False)
    typer.echo(
        f"created {result.created}, duplicates {result.duplicates}, errors 0,"
        f" skipped {len(result.skipped)}, prompts {result.prompts_created}"
    )


@app.command("export")
def export_data(
    project: Annotated[str, typer.Argument(help="project slug")],
    format: Annotated[str, typer.Option(help="trl, hh, raw-jsonl or raw-csv")] = "trl",
    snapshot: Annotated[int | None, typer.Option(help="export this snapshot, whole")] = None,
    since: Annotated[str | None, typer.Option(help="judgments made at or after (ISO 8601)")] = None,
    until: Annotated[str | None, typer.Option(help="judgments made before (ISO 8601)")] = None,
    pseudonymize: Annotated[
        bool, typer.Option("--pseudonymize", help="raw formats: raters as stable pseudonyms")
    ] = False,
    salt: Annotated[
        str | None, typer.Option(help="key of the pseudonyms (the same salt links exports)")
    ] = None,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="file to write, or - for stdout (default: a name"
                     " saying what was exported, in the current directory)"),
    ] = None,
) -> None:  # fmt: skip
    """Export a project's training examples or judgments, streamed (as the API's /export)."""
    import os

    from app.core.config import get_settings
    from app.core.db import unit_of_work
    from app.services import exports, projects

    with database_session() as session:
        try:
            plan = exports.prepare_export(
                session,
                projects.get_project(session, project),
                format,
                snapshot_id=snapshot,
                since=since,
                until=until,
                pseudonymize=pseudonymize,
                salt=salt,
                secret_key=get_settings().resolved_secret_key(),
            )
        except ServiceError as exc:
            fail(exc)
        exports.record_export(session, plan, actor_id=None)
    target = output or plan.filename
    written = 0
    with unit_of_work() as session:
        if target == "-":
            for chunk in exports.stream_export(session, plan):
                sys.stdout.buffer.write(chunk)
                written += len(chunk)
            sys.stdout.buffer.flush()
        else:
            # Written beside the target and renamed at the end: never a half file under its name.
            partial = Path(target).with_name(Path(target).name + ".part")
            try:
                with partial.open("wb") as f:
                    for chunk in exports.stream_export(session, plan):
                        f.write(chunk)
                        written += len(chunk)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
    err.print(
        f"exported {written} bytes ({plan.format}) to {target}", highlight=False, soft_wrap=True
    )


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the web app and API (with several workers, /metrics sums them all)."""
    import uvicorn

    from app.core.config import get_settings

    # Before anything imports prometheus_client (app.main does, in each worker): every
    # process then writes its samples under metrics_dir, emptied of an earlier start's files.
    # Not imported from app.core.metrics, which would import prometheus_client here too soon.
    settings = get_settings()
    metrics_dir = settings.metrics_dir
    if metrics_dir.exists():
        shutil.rmtree(metrics_dir)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir.resolve())
    options: dict[str, Any] = {}
    if settings.log_format == "json":
        from app.core.logs import uvicorn_log_config

        options["log_config"] = uvicorn_log_config()
    uvicorn.run(
        "app.main:create_app", factory=True, host=host, port=port, workers=workers, **options
    )


@app.command()
def demo(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
) -> None:
    """Run the whole product on the embedded default (SQLite under var/)."""
    from app.demo import run_demo

    run_demo(host=host, port=port)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
