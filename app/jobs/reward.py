"""The `reward` run: snapshot the judgments, split by prompt, train a Bradley-Terry reward
model, register its version, and (in auto mode) start PPO against it."""

from __future__ import annotations

from typing import Any

from app.jobs.common import checkpoint_dir, model_dir, train_into
from app.jobs.distributed import trainer_call
from app.jobs.runner import RunContext
from app.kinds.knobs import knobs_of
from app.kinds.reward import RewardConfig, RewardKnobs, RewardRunConfig
from app.ml.counts import distinct_pairs
from app.ml.loading import pick_device
from app.ml.preferences import split_by_prompt
from app.ml.reward import train_reward_model
from app.services import loop, registry, reward_runs, snapshots
from app.services.errors import InvalidInput


def run(ctx: RunContext) -> dict[str, Any]:
    """Snapshot, split, train, save, register the version, then the loop's next step."""
    session, settings = ctx.session, ctx.settings
    config = ctx.config_as(RewardRunConfig)
    project, run_row = ctx.project(), ctx.run_row()

    snapshot, examples = snapshots.snapshot_for_run(
        session, project, run_row, config.snapshot_id, config.data
    )
    session.commit()
    train, val = split_by_prompt(examples, config.val_fraction, config.split_seed)
    ctx.log(
        f"snapshot {snapshot.id} ({snapshot.content_hash[:12]}): {len(examples)} examples of"
        f" {distinct_pairs(examples)} distinct pairs; train {len(train)} examples of"
        f" {distinct_pairs(train)} pairs, validation {len(val)} examples of"
        f" {distinct_pairs(val)} pairs (split by prompt)"
    )
    if len(train) < reward_runs.MIN_TRAIN_PAIRS:
        raise InvalidInput(
            f"only {len(train)} training examples after the split;"
            f" need at least {reward_runs.MIN_TRAIN_PAIRS}"
        )

    spec = config.backbone or registry.base_policy_spec(project, settings)
    backbone = model_dir(ctx, spec)
    version = reward_runs.reward_version_for_run(session, project, ctx.run_id, base_model=spec)
    out_dir = registry.artifact_dir(settings, project, "reward", version.version)
    version.artifact_path = str(out_dir)
    version.snapshot_id = snapshot.id
    session.commit()  # never hold a transaction while training (SQLite write lock)

    trainer_config = RewardConfig(
        **knobs_of(config, RewardKnobs),
        backbone=str(backbone),
        device=str(pick_device()),
    )
    result = train_into(
        ctx,
        version,
        trainer_call(
            ctx, "reward", config.num_processes, train_reward_model,
            config=trainer_config, train=train, val=val, output_dir=out_dir,
            checkpoint_dir=checkpoint_dir(ctx), resume=True, snapshot_id=snapshot.id,
        ),
    )  # fmt: skip

    metrics: dict[str, Any] = {k: float(v) for k, v in result.final_metrics.items()}
    # Examples are judgments, pairs distinct comparisons (three raters on one pair: 3 and 1).
    metrics["train_examples"] = result.train_examples
    metrics["train_pairs"] = result.train_pairs
    metrics["val_examples"] = result.val_examples
    metrics["val_pairs"] = result.val_pairs
    metrics["train_seconds"] = result.train_seconds
    if result.best_val_accuracy is not None:
        metrics["best_val_accuracy"] = result.best_val_accuracy
        # The accuracy is over examples; its interval over the distinct pairs it rests on.
        metrics["best_val_accuracy_pairs"] = result.best_val_accuracy_pairs
        if result.best_val_accuracy_ci95 is not None:
            metrics["best_val_accuracy_ci95"] = list(result.best_val_accuracy_ci95)
    version.metrics = metrics
    reward_runs.settle_reward_version(session, project, version)
    session.commit()
    ctx.log(f"reward model v{version.version} saved ({version.status}); metrics {metrics}")
    next_run = loop.after_reward_run(
        session, project, version, ctx.run_id, ctx.log_after_commit, settings=settings
    )
    session.commit()
    return {
        "model_version_id": version.id,
        "snapshot_id": snapshot.id,
        "metrics": metrics,
        "active": version.status == "active",
        "policy_run_id": next_run.id if next_run is not None else None,
        "policy_run_kind": next_run.kind if next_run is not None else None,
    }
