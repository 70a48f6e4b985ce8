"""Reward-model runs: snapshot the judgments, train a Bradley–Terry reward model, register it.

    judgments ──snapshot──► preference pairs ──split by prompt──► app.ml.reward.train ──► version

`maybe_trigger_reward_run` starts one by itself once a project has `reward_retrain_threshold`
new usable judgments since its last snapshot; `runs.create_run_if_idle` makes sure that two
triggers at the same moment start one run, not two.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import DatasetSnapshot, ModelVersion, Project, Run
from app.services import loop, registry, runs, snapshots
from app.services.errors import FieldError, InvalidInput
from app.services.projects import project_settings

logger = logging.getLogger(__name__)

DEFAULT_LEARNING_RATE = {"full": 1e-5, "lora": 1e-4, "last_n": 3e-5}
MIN_TRAIN_PAIRS = 4


class RewardRunConfig(BaseModel):
    """The `config` of a `reward` run. Unset fields take sensible defaults for a CPU."""

    model_config = ConfigDict(extra="forbid")

    snapshot_id: int | None = Field(None, description="train on this snapshot (default: a new one)")
    data: snapshots.SnapshotConfig = Field(default_factory=snapshots.SnapshotConfig)
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share held out, by prompt")
    split_seed: int = Field(0, description="seeds the train/validation split")
    backbone: str | None = Field(None, description="model spec (default: the base policy)")
    train_mode: Literal["full", "lora", "last_n"] = Field(
        "last_n", description="last_n trains the top layers only: the fast mode for a CPU"
    )
    last_n_layers: int = Field(2, ge=1, le=64)
    epochs: int = Field(1, ge=1, le=100)
    max_steps: int = Field(0, ge=0)
    learning_rate: float | None = Field(None, gt=0.0, le=1.0)
    batch_size: int = Field(8, ge=1, le=512)
    grad_accumulation: int = Field(1, ge=1, le=256)
    max_length: int = Field(512, ge=16, le=8192)
    eval_every: int = Field(0, ge=0)
    early_stopping_patience: int = Field(0, ge=0)
    seed: int = Field(0)


def _field_errors(exc: ValidationError) -> list[FieldError]:
    return [
        FieldError(None, "config." + ".".join(str(p) for p in e["loc"]), e["msg"])
        for e in exc.errors()
    ]


def validate_reward_config(
    session: Session, project: Project, config: dict[str, Any]
) -> dict[str, Any]:
    """Check a `reward` run's config (422 with field errors) and return it normalised."""
    try:
        parsed = RewardRunConfig.model_validate(config)
    except ValidationError as exc:
        raise InvalidInput("invalid reward config", _field_errors(exc)) from exc
    if parsed.snapshot_id is not None:
        snapshot = session.get(DatasetSnapshot, parsed.snapshot_id)
        if snapshot is None or snapshot.project_id != project.id:
            raise InvalidInput(
                f"snapshot {parsed.snapshot_id} is not a snapshot of project {project.slug}",
                [FieldError(None, "config.snapshot_id", "unknown snapshot")],
            )
    return parsed.model_dump()


def maybe_trigger_reward_run(session: Session, project: Project, settings: Settings) -> Run | None:
    """Queue a reward run when enough new usable judgments arrived and none is active."""
    threshold = project_settings(project).reward_retrain_threshold
    last = snapshots.latest_snapshot(session, project)
    new = snapshots.usable_judgment_count(
        session, project, snapshots.SnapshotConfig(), after_id=last.max_judgment_id if last else 0
    )
    if new < threshold:
        return None
    config = dict(project_settings(project).loop_reward_config)
    run = runs.create_run_if_idle(
        session, project, "reward", config, settings=settings, trigger="auto"
    )
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


def _version_for_run(session: Session, run_id: int) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.run_id == run_id, ModelVersion.kind == "reward")
    )


def execute_reward_run(ctx: runs.RunContext) -> dict[str, Any]:
    """The `reward` run handler: snapshot, split, train, save, register the version."""
    from app.ml import loading
    from app.ml.hooks import Cancelled
    from app.ml.preferences import split_by_prompt
    from app.ml.reward import RewardConfig, train_reward_model

    session, settings = ctx.session, ctx.settings
    config = RewardRunConfig.model_validate(ctx.config)
    project = session.get(Project, ctx.project_id)
    assert project is not None
    run = session.get(Run, ctx.run_id)
    assert run is not None

    snapshot, examples = snapshots.snapshot_for_run(
        session, project, run, config.snapshot_id, config.data
    )
    train, val = split_by_prompt(examples, config.val_fraction, config.split_seed)
    ctx.log(
        f"snapshot {snapshot.id} ({snapshot.content_hash[:12]}): {len(examples)} pairs,"
        f" {len(train)} train / {len(val)} validation (split by prompt)"
    )
    if len(train) < MIN_TRAIN_PAIRS:
        raise InvalidInput(
            f"only {len(train)} training pairs after the split; need at least {MIN_TRAIN_PAIRS}"
        )

    spec = config.backbone or registry.base_policy_spec(project, settings)
    session.commit()
    backbone = loading.resolve_model_dir(
        spec, Path(settings.artifacts_dir), allow_hub=settings.allow_hub_downloads
    )
    version = _version_for_run(session, ctx.run_id) or registry.create_version(
        session,
        project,
        "reward",
        base_model=spec,
        artifact_path=None,
        run_id=ctx.run_id,
        status="pending",
    )
    out_dir = registry.artifact_dir(settings, project, "reward", version.version)
    version.artifact_path = str(out_dir)
    version.snapshot_id = snapshot.id
    session.commit()  # never hold a transaction while training (SQLite write lock)

    reward_config = RewardConfig(
        backbone=str(backbone),
        max_length=config.max_length,
        train_mode=config.train_mode,
        last_n_layers=config.last_n_layers,
        learning_rate=config.learning_rate or DEFAULT_LEARNING_RATE[config.train_mode],
        batch_size=config.batch_size,
        grad_accumulation=config.grad_accumulation,
        epochs=config.epochs,
        max_steps=config.max_steps,
        eval_every=config.eval_every,
        early_stopping_patience=config.early_stopping_patience,
        seed=config.seed,
        checkpoint_every=50,
        device=str(loading.pick_device()),
    )
    try:
        result = train_reward_model(
            reward_config, train, val, out_dir,
            checkpoint_dir=Path(settings.artifacts_dir) / "runs" / str(ctx.run_id),
            hooks=ctx.hooks, resume=True, snapshot_id=snapshot.id,
        )  # fmt: skip
    except Exception as exc:
        session.rollback()
        if not isinstance(exc, Cancelled):  # a cancelled or requeued run may still resume
            version.status = "failed"
            session.commit()
        raise

    metrics = {k: float(v) for k, v in result.final_metrics.items()}
    metrics["train_pairs"] = result.train_pairs
    metrics["val_pairs"] = result.val_pairs
    metrics["train_seconds"] = result.train_seconds
    if result.best_val_accuracy is not None:
        metrics["best_val_accuracy"] = result.best_val_accuracy
    version.metrics = metrics
    accuracy = result.best_val_accuracy
    good_enough = accuracy is None or accuracy >= project_settings(project).min_reward_accuracy
    has_active = session.scalar(
        select(ModelVersion.id).where(
            ModelVersion.project_id == project.id,
            ModelVersion.kind == "reward",
            ModelVersion.status == "active",
        )
    )
    if good_enough or has_active is None:
        registry.activate(session, version)
    else:
        version.status = "candidate"
        session.commit()
    ctx.log(f"reward model v{version.version} saved ({version.status}); metrics {metrics}")
    next_run = loop.after_reward_run(ctx, version)  # the closed loop: PPO in auto mode
    return {
        "model_version_id": version.id,
        "snapshot_id": snapshot.id,
        "metrics": metrics,
        "active": version.status == "active",
        "ppo_run_id": next_run.id if next_run is not None else None,
    }
