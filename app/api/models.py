from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.api.deps import DataReader, SessionDep, SettingsDep
from app.services import interactive, registry

router = APIRouter(prefix="/api/v1/models", tags=["models"])


class ScoreIn(interactive.PromptIn):
    responses: list[str] = Field(min_length=1, max_length=64)


class ScoreOut(BaseModel):
    model_version_id: int
    scores: list[float]


class GenerateIn(interactive.PromptIn):
    num_responses: int = Field(1, ge=1, le=8)
    max_new_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.7, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    seed: int = 0


class GenerateOut(BaseModel):
    model_version_id: int
    responses: list[dict[str, Any]]


@router.post("/{version_id}/score", responses={503: {"description": "no worker answered in time"}})
async def score(
    version_id: int,
    body: ScoreIn,
    session: SessionDep,
    settings: SettingsDep,
    user: DataReader,
    timeout_s: float = Query(60.0, gt=0, le=600),
) -> ScoreOut:
    """Rewards of one or more responses to a prompt under a reward model version.

    The scoring runs on a model worker (the web process never loads a model) as a `score` run."""
    version = registry.get_version(session, version_id)
    result = await run_in_threadpool(
        interactive.run_interactive,
        session,
        version,
        "score",
        body.model_dump(),
        settings=settings,
        actor_id=user.id,
        timeout_s=timeout_s,
    )
    return ScoreOut(**result)


@router.post(
    "/{version_id}/generate", responses={503: {"description": "no worker answered in time"}}
)
async def generate(
    version_id: int,
    body: GenerateIn,
    session: SessionDep,
    settings: SettingsDep,
    user: DataReader,
    timeout_s: float = Query(120.0, gt=0, le=600),
) -> GenerateOut:
    """Answer a prompt with any policy version (a playground), on a model worker."""
    version = registry.get_version(session, version_id)
    result = await run_in_threadpool(
        interactive.run_interactive,
        session,
        version,
        "sample",
        body.model_dump(),
        settings=settings,
        actor_id=user.id,
        timeout_s=timeout_s,
    )
    return GenerateOut(**result)
