"""PPO: every knob of `app.ml.ppo.train_ppo`, and a `ppo` run's config (which reward model,
which prompts), with the defaults a CPU worker runs well with."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

from app.kinds.knobs import Knobs, knob, must_divide, num_processes_knob, same_knob


class PPOKnobs(Knobs):
    """Every tunable knob of a PPO run. Defaults follow the published RLHF-with-PPO details."""

    seed: int = knob(0, "Seed for Python, NumPy and torch and for the run's own generators.")
    total_steps: int = knob(
        20, "PPO iterations; each is one rollout batch plus its updates.", ge=1, le=100_000
    )
    batch_size: int = knob(
        16, "Prompts sampled (and responses generated) per PPO iteration.", ge=1, le=4096
    )
    mini_batch_size: int = knob(
        8, "Responses per optimizer step inside a PPO epoch; must divide batch_size.", ge=1, le=4096
    )
    gradient_accumulation_steps: int = knob(
        1,
        "Micro-batches per minibatch; the minibatch is split to bound activation memory. Must"
        " divide mini_batch_size.",
        ge=1,
        le=256,
    )
    ppo_epochs: int = knob(
        4, "Passes over each rollout batch (the same samples are reused).", ge=1, le=64
    )
    learning_rate: float | None = knob(
        None,
        "AdamW learning rate of the trained parameters (and PPO's value head); unset: 3e-6, or"
        " 1e-4 with LoRA.",
        gt=0.0,
        le=1.0,
    )
    adam_eps: float = knob(
        1e-5, "AdamW epsilon; 1e-5 as in the OpenAI/CleanRL PPO baselines.", gt=0
    )
    max_grad_norm: float = knob(1.0, "Global gradient-norm clip per optimizer step.", gt=0.0)
    max_prompt_length: int = knob(
        256, "Prompt tokens kept (the start is cut, the end is kept).", ge=8, le=8192
    )
    max_new_tokens: int = knob(
        64, "Response length limit; longer responses are cut here.", ge=1, le=4096
    )
    temperature: float = knob(
        0.7,
        "Divides the logits when sampling AND in every training forward pass.",
        gt=0.0,
        le=2.0,
    )
    missing_eos_penalty: float | None = knob(
        1.0, "Subtracted from the score of a response without EOS within the limit (None: off)."
    )
    kl_coef: float = knob(
        0.05, "Initial beta of the per-token penalty -beta*(logp - logp_ref).", ge=0.0
    )
    adaptive_kl: bool = knob(False, "Adapt beta towards `target_kl` (Ziegler et al. 2019).")
    target_kl: float = knob(6.0, "Target sequence KL (nats) for the adaptive controller.", gt=0.0)
    kl_horizon: int = knob(10000, "Horizon (in samples) of the adaptive controller.", ge=1)
    gamma: float = knob(
        1.0, "Discount; 1.0 because the only real reward is at the end.", ge=0, le=1
    )
    lam: float = knob(0.95, "GAE lambda.", ge=0.0, le=1.0)
    cliprange: float = knob(0.2, "Policy ratio clip epsilon.", gt=0.0)
    cliprange_value: float = knob(0.2, "Value clip around the rollout values.", gt=0.0)
    vf_coef: float = knob(0.1, "Weight of the value loss in the joint loss.", ge=0.0)
    whiten_rewards: bool = knob(False, "Whiten per-token rewards (without shifting) before GAE.")
    use_lora: bool = knob(
        False,
        "Train LoRA adapters; the reference is the adapter-disabled policy and the reward model "
        "is the adapter-disabled value model, so memory stays near one policy + one RM.",
    )
    lora_r: int = knob(16, "LoRA rank.", ge=1, le=1024)
    lora_alpha: int = knob(32, "LoRA alpha (scale = alpha / r).", ge=1)
    lora_target_modules: str | list[str] = knob("all-linear", "Modules that get LoRA adapters.")
    rollout_forward_batch_size: int = knob(
        16, "Sequences per no-grad forward/generation chunk during the rollout.", ge=1
    )
    reuse_rollout_values: bool = knob(
        True,
        "Run the rollout's value pass for the first minibatch with gradients and train on it "
        "in the first PPO epoch (same weights, same numbers), instead of running it twice. "
        "Holds that minibatch's value activations from the rollout to its update.",
    )
    reward_max_length: int = knob(
        1024, "Token limit of a reward-model input (start is cut).", ge=16
    )
    sample_every: int = knob(5, "Store a table of sample responses every this many steps.", ge=1)
    num_sample_rows: int = knob(4, "Rows in each sample table.", ge=0, le=64)
    checkpoint_every: int = knob(1, "Write a resumable checkpoint every this many steps.", ge=1)
    checkpoint_every_s: float = knob(
        60.0,
        "Also write one once this many seconds passed since the last, checked between steps"
        " (0: by step count only): a killed worker loses at most about this much work.",
        ge=0.0,
    )

    _minibatch_divides_batch = must_divide("mini_batch_size", "batch_size")
    _accumulation_divides_minibatch = must_divide("gradient_accumulation_steps", "mini_batch_size")

    def effective_learning_rate(self) -> float:
        """`learning_rate`, or the default for full fine-tuning or LoRA when it is unset."""
        return self.learning_rate or (1e-4 if self.use_lora else 3e-6)


class PPOConfig(PPOKnobs):
    """What `train_ppo` takes: the knobs plus where it runs."""

    value_model_path: str | None = knob(
        None,
        "Where the value model starts. None: the reward model directory, or the policy (with a "
        "fresh scalar head) when the reward is a Python callable.",
    )
    device: str = knob("auto", "'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = knob("float32", "Weights dtype: float32 or bfloat16 (bfloat16 on GPUs only).")


class PPORunConfig(PPOKnobs):
    """The `config` of a `ppo` run: the knobs, sized for a CPU worker, plus its inputs."""

    reward_model_id: int | None = Field(None, description="default: the active reward model")
    max_train_prompts: int | None = Field(None, ge=1, description="sample of training prompts")
    batch_size: int = same_knob(PPOKnobs, "batch_size", default=8)
    mini_batch_size: int = same_knob(PPOKnobs, "mini_batch_size", default=4)
    ppo_epochs: int = same_knob(PPOKnobs, "ppo_epochs", default=2)
    max_new_tokens: int = same_knob(
        PPOKnobs, "max_new_tokens", note="default: the project's max_new_tokens, at most 256"
    )
    num_processes: int = num_processes_knob(
        note="PPO: each process samples and scores its share of every batch of prompts, so"
        " batch_size must be at least num_processes."
    )

    @field_validator("num_processes")
    @classmethod
    def _a_prompt_per_process(cls, value: int, info: ValidationInfo) -> int:
        # A rank with no prompt would have no rollout to contribute (app.ml.ppo._rollout).
        batch_size = info.data.get("batch_size")
        if batch_size is not None and value > batch_size:
            raise ValueError(
                f"num_processes {value} exceeds batch_size {batch_size}: every process"
                " samples at least one prompt per step"
            )
        return value
