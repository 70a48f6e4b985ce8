"""Imports of preference data (HH-RLHF, TRL) as judged comparisons."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.access import access
from app.api.deps import AdminUser, ProjectDep, SessionDep, SettingsDep
from app.api.prompts import read_body_capped
from app.services import imports
from app.services.errors import FieldError, InvalidInput

router = APIRouter(prefix="/api/v1/projects/{slug}", tags=["preference data"])


class ImportOut(BaseModel):
    created: int
    duplicates: int
    errors: int
    prompts_created: int
    skipped: list[dict[str, Any]]


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


@router.post("/imports", openapi_extra=access("admin", extra=IMPORT_DOC))
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
