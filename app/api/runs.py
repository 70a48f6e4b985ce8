"""Runs: generation and training jobs, launched, listed, followed and cancelled.

The kinds a run can have, and each kind's config schema, come from `app.kinds.RUN_KINDS`: the
request body of `POST /projects/{slug}/runs` is documented as one schema per launchable kind
(`RunCreate<Kind>` in OpenAPI), generated from the same knob definitions the services validate
against.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, ConfigDict, Field

from app.api.access import access
from app.api.deps import AdminUser, DataReader, ProjectDep, SessionDep, SettingsDep
from app.api.schemas import InputModel
from app.kinds.registry import LAUNCHABLE_KINDS, RUN_KINDS
from app.models import Run
from app.services import runs

router = APIRouter(prefix="/api/v1", tags=["runs"])


class RunCreate(InputModel):
    kind: str = Field(description=f"what to run: one of {', '.join(LAUNCHABLE_KINDS)}")
    config: dict[str, Any] = Field(
        default_factory=dict,
        examples=[{"limit": 20, "max_new_tokens": 96}],
        description="the kind's knobs; unset ones take their defaults (see the kind's schema)",
    )


def _body_schema(kind: str) -> dict[str, Any]:
    spec = RUN_KINDS[kind]
    return {
        "title": f"RunCreate{spec.config.__name__.removesuffix('RunConfig')}",
        "type": "object",
        "required": ["kind"],
        "properties": {
            "kind": {"const": kind, "description": f"{spec.title}: {spec.summary}"},
            "config": {"$ref": f"#/components/schemas/{spec.config.__name__}"},
        },
    }


def kind_schemas() -> dict[str, dict[str, Any]]:
    """OpenAPI component schemas of every launchable kind's config (and what they refer to)."""
    out: dict[str, dict[str, Any]] = {}
    for kind in LAUNCHABLE_KINDS:
        config = RUN_KINDS[kind].config
        schema = config.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[config.__name__] = schema
    return out


CREATE_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [_body_schema(kind) for kind in LAUNCHABLE_KINDS],
                    "discriminator": {"propertyName": "kind"},
                }
            }
        },
    }
}


class RunOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    project_id: int
    kind: str
    status: str
    trigger: str
    parent_run_id: int | None
    snapshot_id: int | None
    config: dict[str, Any]
    progress_done: int
    progress_total: int | None
    eta_s: float | None = None
    error: str | None
    result: dict[str, Any]
    attempts: int
    cancel_requested: bool
    worker: str | None
    created_by_id: int | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, run: Run) -> RunOut:
        out = cls.model_validate(run)
        out.eta_s = runs.eta_seconds(run)
        return out


class MetricPoint(BaseModel):
    step: int
    value: float


class RunDetail(RunOut):
    log_tail: str
    metrics: dict[str, list[MetricPoint]] = Field(default_factory=dict)
    latest_metrics: dict[str, float] = Field(default_factory=dict)


@router.post(
    "/projects/{slug}/runs",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=access("admin", extra=CREATE_BODY_DOC),
    responses={
        422: {"description": "unknown kind, or a config value outside its definition"},
        503: {"description": "the broker could not take the task (the run is marked failed)"},
    },
)
def create_run(
    body: RunCreate,
    project: ProjectDep,
    session: SessionDep,
    user: AdminUser,
    settings: SettingsDep,
) -> RunOut:
    """Queue a run. It is stored `queued`, then its task is sent; follow it with GET /runs/{id}."""
    run = runs.create_run(
        session, project, body.kind, body.config, settings=settings, actor_id=user.id,
        launchable_only=True,
    )  # fmt: skip
    return RunOut.of(run)


@router.get("/projects/{slug}/runs", openapi_extra=access("reader"))
def list_runs(
    project: ProjectDep,
    session: SessionDep,
    user: DataReader,
    kind: str | None = None,
    status_: str | None = Query(None, alias="status"),
    limit: int = Query(50, ge=1, le=500),
) -> list[RunOut]:
    """The project's runs, newest first."""
    rows = runs.list_runs(session, project, kind=kind, status=status_, limit=limit)
    return [RunOut.of(r) for r in rows]


@router.get("/runs/{run_id}", openapi_extra=access("reader"))
def get_run(run_id: int, session: SessionDep, user: DataReader) -> RunDetail:
    """A run with its progress, ETA, error, log tail and metrics."""
    run = runs.get_run(session, run_id)
    series = runs.run_metrics(session, run)
    return RunDetail.model_validate(
        {
            **RunOut.of(run).model_dump(),
            "log_tail": run.log_tail,
            "metrics": {
                name: [MetricPoint(step=s, value=v) for s, v in points]
                for name, points in series.items()
            },
            "latest_metrics": {name: points[-1][1] for name, points in series.items()},
        }
    )


@router.post(
    "/runs/{run_id}/cancel",
    responses={409: {"description": "the run has ended"}},
    openapi_extra=access("admin"),
)
def cancel_run(run_id: int, session: SessionDep, user: AdminUser, settings: SettingsDep) -> RunOut:
    """Cancel a run: a queued one ends now (its task is revoked), a running one stops at its
    next step."""
    run = runs.cancel_run(
        session, runs.get_run(session, run_id), settings=settings, actor_id=user.id
    )
    return RunOut.of(run)
