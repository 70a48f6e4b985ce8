"""Policy runs: PPO against a reward model, or DPO from a judgment snapshot → candidate version.

    active policy (start and parent) ─┐
    reward model (reward, value init) ┼─► app.ml.ppo.train_ppo ──► policy v(n+1), candidate
    training prompts (held-out kept) ─┘                                   │
    judgment snapshot ─► preference pairs ─► app.ml.dpo.train_dpo ────────┤
                                                                          ▼
                                                       evaluate run (app.services.evaluation)

A candidate is a plain Hugging Face causal LM under `registry.artifact_dir`, with its lineage on
the version row: parent, run, snapshot (the reward model's, for PPO; the run's own, for DPO),
reward model and metrics. Both kinds are resumable: the run finds its version again by run id and
`train_*` continues from the checkpoint under `artifacts/runs/<run id>`.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import DatasetSnapshot, ModelVersion, Project, Run
from app.services import evaluation, loop, registry, runs, snapshots
from app.services.errors import Conflict, FieldError, InvalidInput
from app.services.projects import project_settings

logger = logging.getLogger(__name__)

MIN_DPO_PAIRS = 2


class PPORunConfig(BaseModel):
    """The `config` of a `ppo` run: the knobs of `app.ml.ppo.PPOConfig` a project tunes, with
    defaults sized for a CPU. Unset `max_new_tokens` takes the project's setting."""

    model_config = ConfigDict(extra="forbid")

    reward_model_id: int | None = Field(None, description="default: the active reward model")
    total_steps: int = Field(20, ge=1, le=100_000)
    batch_size: int = Field(8, ge=1, le=4096)
    mini_batch_size: int = Field(4, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=256)
    ppo_epochs: int = Field(2, ge=1, le=64)
    learning_rate: float | None = Field(
        None, gt=0.0, le=1.0, description="default 3e-6 / LoRA 1e-4"
    )
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    max_prompt_length: int = Field(256, ge=8, le=8192)
    temperature: float = Field(0.7, gt=0.0, le=2.0)
    missing_eos_penalty: float | None = Field(1.0)
    kl_coef: float = Field(0.05, ge=0.0)
    adaptive_kl: bool = False
    target_kl: float = Field(6.0, gt=0.0)
    whiten_rewards: bool = False
    use_lora: bool = False
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    max_train_prompts: int | None = Field(None, ge=1, description="sample of training prompts")
    sample_every: int = Field(5, ge=1)
    num_sample_rows: int = Field(4, ge=0, le=64)
    seed: int = 0

    def ppo_config(self, max_new_tokens: int, device: str) -> Any:
        from app.ml.ppo import PPOConfig

        return PPOConfig(
            seed=self.seed,
            total_steps=self.total_steps,
            batch_size=self.batch_size,
            mini_batch_size=self.mini_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            ppo_epochs=self.ppo_epochs,
            learning_rate=self.learning_rate or (1e-4 if self.use_lora else 3e-6),
            max_prompt_length=self.max_prompt_length,
            max_new_tokens=self.max_new_tokens or max_new_tokens,
            temperature=self.temperature,
            missing_eos_penalty=self.missing_eos_penalty,
            kl_coef=self.kl_coef,
            adaptive_kl=self.adaptive_kl,
            target_kl=self.target_kl,
            whiten_rewards=self.whiten_rewards,
            use_lora=self.use_lora,
            lora_r=self.lora_r,
            lora_alpha=self.lora_alpha,
            rollout_forward_batch_size=min(self.batch_size, 16),
            sample_every=self.sample_every,
            num_sample_rows=self.num_sample_rows,
            checkpoint_every=1,
            device=device,
        )


class DPORunConfig(BaseModel):
    """The `config` of a `dpo` run (`app.ml.dpo.DPOConfig` knobs plus where the pairs come from)."""

    model_config = ConfigDict(extra="forbid")

    snapshot_id: int | None = Field(None, description="train on this snapshot (default: a new one)")
    data: snapshots.SnapshotConfig = Field(default_factory=snapshots.SnapshotConfig)
    reward_model_id: int | None = Field(
        None, description="reward model the evaluation uses (default: the active one)"
    )
    epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(8, ge=1, le=512)
    gradient_accumulation_steps: int = Field(1, ge=1, le=256)
    learning_rate: float | None = Field(
        None, gt=0.0, le=1.0, description="default 1e-6 / LoRA 1e-5"
    )
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    max_prompt_length: int = Field(256, ge=8, le=8192)
    max_length: int = Field(512, ge=16, le=8192)
    use_lora: bool = False
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    seed: int = 0


def _field_errors(exc: ValidationError) -> list[FieldError]:
    return [
        FieldError(None, "config." + ".".join(str(p) for p in e["loc"]), e["msg"])
        for e in exc.errors()
    ]


def _reward_version(
    session: Session, project: Project, reward_model_id: int | None
) -> ModelVersion:
    if reward_model_id is None:
        active = session.scalar(
            select(ModelVersion).where(
                ModelVersion.project_id == project.id,
                ModelVersion.kind == "reward",
                ModelVersion.status == "active",
            )
        )
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


def validate_ppo_config(
    session: Session, project: Project, config: dict[str, Any]
) -> dict[str, Any]:
    """Check a `ppo` run's config (422 with field errors) and return it normalised.

    The reward model is resolved now, so the run records which one it trains against even when
    a newer one becomes active before it starts."""
    try:
        parsed = PPORunConfig.model_validate(config)
    except ValidationError as exc:
        raise InvalidInput("invalid ppo config", _field_errors(exc)) from exc
    if parsed.batch_size % parsed.mini_batch_size:
        raise InvalidInput(
            "batch_size must be a multiple of mini_batch_size",
            [FieldError(None, "config.mini_batch_size", "must divide batch_size")],
        )
    if parsed.mini_batch_size % parsed.gradient_accumulation_steps:
        raise InvalidInput(
            "mini_batch_size must be a multiple of gradient_accumulation_steps",
            [FieldError(None, "config.gradient_accumulation_steps", "must divide the minibatch")],
        )
    parsed.reward_model_id = _reward_version(session, project, parsed.reward_model_id).id
    return parsed.model_dump()


def validate_dpo_config(
    session: Session, project: Project, config: dict[str, Any]
) -> dict[str, Any]:
    """Check a `dpo` run's config (422 with field errors) and return it normalised."""
    try:
        parsed = DPORunConfig.model_validate(config)
    except ValidationError as exc:
        raise InvalidInput("invalid dpo config", _field_errors(exc)) from exc
    if parsed.batch_size % parsed.gradient_accumulation_steps:
        raise InvalidInput(
            "batch_size must be a multiple of gradient_accumulation_steps",
            [FieldError(None, "config.gradient_accumulation_steps", "must divide batch_size")],
        )
    if parsed.snapshot_id is not None:
        snapshot = session.get(DatasetSnapshot, parsed.snapshot_id)
        if snapshot is None or snapshot.project_id != project.id:
            raise InvalidInput(
                f"snapshot {parsed.snapshot_id} is not a snapshot of project {project.slug}",
                [FieldError(None, "config.snapshot_id", "unknown snapshot")],
            )
    if parsed.reward_model_id is not None:
        _reward_version(session, project, parsed.reward_model_id)
    return parsed.model_dump()


def _version_for_run(session: Session, run_id: int) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.run_id == run_id, ModelVersion.kind == "policy")
    )


def _candidate(
    session: Session,
    project: Project,
    ctx: runs.RunContext,
    *,
    snapshot_id: int | None,
    reward_model_id: int | None,
    heldout: dict[str, Any],
) -> tuple[ModelVersion, ModelVersion]:
    """(candidate, parent): the run's pending version, created on the first attempt with the
    active policy as parent; a resumed run keeps the parent it started from."""
    version = _version_for_run(session, ctx.run_id)
    if version is not None:
        assert version.parent_id is not None
        return version, registry.get_version(session, version.parent_id)
    parent = registry.active_policy(session, project, ctx.settings)
    version = registry.create_version(
        session, project, "policy", base_model=parent.base_model, artifact_path=None,
        parent=parent, run_id=ctx.run_id, status="pending",
        name=f"{ctx.kind} v{registry.next_version(session, project, 'policy')}",
    )  # fmt: skip
    version.artifact_path = str(
        registry.artifact_dir(ctx.settings, project, "policy", version.version)
    )
    version.snapshot_id = snapshot_id
    version.reward_model_id = reward_model_id
    version.metrics = {"heldout": heldout}
    session.commit()
    return version, parent


def _checkpoint_dir(ctx: runs.RunContext) -> Path:
    """Where this run's checkpoints live. On a run's first attempt anything already there is
    stale (a run id reused after a database was emptied) and must not be resumed from."""
    path = Path(ctx.settings.artifacts_dir) / "runs" / str(ctx.run_id)
    if ctx.attempt <= 1 and path.exists():
        shutil.rmtree(path)
    return path


def _train(ctx: runs.RunContext, version: ModelVersion, train: Any) -> Any:
    """Call `train` (the ML function); on failure mark the candidate failed, except when the run
    was cancelled or the worker stopped: a requeued run resumes into the same version."""
    from app.ml.hooks import Cancelled

    try:
        return train()
    except Exception as exc:
        ctx.session.rollback()
        if not isinstance(exc, Cancelled):
            version.status = "failed"
            ctx.session.commit()
        raise


def _finish(
    ctx: runs.RunContext, version: ModelVersion, metrics: dict[str, Any], reward_id: int | None
) -> Run | None:
    session = ctx.session
    session.refresh(version)
    version.metrics = {**(version.metrics or {}), **metrics}
    version.status = "candidate"
    session.commit()
    ctx.log(f"policy v{version.version} saved as a candidate")
    return loop.after_policy_run(ctx, version, reward_id)


def execute_ppo_run(ctx: runs.RunContext) -> dict[str, Any]:
    """The `ppo` run handler: active policy + reward model + training prompts → candidate."""
    from app.ml import loading
    from app.ml.ppo import train_ppo

    session, settings = ctx.session, ctx.settings
    config = PPORunConfig.model_validate(ctx.config)
    project = session.get(Project, ctx.project_id)
    run = session.get(Run, ctx.run_id)
    assert project is not None and run is not None
    ps = project_settings(project)
    reward = _reward_version(session, project, config.reward_model_id)
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
    version, parent = _candidate(
        session, project, ctx, snapshot_id=reward.snapshot_id, reward_model_id=reward.id,
        heldout=heldout,
    )  # fmt: skip
    run.snapshot_id = reward.snapshot_id
    parent_spec, reward_dir = registry.model_spec(parent), reward.artifact_path
    out_dir = Path(str(version.artifact_path))
    session.commit()  # never hold a transaction while training (SQLite write lock)

    policy_dir = loading.resolve_model_dir(
        parent_spec, Path(settings.artifacts_dir), allow_hub=settings.allow_hub_downloads
    )
    ppo_config = config.ppo_config(min(ps.max_new_tokens, 256), str(loading.pick_device()))
    ctx.log(
        f"PPO from policy v{parent.version} against reward model v{reward.version}:"
        f" {len(prompts)} training prompts ({len(heldout_ids)} held out), {config.total_steps}"
        f" steps of {config.batch_size}"
    )

    def on_samples(step: int, table: list[dict[str, Any]]) -> None:
        if table:
            ctx.log(f"step {step} sample (score {table[0]['score']:.3f}): {table[0]['response']!r}")

    checkpoint_dir = _checkpoint_dir(ctx)
    started = time.perf_counter()
    result = _train(
        ctx,
        version,
        lambda: train_ppo(
            ppo_config,
            policy_dir,
            reward_dir,
            prompts,
            out_dir,
            checkpoint_dir=checkpoint_dir,
            hooks=ctx.hooks,
            resume=True,
            on_samples=on_samples,
        ),  # fmt: skip
    )
    metrics: dict[str, Any] = {
        "train": {k: float(v) for k, v in result.metrics.items()},
        "steps": result.steps,
        "train_prompts": len(prompts),
        "train_seconds": round(time.perf_counter() - started, 1),
        "algorithm": "ppo",
    }
    next_run = _finish(ctx, version, metrics, reward.id)
    return {
        "model_version_id": version.id,
        "parent_id": parent.id,
        "reward_model_id": reward.id,
        "metrics": metrics,
        "samples": {str(step): table for step, table in result.samples.items()},
        "evaluate_run_id": next_run.id if next_run is not None else None,
    }


def execute_dpo_run(ctx: runs.RunContext) -> dict[str, Any]:
    """The `dpo` run handler: judgment snapshot → preference pairs (held-out prompts left out)
    → DPO from the active policy → candidate."""
    from app.ml import loading
    from app.ml.dpo import DPOConfig, PreferencePair, train_dpo

    session, settings = ctx.session, ctx.settings
    config = DPORunConfig.model_validate(ctx.config)
    project = session.get(Project, ctx.project_id)
    run = session.get(Run, ctx.run_id)
    assert project is not None and run is not None
    ps = project_settings(project)
    snapshot, examples = snapshots.snapshot_for_run(
        session, project, run, config.snapshot_id, config.data
    )
    _, heldout_ids = evaluation.project_prompt_split(
        session, project, ps.heldout_fraction, ps.heldout_seed
    )
    held = {f"prompt:{i}" for i in heldout_ids}
    # Ties are soft labels for a reward model; DPO needs a preferred side.
    pairs = [
        PreferencePair(e.prompt, e.chosen, e.rejected)
        for e in examples
        if e.label == 1.0 and e.group not in held
    ]
    if len(pairs) < MIN_DPO_PAIRS:
        raise InvalidInput(
            f"only {len(pairs)} preference pairs outside the held-out prompts; need at least"
            f" {MIN_DPO_PAIRS}"
        )
    reward_id = config.reward_model_id
    if reward_id is None:
        active_rm = session.scalar(
            select(ModelVersion.id).where(
                ModelVersion.project_id == project.id,
                ModelVersion.kind == "reward",
                ModelVersion.status == "active",
            )
        )
        reward_id = active_rm
    heldout = {"fraction": ps.heldout_fraction, "seed": ps.heldout_seed, "count": len(heldout_ids)}
    version, parent = _candidate(
        session, project, ctx, snapshot_id=snapshot.id, reward_model_id=None, heldout=heldout
    )
    parent_spec = registry.model_spec(parent)
    out_dir = Path(str(version.artifact_path))
    session.commit()

    policy_dir = loading.resolve_model_dir(
        parent_spec, Path(settings.artifacts_dir), allow_hub=settings.allow_hub_downloads
    )
    dpo_config = DPOConfig(
        seed=config.seed,
        epochs=config.epochs,
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate or (1e-5 if config.use_lora else 1e-6),
        beta=config.beta,
        label_smoothing=config.label_smoothing,
        max_prompt_length=config.max_prompt_length,
        max_length=config.max_length,
        use_lora=config.use_lora,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        checkpoint_every=10,
        device=str(loading.pick_device()),
    )
    ctx.log(
        f"DPO from policy v{parent.version} on snapshot {snapshot.id}"
        f" ({snapshot.content_hash[:12]}): {len(pairs)} pairs"
    )
    checkpoint_dir = _checkpoint_dir(ctx)
    started = time.perf_counter()
    result = _train(
        ctx,
        version,
        lambda: train_dpo(
            dpo_config,
            policy_dir,
            pairs,
            out_dir,
            checkpoint_dir=checkpoint_dir,
            hooks=ctx.hooks,
            resume=True,
        ),  # fmt: skip
    )
    metrics: dict[str, Any] = {
        "train": {k: float(v) for k, v in result.metrics.items()},
        "steps": result.steps,
        "train_pairs": len(pairs),
        "train_seconds": round(time.perf_counter() - started, 1),
        "algorithm": "dpo",
    }
    next_run = None
    if reward_id is not None:
        next_run = _finish(ctx, version, metrics, reward_id)
    else:
        _finish_without_evaluation(ctx, version, metrics)
    return {
        "model_version_id": version.id,
        "parent_id": parent.id,
        "snapshot_id": snapshot.id,
        "metrics": metrics,
        "evaluate_run_id": next_run.id if next_run is not None else None,
    }


def _finish_without_evaluation(
    ctx: runs.RunContext, version: ModelVersion, metrics: dict[str, Any]
) -> None:
    # No reward model yet: the candidate waits for an admin (or a later evaluate run).
    ctx.session.refresh(version)
    version.metrics = {**(version.metrics or {}), **metrics}
    version.status = "candidate"
    ctx.session.commit()
    ctx.log(f"policy v{version.version} saved as a candidate; no reward model to evaluate with")
