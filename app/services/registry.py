"""Model registry: the policy and reward model versions of a project, and where their files live.

Version 0 of a project's policy is its base model (a spec such as ``"smollm2"``, a local
directory or a hub id); it is created on first use and is active until another version is
promoted. Trained versions keep their weights under `artifact_dir(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import ModelVersion, Project, Run, utcnow
from app.services.errors import InvalidInput, NotFound
from app.services.projects import project_settings

KINDS = ("policy", "reward")


def base_policy_spec(project: Project, settings: Settings) -> str:
    """The project's base policy spec, falling back to the server default."""
    return project_settings(project).base_policy or settings.base_policy


def model_spec(version: ModelVersion) -> str:
    """What to hand to `app.ml.loading.load_causal_lm`: the trained artifact, else the base."""
    return version.artifact_path or version.base_model


def artifact_dir(settings: Settings, project: Project, kind: str, version: int) -> Path:
    """Where the weights of a trained version are written (one directory per version)."""
    return Path(settings.artifacts_dir) / "projects" / str(project.id) / f"{kind}-v{version}"


def ensure_base_policy(session: Session, project: Project, settings: Settings) -> ModelVersion:
    """Return the project's policy version 0, creating it (active, if nothing else is) once.

    Two processes may race to create it; the unique (project, kind, version) constraint lets one
    win and the other reads the winner's row.
    """
    existing = _get(session, project.id, "policy", 0)
    if existing is not None:
        return existing
    has_active = session.scalar(
        select(ModelVersion.id).where(
            ModelVersion.project_id == project.id,
            ModelVersion.kind == "policy",
            ModelVersion.status == "active",
        )
    )
    spec = base_policy_spec(project, settings)
    row = ModelVersion(
        project_id=project.id,
        kind="policy",
        version=0,
        name=f"base ({spec})",
        base_model=spec,
        status="archived" if has_active else "active",
        promoted_at=None if has_active else utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError:
        found = _get(session, project.id, "policy", 0)
        if found is None:
            raise
        return found
    return row


def active_policy(session: Session, project: Project, settings: Settings) -> ModelVersion:
    """The policy version that generates responses now (the base one until a promotion)."""
    row = session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.project_id == project.id,
            ModelVersion.kind == "policy",
            ModelVersion.status == "active",
        )
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    return row if row is not None else ensure_base_policy(session, project, settings)


def previous_policy(session: Session, active: ModelVersion) -> ModelVersion | None:
    """The version the active one replaced: its parent, else the newest older version."""
    if active.parent_id is not None:
        parent = session.get(ModelVersion, active.parent_id)
        if parent is not None:
            return parent
    return session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.project_id == active.project_id,
            ModelVersion.kind == active.kind,
            ModelVersion.version < active.version,
            ModelVersion.status != "failed",
        )
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )


def next_version(session: Session, project: Project, kind: str) -> int:
    """The number the project's next version of `kind` gets."""
    current = session.scalar(
        select(func.max(ModelVersion.version)).where(
            ModelVersion.project_id == project.id, ModelVersion.kind == kind
        )
    )
    return 0 if current is None else current + 1


def create_version(
    session: Session,
    project: Project,
    kind: str,
    *,
    base_model: str,
    artifact_path: str | None,
    parent: ModelVersion | None = None,
    run_id: int | None = None,
    status: str = "candidate",
    name: str | None = None,
) -> ModelVersion:
    """Register a new version (numbered after the newest)."""
    if kind not in KINDS:
        raise InvalidInput(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
    version = next_version(session, project, kind)
    row = ModelVersion(
        project_id=project.id,
        kind=kind,
        version=version,
        name=name or f"{kind} v{version}",
        base_model=base_model,
        artifact_path=artifact_path,
        parent_id=parent.id if parent else None,
        run_id=run_id,
        status=status,
    )
    session.add(row)
    session.flush()
    return row


def activate(session: Session, version: ModelVersion) -> ModelVersion:
    """Make `version` the active one of its kind; the previously active one is archived."""
    session.execute(
        update(ModelVersion)
        .where(
            ModelVersion.project_id == version.project_id,
            ModelVersion.kind == version.kind,
            ModelVersion.status == "active",
            ModelVersion.id != version.id,
        )
        .values(status="archived")
    )
    version.status = "active"
    version.promoted_at = utcnow()
    session.flush()
    return version


def list_versions(
    session: Session, project: Project, kind: str | None = None
) -> list[ModelVersion]:
    """The project's versions (of one kind, if given), by kind and number."""
    query = select(ModelVersion).where(ModelVersion.project_id == project.id)
    if kind is not None:
        query = query.where(ModelVersion.kind == kind)
    return list(session.scalars(query.order_by(ModelVersion.kind, ModelVersion.version)))


@dataclass(frozen=True)
class VersionSummary:
    """One row of a project's version table: the version, where it came from, and the figures
    that decide about it (a policy's score gain, KL to its parent and the promotion rule's
    verdict; a reward model's validation accuracy)."""

    id: int
    kind: str
    version: int
    name: str
    status: str
    created_at: datetime
    promoted_at: datetime | None
    parent_id: int | None
    parent_version: int | None
    run_id: int | None
    run_kind: str | None
    score_gain: float | None
    kl_to_parent: float | None
    rule_passed: bool | None
    rule_reason: str | None
    val_accuracy: float | None
    val_pairs: int | None
    score_gain_low: float | None = None  # the score gain's interval, when it was evaluated
    score_gain_high: float | None = None


def version_summaries(session: Session, project: Project) -> list[VersionSummary]:
    """Every version of the project, newest first within each kind, with its key figures.

    One query: the figures are read out of `metrics` by the database, so a version's
    evaluation samples (the bulk of its metrics) never leave it."""
    m = ModelVersion.metrics
    rows = session.execute(
        select(
            ModelVersion.id,
            ModelVersion.kind,
            ModelVersion.version,
            ModelVersion.name,
            ModelVersion.status,
            ModelVersion.created_at,
            ModelVersion.promoted_at,
            ModelVersion.parent_id,
            ModelVersion.run_id,
            Run.kind,
            m["score_gain"].as_float(),
            m["kl_to_parent"].as_float(),
            m[("promotion_rule", "passed")].as_boolean(),
            m[("promotion_rule", "reason")].as_string(),
            # The reward job records the best validation accuracy; the last one if it did not.
            func.coalesce(m["best_val_accuracy"].as_float(), m["accuracy/val"].as_float()),
            m["val_pairs"].as_float(),
            m[("score_gain_interval", 0)].as_float(),
            m[("score_gain_interval", 1)].as_float(),
        )
        .outerjoin(Run, Run.id == ModelVersion.run_id)
        .where(ModelVersion.project_id == project.id)
        .order_by(ModelVersion.kind, ModelVersion.version.desc())
    ).all()
    numbers = {row[0]: row[2] for row in rows}
    return [
        VersionSummary(
            id=r[0],
            kind=r[1],
            version=r[2],
            name=r[3],
            status=r[4],
            created_at=r[5],
            promoted_at=r[6],
            parent_id=r[7],
            parent_version=numbers.get(r[7]) if r[7] is not None else None,
            run_id=r[8],
            run_kind=r[9],
            score_gain=r[10],
            kl_to_parent=r[11],
            rule_passed=None if r[12] is None else bool(r[12]),
            rule_reason=r[13],
            val_accuracy=r[14],
            val_pairs=None if r[15] is None else int(r[15]),
            score_gain_low=r[16],
            score_gain_high=r[17],
        )
        for r in rows
    ]


def get_version(session: Session, version_id: int) -> ModelVersion:
    """The version with this id (404 when there is none)."""
    row = session.get(ModelVersion, version_id)
    if row is None:
        raise NotFound(f"model version {version_id} not found")
    return row


def _get(session: Session, project_id: int, kind: str, version: int) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(
            ModelVersion.project_id == project_id,
            ModelVersion.kind == kind,
            ModelVersion.version == version,
        )
    )
