"""Promotion and rollback of model versions: which policy (or reward model) is active.

An admin promotes a candidate, or rolls back to any earlier version; the closed loop promotes
a candidate automatically when the project's rule holds (`evaluation.promotion_rule`). Every
change is an audit event saying who (or `auto`) did it, from which version to which, and why.
The generation service always uses the active policy, so a promotion changes what the next
round of responses comes from.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ModelVersion, Project
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
    """The version's ancestors, parent first, back to the base policy."""
    chain: list[ModelVersion] = []
    seen = {version.id}
    current = version
    while current.parent_id is not None and len(chain) < limit:
        parent = session.get(ModelVersion, current.parent_id)
        if parent is None or parent.id in seen:
            break
        chain.append(parent)
        seen.add(parent.id)
        current = parent
    return chain
