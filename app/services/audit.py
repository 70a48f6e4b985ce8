from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.models import AuditEvent


def record(
    session: Session,
    action: str,
    *,
    actor_id: int | None = None,
    project_id: int | None = None,
    target: tuple[str, int] | None = None,
    **data: Any,
) -> AuditEvent:
    """Add an audit event to the current transaction (it commits with the change it describes)."""
    event = AuditEvent(
        action=action,
        actor_id=actor_id,
        project_id=project_id,
        target_type=target[0] if target else None,
        target_id=target[1] if target else None,
        data=data,
    )
    session.add(event)
    return event
