"""Generation: how the policy samples answers (`SamplingConfig`, read by `app.ml.generation`),
which of them raters see (`BestOfKnobs`), and the config of a `generate` run (which prompts;
sampling and best-of knobs unset take the project's)."""

from __future__ import annotations

from pydantic import Field, model_validator

from app.kinds.knobs import Knobs, knob, same_knob
from app.kinds.pairs import PairRule


class SamplingConfig(Knobs):
    """How to sample responses; defaults suit collecting pairs for human comparison."""

    num_responses: int = knob(2, "K: responses sampled per prompt (2 for a comparison pair)", ge=1)
    temperature: float = knob(
        0.7, "softmax temperature when sampling; ignored when greedy", ge=0.0, le=2.0
    )
    top_p: float = knob(
        0.9, "nucleus sampling: keep the smallest token set with this much mass", gt=0.0, le=1.0
    )
    max_new_tokens: int = knob(
        128, "longest response; a response cut here is `truncated`", ge=1, le=4096
    )
    batch_size: int = knob(16, "sequences (prompt x sample rows) decoded together", ge=1, le=1024)
    do_sample: bool = knob(True, "sample; False means greedy (all K responses are equal)")
    seed: int = knob(0, "seeds every row's generator; same seed, same responses")

    @model_validator(mode="after")
    def _temperature_when_sampling(self) -> SamplingConfig:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 when sampling, got {self.temperature}; "
                "use do_sample=False for greedy decoding"
            )
        return self


class BestOfKnobs(Knobs):
    """Best-of-K: sample more answers than raters see and let the reward model pick the pair."""

    best_of_k: int = knob(
        0,
        "K answers sampled per prompt and scored by the reward model; only the top one and a"
        " contrasting one (pair_selection) are stored, as one pair for raters. 2 or less: off"
        " (responses_per_prompt answers, all stored and paired); also off while the project has"
        " no reward model",
        ge=0,
        le=16,
    )
    pair_selection: PairRule = knob(
        "top_random",
        "best-of-K: the answer paired with the reward model's top one. top_random: a random"
        " other one (a typical answer of the policy); top_bottom: the lowest scored (widest"
        " contrast); top_two: the second best (finest distinctions)",
    )


_PROJECT = "default: the project's setting"


class GenerateRunConfig(Knobs):
    """The `config` of a `generate` run: which prompts, and sampling knobs where they differ
    from the project's settings (unset ones take the project's)."""

    prompt_ids: list[int] | None = Field(
        None, description="only these prompts (default: every prompt lacking responses)"
    )
    limit: int | None = Field(None, ge=1, description="at most this many prompts")
    responses_per_prompt: int | None = same_knob(
        SamplingConfig, "num_responses", default=None, ge=2, le=8, note=_PROJECT
    )
    temperature: float | None = same_knob(
        SamplingConfig, "temperature", default=None, gt=0.0, note=_PROJECT
    )
    top_p: float | None = same_knob(SamplingConfig, "top_p", default=None, note=_PROJECT)
    max_new_tokens: int | None = same_knob(
        SamplingConfig, "max_new_tokens", default=None, note=_PROJECT
    )
    batch_size: int = same_knob(SamplingConfig, "batch_size")
    first_batch_prompts: int = knob(
        0, "if > 0, a first small batch so the first pairs land early", ge=0, le=64
    )
    seed: int | None = same_knob(SamplingConfig, "seed", default=None, note="default: the run id")
    best_of_k: int | None = same_knob(BestOfKnobs, "best_of_k", default=None, note=_PROJECT)
    pair_selection: PairRule | None = same_knob(
        BestOfKnobs, "pair_selection", default=None, note=_PROJECT
    )
    reward_model_id: int | None = Field(
        None,
        description="best-of-K: the reward model version that scores the answers (default: the"
        " project's active one when the run starts)",
    )
