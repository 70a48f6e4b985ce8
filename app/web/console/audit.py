"""Console page: the audit log, filtered like `GET /api/v1/audit`, newest first.

    GET /admin/audit    the log; filters as GET parameters (actor, action, target_type,
                        target_id, project, since, until), `before` for older pages (reader)

A project's own view is the same page with `?project=<slug>` (linked from its summary page).
A filter that names nothing (an unknown email or slug, a date that is no date) re-renders the
form with the reason at its field and a 422.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import SessionDep
from app.services import audit, projects
from app.services.errors import InvalidInput
from app.web.console.common import Reader, console_route, page

router = APIRouter(prefix="/admin")

# A data value longer than this is cut in the table; the full event is in the cell's title.
VALUE_CHARS = 60


def object_link(row: audit.AuditRow) -> str | None:
    """The console page of the event's object, where it has one."""
    event, slug = row.event, row.project_slug
    kind, target = event.target_type, event.target_id
    if target is None:
        return None
    if kind == "run":
        return f"/admin/runs/{target}"
    if kind == "model_version":
        return f"/admin/models/{target}"
    if kind == "user":
        return f"/admin/people#user-{target}"
    if kind == "project" and slug:
        return f"/admin/projects/{slug}"
    if kind == "prompt" and slug:
        return f"/admin/projects/{slug}/prompts/{target}"
    if kind == "pair" and slug and row.prompt_id is not None:
        return f"/admin/projects/{slug}/prompts/{row.prompt_id}#pair-{target}"
    if kind == "snapshot" and slug:
        return f"/admin/projects/{slug}/data#snapshots-title"
    return None


def _short(value: Any) -> str:
    """A value on one line: a timestamp to the minute, anything long cut at VALUE_CHARS."""
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value) if "T" in value else None
        except ValueError:
            moment = None
        text = moment.strftime("%Y-%m-%d %H:%M") if moment else value
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 1] + "…"


def data_items(data: dict[str, Any]) -> list[tuple[str, str]]:
    """An event's data as (key, shortened value) pairs, empty values left out."""
    return [(key, _short(value)) for key, value in data.items() if value not in (None, "", [], {})]


def data_title(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=False, sort_keys=True, default=str)


@console_route(router, "GET", "/audit", access="reader")
def audit_log(request: Request, session: SessionDep, user: Reader) -> Response:
    params = request.query_params
    values = {name: params.get(name, "").strip() for name in audit.FILTER_FIELDS}
    before = params.get("before", "")
    errors: dict[str, str] = {}
    found = audit.AuditPage([], None)
    try:
        where = audit.AuditFilter.parse(session, values)
    except InvalidInput as exc:
        errors = {str(e.field): e.message for e in exc.errors}
    else:
        found = audit.browse_events(
            session, where, before=int(before) if before.isdigit() else None
        )
    query = {name: value for name, value in values.items() if value}
    context = {
        "values": values,
        "errors": errors,
        "found": found,
        "query": query,
        "paged": before.isdigit(),
        "projects": projects.list_projects(session),
        "object_link": object_link,
        "data_items": data_items,
        "data_title": data_title,
    }
    return page(
        request, "console/audit/log.html", user, context, section="audit",
        status_code=422 if errors else 200,
    )  # fmt: skip
