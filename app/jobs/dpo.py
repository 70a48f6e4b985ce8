"""The `dpo` run: a judgment snapshot's preference pairs (held-out prompts left out) train the
active policy by DPO into a candidate version; its evaluation is queued when a reward model can
judge it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.jobs.common import checkpoint_dir, model_dir, train_candidate
from app.jobs.distributed import trainer_call
from app.jobs.runner import RunContext
from app.kinds.dpo import DPOConfig, DPOKnobs, DPORunConfig
from app.kinds.knobs import knobs_of
from app.ml.counts import distinct_pairs
from app.ml.dpo import PreferencePair, train_dpo
from app.ml.loading import pick_device
from app.services import evaluation, loop, policy_runs, registry, snapshots
from app.services.errors import InvalidInput
from app.services.projects import project_settings


def run(ctx: RunContext) -> dict[str, Any]:
    """Snapshot → preference pairs → DPO from the active policy → candidate."""
    session, settings = ctx.session, ctx.settings
    config = ctx.config_as(DPORunConfig)
    project, run_row = ctx.project(), ctx.run_row()
    ps = project_settings(project)
    snapshot, examples = snapshots.snapshot_for_run(
        session, project, run_row, config.snapshot_id, config.data
    )
    session.commit()
    _, heldout_ids = evaluation.project_prompt_split(
        session, project, ps.heldout_fraction, ps.heldout_seed
    )
    held = {f"prompt:{i}" for i in heldout_ids}
    # A tie (label 0.5) names no preferred side: DPO leaves it out. A reliability-weighted label
    # (0.5 < p <= 1) trains with that pair's own smoothing (`app.ml.dpo.pair_smoothing`).
    used = [e for e in examples if e.label > 0.5 and e.group not in held]
    pairs = [PreferencePair(e.prompt, e.chosen, e.rejected, e.label) for e in used]
    distinct = distinct_pairs(used)
    if len(pairs) < policy_runs.MIN_DPO_PAIRS:
        raise InvalidInput(
            f"only {len(pairs)} preference examples outside the held-out prompts; need at least"
            f" {policy_runs.MIN_DPO_PAIRS}"
        )
    reward_id = config.reward_model_id
    if reward_id is None:
        active = policy_runs.active_reward_version(session, project)
        reward_id = active.id if active is not None else None
    heldout = {"fraction": ps.heldout_fraction, "seed": ps.heldout_seed, "count": len(heldout_ids)}
    version, parent = policy_runs.candidate_for_run(
        session, project, ctx.run_id, ctx.kind, settings, snapshot_id=snapshot.id,
        reward_model_id=None, heldout=heldout,
    )  # fmt: skip
    parent_spec = registry.model_spec(parent)
    out_dir = Path(str(version.artifact_path))
    session.commit()  # never hold a transaction while training (SQLite write lock)

    policy_dir = model_dir(ctx, parent_spec)
    trainer_config = DPOConfig(**knobs_of(config, DPOKnobs), device=str(pick_device()))
    ctx.log(
        f"DPO from policy v{parent.version} on snapshot {snapshot.id}"
        f" ({snapshot.content_hash[:12]}): {len(pairs)} examples of {distinct} distinct pairs"
    )
    result, metrics = train_candidate(
        ctx,
        version,
        trainer_call(
            ctx, "dpo", config.num_processes, train_dpo,
            config=trainer_config, policy_dir=policy_dir, pairs=pairs, output_dir=out_dir,
            checkpoint_dir=checkpoint_dir(ctx), resume=True,
        ),
        algorithm="dpo",
        train_examples=len(pairs),
        train_pairs=distinct,
    )  # fmt: skip
    next_run = None
    if reward_id is not None:
        next_run = loop.after_policy_run(
            session,
            project,
            version,
            reward_id,
            ctx.run_id,
            ctx.log_after_commit,
            settings=settings,
        )
        session.commit()
    else:
        # No reward model yet: the candidate waits for an admin (or a later evaluate run).
        ctx.log(f"policy v{version.version} saved as a candidate; no reward model to evaluate with")
    return {
        "model_version_id": version.id,
        "parent_id": parent.id,
        "snapshot_id": snapshot.id,
        "metrics": metrics,
        "evaluate_run_id": next_run.id if next_run is not None else None,
    }
