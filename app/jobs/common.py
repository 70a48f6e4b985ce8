"""Pieces every training job shares: resolving a model spec, where a run's checkpoints live,
and training into a pending model version (marked failed if training fails)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from app.jobs.runner import RunContext
from app.ml.hooks import Cancelled
from app.ml.loading import resolve_model_dir
from app.models import ModelVersion
from app.services import policy_runs

T = TypeVar("T")


class TrainResult(Protocol):
    """What a policy trainer returns (`PPOResult`, `DPOResult`), as far as jobs read it."""

    @property
    def metrics(self) -> Mapping[str, float]: ...
    @property
    def steps(self) -> int: ...


R = TypeVar("R", bound=TrainResult)


def model_dir(ctx: RunContext, spec: str) -> Path | str:
    """Where the model `spec` (a version's artifacts, `smollm2`, a path or a hub id) loads from."""
    settings = ctx.settings
    return resolve_model_dir(
        spec, Path(settings.artifacts_dir), allow_hub=settings.allow_hub_downloads
    )


def checkpoint_dir(ctx: RunContext) -> Path:
    """Where this run's checkpoints live. On a run's first attempt anything already there is
    stale (a run id reused after a database was emptied) and must not be resumed from."""
    path = Path(ctx.settings.artifacts_dir) / "runs" / str(ctx.run_id)
    if ctx.attempt <= 1 and path.exists():
        shutil.rmtree(path)
    return path


def train_into(ctx: RunContext, version: ModelVersion, train: Callable[[], T]) -> T:
    """Call `train` (the ML function); on failure mark the version failed, except when the run
    was cancelled or the worker stopped: a requeued run resumes into the same version."""
    try:
        return train()
    except Exception as exc:
        ctx.session.rollback()
        if not isinstance(exc, Cancelled):
            version.status = "failed"
            ctx.session.commit()
        raise


def train_candidate(
    ctx: RunContext, version: ModelVersion, train: Callable[[], R], *, algorithm: str, **data: int
) -> tuple[R, dict[str, Any]]:
    """Train a policy into its pending version; it becomes a `candidate` with the training
    metrics (and `data`, such as how many prompts or pairs it saw), committed."""
    started = time.perf_counter()
    result = train_into(ctx, version, train)
    metrics: dict[str, Any] = {
        "train": {k: float(v) for k, v in result.metrics.items()},
        "steps": result.steps,
        **data,
        "train_seconds": round(time.perf_counter() - started, 1),
        "algorithm": algorithm,
    }
    ctx.session.refresh(version)
    policy_runs.settle_candidate(version, metrics)
    ctx.session.commit()
    ctx.log(f"policy v{version.version} saved as a candidate")
    return result, metrics
