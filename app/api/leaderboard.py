"""The human leaderboard of a project's policy versions."""

from __future__ import annotations

from fastapi import APIRouter, Query
from pydantic import BaseModel

from app.api.access import access
from app.api.deps import DataReader, ProjectDep, SessionDep
from app.services import leaderboard

router = APIRouter(prefix="/api/v1", tags=["models"])


class LeaderboardOut(BaseModel):
    games: int
    bootstrap: int
    seed: int
    versions: list[leaderboard.Standing]


@router.get("/projects/{slug}/leaderboard", openapi_extra=access("reader"))
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
