"""Projects and their settings."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.kinds.generate import BestOfKnobs, SamplingConfig
from app.kinds.knobs import same_knob
from app.kinds.pairs import PairRule
from app.kinds.registry import RUN_KINDS
from app.models import Project
from app.services import audit
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound

# The closed loop's algorithms (`loop_algorithm`): the run kind each queues after a reward run,
# and what that run's config always holds (app.services.loop.after_reward_run).
LoopAlgorithm = Literal["ppo", "rloo", "grpo", "dpo-online"]
LOOP_ALGORITHMS: dict[str, tuple[str, dict[str, Any]]] = {
    "ppo": ("ppo", {}),
    "rloo": ("rloo", {}),
    "grpo": ("grpo", {}),
    "dpo-online": ("dpo", {"pair_source": "policy"}),
}
# RLOO: against the same reward model it gained more than PPO in each of three paired rounds
# of bench/closed_loop.py (docs/benchmarks.md "Closed loop over a family of rules").
DEFAULT_LOOP_ALGORITHM: LoopAlgorithm = "rloo"
# The default algorithm's CPU-sized loop config: the closed-loop bench's (LoRA, 12 iterations of
# 4 prompts x 4 answers, two passes over each batch, lr 1e-4: the largest rate measured to keep
# a round's KL under 5 nats).
DEFAULT_LOOP_RLOO_CONFIG: dict[str, Any] = {
    "total_steps": 12, "batch_size": 4, "num_generations": 4, "mini_batch_size": 8, "epochs": 2,
    "use_lora": True, "learning_rate": 1e-4, "kl_coef": 0.05, "missing_eos_penalty": 1.0,
}  # fmt: skip
# The run kind each loop config is the config of.
LOOP_KINDS = {
    "loop_reward_config": "reward",
    "loop_ppo_config": "ppo",
    "loop_rloo_config": "rloo",
    "loop_grpo_config": "grpo",
    "loop_dpo_config": "dpo",
    "loop_evaluate_config": "evaluate",
    "loop_generation_config": "generate",
}
SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}[a-z0-9]$|^[a-z0-9]$")


class ProjectSettings(BaseModel):
    """A project's settings. Stored as JSON; missing keys take these defaults on read."""

    model_config = ConfigDict(extra="forbid")

    overlap: int = Field(3, ge=1, le=50, description="raters needed per comparison pair")
    lease_ttl_s: int = Field(600, ge=30, le=86_400, description="how long a rater holds a pair")
    aspects: list[str] = Field(
        default_factory=lambda: ["helpfulness", "harmlessness", "honesty"],
        description="optional per-aspect judgments shown to raters",
    )
    require_rationale: bool = Field(False, description="raters must explain each judgment")
    gold_rate: float = Field(0.1, ge=0.0, le=1.0, description="share of gold pairs served")
    # The generation settings are the sampling knobs' own definitions (app.kinds.generate).
    responses_per_prompt: int = same_knob(SamplingConfig, "num_responses", ge=2, le=8)
    temperature: float = same_knob(SamplingConfig, "temperature")
    top_p: float = same_knob(SamplingConfig, "top_p")
    max_new_tokens: int = same_knob(SamplingConfig, "max_new_tokens")
    best_of_k: int = same_knob(BestOfKnobs, "best_of_k")
    pair_selection: PairRule = same_knob(BestOfKnobs, "pair_selection")
    auto_generate: bool = Field(True, description="queue a generation run after an upload")
    version_eval_rate: float = Field(
        0.25, ge=0.0, le=1.0, description="share of new-vs-previous policy pairs when generating"
    )
    base_policy: str | None = Field(None, description="policy model spec; None = server default")
    reward_retrain_threshold: int = Field(
        200, ge=1, description="new usable judgments that trigger a reward-model run"
    )
    auto_mode: bool = Field(False, description="reward run -> PPO -> evaluate -> promote")
    min_reward_accuracy: float = Field(
        0.6,
        ge=0.0,
        le=1.0,
        description="auto mode: a reward model below this validation accuracy starts no PPO run",
    )
    promote_min_score_gain: float = Field(
        0.0, description="promotion rule: the candidate's reward gain over its parent, at least"
    )
    promote_max_kl: float = Field(
        10.0, ge=0.0, description="promotion rule: the candidate's KL to its parent, at most"
    )
    promote_require_lower_bound: bool = Field(
        True,
        description="promotion rule: the lower end of the score gain's interval (not the point"
        " gain) must reach promote_min_score_gain, so a gain that may be luck does not promote",
    )
    heldout_fraction: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of prompts reserved for policy evaluation"
    )
    heldout_seed: int = Field(0, description="seeds which prompts are held out")
    loop_reward_config: dict[str, Any] = Field(
        default_factory=dict, description="config of the reward runs started automatically"
    )
    loop_algorithm: LoopAlgorithm = Field(
        DEFAULT_LOOP_ALGORITHM,
        description="how the closed loop trains the policy after a reward run: 'ppo', 'rloo',"
        " 'grpo' (against the reward model), or 'dpo-online' (DPO on the policy's own answers"
        " ranked by the reward model); each with its loop_<kind>_config",
    )
    loop_ppo_config: dict[str, Any] = Field(
        default_factory=dict, description="config of the PPO runs the closed loop starts"
    )
    loop_rloo_config: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_LOOP_RLOO_CONFIG),
        description="config of the RLOO runs the closed loop starts (default: CPU-sized)",
    )
    loop_grpo_config: dict[str, Any] = Field(
        default_factory=dict, description="config of the GRPO runs the closed loop starts"
    )
    loop_dpo_config: dict[str, Any] = Field(
        default_factory=dict,
        description="config of the DPO runs the closed loop starts with 'dpo-online'",
    )
    loop_evaluate_config: dict[str, Any] = Field(
        default_factory=dict, description="config of the evaluation runs after a policy run"
    )
    loop_generation_config: dict[str, Any] = Field(
        default_factory=dict, description="config of the generation run after a promotion"
    )

    @field_validator(*LOOP_KINDS)
    @classmethod
    def _knobs_of_the_kind(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # Each value is checked against its knob's definition now, not when the loop first
        # queues the run; what depends on other knobs or on the database is checked then.
        kind = RUN_KINDS[LOOP_KINDS[str(info.field_name)]]
        blank = kind.config.model_construct()
        for name, knob_value in value.items():
            if name not in kind.config.model_fields:
                raise ValueError(f"{name!r} is not a knob of {kind.name} runs")
            try:
                kind.config.__pydantic_validator__.validate_assignment(blank, name, knob_value)
            except ValidationError as exc:
                raise ValueError(f"{name}: {exc.errors()[0]['msg']}") from None
        return value


def project_settings(project: Project) -> ProjectSettings:
    return ProjectSettings.model_validate(project.settings or {})


def _validated_settings(data: dict[str, Any]) -> ProjectSettings:
    try:
        return ProjectSettings.model_validate(data)
    except ValidationError as exc:
        errors = [
            FieldError(None, "settings." + ".".join(str(p) for p in e["loc"]), e["msg"])
            for e in exc.errors()
        ]
        raise InvalidInput("invalid project settings", errors) from exc


MAX_NAME = 200  # projects.name is a VARCHAR(200)


def _check_name(name: str) -> None:
    if not name.strip():
        raise InvalidInput("a project needs a name", [FieldError(None, "name", "empty")])
    if len(name.strip()) > MAX_NAME:
        raise InvalidInput(
            f"the name is longer than {MAX_NAME} characters",
            [FieldError(None, "name", f"longer than {MAX_NAME} characters")],
        )


def create_project(
    session: Session,
    slug: str,
    name: str,
    *,
    guidelines: str = "",
    settings: dict[str, Any] | None = None,
    actor_id: int | None = None,
) -> Project:
    """Create a project; its settings are validated and stored with defaults filled in."""
    if not SLUG_RE.match(slug):
        raise InvalidInput(
            f"slug {slug!r} must be 1-64 lowercase letters, digits or dashes,"
            " not starting or ending with a dash"
        )
    _check_name(name)
    validated = _validated_settings(settings or {})
    project = Project(
        slug=slug,
        name=name.strip(),
        guidelines=guidelines,
        settings=validated.model_dump(),
        created_by_id=actor_id,
    )
    try:
        with session.begin_nested():
            session.add(project)
    except IntegrityError as exc:
        raise Conflict(f"a project with slug {slug!r} already exists") from exc
    audit.record(
        session,
        "project.create",
        actor_id=actor_id,
        project_id=project.id,
        target=("project", project.id),
    )
    return project


def get_project(session: Session, slug: str) -> Project:
    project = session.scalar(select(Project).where(Project.slug == slug))
    if project is None:
        raise NotFound(f"project {slug!r} not found")
    return project


def list_projects(session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.id)))


def update_project(
    session: Session,
    project: Project,
    *,
    name: str | None = None,
    guidelines: str | None = None,
    settings: dict[str, Any] | None = None,
    actor_id: int | None = None,
) -> Project:
    """Change name, guidelines or settings (a partial settings dict is merged over the current)."""
    if name is not None:
        _check_name(name)
        project.name = name.strip()
    if guidelines is not None:
        project.guidelines = guidelines
    if settings is not None:
        merged = {**project_settings(project).model_dump(), **settings}
        project.settings = _validated_settings(merged).model_dump()
    audit.record(
        session,
        "project.update",
        actor_id=actor_id,
        project_id=project.id,
        target=("project", project.id),
        changed=sorted((settings or {}).keys()),
    )
    session.flush()
    return project
