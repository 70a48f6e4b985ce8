"""Policy runs, request-time half: checking `ppo`, `rloo`, `grpo` and `dpo` configs, and the
candidate version a run trains into.

    active policy (start and parent) ─┐
    reward model (reward, value init) ┼─► app.jobs.ppo ──► policy v(n+1), candidate
                                      │   (app.jobs.critic_free: rloo, grpo)
    training prompts (held-out kept) ─┘                          │
    judgment snapshot ─► preference pairs ─► app.jobs.dpo ───────┤
                                                                 ▼
                                                   evaluate run (app.jobs.evaluate)

A candidate is a plain Hugging Face causal LM under `registry.artifact_dir`, with its lineage on
the version row: parent, run, snapshot (the reward model's, for PPO; the run's own, for DPO),
reward model and metrics. Every policy kind is resumable: the run finds its version again by run id.
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.kinds.critic_free import GRPORunConfig, RLOORunConfig
from app.kinds.dpo import DPORunConfig
from app.kinds.ppo import PPORunConfig
from app.models import ModelVersion, Project
from app.services import registry, snapshots
from app.services.errors import Conflict, FieldError, InvalidInput
from app.services.projects import project_settings

MIN_DPO_PAIRS = 2
# PPO answers are cut here even when the project lets raters see longer ones: a CPU worker's
# rollout time grows with every token.
MAX_PPO_NEW_TOKENS = 256


def reward_version(session: Session, project: Project, reward_model_id: int | None) -> ModelVersion:
    """The reward model a run trains against: the given one, else the project's active one
    (422 when there is none or it belongs elsewhere, 409 when it has no usable weights)."""
    if reward_model_id is None:
        active = active_reward_version(session, project)
        if active is None:
            raise InvalidInput(
                "the project has no active reward model; train one (a reward run) first",
                [FieldError(None, "config.reward_model_id", "no active reward model")],
            )
        return active
    version = session.get(ModelVersion, reward_model_id)
    if version is None or version.project_id != project.id or version.kind != "reward":
        raise InvalidInput(
            f"model version {reward_model_id} is not a reward model of project {project.slug}",
            [FieldError(None, "config.reward_model_id", "not a reward model of this project")],
        )
    if not version.artifact_path or version.status in ("pending", "failed"):
        raise Conflict(f"reward model version {version.id} is {version.status}; no usable weights")
    return version


def active_reward_version(session: Session, project: Project) -> ModelVersion | None:
    """The project's active reward model, if it has one."""
    return session.scalar(
        select(ModelVersion).where(
            ModelVersion.project_id == project.id,
            ModelVersion.kind == "reward",
            ModelVersion.status == "active",
        )
    )


RLRunConfig = TypeVar("RLRunConfig", PPORunConfig, RLOORunConfig, GRPORunConfig)


def validate_rl_config(session: Session, project: Project, config: RLRunConfig) -> RLRunConfig:
    """Resolve a `ppo`, `rloo` or `grpo` run's reward model now, so the run records which one it
    trains against even when a newer one becomes active before it starts; an unset
    `max_new_tokens` takes the project's (at most `MAX_PPO_NEW_TOKENS`)."""
    reward = reward_version(session, project, config.reward_model_id)
    update: dict[str, Any] = {"reward_model_id": reward.id}
    if "max_new_tokens" not in config.model_fields_set:
        ps = project_settings(project)
        update["max_new_tokens"] = min(ps.max_new_tokens, MAX_PPO_NEW_TOKENS)
    return config.model_copy(update=update)


def validate_dpo_config(session: Session, project: Project, config: DPORunConfig) -> DPORunConfig:
    """Check that a `dpo` run's snapshot and reward model belong to the project.

    With policy pairs (`pair_source` "policy" or "mixed") the reward model that ranks them is
    resolved now, as for PPO (422 when the project has none), and unset sampling knobs take the
    project's temperature and `max_new_tokens` (at most `MAX_PPO_NEW_TOKENS`): the run records
    what it samples with."""
    snapshots.check_run_snapshot(session, project, config.snapshot_id)
    if config.pair_source == "human":
        if config.reward_model_id is not None:
            reward_version(session, project, config.reward_model_id)
        return config
    try:
        reward = reward_version(session, project, config.reward_model_id)
    except InvalidInput as exc:
        raise InvalidInput(
            f"pair_source {config.pair_source!r} ranks the policy's own answers with a reward"
            f" model: {exc.message}; or use pair_source 'human'",
            exc.errors,
        ) from exc
    ps = project_settings(project)
    update: dict[str, Any] = {"reward_model_id": reward.id}
    if config.temperature is None:
        if not ps.temperature > 0:
            raise InvalidInput(
                "policy pairs need sampled answers, but the project's temperature is 0 (greedy:"
                " every answer alike); set config.temperature",
                [FieldError(None, "config.temperature", "must be > 0 for policy pairs")],
            )
        update["temperature"] = ps.temperature
    if config.max_new_tokens is None:
        update["max_new_tokens"] = min(ps.max_new_tokens, MAX_PPO_NEW_TOKENS)
    return config.model_copy(update=update)


def candidate_for_run(
    session: Session,
    project: Project,
    run_id: int,
    kind: str,
    settings: Settings,
    *,
    snapshot_id: int | None,
    reward_model_id: int | None,
    heldout: dict[str, Any],
) -> tuple[ModelVersion, ModelVersion]:
    """(candidate, parent): the run's pending version, created on the first attempt with the
    active policy as parent; a resumed run keeps the parent it started from."""
    version = session.scalar(
        select(ModelVersion).where(ModelVersion.run_id == run_id, ModelVersion.kind == "policy")
    )
    if version is not None:
        assert version.parent_id is not None
        return version, registry.get_version(session, version.parent_id)
    parent = registry.active_policy(session, project, settings)
    version = registry.create_version(
        session, project, "policy", base_model=parent.base_model, artifact_path=None,
        parent=parent, run_id=run_id, status="pending",
        name=f"{kind} v{registry.next_version(session, project, 'policy')}",
    )  # fmt: skip
    version.artifact_path = str(registry.artifact_dir(settings, project, "policy", version.version))
    version.snapshot_id = snapshot_id
    version.reward_model_id = reward_model_id
    version.metrics = {"heldout": heldout}
    return version, parent


def settle_candidate(version: ModelVersion, metrics: dict[str, Any]) -> None:
    """A trained policy becomes a `candidate` with its training metrics."""
    version.metrics = {**(version.metrics or {}), **metrics}
    version.status = "candidate"
