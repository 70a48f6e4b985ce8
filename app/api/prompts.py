from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.access import access
from app.api.deps import AdminUser, DataReader, ProjectDep, SessionDep, SettingsDep
from app.services import generation, inputs
from app.services import prompts as prompt_service
from app.services.errors import (
    FieldError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)

router = APIRouter(prefix="/api/v1/projects/{slug}/prompts", tags=["prompts"])

UPLOAD_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["prompts"],
                    "properties": {"prompts": {"type": "array", "items": {"type": "object"}}},
                },
                "example": {
                    "prompts": [
                        {"prompt": "Explain RLHF in one sentence.", "external_id": "q1"},
                        {
                            "messages": [{"role": "user", "content": "Hi!"}],
                            "external_id": "q2",
                            "responses": [{"text": "Hello!", "model": "m1"}, {"text": "Hey."}],
                        },
                    ]
                },
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    },
    "responses": {
        "422": {"description": "invalid records: every error with its line and field"},
        "413": {"description": "the upload is larger than the limit"},
        "415": {"description": "not JSON, JSONL or CSV"},
    },
}


class UploadOut(BaseModel):
    created: int
    duplicates: int
    errors: int
    responses_created: int
    pairs_created: int
    generation_run_id: int | None = None


class PromptOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    external_id: str | None
    text: str | None
    messages: list[dict[str, str]] | None
    meta: dict[str, Any]
    source: str
    created_at: datetime


class PromptPage(BaseModel):
    items: list[PromptOut]
    total: int
    offset: int
    limit: int


async def read_body_capped(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything larger than `limit` without reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"upload is {int(declared)} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"upload is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # let request.form() parse what we already read
    return body


@router.post("", openapi_extra=access("admin", extra=UPLOAD_BODY_DOC))
async def upload_prompts(
    request: Request,
    project: ProjectDep,
    session: SessionDep,
    user: AdminUser,
    settings: SettingsDep,
) -> UploadOut:
    """Add prompts (optionally with responses) as JSON, or as a JSONL/CSV file upload.

    All or nothing: one invalid record means a 422 listing every error, and nothing stored.
    A record whose `external_id` already exists counts as a duplicate and is skipped.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body_capped(request, settings.max_upload_bytes)
    max_records = settings.max_upload_records
    if content_type == "application/json":
        records = await run_in_threadpool(_parse_json_body, body, max_records)
    elif content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=5)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput(
                "multipart upload needs a file field named 'file'",
                [FieldError(None, "file", "missing")],
            )
        raw = await upload.read()
        records = await run_in_threadpool(
            prompt_service.parse_upload, raw, upload.filename, upload.content_type, max_records
        )
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {content_type or '(none)'}: send application/json"
            " or a multipart/form-data file upload (JSONL or CSV)"
        )
    result = await run_in_threadpool(
        prompt_service.store_prompts, session, project, records, source="api", actor_id=user.id
    )
    run = await run_in_threadpool(
        generation.queue_generation_after_upload,
        session,
        project,
        result.prompt_ids,
        settings=settings,
        actor_id=user.id,
    )
    return UploadOut(**result.as_dict(), generation_run_id=run.id if run else None)


def _parse_json_body(body: bytes, max_records: int) -> list[prompt_service.PromptRecord]:
    try:
        data = inputs.loads(body, envelope=2)
    except inputs.NestedTooDeep as exc:
        raise InvalidInput(
            "the body is nested too deeply", [FieldError(None, None, str(exc))]
        ) from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            "body is not valid UTF-8", [FieldError(None, None, f"not valid UTF-8: {exc.reason}")]
        ) from exc
    except json.JSONDecodeError as exc:
        raise InvalidInput(
            "malformed JSON body",
            [FieldError(exc.lineno, None, f"malformed JSON: {exc.msg} at column {exc.colno}")],
        ) from exc
    if not isinstance(data, dict) or "prompts" not in data:
        raise InvalidInput(
            "the body must be an object with a 'prompts' array",
            [FieldError(None, "prompts", "missing")],
        )
    return prompt_service.parse_json_records(data["prompts"], max_records)


@router.get("", openapi_extra=access("reader"))
def list_prompts(
    project: ProjectDep,
    session: SessionDep,
    user: DataReader,
    offset: int = Query(0, ge=0),
    limit: int = Query(50, ge=1, le=500),
) -> PromptPage:
    rows, total = prompt_service.list_prompts(session, project, offset, limit)
    return PromptPage(
        items=[PromptOut.model_validate(r) for r in rows], total=total, offset=offset, limit=limit
    )
