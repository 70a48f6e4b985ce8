"""Liveness, readiness and metrics: the endpoints that orchestrators and Prometheus call.

`/healthz` is the process being up and nothing more (it must stay trivially cheap: the rater
hot path benchmark uses it as its bare-endpoint baseline). `/readyz` checks the database, the
broker and the workers of every queue (`services/readiness.py`). `/metrics` is the Prometheus
text format (`core/metrics.py` for the web processes' own figures, `services/metrics.py` for
the database's); it is open unless the `metrics_token` setting is set, like most scrape
targets, so serve it on a private address and keep it off the public proxy (docs/operations.md).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from app.api.access import access
from app.api.deps import SessionDep, SettingsDep
from app.core.metrics import render
from app.core.security import same_token
from app.services import metrics, readiness

router = APIRouter(tags=["health"])


class ReadinessOut(BaseModel):
    """Each check's answer, "ok" or why it failed; `failed` names the failed ones."""

    status: Literal["ok", "unavailable"]
    database: str
    broker: str
    workers: dict[str, str]
    failed: list[str]


READINESS_DOC: dict[int | str, dict[str, Any]] = {
    200: {"model": ReadinessOut, "description": "every check passed"},
    503: {"model": ReadinessOut, "description": "a check failed: `failed` says which, and why"},
}


@router.get("/healthz", openapi_extra=access("public"))
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=READINESS_DOC, openapi_extra=access("public"))
def readyz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Ready to work: the database, the broker, and a recent worker of each queue; 503 (with
    the failed checks and why) if any is missing."""
    answer = readiness.check(session, settings)
    return JSONResponse(answer.as_dict(), status_code=200 if answer.ok else 503)


@router.get("/metrics", include_in_schema=False, openapi_extra=access("public"))
def prometheus_metrics(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """Prometheus metrics of every web process of this host and of the database."""
    if settings.metrics_token:
        scheme, _, secret = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not same_token(secret.strip(), settings.metrics_token):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="/metrics wants 'Authorization: Bearer <VERDICT_METRICS_TOKEN>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
    body, content_type = render(metrics.database_metrics(session))
    return Response(body, media_type=content_type)
