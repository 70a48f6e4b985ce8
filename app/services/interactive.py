"""Interactive model work for the API: score responses with a reward model, or answer a prompt
with a policy version (the playground).

The web process never loads a model. A call becomes a short run (`score` or `sample`) on the
model queue; the API waits for its row to finish, up to a timeout. When the worker is busy (a
long training run on the embedded default's single worker), the call answers 503 and the run is
cancelled, so no stale work piles up. Every call is a row with its lineage, like any run.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.orm import Session

from app.kinds.interactive import SampleRunConfig, ScoreRunConfig
from app.models import ModelVersion, Project, Run
from app.models.training import FINISHED_STATUSES
from app.services import registry
from app.services.errors import Conflict, InvalidInput, ServiceError

POLL_INTERVAL_S = 0.1


class WorkerBusy(ServiceError):
    status_code = 503


def _usable(version: ModelVersion, kind: str) -> None:
    if version.kind != kind:
        raise InvalidInput(
            f"model version {version.id} is a {version.kind} model, not a {kind} model"
        )
    if version.status in ("pending", "failed"):
        raise Conflict(f"model version {version.id} is {version.status}; it has no usable weights")


def validate_score_config(
    session: Session, project: Project, config: ScoreRunConfig
) -> ScoreRunConfig:
    """Check that a `score` run's version is a reward model with saved weights."""
    version = registry.get_version(session, config.model_version_id)
    _usable(version, "reward")
    if not version.artifact_path:
        raise Conflict(f"reward model version {version.id} has no saved weights")
    return config


def validate_sample_config(
    session: Session, project: Project, config: SampleRunConfig
) -> SampleRunConfig:
    """Check that a `sample` run's version is a usable policy."""
    _usable(registry.get_version(session, config.model_version_id), "policy")
    return config


def wait_for_run(session: Session, run_id: int, timeout_s: float) -> Run | None:
    """Poll run `run_id` until it has finished; None after `timeout_s` seconds.

    Read-only: each poll's transaction is rolled back before the sleep, so no transaction (and
    on SQLite no write lock) is held while waiting.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        session.expire_all()
        current = session.get(Run, run_id)
        assert current is not None
        finished = current.status in FINISHED_STATUSES
        if finished:
            # Handed back detached with everything loaded: the rollback would expire it, and
            # reading it afterwards would begin a transaction that outlives this call.
            session.refresh(current)
            session.expunge(current)
        session.rollback()
        if finished:
            return current
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_INTERVAL_S)


def busy(run: Run, timeout_s: float) -> WorkerBusy:
    """The 503 of a call whose run no worker finished in time."""
    return WorkerBusy(
        f"no model worker answered within {timeout_s:.0f} s (run {run.id}; a worker may be"
        " busy with a training run); try again later"
    )


def result_of(run: Run) -> dict[str, Any]:
    """A finished interactive run's result; an error for a run that failed or was cancelled."""
    if run.status != "succeeded":
        raise ServiceError(f"{run.kind} run {run.id} {run.status}: {run.error or 'no error given'}")
    return dict(run.result or {})
