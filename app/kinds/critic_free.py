"""RLOO and GRPO: every knob of `app.ml.critic_free.train_critic_free`, and the configs of the
`rloo` and `grpo` runs, with the defaults a CPU worker runs well with.

The two share one trainer and every knob; they differ in the advantage estimator and, by
default, in where the KL to the reference goes (`kl_placement`). Knobs that mean what they mean
in PPO are PPO's own definitions (`same_knob`), so a learning rate or a token limit is written
once for every policy trainer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from app.kinds.knobs import Knobs, knob, must_divide, same_knob
from app.kinds.ppo import PPOKnobs

Estimator = Literal["rloo", "grpo"]
KLPlacement = Literal["reward", "loss"]


class CriticFreeKnobs(Knobs):
    """Every tunable knob of an RLOO or GRPO run."""

    seed: int = same_knob(PPOKnobs, "seed")
    estimator: Estimator = knob(
        "rloo",
        "How a response's advantage is read from its group of K: 'rloo' subtracts the mean"
        " reward of the other K-1 answers to the same prompt (leave-one-out, Ahmadian et al."
        " 2024); 'grpo' subtracts the group mean and divides by the group's standard deviation"
        " (Shao et al. 2024).",
    )
    total_steps: int = knob(
        20, "Iterations; each samples K answers to batch_size prompts, then updates.", ge=1,
        le=100_000,
    )  # fmt: skip
    batch_size: int = knob(4, "Prompts per iteration (each answered K times).", ge=1, le=4096)
    num_generations: int = knob(
        4,
        "K: answers sampled per prompt; each is judged against the others of its group, so no"
        " value model is needed. At least 2.",
        ge=2,
        le=64,
    )
    mini_batch_size: int = knob(
        16,
        "Responses per optimizer step; must divide batch_size x num_generations.",
        ge=1,
        le=4096,
    )
    gradient_accumulation_steps: int = same_knob(PPOKnobs, "gradient_accumulation_steps")
    epochs: int = knob(
        1,
        "Passes over each batch of answers. With 1 the clipped ratio is 1 throughout and the"
        " update is plain REINFORCE with the group baseline.",
        ge=1,
        le=64,
    )
    learning_rate: float | None = same_knob(PPOKnobs, "learning_rate")
    adam_eps: float = same_knob(PPOKnobs, "adam_eps")
    max_grad_norm: float = same_knob(PPOKnobs, "max_grad_norm")
    max_prompt_length: int = same_knob(PPOKnobs, "max_prompt_length")
    max_new_tokens: int = same_knob(PPOKnobs, "max_new_tokens")
    temperature: float = same_knob(PPOKnobs, "temperature")
    missing_eos_penalty: float | None = same_knob(PPOKnobs, "missing_eos_penalty")
    kl_coef: float = knob(
        0.05,
        "Beta: weight of the KL to the reference, as a penalty on each answer's reward or as a"
        " loss term (kl_placement).",
        ge=0.0,
    )
    kl_placement: KLPlacement = knob(
        "reward",
        "'reward': the answer's reward is its score minus beta x its sequence KL (log-ratio"
        " summed over its tokens), so the advantage already trades score against drift (RLOO's"
        " choice: the estimator is unbiased for the KL-regularised objective). 'loss': the"
        " advantage compares scores only and beta x a per-token KL estimate (k3, never"
        " negative) is added to the loss (GRPO's choice: the group's scale normalisation then"
        " never mixes KL into the reward's spread).",
    )
    scale_by_group_std: bool = knob(
        True,
        "GRPO: divide each advantage by its group's reward standard deviation (off: only the"
        " group mean is subtracted, as in Dr. GRPO; a group of equal rewards gives 0 either way).",
    )
    whiten_advantages: bool = knob(
        True,
        "RLOO: normalise the batch's advantages to unit variance (no shift), so the step size"
        " does not depend on the reward model's scale.",
    )
    cliprange: float = same_knob(PPOKnobs, "cliprange")
    use_lora: bool = knob(
        False,
        "Train LoRA adapters; the reference is the adapter-disabled policy, so memory stays"
        " near one policy + the reward model.",
    )
    lora_r: int = same_knob(PPOKnobs, "lora_r")
    lora_alpha: int = same_knob(PPOKnobs, "lora_alpha")
    lora_target_modules: str | list[str] = same_knob(PPOKnobs, "lora_target_modules")
    rollout_forward_batch_size: int = same_knob(PPOKnobs, "rollout_forward_batch_size")
    reward_max_length: int = same_knob(PPOKnobs, "reward_max_length")
    sample_every: int = same_knob(PPOKnobs, "sample_every")
    num_sample_rows: int = same_knob(PPOKnobs, "num_sample_rows")
    checkpoint_every: int = same_knob(PPOKnobs, "checkpoint_every")
    checkpoint_every_s: float = same_knob(PPOKnobs, "checkpoint_every_s")

    _accumulation_divides_minibatch = must_divide("gradient_accumulation_steps", "mini_batch_size")

    @field_validator("mini_batch_size")
    @classmethod
    def _minibatch_divides_the_answers(cls, value: int, info: ValidationInfo) -> int:
        # A field validator (not a model one), so that a project's loop config, checked one
        # knob at a time, is checked here only when it sets mini_batch_size.
        batch, k = info.data.get("batch_size"), info.data.get("num_generations")
        if batch is not None and k is not None and (batch * k) % value:
            raise ValueError(
                f"mini_batch_size {value} must divide batch_size x num_generations"
                f" ({batch} x {k} = {batch * k})"
            )
        return value

    def effective_learning_rate(self) -> float:
        """`learning_rate`, or the default for full fine-tuning or LoRA when it is unset."""
        return self.learning_rate or (1e-4 if self.use_lora else 3e-6)


class CriticFreeConfig(CriticFreeKnobs):
    """What `train_critic_free` takes: the knobs plus where it runs."""

    device: str = knob("auto", "'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = knob("float32", "Weights dtype: float32 or bfloat16 (bfloat16 on GPUs only).")


class RLOORunConfig(CriticFreeKnobs):
    """The `config` of an `rloo` run: the knobs, sized for a CPU worker, plus its inputs."""

    reward_model_id: int | None = Field(None, description="default: the active reward model")
    max_train_prompts: int | None = Field(None, ge=1, description="sample of training prompts")
    estimator: Literal["rloo"] = same_knob(CriticFreeKnobs, "estimator", default="rloo")
    max_new_tokens: int = same_knob(
        PPOKnobs, "max_new_tokens", note="default: the project's max_new_tokens, at most 256"
    )


class GRPORunConfig(CriticFreeKnobs):
    """The `config` of a `grpo` run: the knobs, sized for a CPU worker, plus its inputs."""

    reward_model_id: int | None = Field(None, description="default: the active reward model")
    max_train_prompts: int | None = Field(None, ge=1, description="sample of training prompts")
    estimator: Literal["grpo"] = same_knob(CriticFreeKnobs, "estimator", default="grpo")
    kl_placement: KLPlacement = same_knob(CriticFreeKnobs, "kl_placement", default="loss")
    kl_coef: float = same_knob(CriticFreeKnobs, "kl_coef", default=0.04)
    max_new_tokens: int = same_knob(
        PPOKnobs, "max_new_tokens", note="default: the project's max_new_tokens, at most 256"
    )
