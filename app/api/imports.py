from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import AdminUser, DataReader, ProjectDep, SessionDep, SettingsDep
from app.api.prompts import read_body_capped
from app.services import imports, snapshots
from app.services.errors import FieldError, InvalidInput

router = APIRouter(prefix="/api/v1/projects/{slug}", tags=["preference data"])


class ImportOut(BaseModel):
    created: int
    duplicates: int
    errors: int
    prompts_created: int
    skipped: list[dict[str, Any]]


class SnapshotOut(BaseModel):
    id: int
    content_hash: str
    judgments: int
    config: dict[str, Any]
    stats: dict[str, Any]


IMPORT_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


@router.post("/imports", openapi_extra=IMPORT_DOC)
async def import_preferences(
    request: Request,
    project: ProjectDep,
    session: SessionDep,
    user: AdminUser,
    settings: SettingsDep,
    format: imports.Format = Query("auto", description="hh-rlhf, trl or auto (per record)"),
    source: str = Query("hh-rlhf", description="attributed to every imported judgment"),
) -> ImportOut:
    """Import preference pairs from a JSONL file (gzip or not): HH-RLHF transcripts
    (`{"chosen": "\\n\\nHuman: …\\n\\nAssistant: …", "rejected": …}`) or TRL's preference
    format (`chosen`/`rejected`, optional `prompt`, plain or conversational).

    All or nothing with line numbers; records with an empty or identical answer are skipped
    and listed. Imported judgments train reward models and never count as rater work."""
    await read_body_capped(request, settings.max_upload_bytes)
    form = await request.form(max_files=1, max_fields=5)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidInput(
            "send the file as a multipart field named 'file'", [FieldError(None, "file", "missing")]
        )
    raw = await upload.read()
    records, skipped = await run_in_threadpool(
        imports.parse_preferences,
        raw,
        format,
        settings.max_upload_records,
        settings.max_upload_bytes,
    )
    result = await run_in_threadpool(
        imports.store_preferences,
        session,
        project,
        records,
        source=source,
        skipped=skipped,
        actor_id=user.id,
    )
    return ImportOut(**result.as_dict())


@router.post("/snapshots", status_code=201)
def create_snapshot(
    project: ProjectDep,
    session: SessionDep,
    user: AdminUser,
    body: snapshots.SnapshotConfig | None = None,
) -> SnapshotOut:
    """Freeze the project's usable judgments into an immutable, hashed dataset snapshot."""
    snapshot = snapshots.create_snapshot(session, project, body)
    return SnapshotOut(
        id=snapshot.id,
        content_hash=snapshot.content_hash,
        judgments=len(snapshot.judgment_ids),
        config=snapshot.config,
        stats=snapshot.stats,
    )


@router.get("/snapshots")
def list_snapshots(project: ProjectDep, session: SessionDep, user: DataReader) -> list[SnapshotOut]:
    return [
        SnapshotOut(
            id=s.id,
            content_hash=s.content_hash,
            judgments=len(s.judgment_ids),
            config=s.config,
            stats=s.stats,
        )
        for s in snapshots.list_snapshots(session, project)
    ]
