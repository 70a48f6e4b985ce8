"""Evaluation of a candidate policy against its parent: the knobs of
`app.ml.evaluation.evaluate_policy`, and an `evaluate` run's config (which versions)."""

from __future__ import annotations

from pydantic import Field

from app.kinds.knobs import Knobs, knob, same_knob


class EvaluationKnobs(Knobs):
    """How candidate and parent answer the held-out prompts."""

    max_new_tokens: int = knob(64, "Response length limit of both policies.", ge=1, le=4096)
    temperature: float = knob(
        0.7,
        "Sampling temperature of both policies; the KL is taken under it, so it must be > 0.",
        gt=0.0,
        le=2.0,
    )
    batch_size: int = knob(8, "Prompts answered together.", ge=1, le=512)
    max_prompt_length: int = knob(
        256, "Prompt tokens kept (the start is cut, the end is kept).", ge=8, le=8192
    )
    seed: int = knob(0, "Both policies sample with this seed (a policy against itself: KL 0).")
    num_samples: int = knob(8, "Prompts kept with both answers as samples.", ge=0, le=64)
    confidence: float = knob(
        0.95,
        "Confidence level of the score gain's interval (a paired bootstrap over prompts), which"
        " the promotion rule can require to clear its threshold.",
        gt=0.0,
        lt=1.0,
    )
    bootstrap_resamples: int = knob(
        2000,
        "Resamples of the prompts behind the interval; more give steadier ends (with 2,000, an"
        " end of a 95 % interval moves by about 0.06 standard errors of the gain from seed to"
        " seed).",
        ge=100,
        le=100_000,
    )


class EvaluateRunConfig(EvaluationKnobs):
    """The `config` of an `evaluate` run."""

    model_version_id: int = Field(description="the candidate policy version")
    reward_model_id: int | None = Field(
        None,
        description="reward model (default: the one the candidate was trained against, else the"
        " project's active one)",
    )
    max_prompts: int = Field(
        64,
        ge=1,
        le=10_000,
        description="held-out prompts evaluated (all of them when fewer): the score gain's"
        " interval narrows with their number, about as 1/sqrt(prompts), and on a dozen prompts"
        " it is too wide to tell a real gain from luck",
    )
    max_new_tokens: int = same_knob(
        EvaluationKnobs,
        "max_new_tokens",
        note="default: the project's max_new_tokens, at most 256",
    )
