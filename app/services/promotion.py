"""Promotion and rollback of model versions: which policy (or reward model) is active.

An admin promotes a candidate, or rolls back to any earlier version; the closed loop promotes
a candidate automatically when the project's rule holds (`evaluation.promotion_rule`). Every
change is an audit event saying who (or `auto`) did it, from which version to which, and why.
The generation service always uses the active policy, so a promotion changes what the next
round of responses comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import literal, select
from sqlalchemy.orm import Session, aliased, defer

from app.models import DatasetSnapshot, ModelVersion, Project, Run
from app.services import audit, registry
from app.services.errors import Conflict

PROMOTABLE = ("candidate", "archived")


def active_version(session: Session, project_id: int, kind: str) -> ModelVersion | None:
    """The active version of a kind, or None."""
    return session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.project_id == project_id,
            ModelVersion.kind == kind,
            ModelVersion.status == "active",
        )
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )


def _lock_project(session: Session, project_id: int) -> None:
    # Two promotions at once must not both leave a version active: serialise them on the project
    # row (PostgreSQL); on SQLite every transaction of the app already holds the write lock.
    if session.get_bind().dialect.name != "sqlite":
        session.execute(select(Project.id).where(Project.id == project_id).with_for_update())


def _usable(version: ModelVersion) -> None:
    if version.status == "active":
        raise Conflict(f"{version.kind} v{version.version} (id {version.id}) is already active")
    if version.status not in PROMOTABLE:
        raise Conflict(
            f"{version.kind} v{version.version} (id {version.id}) is {version.status}; only a"
            f" candidate or an archived version can become active"
        )
    if version.artifact_path is None and version.version != 0:
        raise Conflict(f"{version.kind} v{version.version} (id {version.id}) has no weights")


def promote(
    session: Session,
    version: ModelVersion,
    *,
    actor_id: int | None,
    reason: str = "",
    trigger: str = "admin",
) -> ModelVersion:
    """Make `version` the active one of its kind (the previous one is archived).

    409 when it is already active, pending, failed, or has no weights. `trigger` is `admin` or
    `auto` (the closed loop); the audit event records it with the version replaced."""
    _lock_project(session, version.project_id)
    session.refresh(version)
    _usable(version)
    previous = active_version(session, version.project_id, version.kind)
    audit.record(
        session,
        "model.promote",
        actor_id=actor_id,
        project_id=version.project_id,
        target=("model_version", version.id),
        kind=version.kind,
        version=version.version,
        previous_id=previous.id if previous else None,
        previous_version=previous.version if previous else None,
        trigger=trigger,
        reason=reason,
    )
    return registry.activate(session, version)


def rollback(
    session: Session, version: ModelVersion, *, actor_id: int | None, reason: str = ""
) -> ModelVersion:
    """Return to an earlier version: it must be older than the active one (409 otherwise)."""
    _lock_project(session, version.project_id)
    session.refresh(version)
    current = active_version(session, version.project_id, version.kind)
    if current is not None and version.version >= current.version:
        raise Conflict(
            f"{version.kind} v{version.version} is not earlier than the active v{current.version};"
            " promote it instead"
        )
    _usable(version)
    audit.record(
        session,
        "model.rollback",
        actor_id=actor_id,
        project_id=version.project_id,
        target=("model_version", version.id),
        kind=version.kind,
        version=version.version,
        previous_id=current.id if current else None,
        previous_version=current.version if current else None,
        reason=reason,
    )
    return registry.activate(session, version)


def lineage(session: Session, version: ModelVersion, limit: int = 100) -> list[ModelVersion]:
    """The version's ancestors, parent first, back to the base policy (at most `limit`).

    One recursive query, however long the chain: the console draws it on every version page."""
    if version.parent_id is None:
        return []
    chain = (
        select(ModelVersion.id, ModelVersion.parent_id, literal(1).label("depth"))
        .where(ModelVersion.id == version.parent_id)
        .cte("chain", recursive=True)
    )
    step = aliased(ModelVersion)
    chain = chain.union_all(
        select(step.id, step.parent_id, (chain.c.depth + 1).label("depth"))
        .join(chain, step.id == chain.c.parent_id)
        .where(chain.c.depth < limit)  # also ends a cycle, which the loop below cuts short
    )
    rows = session.execute(
        select(ModelVersion, chain.c.depth)
        .join(chain, ModelVersion.id == chain.c.id)
        # The chain needs names and numbers; metrics (with evaluation samples) load if read.
        .options(defer(ModelVersion.metrics))
        .order_by(chain.c.depth)
    )
    out: list[ModelVersion] = []
    seen = {version.id}
    for ancestor, _ in rows:
        if ancestor.id in seen:
            break
        out.append(ancestor)
        seen.add(ancestor.id)
    return out


@dataclass(frozen=True)
class RunRef:
    """A run named on a version page: enough to link to it and say where it stands."""

    id: int
    kind: str
    status: str


@dataclass(frozen=True)
class SnapshotRef:
    """A dataset snapshot named on a version page (its judgment ids are not loaded)."""

    id: int
    judgments: int | None
    content_hash: str
    created_at: datetime


@dataclass(frozen=True)
class VersionLineage:
    """Where a version comes from and where it stands: the data and reward model it was
    trained on, the run that made it, the run that evaluated it, its ancestors back to the
    base, and the version of its kind that is active now."""

    version: ModelVersion
    ancestors: list[ModelVersion]
    snapshot: SnapshotRef | None
    reward_model: ModelVersion | None
    run: RunRef | None
    evaluation_run: RunRef | None
    active: ModelVersion | None

    @property
    def action(self) -> str | None:
        """What an admin can do with the version: `promote` (a candidate, or an archived
        version newer than the active one), `rollback` (an older one), or nothing."""
        if self.version.status not in PROMOTABLE:
            return None
        if self.active is not None and self.version.version < self.active.version:
            return "rollback"
        return "promote"


def version_lineage(session: Session, version: ModelVersion) -> VersionLineage:
    """Everything the version page draws around `version`, in a fixed number of queries."""
    ancestors = lineage(session, version)
    reward = (
        session.get(ModelVersion, version.reward_model_id, options=[defer(ModelVersion.metrics)])
        if version.reward_model_id is not None
        else None
    )
    snapshot = None
    if version.snapshot_id is not None:
        row = session.execute(
            select(
                DatasetSnapshot.id,
                DatasetSnapshot.stats,
                DatasetSnapshot.content_hash,
                DatasetSnapshot.created_at,
            ).where(DatasetSnapshot.id == version.snapshot_id)
        ).one_or_none()
        if row is not None:
            judgments = (row.stats or {}).get("judgments")
            snapshot = SnapshotRef(
                row.id, int(judgments) if judgments is not None else None, row.content_hash,
                row.created_at,
            )  # fmt: skip
    evaluation = (version.metrics or {}).get("evaluation") or {}
    evaluation_run_id = evaluation.get("run_id") if isinstance(evaluation, dict) else None
    wanted = {i for i in (version.run_id, evaluation_run_id) if isinstance(i, int)}
    found = {
        r.id: RunRef(r.id, r.kind, r.status)
        for r in session.execute(
            select(Run.id, Run.kind, Run.status).where(Run.id.in_(wanted or {0}))
        )
    }
    return VersionLineage(
        version=version,
        ancestors=ancestors,
        snapshot=snapshot,
        reward_model=reward,
        run=found.get(version.run_id) if version.run_id is not None else None,
        evaluation_run=found.get(evaluation_run_id) if evaluation_run_id is not None else None,
        active=active_version(session, version.project_id, version.kind),
    )
