"""Console pages: a project's data. The prompt browser (search, filters, keyset pages), the page
of one prompt (its responses, pairs and judgments; admins mark pairs gold there), the upload
page (prompts, or preference pairs to import) and the Export form (`app.services.exports`; its
download is answered as the API's `GET /api/v1/projects/{slug}/export` answers it).

The queries live in `app.services.browse`; an upload goes through the same parsers, limits and
stores as the API's (`POST /api/v1/projects/{slug}/prompts` and `.../imports`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.responses import Response

from app.api import exports as export_api
from app.api.deps import SessionDep, SettingsDep
from app.core.config import Settings
from app.models import Project, User
from app.services import browse, exports, generation, imports, snapshots
from app.services import prompts as prompt_service
from app.services.errors import FieldError, InvalidInput, ServiceError
from app.services.projects import project_settings
from app.services.rendering import render_markdown
from app.web.console.common import Admin, ProjectPage, Reader, console_route, done, htmx, page

router = APIRouter(prefix="/admin")

GOLD_OPTIONS = [
    ("", "Not gold"),
    ("a", "A is better"),
    ("b", "B is better"),
    ("tie", "About the same"),
    ("both_bad", "Both bad"),
]
UPLOAD_KINDS = ("prompts", "preferences")
# Skipped import lines named in the flash message; the rest are counted.
SKIPS_NAMED = 5


def _int(value: str | None) -> int | None:
    """A keyset id from the query string; anything else reads as no id."""
    return int(value) if value and value.isdigit() else None


@console_route(router, "GET", "/projects/{slug}/data", access="reader")
def prompt_browser(
    request: Request, session: SessionDep, project: ProjectPage, user: Reader
) -> Response:
    params = request.query_params
    flt = browse.PromptFilter.from_params(params)
    # A swap of the results (filter form, pager) needs neither the form nor its sources.
    fragment = htmx(request) and request.headers.get("hx-target") == "prompt-results"
    result = browse.list_prompts(
        session,
        project,
        flt,
        after=_int(params.get("after")),
        before=_int(params.get("before")),
        with_sources=not fragment,
    )
    template = "console/data/_results.html" if fragment else "console/data/browser.html"
    context = {"tab": "data", "result": result, "flt": flt, "tri": browse.TRI}
    if not fragment:
        context["snapshots"] = snapshots.snapshot_summaries(session, project)
    return page(request, template, user, context, section="project", project=project)


def _prompt_page(
    request: Request,
    session: Session,
    project: Project,
    user: User,
    prompt_id: int,
    *,
    gold_error: tuple[int, str] | None = None,
    status_code: int = 200,
) -> Response:
    detail = browse.prompt_detail(session, project, prompt_id)
    context = {
        "tab": "data",
        "detail": detail,
        "markdown": render_markdown,
        "pretty": _pretty,
        "gold_options": GOLD_OPTIONS,
        "gold_error": gold_error,
    }
    return page(
        request, "console/data/prompt.html", user, context, section="project", project=project,
        status_code=status_code,
    )  # fmt: skip


def _pretty(value: Any) -> str:
    """A JSON value as indented text (escaped by the template like any other text)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


@console_route(router, "GET", "/projects/{slug}/prompts/{prompt_id}", access="reader")
def prompt_page(
    request: Request, session: SessionDep, project: ProjectPage, user: Reader, prompt_id: int
) -> Response:
    return _prompt_page(request, session, project, user, prompt_id)


@console_route(router, "POST", "/projects/{slug}/pairs/{pair_id}/gold", access="admin")
async def mark_gold(
    request: Request, session: SessionDep, project: ProjectPage, user: Admin, pair_id: int
) -> Response:
    form = await request.form()
    pair = await run_in_threadpool(browse.project_pair, session, project, pair_id)
    url = f"/admin/projects/{project.slug}/prompts/{pair.prompt_id}"
    if "choice" not in form:
        return await run_in_threadpool(
            _prompt_page, request, session, project, user, pair.prompt_id,
            gold_error=(pair.id, "choose the expected answer, or Not gold"), status_code=422,
        )  # fmt: skip
    choice = str(form["choice"]) or None
    try:
        await run_in_threadpool(browse.mark_gold, session, pair, choice, actor_id=user.id)
    except InvalidInput as exc:
        message = exc.errors[0].message if exc.errors else exc.message
        return await run_in_threadpool(
            _prompt_page, request, session, project, user, pair.prompt_id,
            gold_error=(pair.id, message), status_code=422,
        )  # fmt: skip
    label = dict(GOLD_OPTIONS)[choice or ""]
    said = f"Pair {pair.id} is gold: {label}." if choice else f"Pair {pair.id} is no longer gold."
    return done(request, f"{url}#pair-{pair.id}", said)


# --- upload -------------------------------------------------------------------------------------


@dataclass
class UploadForm:
    """What the upload page shows: the choices made, and what went wrong with the file."""

    kind: str = "prompts"
    format: str = "auto"
    source: str = "hh-rlhf"
    filename: str = ""
    message: str = ""
    errors: list[FieldError] = field(default_factory=list)
    field_errors: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Each error of the file as "line N, field: message"."""
        out = []
        for e in self.errors:
            where = ", ".join(p for p in (f"line {e.line}" if e.line else "", e.field or "") if p)
            out.append(f"{where}: {e.message}" if where else e.message)
        return out


def _size(n: int) -> str:
    """A byte count in words: "80 KB", "20 MB" (binary units, as the limit is set)."""
    for unit, scale in (("MB", 1024**2), ("KB", 1024)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{n} bytes"


def _upload_page(
    request: Request,
    project: Project,
    user: User,
    settings: Settings,
    form: UploadForm,
    status_code: int = 200,
) -> Response:
    context = {
        "tab": "data",
        "form": form,
        "formats": imports.FORMATS,
        "max_bytes": settings.max_upload_bytes,
        "max_size": _size(settings.max_upload_bytes),
        "max_records": settings.max_upload_records,
        "auto_generate": project_settings(project).auto_generate,
    }
    return page(
        request, "console/data/upload.html", user, context, section="project", project=project,
        status_code=status_code,
    )  # fmt: skip


@console_route(router, "GET", "/projects/{slug}/upload", access="admin")
def upload_page(
    request: Request, project: ProjectPage, settings: SettingsDep, user: Admin
) -> Response:
    return _upload_page(request, project, user, settings, UploadForm())


def _read_form(form: FormData) -> tuple[UploadForm, UploadFile | None]:
    """The upload form's choices, refusing at its field what the page could not have sent."""
    upload = form.get("file")
    chosen = UploadForm(
        kind=str(form.get("kind", "")),
        format=str(form.get("format", "auto")) or "auto",
        source=str(form.get("source", "hh-rlhf")).strip() or "hh-rlhf",
        filename=upload.filename or "" if isinstance(upload, UploadFile) else "",
    )
    if chosen.kind not in UPLOAD_KINDS:
        chosen.field_errors["kind"] = "choose what the file holds: prompts or preference pairs"
    if chosen.format not in imports.FORMATS:
        chosen.field_errors["format"] = f"one of {', '.join(imports.FORMATS)}"
    if not isinstance(upload, UploadFile) or not upload.filename:
        chosen.field_errors["file"] = "choose a file to upload"
        upload = None
    return chosen, upload


@console_route(router, "POST", "/projects/{slug}/upload", access="admin")
async def upload(
    request: Request,
    session: SessionDep,
    project: ProjectPage,
    settings: SettingsDep,
    user: Admin,
) -> Response:
    # The form is already parsed (the CSRF check read it): Starlette keeps a file part on disk
    # past 1 MB, so an outsized upload costs disk for a moment, never memory.
    chosen, upload = _read_form(await request.form())
    if chosen.field_errors or upload is None:
        chosen.message = "Nothing was uploaded."
        return _upload_page(request, project, user, settings, chosen, 422)
    size = upload.size or 0
    if size > settings.max_upload_bytes:
        chosen.message = (
            f"The file is {_size(size)}; the limit is {_size(settings.max_upload_bytes)}."
            " Split it into smaller files."
        )
        return _upload_page(request, project, user, settings, chosen, 413)
    raw = await upload.read()
    try:
        if chosen.kind == "prompts":
            message = await run_in_threadpool(
                _store_prompts, session, project, user, settings, raw, upload
            )
        else:
            message = await run_in_threadpool(
                _store_preferences, session, project, user, settings, raw, chosen
            )
    except ServiceError as exc:
        # The stores are all or nothing; rolling back here makes sure nothing of a refused file
        # reaches the commit the request makes on a normal answer.
        session.rollback()
        chosen.message = exc.message
        chosen.errors = exc.errors if isinstance(exc, InvalidInput) else []
        status_code = 422 if isinstance(exc, InvalidInput) else exc.status_code
        # The rollback expired the user and the project: rendering reads them again.
        return await run_in_threadpool(
            _upload_page, request, project, user, settings, chosen, status_code
        )
    return done(request, f"/admin/projects/{project.slug}/data", f"{chosen.filename}: {message}")


def _store_prompts(
    session: Session,
    project: Project,
    user: User,
    settings: Settings,
    raw: bytes,
    upload: UploadFile,
) -> str:
    records = prompt_service.parse_upload(
        raw, upload.filename, upload.content_type, settings.max_upload_records
    )
    result = prompt_service.store_prompts(
        session, project, records, source="console", actor_id=user.id
    )
    run = generation.queue_generation_after_upload(
        session, project, result.prompt_ids, settings=settings, actor_id=user.id
    )
    said = (
        f"{result.created:,} prompts created, {result.duplicates:,} duplicates skipped,"
        f" {result.responses_created:,} responses, {result.pairs_created:,} pairs."
    )
    if run is not None:
        said += f" Generation run {run.id} queued."
    return said


def _store_preferences(
    session: Session,
    project: Project,
    user: User,
    settings: Settings,
    raw: bytes,
    chosen: UploadForm,
) -> str:
    fmt: imports.Format = chosen.format  # type: ignore[assignment]  # checked by _read_form
    records, skipped = imports.parse_preferences(
        raw, fmt, settings.max_upload_records, settings.max_upload_bytes
    )
    result = imports.store_preferences(
        session, project, records, source=chosen.source, skipped=skipped, actor_id=user.id
    )
    said = (
        f"{result.created:,} pairs imported with their judgments"
        f" ({result.prompts_created:,} new prompts), {result.duplicates:,} duplicates skipped."
    )
    if result.skipped:
        named = [f"line {s['line']}: {s['reason']}" for s in result.skipped[:SKIPS_NAMED]]
        if len(result.skipped) > SKIPS_NAMED:
            named.append(f"{len(result.skipped) - SKIPS_NAMED:,} more")
        said += f" {len(result.skipped):,} lines skipped ({'; '.join(named)})."
    return said


@console_route(router, "GET", "/projects/{slug}/export", access="reader")
def export_page(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    project: ProjectPage,
    user: Reader,
) -> Response:
    """The Export form; submitted (it has a `format`), the download itself, through the same
    service, checks and audit as `GET /api/v1/projects/{slug}/export`. A refused parameter is
    shown at its field (422)."""
    params = request.query_params
    form = {k: params.get(k, "") for k in ("format", "snapshot", "since", "until", "salt")}
    form["pseudonymize"] = "on" if params.get("pseudonymize") else ""
    errors: dict[str, str] = {}
    if form["format"]:
        snapshot_id = _int(form["snapshot"])
        try:
            if form["snapshot"] and snapshot_id is None:
                raise InvalidInput("", [FieldError(None, "snapshot", "choose a snapshot")])
            plan = exports.prepare_export(
                session,
                project,
                form["format"],
                snapshot_id=snapshot_id,
                since=form["since"] or None,
                until=form["until"] or None,
                pseudonymize=bool(form["pseudonymize"]),
                salt=form["salt"] or None,
                secret_key=settings.resolved_secret_key(),
            )
            if not export_api.may_export(user, plan):
                raise InvalidInput(
                    "", [FieldError(None, "pseudonymize", f"as a {user.role}, pseudonymise raters")]
                )
        except InvalidInput as exc:
            errors = {e.field or "format": e.message for e in exc.errors}
        else:
            exports.record_export(session, plan, actor_id=user.id)
            return export_api.streamed(request, plan)
    context = {
        "tab": "data",
        "form": form,
        "errors": errors,
        "formats": exports.FORMATS.values(),
        "snapshots": snapshots.snapshot_summaries(session, project, limit=100),
    }
    return page(
        request, "console/data/export.html", user, context, section="project", project=project,
        status_code=422 if errors else 200,
    )  # fmt: skip
