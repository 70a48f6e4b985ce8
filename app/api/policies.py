"""Model versions with their lineage, promotion and rollback, and the policy leaderboard."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import AdminUser, DataReader, ProjectDep, SessionDep, SettingsDep
from app.models import ModelVersion, Project, Run
from app.services import leaderboard, loop, promotion, registry

router = APIRouter(prefix="/api/v1", tags=["policies"])


class VersionRef(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    version: int
    name: str
    status: str


class RunRef(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    status: str
    trigger: str
    parent_run_id: int | None


class ModelDetail(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    project_id: int
    kind: str
    version: int
    name: str
    status: str
    base_model: str
    artifact_path: str | None
    parent_id: int | None
    run_id: int | None
    snapshot_id: int | None
    reward_model_id: int | None
    metrics: dict[str, Any]
    created_at: datetime
    promoted_at: datetime | None
    parent: VersionRef | None = None
    reward_model: VersionRef | None = None
    run: RunRef | None = None
    lineage: list[VersionRef] = Field(
        default_factory=list, description="ancestors, parent first, back to the base policy"
    )


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=2000)
    generate: bool = Field(
        True, description="policies only: queue a generation run by the new active version"
    )


class PromoteOut(BaseModel):
    model: ModelDetail
    previous_id: int | None
    generation_run_id: int | None


class LeaderboardRow(BaseModel):
    version_id: int
    version: int
    name: str
    status: str
    games: int
    wins: int
    losses: int
    ties: int
    win_rate: float
    rating: float
    ci_low: float
    ci_high: float


class LeaderboardOut(BaseModel):
    games: int
    bootstrap: int
    seed: int
    versions: list[LeaderboardRow]


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


@router.get("/models/{version_id}")
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
)
def rollback(
    version_id: int, body: PromoteIn, session: SessionDep, settings: SettingsDep, user: AdminUser
) -> PromoteOut:
    """Go back to an earlier version (admin only); the active one is archived."""
    version = registry.get_version(session, version_id)
    previous = promotion.active_version(session, version.project_id, version.kind)
    promotion.rollback(session, version, actor_id=user.id, reason=body.reason)
    return _change(session, settings, version, body, previous)


@router.get("/projects/{slug}/leaderboard")
def get_leaderboard(
    project: ProjectDep,
    session: SessionDep,
    user: DataReader,
    bootstrap: int = Query(200, ge=0, le=2000, description="bootstrap rounds for the intervals"),
    seed: int = Query(0, description="bootstrap seed"),
) -> LeaderboardOut:
    """Policy versions ranked by human judgments of new-vs-previous (`version_eval`) pairs: win
    rate and Bradley–Terry rating (Elo scale) with bootstrap 95 % intervals."""
    board = leaderboard.project_leaderboard(session, project, bootstrap=bootstrap, seed=seed)
    return LeaderboardOut.model_validate(board)
