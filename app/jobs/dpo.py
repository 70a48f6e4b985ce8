"""The `dpo` run: preference pairs train the active policy by DPO into a candidate version; its
evaluation is queued when a reward model can judge it.

Where the pairs come from is `pair_source`:

* `human`: a judgment snapshot's pairs (judgments of held-out prompts left out, ties dropped).
* `policy`: on-policy (iterative) DPO. The parent policy answers a seeded sample of training
  prompts (never held-out ones) K times, the reward model ranks the answers, and one pair per
  prompt that the reward model can tell apart is kept (`app.ml.online_pairs`). The closed loop
  runs one such run per round, so each round trains on the current policy's own answers.
* `mixed`: both, in one training set.

Resuming: the policy pairs are written to the run's checkpoint directory before training starts
and read back on a resumed attempt (they are also a function of the seed, so an attempt that
died while sampling draws the same ones again); then `train_dpo` resumes from its checkpoint.
"""

from __future__ import annotations

import gc
import random
from pathlib import Path
from typing import Any

import torch

from app.jobs.common import checkpoint_dir, model_dir, train_candidate, train_into
from app.jobs.distributed import trainer_call
from app.jobs.runner import RunContext
from app.kinds.dpo import DPOConfig, DPOKnobs, DPORunConfig, OnlinePairKnobs
from app.kinds.knobs import knobs_of
from app.ml.counts import distinct_pairs
from app.ml.dpo import PreferencePair, train_dpo
from app.ml.loading import load_causal_lm, pick_device
from app.ml.online_pairs import PolicyPairs, load_pairs, policy_pairs, save_pairs
from app.ml.reward import load_reward_model
from app.models import ModelVersion
from app.services import evaluation, loop, policy_runs, registry, snapshots
from app.services.errors import InvalidInput
from app.services.projects import ProjectSettings, project_settings

PAIRS_FILE = "policy_pairs.json"


def run(ctx: RunContext) -> dict[str, Any]:
    """Human and/or policy pairs → DPO from the active policy → candidate."""
    session, settings = ctx.session, ctx.settings
    config = ctx.config_as(DPORunConfig)
    project, run_row = ctx.project(), ctx.run_row()
    ps = project_settings(project)
    train_ids, heldout_ids = evaluation.project_prompt_split(
        session, project, ps.heldout_fraction, ps.heldout_seed
    )
    snapshot = None
    human: list[PreferencePair] = []
    distinct = 0
    if config.pair_source != "policy":
        snapshot, examples = snapshots.snapshot_for_run(
            session, project, run_row, config.snapshot_id, config.data
        )
        session.commit()
        held = {f"prompt:{i}" for i in heldout_ids}
        # A tie (label 0.5) names no preferred side: DPO leaves it out. A reliability-weighted
        # label (0.5 < p <= 1) trains with that pair's own smoothing (`dpo.pair_smoothing`).
        used = [e for e in examples if e.label > 0.5 and e.group not in held]
        human = [PreferencePair(e.prompt, e.chosen, e.rejected, e.label) for e in used]
        distinct = distinct_pairs(used)
    if config.pair_source == "human" and len(human) < policy_runs.MIN_DPO_PAIRS:
        raise InvalidInput(
            f"only {len(human)} preference examples outside the held-out prompts; need at least"
            f" {policy_runs.MIN_DPO_PAIRS}"
        )
    reward: ModelVersion | None = None
    if config.pair_source != "human":
        reward = policy_runs.reward_version(session, project, config.reward_model_id)
    reward_id = config.reward_model_id if reward is None else reward.id
    if reward_id is None:
        active = policy_runs.active_reward_version(session, project)
        reward_id = active.id if active is not None else None
    heldout = {"fraction": ps.heldout_fraction, "seed": ps.heldout_seed, "count": len(heldout_ids)}
    # Policy pairs only: like PPO, the candidate descends from the reward model's snapshot.
    snapshot_id = snapshot.id if snapshot is not None else reward.snapshot_id if reward else None
    if snapshot is None:
        run_row.snapshot_id = snapshot_id
    version, parent = policy_runs.candidate_for_run(
        session, project, ctx.run_id, ctx.kind, settings, snapshot_id=snapshot_id,
        reward_model_id=reward.id if reward is not None else None, heldout=heldout,
    )  # fmt: skip
    parent_spec = registry.model_spec(parent)
    out_dir = Path(str(version.artifact_path))
    session.commit()  # never hold a transaction while sampling or training (SQLite write lock)

    # Once per attempt: a first attempt's call empties the directory of a stale run.
    checkpoints = checkpoint_dir(ctx)
    drawn: PolicyPairs | None = None
    if reward is not None:
        knobs = _pair_knobs(config, ps, ctx.run_id)
        prompt_ids = policy_prompt_ids(train_ids, config.max_policy_prompts, knobs.sampling_seed)
        prompts = evaluation.load_prompt_messages(session, prompt_ids)
        session.commit()
        key = {
            "config": knobs.to_dict(),
            "prompt_ids": prompt_ids,
            "policy_version_id": parent.id,
            "reward_model_id": reward.id,
        }
        reward_dir = str(reward.artifact_path)
        drawn = train_into(
            ctx,
            version,
            lambda: _policy_pairs(ctx, knobs, parent_spec, reward_dir, prompts, checkpoints, key),
        )
    policy = [p.preference() for p in drawn.pairs] if drawn is not None else []
    pairs = human + policy
    if len(pairs) < policy_runs.MIN_DPO_PAIRS:
        version.status = "failed"
        session.commit()
        raise InvalidInput(
            f"only {len(pairs)} preference pairs ({len(human)} human, {len(policy)} from the"
            f" policy); need at least {policy_runs.MIN_DPO_PAIRS}: lower min_score_margin, raise"
            " samples_per_prompt or max_policy_prompts, or add judgments"
        )
    summary = _pair_summary(config, len(human), drawn)

    policy_dir = model_dir(ctx, parent_spec)
    trainer_config = DPOConfig(**knobs_of(config, DPOKnobs), device=str(pick_device()))
    sources = []
    if snapshot is not None:
        sources.append(
            f"{len(human)} examples of {distinct} distinct pairs from snapshot {snapshot.id}"
            f" ({snapshot.content_hash[:12]})"
        )
    if reward is not None:
        sources.append(
            f"{len(policy)} policy pairs ranked by reward model v{reward.version}"
            f" (mean margin {summary['mean_margin']:.3f})"
        )
    ctx.log(f"DPO from policy v{parent.version} on {' and '.join(sources)}")
    result, metrics = train_candidate(
        ctx,
        version,
        trainer_call(
            ctx, "dpo", config.num_processes, train_dpo,
            config=trainer_config, policy_dir=policy_dir, pairs=pairs, output_dir=out_dir,
            checkpoint_dir=checkpoints, resume=True,
        ),
        algorithm="dpo",
        train_examples=len(pairs),
        train_pairs=distinct + len(policy),
        human_pairs=len(human),
        policy_pairs=len(policy),
    )  # fmt: skip
    version.metrics = {**(version.metrics or {}), "pairs": summary}
    session.commit()
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
        "snapshot_id": snapshot_id,
        "reward_model_id": reward.id if reward is not None else None,
        "pairs": summary,
        "metrics": metrics,
        "evaluate_run_id": next_run.id if next_run is not None else None,
    }


def policy_prompt_ids(train_ids: list[int], limit: int | None, seed: int) -> list[int]:
    """The training prompts the policy answers: all of them, or a sample of `limit` drawn with
    `seed` (in id order). The caller passes training prompts only, never held-out ones."""
    if limit is None or len(train_ids) <= limit:
        return list(train_ids)
    return sorted(random.Random(seed).sample(train_ids, limit))


def _pair_knobs(config: DPORunConfig, ps: ProjectSettings, run_id: int) -> OnlinePairKnobs:
    """The run's policy-pair knobs, with unset ones resolved: sampling from the project (the
    run's validation normally did this already) and the seed from the run id."""
    values = knobs_of(config, OnlinePairKnobs)
    if values["temperature"] is None:
        values["temperature"] = ps.temperature
    if values["max_new_tokens"] is None:
        values["max_new_tokens"] = min(ps.max_new_tokens, policy_runs.MAX_PPO_NEW_TOKENS)
    if values["sampling_seed"] is None:
        values["sampling_seed"] = run_id
    return OnlinePairKnobs(**values)


def _policy_pairs(
    ctx: RunContext,
    knobs: OnlinePairKnobs,
    policy_spec: str,
    reward_dir: str,
    prompts: list[list[dict[str, str]]],
    checkpoints: Path,
    key: dict[str, Any],
) -> PolicyPairs:
    """The pairs an earlier attempt of this run drew, or new ones, saved before training."""
    path = checkpoints / PAIRS_FILE
    if (saved := load_pairs(path, key)) is not None:
        ctx.log(f"resumed with the {len(saved.pairs)} policy pairs drawn by an earlier attempt")
        return saved
    if not prompts:
        raise InvalidInput("the project has no training prompts (all are held out or none exist)")
    settings = ctx.settings
    device = pick_device()
    ctx.log(
        f"sampling {knobs.samples_per_prompt} answers to each of {len(prompts)} training prompts"
        f" (temperature {knobs.temperature}, at most {knobs.max_new_tokens} tokens)"
    )
    policy = load_causal_lm(
        policy_spec, Path(settings.artifacts_dir), device, allow_hub=settings.allow_hub_downloads
    )
    reward = load_reward_model(reward_dir, device)
    try:
        drawn = policy_pairs(policy, reward, prompts, knobs, ctx.hooks)
    finally:
        del policy, reward
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save_pairs(path, drawn, key)
    return drawn


def _pair_summary(config: DPORunConfig, human: int, drawn: PolicyPairs | None) -> dict[str, Any]:
    """What the run trained on, per source, for the run's result and the candidate's metrics."""
    summary: dict[str, Any] = {"source": config.pair_source, "human": human, "policy": 0}
    if drawn is not None:
        stats = drawn.stats()
        summary.update(
            policy=len(drawn.pairs),
            prompts=drawn.prompts,
            answers=drawn.answers,
            truncated=drawn.truncated,
            dropped_low_margin=drawn.dropped_low_margin,
            dropped_identical=drawn.dropped_identical,
            mean_margin=round(stats["mean_margin"], 6),
        )
    return summary
