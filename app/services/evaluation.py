"""Evaluation of candidate policies on held-out prompts, and the automatic promotion rule.

    candidate ──evaluate run──► mean reward-model score, score gain over the parent,
                                KL(candidate ‖ parent), sample responses ──► version.metrics

Held-out prompts: each prompt of a project is held out or not by a hash of (seed, prompt id),
so the split never depends on which other prompts exist. PPO never trains on a held-out prompt
and DPO never on a judgment of one, and every evaluation of the project reads the same set.

The promotion rule: KL to the parent ≤ `promote_max_kl`, and a score gain that reaches
`promote_min_score_gain`. With `promote_require_lower_bound` (the default) it is the lower end of
the gain's interval — a paired bootstrap over the evaluated prompts — that must reach it, not the
point gain: +0.22 on 11 prompts can be luck, and the interval says how much. An evaluation
recorded before intervals existed does not pass that rule until it is evaluated again.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.kinds.evaluate import EvaluateRunConfig
from app.models import ModelVersion, Project, Prompt
from app.services import registry
from app.services.errors import Conflict, FieldError, InvalidInput
from app.services.projects import ProjectSettings, project_settings
from app.services.prompts import prompt_messages

logger = logging.getLogger(__name__)

MAX_IDS_IN_SQL = 500
# Evaluation answers are cut here even when the project lets raters see longer ones.
MAX_EVAL_NEW_TOKENS = 256


# --- held-out prompts --------------------------------------------------------------------------


def is_heldout(prompt_id: int, fraction: float, seed: int) -> bool:
    """Whether a prompt is reserved for evaluation: a stable hash draw below `fraction`."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_prompt_ids(ids: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train ids, held-out ids). With two or more prompts and `fraction > 0`, both sides get at
    least one prompt, so a small project can still train and be evaluated."""
    heldout = [i for i in ids if is_heldout(i, fraction, seed)]
    if fraction > 0 and len(ids) >= 2:
        if not heldout:
            heldout = [min(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())]
        if len(heldout) == len(ids):
            heldout = heldout[1:]
    held = set(heldout)
    return [i for i in ids if i not in held], [i for i in ids if i in held]


def project_prompt_split(
    session: Session, project: Project, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """The project's prompt ids split into (train, held-out), in id order."""
    ids = list(
        session.scalars(
            select(Prompt.id).where(Prompt.project_id == project.id).order_by(Prompt.id)
        )
    )
    return split_prompt_ids(ids, fraction, seed)


def load_prompt_messages(session: Session, ids: list[int]) -> list[list[dict[str, str]]]:
    """Chat messages of the prompts with these ids, in the order given."""
    found: dict[int, list[dict[str, str]]] = {}
    for start in range(0, len(ids), MAX_IDS_IN_SQL):
        chunk = ids[start : start + MAX_IDS_IN_SQL]
        for prompt in session.scalars(select(Prompt).where(Prompt.id.in_(chunk))):
            found[prompt.id] = prompt_messages(prompt)
    return [found[i] for i in ids if i in found]


# --- the promotion rule ------------------------------------------------------------------------


def _interval(value: Any) -> tuple[float, float] | None:
    """A stored `[low, high]`, or None when there is none (or it is not one)."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    try:
        low, high = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        return None
    return (low, high) if math.isfinite(low) and math.isfinite(high) and low <= high else None


def _interval_text(interval: tuple[float, float], metrics: dict[str, Any]) -> str:
    """`95 % interval [-0.0500, +0.4100] over 11 prompts`."""
    confidence, prompts = metrics.get("confidence"), metrics.get("num_prompts")
    level = f"{100 * float(confidence):g} % " if confidence is not None else ""
    over = f" over {int(prompts)} prompts" if prompts is not None else ""
    return f"{level}interval [{interval[0]:+.4f}, {interval[1]:+.4f}]{over}"


def promotion_rule(settings: ProjectSettings, metrics: dict[str, Any]) -> tuple[bool, str]:
    """The project's automatic promotion rule: score gain ≥ X and KL to the parent ≤ Y, where
    the gain is the lower end of its interval when `promote_require_lower_bound` is set.

    Returns (passed, a sentence saying why, naming the interval) for the run log and the
    version's metrics."""
    gain, kl = metrics.get("score_gain"), metrics.get("kl_to_parent")
    if gain is None or kl is None:
        return False, "not evaluated yet"
    min_gain, max_kl = settings.promote_min_score_gain, settings.promote_max_kl
    interval = _interval(metrics.get("score_gain_interval"))
    kl_ok = float(kl) <= max_kl
    kl_text = f"KL {float(kl):.4f} {'<=' if kl_ok else '>'} {max_kl:g}"
    if settings.promote_require_lower_bound:
        if interval is None:
            return False, (
                f"score gain {float(gain):+.4f} has no interval (evaluated before intervals were"
                f" recorded; evaluate it again), and the rule requires its lower end to reach"
                f" {min_gain:g}; {kl_text}"
            )
        gain_ok = interval[0] >= min_gain
        gain_text = (
            f"score gain {float(gain):+.4f}, {_interval_text(interval, metrics)}: lower end"
            f" {interval[0]:+.4f} {'>=' if gain_ok else '<'} {min_gain:g}"
        )
    else:
        gain_ok = float(gain) >= min_gain
        gain_text = f"score gain {float(gain):+.4f} {'>=' if gain_ok else '<'} {min_gain:g}"
        if interval is not None:
            gain_text += f" ({_interval_text(interval, metrics)}; its lower end not required)"
    return gain_ok and kl_ok, f"{gain_text} and {kl_text}"


# --- the evaluate run --------------------------------------------------------------------------


def reward_model_for(
    session: Session, project: Project, candidate: ModelVersion, reward_model_id: int | None
) -> ModelVersion | None:
    """The reward model that judges `candidate`: the given one, the one it was trained against,
    else the project's active reward model (None when the project has none)."""
    wanted = reward_model_id or candidate.reward_model_id
    if wanted is not None:
        reward = registry.get_version(session, wanted)
        if reward.kind != "reward" or reward.project_id != project.id:
            raise InvalidInput(
                f"model version {wanted} is not a reward model of project {project.slug}",
                [FieldError(None, "config.reward_model_id", "not a reward model of this project")],
            )
        if not reward.artifact_path or reward.status in ("pending", "failed"):
            raise Conflict(f"reward model version {wanted} has no usable weights")
        return reward
    return session.scalar(
        select(ModelVersion).where(
            ModelVersion.project_id == project.id,
            ModelVersion.kind == "reward",
            ModelVersion.status == "active",
        )
    )


def validate_evaluate_config(
    session: Session, project: Project, config: EvaluateRunConfig
) -> EvaluateRunConfig:
    """Check that an `evaluate` run's candidate is a trained policy of the project with a parent,
    and that a reward model can judge it; an unset `max_new_tokens` takes the project's."""
    version = registry.get_version(session, config.model_version_id)
    if version.kind != "policy" or version.project_id != project.id:
        raise InvalidInput(
            f"model version {version.id} is not a policy of project {project.slug}",
            [FieldError(None, "config.model_version_id", "not a policy of this project")],
        )
    if version.parent_id is None or not version.artifact_path:
        raise InvalidInput(
            f"policy version {version.id} has no parent to compare with (the base policy)",
            [FieldError(None, "config.model_version_id", "no parent")],
        )
    if version.status in ("pending", "failed"):
        raise Conflict(f"policy version {version.id} is {version.status}; nothing to evaluate")
    if reward_model_for(session, project, version, config.reward_model_id) is None:
        raise InvalidInput(
            "the project has no active reward model to evaluate with; train one first",
            [FieldError(None, "config.reward_model_id", "no reward model")],
        )
    if "max_new_tokens" not in config.model_fields_set:
        ps = project_settings(project)
        config = config.model_copy(
            update={"max_new_tokens": min(ps.max_new_tokens, MAX_EVAL_NEW_TOKENS)}
        )
    return config


def heldout_for(
    session: Session, project: Project, candidate: ModelVersion, max_prompts: int
) -> list[int]:
    """The held-out prompt ids a candidate is evaluated on: the split it was trained under
    (recorded on it), else the project's current one; at most `max_prompts`."""
    ps = project_settings(project)
    heldout = dict((candidate.metrics or {}).get("heldout") or {})
    fraction = float(heldout.get("fraction", ps.heldout_fraction))
    seed = int(heldout.get("seed", ps.heldout_seed))
    _, heldout_ids = project_prompt_split(session, project, fraction, seed)
    return heldout_ids[:max_prompts]


def record_evaluation(
    project: Project, candidate: ModelVersion, evaluation: dict[str, Any], samples: Any
) -> tuple[bool, str]:
    """Put an evaluation's figures into the candidate's metrics, with the verdict of the
    project's promotion rule; returns (passed, why)."""
    passed, why = promotion_rule(project_settings(project), evaluation)
    candidate.metrics = {
        **(candidate.metrics or {}),
        "score_gain": evaluation["score_gain"],
        "kl_to_parent": evaluation["kl_to_parent"],
        "mean_score": evaluation["mean_score"],
        "score_gain_interval": evaluation.get("score_gain_interval"),
        "win_share": evaluation.get("win_share"),
        "evaluation": {**evaluation, "samples": samples},
        "promotion_rule": {"passed": passed, "reason": why},
    }
    return passed, why
