"""The `rloo` and `grpo` runs: the active policy, trained against a reward model on the
project's training prompts (held-out ones never) by a critic-free estimator, becomes a candidate
version; then its evaluation is queued. The same steps as a `ppo` run (`app.jobs.ppo`), with
`app.ml.critic_free` as the trainer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from app.jobs.common import checkpoint_dir, model_dir, train_candidate
from app.jobs.runner import RunContext
from app.kinds.critic_free import CriticFreeConfig, CriticFreeKnobs, GRPORunConfig, RLOORunConfig
from app.kinds.knobs import knobs_of
from app.ml.critic_free import train_critic_free
from app.ml.loading import pick_device
from app.services import evaluation, loop, policy_runs, registry
from app.services.errors import InvalidInput
from app.services.projects import project_settings


def rloo(ctx: RunContext) -> dict[str, Any]:
    """An `rloo` run: leave-one-out advantages, KL in the reward by default."""
    return _run(ctx, ctx.config_as(RLOORunConfig))


def grpo(ctx: RunContext) -> dict[str, Any]:
    """A `grpo` run: group-normalised advantages, KL in the loss by default."""
    return _run(ctx, ctx.config_as(GRPORunConfig))


def _run(ctx: RunContext, config: RLOORunConfig | GRPORunConfig) -> dict[str, Any]:
    """Active policy + reward model + training prompts → candidate."""
    session, settings = ctx.session, ctx.settings
    project, run_row = ctx.project(), ctx.run_row()
    ps = project_settings(project)
    reward = policy_runs.reward_version(session, project, config.reward_model_id)
    assert reward.artifact_path
    train_ids, heldout_ids = evaluation.project_prompt_split(
        session, project, ps.heldout_fraction, ps.heldout_seed
    )
    if config.max_train_prompts is not None and len(train_ids) > config.max_train_prompts:
        train_ids = sorted(random.Random(config.seed).sample(train_ids, config.max_train_prompts))
    prompts = evaluation.load_prompt_messages(session, train_ids)
    if not prompts:
        raise InvalidInput("the project has no training prompts (all are held out or none exist)")
    heldout = {"fraction": ps.heldout_fraction, "seed": ps.heldout_seed, "count": len(heldout_ids)}
    version, parent = policy_runs.candidate_for_run(
        session, project, ctx.run_id, ctx.kind, settings, snapshot_id=reward.snapshot_id,
        reward_model_id=reward.id, heldout=heldout,
    )  # fmt: skip
    run_row.snapshot_id = reward.snapshot_id
    parent_spec, reward_dir = registry.model_spec(parent), reward.artifact_path
    out_dir = Path(str(version.artifact_path))
    session.commit()  # never hold a transaction while training (SQLite write lock)

    policy_dir = model_dir(ctx, parent_spec)
    trainer_config = CriticFreeConfig(
        **knobs_of(config, CriticFreeKnobs), device=str(pick_device())
    )
    name = config.estimator.upper()
    ctx.log(
        f"{name} from policy v{parent.version} against reward model v{reward.version}:"
        f" {len(prompts)} training prompts ({len(heldout_ids)} held out), {config.total_steps}"
        f" steps of {config.batch_size} prompts x {config.num_generations} answers"
    )

    def on_samples(step: int, table: list[dict[str, Any]]) -> None:
        if table:
            ctx.log(f"step {step} sample (score {table[0]['score']:.3f}): {table[0]['response']!r}")

    result, metrics = train_candidate(
        ctx,
        version,
        lambda: train_critic_free(
            trainer_config, policy_dir, reward_dir, prompts, out_dir, checkpoint_dir(ctx),
            hooks=ctx.hooks, resume=True, on_samples=on_samples,
        ),
        algorithm=config.estimator,
        train_prompts=len(prompts),
    )  # fmt: skip
    next_run = loop.after_policy_run(
        session, project, version, reward.id, ctx.run_id, ctx.log_after_commit, settings=settings
    )
    session.commit()
    return {
        "model_version_id": version.id,
        "parent_id": parent.id,
        "reward_model_id": reward.id,
        "metrics": metrics,
        "samples": {str(step): table for step, table in result.samples.items()},
        "evaluate_run_id": next_run.id if next_run is not None else None,
    }
