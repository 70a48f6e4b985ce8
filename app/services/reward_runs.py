"""Reward-model runs, request-time half: checking a `reward` run's config, the automatic
retraining trigger, and what a trained reward model's version becomes.

    judgments ──snapshot──► preference pairs ──split by prompt──► app.jobs.reward ──► version

`maybe_trigger_reward_run` starts one by itself once a project has `reward_retrain_threshold`
new usable judgments since its last snapshot; `runs.create_run_if_idle` makes sure that two
triggers at the same moment start one run, not two.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.kinds.data import SnapshotConfig
from app.kinds.reward import RewardRunConfig
from app.models import ModelVersion, Project, Run
from app.services import audit, registry, runs, snapshots
from app.services.projects import project_settings

logger = logging.getLogger(__name__)

MIN_TRAIN_PAIRS = 4


def validate_reward_config(
    session: Session, project: Project, config: RewardRunConfig
) -> RewardRunConfig:
    """Check that a `reward` run's snapshot, if it names one, belongs to the project."""
    snapshots.check_run_snapshot(session, project, config.snapshot_id)
    return config


def maybe_trigger_reward_run(session: Session, project: Project, settings: Settings) -> Run | None:
    """Queue a reward run when enough new usable judgments arrived and none is active."""
    threshold = project_settings(project).reward_retrain_threshold
    last = snapshots.latest_snapshot(session, project)
    new = snapshots.usable_judgment_count(
        session, project, SnapshotConfig(), after_id=last.max_judgment_id if last else 0
    )
    if new < threshold:
        return None
    config = dict(project_settings(project).loop_reward_config)
    run = runs.create_run_if_idle(
        session, project, "reward", config, settings=settings, trigger="auto",
        broker_errors_fail_commit=False,
    )  # fmt: skip
    if run is not None:
        logger.info("project %s: %d new judgments, queued reward run %s", project.slug, new, run.id)
    return run


def trigger_all_projects(session: Session, settings: Settings) -> list[int]:
    """The periodic check: `maybe_trigger_reward_run` for every project. Returns new run ids."""
    started = []
    for project in session.scalars(select(Project).order_by(Project.id)).all():
        run = maybe_trigger_reward_run(session, project, settings)
        if run is not None:
            started.append(run.id)
    return started


def reward_version_for_run(
    session: Session, project: Project, run_id: int, *, base_model: str
) -> ModelVersion:
    """The `pending` reward version a run trains into: found again by run id when the run
    resumes, else created."""
    existing = session.scalar(
        select(ModelVersion).where(ModelVersion.run_id == run_id, ModelVersion.kind == "reward")
    )
    return existing or registry.create_version(
        session, project, "reward", base_model=base_model, artifact_path=None, run_id=run_id,
        status="pending",
    )  # fmt: skip


def settle_reward_version(session: Session, project: Project, version: ModelVersion) -> None:
    """A trained reward model becomes active when its validation accuracy reaches the project's
    minimum (or was not measured), or when the project has no active one yet; otherwise it
    stays a candidate."""
    accuracy = (version.metrics or {}).get("best_val_accuracy")
    good_enough = accuracy is None or accuracy >= project_settings(project).min_reward_accuracy
    previous = session.scalar(
        select(ModelVersion).where(
            ModelVersion.project_id == project.id,
            ModelVersion.kind == "reward",
            ModelVersion.status == "active",
        )
    )
    if good_enough or previous is None:
        # The closed loop's promotion: audited like an admin's, as `model.promote` by no one.
        audit.record(
            session, "model.promote", project_id=project.id,
            target=("model_version", version.id), kind="reward", version=version.version,
            previous_id=previous.id if previous else None,
            previous_version=previous.version if previous else None, trigger="auto",
            reason="validation accuracy not measured" if accuracy is None
            else f"best validation accuracy {accuracy:.4g}",
        )  # fmt: skip
        registry.activate(session, version)
    else:
        version.status = "candidate"
