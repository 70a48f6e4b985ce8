from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from app.api.access import access
from app.api.deps import AdminUser, CurrentUser, ProjectDep, SessionDep
from app.api.schemas import InputModel
from app.models import Project
from app.services import projects, staffing

router = APIRouter(prefix="/api/v1/projects", tags=["projects"])


class ProjectCreate(InputModel):
    slug: str = Field(examples=["helpfulness-v1"])
    name: str
    guidelines: str = ""
    settings: dict[str, Any] = Field(default_factory=dict)


class ProjectUpdate(InputModel):
    name: str | None = None
    guidelines: str | None = None
    settings: dict[str, Any] | None = Field(None, description="merged over current settings")


class ProjectOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    slug: str
    name: str
    guidelines: str
    settings: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, project: Project) -> ProjectOut:
        out = cls.model_validate(project)
        out.settings = projects.project_settings(project).model_dump()
        return out


@router.post("", status_code=status.HTTP_201_CREATED, openapi_extra=access("admin"))
def create_project(body: ProjectCreate, session: SessionDep, user: AdminUser) -> ProjectOut:
    project = projects.create_project(
        session,
        body.slug,
        body.name,
        guidelines=body.guidelines,
        settings=body.settings,
        actor_id=user.id,
    )
    return ProjectOut.of(project)


@router.get("", openapi_extra=access("user"))
def list_projects(session: SessionDep, user: CurrentUser) -> list[ProjectOut]:
    """The projects you can work on: every one for admins and reviewers; for a rater, the
    projects open to every rater and those they are staffed on."""
    return [ProjectOut.of(p) for p in staffing.rateable_projects(session, user)]


@router.get("/{slug}", openapi_extra=access("rater"))
def get_project(project: ProjectDep, session: SessionDep, user: CurrentUser) -> ProjectOut:
    """A project you can work on. A staffed project is for its staff (and admins and
    reviewers): another rater gets 403 here, as it is left out of the list above."""
    if not staffing.may_rate(session, project, user):
        raise staffing.not_staffed(project)
    return ProjectOut.of(project)


@router.patch("/{slug}", openapi_extra=access("admin"))
def update_project(
    body: ProjectUpdate, project: ProjectDep, session: SessionDep, user: AdminUser
) -> ProjectOut:
    projects.update_project(
        session,
        project,
        name=body.name,
        guidelines=body.guidelines,
        settings=body.settings,
        actor_id=user.id,
    )
    return ProjectOut.of(project)
