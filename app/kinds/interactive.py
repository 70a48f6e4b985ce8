"""Interactive model work the API awaits: score answers with a reward model (`score`), or
answer a prompt with a policy version, the playground (`sample`)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from app.kinds.generate import SamplingConfig
from app.kinds.knobs import Knobs, same_knob


class Message(BaseModel):
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class PromptIn(Knobs):
    """A prompt as text or as chat messages (the last one from the user)."""

    prompt: str | None = Field(None, description="the prompt as plain text")
    messages: list[Message] | None = Field(
        None, description="the prompt as chat messages, the last one from the user"
    )

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


class ScoreRequest(PromptIn):
    """What `POST /models/{id}/score` takes."""

    responses: list[str] = Field(min_length=1, max_length=64, description="answers to score")


class ScoreRunConfig(ScoreRequest):
    """The `config` of a `score` run."""

    model_version_id: int = Field(description="the reward model version")


class SampleRequest(PromptIn):
    """What `POST /models/{id}/generate` (the playground) takes."""

    num_responses: int = same_knob(SamplingConfig, "num_responses", default=1, le=8)
    max_new_tokens: int = same_knob(SamplingConfig, "max_new_tokens", le=2048)
    temperature: float = same_knob(SamplingConfig, "temperature", note="0 = greedy")
    top_p: float = same_knob(SamplingConfig, "top_p")
    seed: int = same_knob(SamplingConfig, "seed")


class SampleRunConfig(SampleRequest):
    """The `config` of a `sample` run."""

    model_version_id: int = Field(description="the policy version")
