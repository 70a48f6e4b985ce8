"""The closed loop: judgments → reward model → policy → evaluation → promotion → generation.

    reward run ──(auto_mode, val accuracy ≥ min_reward_accuracy)──► policy run (loop_algorithm)
    ppo / rloo / grpo / dpo run ──► evaluate run ──(auto_mode, promotion rule)──► promotion
    promotion ──(auto_mode, or an admin asking for it)──► generate run by the new active policy

Each arrow is called by the job that finished its work, at its end, so every step is a run of
its own with status, trigger `auto` and `parent_run_id` pointing at the run that caused it. A
step that cannot start (no reward model, an invalid `loop_*_config`, a broker failure) is
written to the calling run's log and result; it never fails the run whose work is already done.
The policy run after a reward run is the project's `loop_algorithm`: a `ppo`, `rloo` or `grpo` run
against the new reward model, or (`dpo-online`) a `dpo` run on the policy's own answers ranked by
it; its config is the project's `loop_<kind>_config`. The caller commits; the new run's message
is sent then. The new reward judgments that start the
next round are counted by the periodic reward trigger (`reward_runs.trigger_all_projects`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import ModelVersion, Project, Run
from app.services import promotion, runs
from app.services.errors import ServiceError
from app.services.projects import LOOP_ALGORITHMS, project_settings

logger = logging.getLogger(__name__)

Log = Callable[[str], None]


def _queue(
    session: Session,
    project: Project,
    kind: str,
    config: dict[str, Any],
    *,
    settings: Settings,
    parent_run_id: int | None,
    log: Log,
    idle_only: bool,
) -> Run | None:
    create = runs.create_run_if_idle if idle_only else runs.create_run
    try:
        with session.begin_nested():  # a refused step leaves the caller's work in place
            run = create(
                session, project, kind, config, settings=settings, trigger="auto",
                parent_run_id=parent_run_id, broker_errors_fail_commit=False,
            )  # fmt: skip
    except ServiceError as exc:
        log(f"closed loop: could not queue a {kind} run: {exc.message}")
        return None
    if run is None:
        log(f"closed loop: a {kind} run is already queued or running; none added")
        return None
    log(f"closed loop: queued {kind} run {run.id}")
    return run


def after_reward_run(
    session: Session,
    project: Project,
    version: ModelVersion,
    run_id: int,
    log: Log,
    *,
    settings: Settings,
) -> Run | None:
    """After a reward run: in auto mode, start the project's `loop_algorithm` run against the
    new reward model when it is active and its validation accuracy reached the project's
    minimum. Returns that run."""
    ps = project_settings(project)
    accuracy = (version.metrics or {}).get("best_val_accuracy")
    if not ps.auto_mode:
        return None
    kind, fixed = LOOP_ALGORITHMS[ps.loop_algorithm]
    if version.status != "active":
        log(f"closed loop: reward model v{version.version} is not active; no {kind} run")
        return None
    if accuracy is None or float(accuracy) < ps.min_reward_accuracy:
        log(
            f"closed loop: validation accuracy {accuracy} is below the project minimum"
            f" {ps.min_reward_accuracy:g} (or was not measured); no {kind} run"
        )
        return None
    loop_config = getattr(ps, f"loop_{kind}_config")
    config = {**loop_config, **fixed, "reward_model_id": version.id}
    return _queue(
        session, project, kind, config, settings=settings, parent_run_id=run_id, log=log,
        idle_only=True,
    )  # fmt: skip


def after_policy_run(
    session: Session,
    project: Project,
    candidate: ModelVersion,
    reward_model_id: int | None,
    run_id: int,
    log: Log,
    *,
    settings: Settings,
) -> Run | None:
    """After a policy run (PPO, RLOO, GRPO, DPO): queue the evaluation of its candidate (every
    candidate is evaluated, whatever the mode; promotion is what auto mode decides). Returns
    that run."""
    existing = session.scalar(
        select(Run).where(Run.parent_run_id == run_id, Run.kind == "evaluate").limit(1)
    )
    if existing is not None:  # a resumed run that had already queued it
        return existing
    config = {**project_settings(project).loop_evaluate_config, "model_version_id": candidate.id}
    if reward_model_id is not None:
        config["reward_model_id"] = reward_model_id
    return _queue(
        session, project, "evaluate", config, settings=settings, parent_run_id=run_id, log=log,
        idle_only=False,
    )  # fmt: skip


def after_evaluation(
    session: Session,
    project: Project,
    candidate: ModelVersion,
    rule_passed: bool,
    run_id: int,
    log: Log,
    *,
    settings: Settings,
) -> dict[str, Any]:
    """After an evaluation: in auto mode, promote a candidate that passed the rule and let the
    new active policy generate the next round. Returns what happened, for the run's result."""
    outcome: dict[str, Any] = {"promoted": False, "generation_run_id": None}
    if not project_settings(project).auto_mode:
        return outcome
    if not rule_passed:
        log(f"closed loop: policy v{candidate.version} stays a candidate")
        return outcome
    try:
        with session.begin_nested():
            promotion.promote(
                session, candidate, actor_id=None, reason=f"rule passed in run {run_id}",
                trigger="auto",
            )  # fmt: skip
    except ServiceError as exc:
        log(f"closed loop: promotion of policy v{candidate.version} refused: {exc.message}")
        return outcome
    log(f"closed loop: promoted policy v{candidate.version}")
    outcome["promoted"] = True
    run = after_promotion(
        session, project, candidate, settings=settings, parent_run_id=run_id, log=log
    )
    outcome["generation_run_id"] = run.id if run is not None else None
    return outcome


def after_promotion(
    session: Session,
    project: Project,
    version: ModelVersion,
    *,
    settings: Settings,
    parent_run_id: int | None = None,
    log: Log | None = None,
) -> Run | None:
    """Queue a generation run so the newly active policy answers the next round of prompts.

    Generation always reads the active policy and skips prompts it already answered, so a run
    queued next to another one does no double work."""
    if version.kind != "policy":
        return None
    config = dict(project_settings(project).loop_generation_config)
    return _queue(
        session, project, "generate", config, settings=settings, parent_run_id=parent_run_id,
        log=log or (lambda message: logger.info("project %s: %s", project.slug, message)),
        idle_only=False,
    )  # fmt: skip
