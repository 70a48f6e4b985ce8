"""Interactive model work: score answers with a reward model, or answer a prompt with a policy
version (the playground).

The web process never loads a model. A call becomes a short run (`score` or `sample`) on the
model queue. The API waits for its row to finish, up to a timeout, and past it answers with the
run to follow (202) and leaves it queued: a worker busy with a long training run (the embedded
default has one) gets to it afterwards, and the answer is then the run's `result`. The console
queues the run and follows it from the page. Every call is a row with its lineage, like any run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.kinds.interactive import PromptIn, SampleRunConfig, ScoreRunConfig
from app.models import ModelVersion, Project, Run
from app.models.training import FINISHED_STATUSES
from app.services import registry, runs
from app.services.errors import Conflict, FieldError, InvalidInput, ServiceError

POLL_INTERVAL_S = 0.1
INTERACTIVE_KINDS = ("sample", "score")
VERSION_KIND = {"sample": "policy", "score": "reward"}


def _usable(version: ModelVersion, kind: str, project: Project | None = None) -> None:
    if project is not None and version.project_id != project.id:
        raise InvalidInput(
            f"model version {version.id} is not a model of project {project.slug}",
            [FieldError(None, "config.model_version_id", "not a model of this project")],
        )
    if version.kind != kind:
        raise InvalidInput(
            f"model version {version.id} is a {version.kind} model, not a {kind} model",
            [FieldError(None, "config.model_version_id", f"not a {kind} model")],
        )
    if version.status in ("pending", "failed"):
        raise Conflict(f"model version {version.id} is {version.status}; it has no usable weights")


def validate_score_config(
    session: Session, project: Project, config: ScoreRunConfig
) -> ScoreRunConfig:
    """Check that a `score` run's version is a reward model of the project with saved weights."""
    version = registry.get_version(session, config.model_version_id)
    _usable(version, "reward", project)
    if not version.artifact_path:
        raise Conflict(f"reward model version {version.id} has no saved weights")
    return config


def validate_sample_config(
    session: Session, project: Project, config: SampleRunConfig
) -> SampleRunConfig:
    """Check that a `sample` run's version is a usable policy of the project."""
    _usable(registry.get_version(session, config.model_version_id), "policy", project)
    return config


def queue_run(
    session: Session,
    project: Project,
    kind: Literal["sample", "score"],
    version_id: int | None,
    request: dict[str, Any],
    *,
    settings: Settings,
    actor_id: int | None,
    trigger: str = "console",
) -> Run:
    """Queue a `sample` or `score` run of version `version_id` on `request` (a `SampleRequest`
    or `ScoreRequest` as a dict); its task is sent when the caller commits.

    422 at `config.model_version_id` when the version is missing or is not a policy (sample) or
    reward model (score) of the project; 422 at the field for a bad request; 409 for a version
    without usable weights."""
    wanted = VERSION_KIND[kind]
    errors: list[FieldError] = []
    problems: list[str] = []  # the answer's detail: what is wrong, in words
    version = None
    if version_id is None:
        problems.append(f"choose a {wanted} version")
        errors.append(FieldError(None, "config.model_version_id", f"choose a {wanted} version"))
    else:
        version = session.get(ModelVersion, version_id)
        if version is None:
            problems.append(f"model version {version_id} not found")
            errors.append(FieldError(None, "config.model_version_id", "no such version"))
        elif version.kind != wanted or version.project_id != project.id:
            try:
                _usable(version, wanted, project)
            except InvalidInput as exc:
                problems.append(exc.message)
                errors.extend(exc.errors)
    # Every problem of the request at once, not only the first: the form shows each at its field.
    request_errors: list[FieldError] = []
    try:
        runs.parse_config(runs.get_kind(kind), {**request, "model_version_id": version_id or 0})
    except InvalidInput as exc:
        request_errors.extend(exc.errors)
    try:  # pydantic checks the prompt only once every field is valid; the form wants both now
        PromptIn.model_validate({k: request.get(k) for k in ("prompt", "messages")})
    except ValidationError as exc:
        request_errors.extend(runs.config_errors(exc))
    if request_errors:
        problems.append(f"invalid {kind} request")
    if problems:
        unique = list({(e.field, e.message): e for e in errors + request_errors}.values())
        raise InvalidInput("; ".join(problems), unique)
    assert version is not None
    _usable(version, wanted, project)
    return runs.create_run(
        session, project, kind, {**request, "model_version_id": version.id}, settings=settings,
        actor_id=actor_id, trigger=trigger,
    )  # fmt: skip


def wait_for_run(session: Session, run_id: int, timeout_s: float) -> Run | None:
    """Poll run `run_id` until it has finished; None after `timeout_s` seconds.

    Read-only: each poll's transaction is rolled back before the sleep, so no transaction (and
    on SQLite no write lock) is held while waiting.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        session.expire_all()
        current = session.get(Run, run_id)
        assert current is not None
        finished = current.status in FINISHED_STATUSES
        if finished:
            # Handed back detached with everything loaded: the rollback would expire it, and
            # reading it afterwards would begin a transaction that outlives this call.
            session.refresh(current)
            session.expunge(current)
        session.rollback()
        if finished:
            return current
        if time.monotonic() > deadline:
            return None
        time.sleep(POLL_INTERVAL_S)


def result_of(run: Run) -> dict[str, Any]:
    """A finished interactive run's result; an error for a run that failed or was cancelled."""
    if run.status != "succeeded":
        raise ServiceError(f"{run.kind} run {run.id} {run.status}: {run.error or 'no error given'}")
    return dict(run.result or {})


# --- what the console shows of a run --------------------------------------------------------


@dataclass(frozen=True)
class AnswerText:
    """One answer: a sampled response (with `truncated`, `tokens`) or a scored one (`score`)."""

    text: str
    truncated: bool = False
    tokens: int | None = None
    score: float | None = None


@dataclass(frozen=True)
class Answer:
    """An interactive run as the console follows it: still waiting, or what it answered."""

    run: Run
    kind: str  # "sample", "score", or another run kind (which has no answer to show)
    finished: bool
    messages: list[dict[str, str]] = field(default_factory=list)
    answers: list[AnswerText] = field(default_factory=list)
    error: str | None = None


def answer_of(run: Run) -> Answer:
    """What run `run` asked and, once it has ended, what it answered (or its error).

    Reads only the run's row: the prompt comes from its stored config, the answers from its
    result, so following a run costs one query per poll."""
    finished = run.status in FINISHED_STATUSES
    if run.kind not in INTERACTIVE_KINDS:
        return Answer(run=run, kind=run.kind, finished=finished)
    model = SampleRunConfig if run.kind == "sample" else ScoreRunConfig
    config: SampleRunConfig | ScoreRunConfig | None
    try:
        config = model.model_validate(run.config)
    except ValidationError:  # a row written by hand: show what it has
        config = None
    messages = config.as_messages() if config is not None else []
    if not finished:
        return Answer(run=run, kind=run.kind, finished=False, messages=messages)
    if run.status != "succeeded":
        error = run.error or f"the run was {run.status}"
        return Answer(run=run, kind=run.kind, finished=True, messages=messages, error=error)
    result = run.result or {}
    answers: list[AnswerText] = []
    if run.kind == "sample":
        answers = [
            AnswerText(
                text=str(r.get("text", "")),
                truncated=bool(r.get("truncated", False)),
                tokens=r.get("tokens"),
            )
            for r in result.get("responses", [])
        ]
    else:
        texts = config.responses if isinstance(config, ScoreRunConfig) else []
        scores = list(result.get("scores", []))
        answers = [AnswerText(text=t, score=float(s)) for t, s in zip(texts, scores, strict=False)]
    return Answer(run=run, kind=run.kind, finished=True, messages=messages, answers=answers)
