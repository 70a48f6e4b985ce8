"""The audit log: everything the seed did (users, projects, staffing, invites, tokens), a few
admin actions of the day (a gold answer, a settings change, a promotion, a cancelled run, a
role change), and a project's own log filtered to its model actions."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.models import ModelVersion, User
from app.services import audit, judgments, projects, users
from shots import Shot


def seed(session: Session, ids: dict[str, Any]) -> None:
    """Admin actions on the main project, through their services where a seed can call them."""
    admin = session.get(User, ids["admin"])
    reward = session.get(ModelVersion, ids["reward"])
    policy = session.get(ModelVersion, ids["policy"])
    assert admin is not None and reward is not None and policy is not None
    helpful = projects.get_project(session, str(ids["slug"]))
    judgments.set_gold(session, int(ids["pair"]), "a", actor_id=admin.id)
    projects.update_project(
        session, helpful, settings={"reward_retrain_threshold": 80}, actor_id=admin.id
    )
    # What promotion and cancelling write (their services need a worker's run rows to act on).
    audit.record(
        session, "model.promote", project_id=helpful.id, target=("model_version", reward.id),
        kind="reward", version=reward.version, previous_id=None, previous_version=None,
        trigger="auto", reason="best validation accuracy 0.74",
    )  # fmt: skip
    audit.record(
        session, "model.promote", actor_id=admin.id, project_id=helpful.id,
        target=("model_version", policy.id), kind="policy", version=policy.version,
        previous_id=None, previous_version=0, trigger="admin",
        reason="beats base on 61 % of held-out prompts <checked by hand>",
    )  # fmt: skip
    audit.record(
        session, "run.cancel", actor_id=admin.id, project_id=helpful.id,
        target=("run", int(ids["run"])), status="running",
    )  # fmt: skip
    reviewer = users.get_user_by_email(session, "reviewer@verdict.local")
    assert reviewer is not None
    users.set_role(session, reviewer.id, "admin", actor=admin)
    users.set_role(session, reviewer.id, "reviewer", actor=admin)


PAGES = [
    Shot("console-audit", "/admin/audit"),
    Shot(
        "console-audit-project",
        lambda ids: f"/admin/audit?project={ids['slug']}&action=model.",
    ),
]
