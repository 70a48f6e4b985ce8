"""The interactive runs the API awaits: `score` (rewards of answers under a reward model) and
`sample` (a policy version answers one prompt, the playground)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from app.jobs.runner import RunContext
from app.kinds.generate import SamplingConfig
from app.kinds.interactive import SampleRunConfig, ScoreRunConfig
from app.ml.generation import generate_responses
from app.ml.loading import load_causal_lm, pick_device
from app.ml.reward import LoadedRewardModel, load_reward_model, score_responses
from app.services import registry


@lru_cache(maxsize=1)
def _reward_model(path: str, device: str) -> LoadedRewardModel:
    # One model stays loaded in the worker: repeated scoring calls skip the load.
    return load_reward_model(path, device)


def score(ctx: RunContext) -> dict[str, Any]:
    """Rewards of the responses under the reward model version."""
    config = ctx.config_as(ScoreRunConfig)
    version = registry.get_version(ctx.session, config.model_version_id)
    ctx.session.commit()
    assert version.artifact_path
    model = _reward_model(str(Path(version.artifact_path)), str(pick_device()))
    scores = score_responses(model, config.as_messages(), config.responses)
    return {"model_version_id": version.id, "scores": scores}


def sample(ctx: RunContext) -> dict[str, Any]:
    """A policy version answers one prompt."""
    config = ctx.config_as(SampleRunConfig)
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
