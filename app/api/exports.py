"""Exports: a project's judgments or training examples as a streamed file.

The parameters are checked, and the export audited, in the request's own unit of work, before
the first byte is sent; so a bad parameter is a plain 422 naming it and a changed snapshot a
409, never a truncated file. The body is then streamed from a session of its own, which lives
as long as the stream (the request's session is committed and closed when the endpoint
returns, before the body is sent).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse

from app.api.access import access
from app.api.deps import DataReader, ProjectDep, SessionDep, SettingsDep
from app.models import User
from app.services import exports, permissions

router = APIRouter(prefix="/api/v1/projects/{slug}", tags=["preference data"])

FORMAT_HELP = "; ".join(f"`{f.name}`: {f.description}" for f in exports.FORMATS.values())


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the file, streamed (Content-Disposition names it)",
            "content": {
                media: {} for media in sorted({f.media_type for f in exports.FORMATS.values()})
            },
        },
        409: {"description": "the snapshot no longer matches its judgments"},
        422: {"description": "a parameter is wrong; `errors[].field` names it"},
    },
    openapi_extra=access("reader"),
)
def export(
    request: Request,
    project: ProjectDep,
    session: SessionDep,
    settings: SettingsDep,
    user: DataReader,
    format: Annotated[str, Query(description=FORMAT_HELP)],
    snapshot: Annotated[
        int | None, Query(description="export this snapshot, whole, as it was trained on")
    ] = None,
    since: Annotated[
        str | None,
        Query(description="judgments made at or after this ISO 8601 date or time (UTC)"),
    ] = None,
    until: Annotated[
        str | None, Query(description="judgments made before this ISO 8601 date or time (UTC)")
    ] = None,
    pseudonymize: Annotated[
        bool, Query(description="raw formats: raters as stable HMAC pseudonyms, not emails")
    ] = False,
    salt: Annotated[
        str | None,
        Query(
            description="key of the pseudonyms (the same salt links exports); by default one"
            " derived from the server's secret and the export's parameters"
        ),
    ] = None,
) -> StreamingResponse:
    """Stream the project's data in one of the export formats, from a snapshot, a date range
    or the current state. Admins and reviewers may export; raters' emails (a raw export
    without `pseudonymize`) are for admins only."""
    plan = exports.prepare_export(
        session,
        project,
        format,
        snapshot_id=snapshot,
        since=since,
        until=until,
        pseudonymize=pseudonymize,
        salt=salt,
        secret_key=settings.resolved_secret_key(),
    )
    if not may_export(user, plan):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"your role ({user.role}) sees raters pseudonymised only: add pseudonymize=true",
        )
    exports.record_export(session, plan, actor_id=user.id)
    return streamed(request, plan)


def streamed(request: Request, plan: exports.ExportPlan) -> StreamingResponse:
    """The export as a download, read through a session of its own that lives as long as the
    stream (also the console's Export form's answer)."""
    sessionmaker = request.app.state.sessionmaker

    def body() -> Iterator[bytes]:
        stream_session = sessionmaker()
        try:
            yield from exports.stream_export(stream_session, plan)
        finally:
            stream_session.close()

    return StreamingResponse(
        body(),
        media_type=plan.spec.media_type,
        headers={"Content-Disposition": f'attachment; filename="{plan.filename}"'},
    )


def may_export(user: User, plan: exports.ExportPlan) -> bool:
    """Raters' emails (a raw export without pseudonyms) are for admins; the rest for readers."""
    return permissions.is_admin(user) or not (plan.spec.has_raters and not plan.pseudonymize)
