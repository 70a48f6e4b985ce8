"""The `evaluate` run: a candidate policy against its parent on held-out prompts, under a
reward model; the figures go into the candidate's metrics, then the closed loop decides."""

from __future__ import annotations

from typing import Any

from app.jobs.common import model_dir
from app.jobs.runner import RunContext
from app.kinds.evaluate import EvaluateRunConfig, EvaluationKnobs
from app.kinds.knobs import knobs_of
from app.ml.evaluation import evaluate_policy
from app.ml.loading import pick_device
from app.services import evaluation, loop, registry
from app.services.errors import Conflict, InvalidInput


def _plain(value: Any) -> float | list[float]:
    """A figure as a plain float, an interval as a list of them, for the JSON columns."""
    return [float(x) for x in value] if isinstance(value, list) else float(value)


def run(ctx: RunContext) -> dict[str, Any]:
    """Candidate vs parent on held-out prompts → candidate metrics → the loop's next step."""
    session, settings = ctx.session, ctx.settings
    config = ctx.config_as(EvaluateRunConfig)
    project = ctx.project()
    candidate = registry.get_version(session, config.model_version_id)
    assert candidate.parent_id is not None and candidate.artifact_path
    parent = registry.get_version(session, candidate.parent_id)
    reward = evaluation.reward_model_for(session, project, candidate, config.reward_model_id)
    if reward is None or not reward.artifact_path:
        raise Conflict("no reward model to evaluate with")
    heldout_ids = evaluation.heldout_for(session, project, candidate, config.max_prompts)
    prompts = evaluation.load_prompt_messages(session, heldout_ids)
    parent_spec = registry.model_spec(parent)
    reward_dir, candidate_dir = reward.artifact_path, candidate.artifact_path
    session.commit()  # no transaction may stay open while models load and sample
    if not prompts:
        raise InvalidInput("the project has no held-out prompts to evaluate on")

    parent_dir = model_dir(ctx, parent_spec)
    ctx.log(
        f"evaluating policy v{candidate.version} against v{parent.version} on {len(prompts)}"
        f" held-out prompts under reward model v{reward.version}"
    )
    result = evaluate_policy(
        candidate_dir,
        parent_dir,
        reward_dir,
        prompts,
        EvaluationKnobs(**knobs_of(config, EvaluationKnobs)),
        device=str(pick_device()),
        hooks=ctx.hooks,
    )
    samples = result.pop("samples")
    figures = {
        **{k: _plain(v) for k, v in result.items()},
        "reward_model_id": reward.id,
        "parent_id": parent.id,
        "run_id": ctx.run_id,
        "heldout_prompt_ids": heldout_ids,
    }
    session.refresh(candidate)
    passed, why = evaluation.record_evaluation(project, candidate, figures, samples)
    session.commit()
    ctx.log(f"policy v{candidate.version}: {why} -> rule {'passed' if passed else 'not passed'}")
    step = loop.after_evaluation(
        session, project, candidate, passed, ctx.run_id, ctx.log_after_commit, settings=settings
    )
    session.commit()
    return {
        "model_version_id": candidate.id,
        "evaluation": figures,
        "samples": samples,
        "rule_passed": passed,
        "rule": why,
        **step,
    }
