"""Interactive model work for the API: score responses with a reward model, or answer a prompt
with a policy version (the playground).

The web process never loads a model. A call becomes a short run (`score` or `sample`) on the
model queue; the API waits for its row to finish, up to a timeout. When the worker is busy (a
long training run on the embedded default's single worker), the call answers 503 and the run is
cancelled, so no stale work piles up. Every call is a row with its lineage, like any run.
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import ModelVersion, Project, Run
from app.services import registry, runs
from app.services.errors import Conflict, FieldError, InvalidInput, ServiceError

if TYPE_CHECKING:
    from app.ml.reward import LoadedRewardModel

POLL_INTERVAL_S = 0.1


class WorkerBusy(ServiceError):
    status_code = 503


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class PromptIn(BaseModel):
    """A prompt as text or as chat messages (the last one from the user)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    messages: list[Message] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> PromptIn:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' must not be empty")
        if self.messages is not None and (not self.messages or self.messages[-1].role != "user"):
            raise ValueError("the last message must be from the user")
        return self

    def as_messages(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]


class ScoreConfig(PromptIn):
    model_version_id: int
    responses: list[str] = Field(min_length=1, max_length=64)


class SampleConfig(PromptIn):
    model_version_id: int
    num_responses: int = Field(1, ge=1, le=8)
    max_new_tokens: int = Field(128, ge=1, le=2048)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    seed: int = 0


def _parse(model: type[BaseModel], config: dict[str, Any]) -> BaseModel:
    try:
        return model.model_validate(config)
    except ValidationError as exc:
        raise InvalidInput(
            "invalid request",
            [
                FieldError(None, ".".join(str(p) for p in e["loc"]) or None, e["msg"])
                for e in exc.errors()
            ],
        ) from exc


def _usable(version: ModelVersion, kind: str) -> None:
    if version.kind != kind:
        raise InvalidInput(
            f"model version {version.id} is a {version.kind} model, not a {kind} model"
        )
    if version.status in ("pending", "failed"):
        raise Conflict(f"model version {version.id} is {version.status}; it has no usable weights")


def validate_score_config(
    session: Session, project: Project, config: dict[str, Any]
) -> dict[str, Any]:
    parsed = _parse(ScoreConfig, config)
    assert isinstance(parsed, ScoreConfig)
    version = registry.get_version(session, parsed.model_version_id)
    _usable(version, "reward")
    if not version.artifact_path:
        raise Conflict(f"reward model version {version.id} has no saved weights")
    return parsed.model_dump()


def validate_sample_config(
    session: Session, project: Project, config: dict[str, Any]
) -> dict[str, Any]:
    parsed = _parse(SampleConfig, config)
    assert isinstance(parsed, SampleConfig)
    _usable(registry.get_version(session, parsed.model_version_id), "policy")
    return parsed.model_dump()


def await_run(session: Session, run: Run, settings: Settings, timeout_s: float) -> Run:
    """Wait for `run` to finish. On timeout, cancel it and raise WorkerBusy (503)."""
    deadline = time.monotonic() + timeout_s
    while True:
        session.expire_all()
        current = session.get(Run, run.id)
        assert current is not None
        session.commit()  # never keep a transaction (and SQLite's lock) while sleeping
        if current.status in ("succeeded", "failed", "cancelled"):
            return current
        if time.monotonic() > deadline:
            try:
                runs.cancel_run(session, current, settings=settings)
            except Conflict:
                session.expire_all()
                finished = session.get(Run, run.id)
                if finished is not None and finished.status in ("succeeded", "failed", "cancelled"):
                    return finished
            raise WorkerBusy(
                f"no model worker answered within {timeout_s:.0f} s (run {run.id}; a worker may be"
                " busy with a training run); try again later"
            )
        time.sleep(POLL_INTERVAL_S)


def run_interactive(
    session: Session,
    version: ModelVersion,
    kind: str,
    config: dict[str, Any],
    *,
    settings: Settings,
    actor_id: int | None,
    timeout_s: float,
) -> dict[str, Any]:
    """Queue a `score` or `sample` run for `version`, wait for it, and return its result."""
    project = session.get(Project, version.project_id)
    assert project is not None
    run = runs.create_run(
        session,
        project,
        kind,
        {**config, "model_version_id": version.id},
        settings=settings,
        actor_id=actor_id,
        trigger="api",
    )
    done = await_run(session, run, settings, timeout_s)
    if done.status != "succeeded":
        raise ServiceError(f"{kind} run {done.id} {done.status}: {done.error or 'no error given'}")
    return dict(done.result or {})


# --- worker side ------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _reward_model(path: str, device: str) -> LoadedRewardModel:
    # One model stays loaded in the worker: repeated scoring calls skip the load.
    from app.ml.reward import load_reward_model

    return load_reward_model(path, device)


def execute_score_run(ctx: runs.RunContext) -> dict[str, Any]:
    """The `score` run handler: rewards of the responses under the reward model version."""
    from app.ml.loading import pick_device
    from app.ml.reward import score_responses

    config = ScoreConfig.model_validate(ctx.config)
    version = registry.get_version(ctx.session, config.model_version_id)
    ctx.session.commit()
    assert version.artifact_path
    model = _reward_model(str(Path(version.artifact_path)), str(pick_device()))
    scores = score_responses(model, config.as_messages(), config.responses)
    return {"model_version_id": version.id, "scores": scores}


def execute_sample_run(ctx: runs.RunContext) -> dict[str, Any]:
    """The `sample` run handler: a policy version answers one prompt."""
    from app.ml.generation import SamplingConfig, generate_responses
    from app.ml.loading import load_causal_lm

    config = SampleConfig.model_validate(ctx.config)
    version = registry.get_version(ctx.session, config.model_version_id)
    spec = registry.model_spec(version)
    ctx.session.commit()
    loaded = load_causal_lm(
        spec, Path(ctx.settings.artifacts_dir), allow_hub=ctx.settings.allow_hub_downloads
    )
    sampling = SamplingConfig(
        num_responses=config.num_responses,
        temperature=max(config.temperature, 1e-5),
        top_p=config.top_p,
        max_new_tokens=config.max_new_tokens,
        do_sample=config.temperature > 0,
        seed=config.seed,
    )
    [answers] = generate_responses(loaded, [config.as_messages()], sampling)
    return {
        "model_version_id": version.id,
        "responses": [
            {"text": a.text, "truncated": a.truncated, "tokens": a.num_tokens} for a in answers
        ],
    }
