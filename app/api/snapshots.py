"""Dataset snapshots: immutable, hashed sets of the judgments a training run uses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from app.api.access import access
from app.api.deps import AdminUser, DataReader, ProjectDep, SessionDep
from app.kinds.data import SnapshotConfig
from app.services import snapshots

router = APIRouter(prefix="/api/v1/projects/{slug}", tags=["preference data"])


class SnapshotOut(BaseModel):
    id: int
    content_hash: str
    judgments: int
    config: dict[str, Any]
    stats: dict[str, Any]


@router.post("/snapshots", status_code=201, openapi_extra=access("admin"))
def create_snapshot(
    project: ProjectDep,
    session: SessionDep,
    user: AdminUser,
    body: SnapshotConfig | None = None,
) -> SnapshotOut:
    """Freeze the project's usable judgments into an immutable, hashed dataset snapshot."""
    snapshot = snapshots.create_snapshot(session, project, body, actor_id=user.id)
    return SnapshotOut(
        id=snapshot.id,
        content_hash=snapshot.content_hash,
        judgments=len(snapshot.judgment_ids),
        config=snapshot.config,
        stats=snapshot.stats,
    )


@router.get("/snapshots", openapi_extra=access("reader"))
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
