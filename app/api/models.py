"""Model versions: listing, lineage, promotion and rollback, and the interactive calls that
run on a model worker (scoring with a reward model, the generation playground)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.access import access
from app.api.deps import AdminUser, DataReader, ProjectDep, SessionDep, SettingsDep
from app.api.schemas import InputModel
from app.core.config import Settings
from app.kinds.interactive import SampleRequest, ScoreRequest
from app.models import ModelVersion, Project, Run, User
from app.services import interactive, loop, promotion, registry, runs

router = APIRouter(prefix="/api/v1", tags=["models"])


class VersionRef(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    version: int
    name: str
    status: str


class ModelVersionOut(VersionRef):
    base_model: str
    artifact_path: str | None
    parent_id: int | None
    run_id: int | None
    metrics: dict[str, Any]
    created_at: datetime
    promoted_at: datetime | None


class RunRef(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    status: str
    trigger: str
    parent_run_id: int | None


class ModelDetail(ModelVersionOut):
    project_id: int
    snapshot_id: int | None
    reward_model_id: int | None
    parent: VersionRef | None = None
    reward_model: VersionRef | None = None
    run: RunRef | None = None
    lineage: list[VersionRef] = Field(
        default_factory=list, description="ancestors, parent first, back to the base policy"
    )


class PromoteIn(InputModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=2000)
    generate: bool = Field(
        True, description="policies only: queue a generation run by the new active version"
    )


class PromoteOut(BaseModel):
    model: ModelDetail
    previous_id: int | None
    generation_run_id: int | None


class ScoreOut(BaseModel):
    model_version_id: int
    scores: list[float]


class GenerateOut(BaseModel):
    model_version_id: int
    responses: list[dict[str, Any]]


@router.get("/projects/{slug}/models", openapi_extra=access("reader"))
def list_models(
    project: ProjectDep,
    session: SessionDep,
    user: DataReader,
    settings: SettingsDep,
    kind: Literal["policy", "reward"] | None = None,
) -> list[ModelVersionOut]:
    """The project's model versions; policy version 0 (the base model) always exists."""
    registry.ensure_base_policy(session, project, settings)
    versions: list[ModelVersion] = registry.list_versions(session, project, kind)
    return [ModelVersionOut.model_validate(v) for v in versions]


def _detail(session: SessionDep, version: ModelVersion) -> ModelDetail:
    out = ModelDetail.model_validate(version)
    if version.parent_id is not None:
        parent = session.get(ModelVersion, version.parent_id)
        out.parent = VersionRef.model_validate(parent) if parent else None
    if version.reward_model_id is not None:
        reward = session.get(ModelVersion, version.reward_model_id)
        out.reward_model = VersionRef.model_validate(reward) if reward else None
    if version.run_id is not None:
        run = session.get(Run, version.run_id)
        out.run = RunRef.model_validate(run) if run else None
    out.lineage = [VersionRef.model_validate(v) for v in promotion.lineage(session, version)]
    return out


@router.get("/models/{version_id}", openapi_extra=access("reader"))
def get_model(version_id: int, session: SessionDep, user: DataReader) -> ModelDetail:
    """A model version with its lineage (parent chain, run, snapshot, reward model) and metrics
    (training, evaluation on held-out prompts, the promotion rule's verdict)."""
    return _detail(session, registry.get_version(session, version_id))


def _change(
    session: SessionDep,
    settings: SettingsDep,
    version: ModelVersion,
    body: PromoteIn,
    previous: ModelVersion | None,
) -> PromoteOut:
    run = None
    if body.generate and version.kind == "policy":
        project = session.get(Project, version.project_id)
        assert project is not None
        run = loop.after_promotion(session, project, version, settings=settings)
    return PromoteOut(
        model=_detail(session, version),
        previous_id=previous.id if previous else None,
        generation_run_id=run.id if run else None,
    )


@router.post(
    "/models/{version_id}/promote",
    responses={409: {"description": "already active, pending, failed or without weights"}},
    openapi_extra=access("admin"),
)
def promote(
    version_id: int, body: PromoteIn, session: SessionDep, settings: SettingsDep, user: AdminUser
) -> PromoteOut:
    """Make a candidate (or an archived version) the active one (admin only). For a policy, the
    next generation run uses it; with `generate` (default) one is queued now."""
    version = registry.get_version(session, version_id)
    previous = promotion.active_version(session, version.project_id, version.kind)
    promotion.promote(session, version, actor_id=user.id, reason=body.reason)
    return _change(session, settings, version, body, previous)


@router.post(
    "/models/{version_id}/rollback",
    responses={409: {"description": "not earlier than the active version, or not usable"}},
    openapi_extra=access("admin"),
)
def rollback(
    version_id: int, body: PromoteIn, session: SessionDep, settings: SettingsDep, user: AdminUser
) -> PromoteOut:
    """Go back to an earlier version (admin only); the active one is archived."""
    version = registry.get_version(session, version_id)
    previous = promotion.active_version(session, version.project_id, version.kind)
    promotion.rollback(session, version, actor_id=user.id, reason=body.reason)
    return _change(session, settings, version, body, previous)


class RunPending(BaseModel):
    """The answer of an interactive call that outlived its `timeout_s`: the run is still queued
    or running and will finish; read its `result` at `follow`."""

    run_id: int
    status: str
    follow: str = Field(description="where the run's status and, once it succeeded, `result` are")


def _run_and_wait(
    session: Session,
    version: ModelVersion,
    kind: Literal["sample", "score"],
    config: dict[str, Any],
    *,
    settings: Settings,
    user: User,
    timeout_s: float,
) -> dict[str, Any] | RunPending:
    """Queue a `score` or `sample` run for `version`, wait for a worker to finish it, and
    return its result; the run to follow when none finishes it within `timeout_s`.

    The run is left alone on a timeout: a worker busy with a training run answers it later, and
    cancelling it would throw away what a worker may be in the middle of."""
    project = session.get(Project, version.project_id)
    assert project is not None
    run = interactive.queue_run(
        session, project, kind, version.id, config, settings=settings, actor_id=user.id,
        trigger="api",
    )  # fmt: skip
    run_id = run.id
    session.commit()  # sends the task (503 when the broker refuses it); the wait holds nothing
    done = interactive.wait_for_run(session, run_id, timeout_s)
    if done is None:
        current = runs.get_run(session, run_id)
        return RunPending(run_id=run_id, status=current.status, follow=f"/api/v1/runs/{run_id}")
    return interactive.result_of(done)


def _pending(outcome: RunPending) -> JSONResponse:
    return JSONResponse(outcome.model_dump(), status_code=202, headers={"Location": outcome.follow})


PENDING: dict[int | str, dict[str, Any]] = {
    202: {
        "model": RunPending,
        "description": "no worker finished within `timeout_s`: the run stays queued; follow it"
        " at `Location` (`GET /api/v1/runs/{id}`, its `result` once it succeeded)",
    },
    503: {"description": "the broker refused the run's task"},
}


@router.post(
    "/models/{version_id}/score",
    response_model=ScoreOut,
    responses=PENDING,
    openapi_extra=access("reader"),
)
async def score(
    version_id: int,
    body: ScoreRequest,
    session: SessionDep,
    settings: SettingsDep,
    user: DataReader,
    timeout_s: float = Query(60.0, gt=0, le=600),
) -> ScoreOut | JSONResponse:
    """Rewards of one or more responses to a prompt under a reward model version.

    The scoring runs on a model worker (the web process never loads a model) as a `score` run;
    past `timeout_s` the answer is 202 with the run to follow."""
    version = registry.get_version(session, version_id)
    outcome = await run_in_threadpool(
        _run_and_wait, session, version, "score", body.model_dump(), settings=settings,
        user=user, timeout_s=timeout_s,
    )  # fmt: skip
    if isinstance(outcome, RunPending):
        return _pending(outcome)
    return ScoreOut(**outcome)


@router.post(
    "/models/{version_id}/generate",
    response_model=GenerateOut,
    responses=PENDING,
    openapi_extra=access("reader"),
)
async def generate(
    version_id: int,
    body: SampleRequest,
    session: SessionDep,
    settings: SettingsDep,
    user: DataReader,
    timeout_s: float = Query(120.0, gt=0, le=600),
) -> GenerateOut | JSONResponse:
    """Answer a prompt with any policy version (a playground), on a model worker; past
    `timeout_s` the answer is 202 with the run to follow."""
    version = registry.get_version(session, version_id)
    outcome = await run_in_threadpool(
        _run_and_wait, session, version, "sample", body.model_dump(), settings=settings,
        user=user, timeout_s=timeout_s,
    )  # fmt: skip
    if isinstance(outcome, RunPending):
        return _pending(outcome)
    return GenerateOut(**outcome)
