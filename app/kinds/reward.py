"""Reward-model training: the knobs of `app.ml.reward.train_reward_model` and a `reward` run's
config (which judgments, how they are split, which backbone)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from app.kinds.data import SnapshotConfig
from app.kinds.knobs import Knobs, knob, num_processes_knob, same_knob

TrainMode = Literal["full", "lora", "last_n"]
TRAIN_MODES: tuple[TrainMode, ...] = ("full", "lora", "last_n")
# The peak learning rate when none is given: higher the fewer weights train.
DEFAULT_LEARNING_RATE: dict[str, float] = {"full": 1e-5, "lora": 1e-4, "last_n": 3e-5}


class RewardKnobs(Knobs):
    """Every tunable knob of Bradley-Terry reward-model training."""

    max_length: int = knob(
        512,
        "Most tokens in one prompt+response sequence. Longer pairs lose the start of the prompt"
        " first, then the end of the responses.",
        ge=16,
        le=8192,
    )
    train_mode: TrainMode = knob(
        "full", "What trains: `full` (every weight), `lora`, or `last_n` (fast on CPU)."
    )
    last_n_layers: int = knob(
        2, "`last_n` mode: how many top decoder layers train (plus norm and head).", ge=1, le=64
    )
    lora_r: int = knob(16, "`lora` mode: adapter rank.", ge=1, le=1024)
    lora_alpha: int = knob(32, "`lora` mode: adapter scaling alpha.", ge=1)
    lora_target_modules: str = knob(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "`lora` mode: comma-separated names of the linear layers to adapt.",
    )
    learning_rate: float | None = knob(
        None,
        "Peak AdamW learning rate; unset: by train_mode, full 1e-5, lora 1e-4, last_n 3e-5.",
        gt=0.0,
        le=1.0,
    )
    weight_decay: float = knob(0.0, "AdamW weight decay.", ge=0.0)
    batch_size: int = knob(8, "Preference pairs per forward pass.", ge=1, le=512)
    grad_accumulation: int = knob(
        1, "Forward passes whose gradients make one optimizer step.", ge=1, le=256
    )
    max_grad_norm: float = knob(
        1.0, "Clip the global gradient norm to this (0: no clipping).", ge=0.0
    )
    warmup_ratio: float = knob(
        0.05, "Fraction of the steps with a linear learning-rate warmup.", ge=0.0, le=1.0
    )
    min_lr_ratio: float = knob(
        0.0, "The cosine schedule decays to this fraction of the peak rate.", ge=0.0, le=1.0
    )
    epochs: int = knob(1, "Passes over the training pairs.", ge=0, le=100)
    max_steps: int = knob(0, "Optimizer steps; when > 0 it overrides `epochs`.", ge=0)
    eval_every: int = knob(
        0, "Evaluate on the validation pairs every N steps (always at the end).", ge=0
    )
    early_stopping_patience: int = knob(
        0, "Stop after N evaluations without a better validation accuracy (0: off).", ge=0
    )
    restore_best: bool = knob(
        True, "Save the weights of the best validation accuracy, not the last ones."
    )
    center_rewards_coefficient: float = knob(
        0.0, "Weight of the (r_chosen + r_rejected)^2 term that centers rewards.", ge=0.0
    )
    length_group_batches: int = knob(
        16, "Pairs of this many batches are sorted by length together (less padding).", ge=1
    )
    seed: int = knob(0, "Seeds the head init, adapters and data order.")
    checkpoint_every: int = knob(
        0, "Write a resumable checkpoint every N steps (0: by time and on cancel only).", ge=0
    )
    checkpoint_every_s: float = knob(
        60.0,
        "Also write one once this many seconds passed since the last, checked between steps"
        " (0: by step count only): a killed worker loses at most about this much work.",
        ge=0.0,
    )

    @model_validator(mode="after")
    def _some_training(self) -> RewardKnobs:
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("set epochs or max_steps")
        return self

    def peak_learning_rate(self) -> float:
        """`learning_rate`, or the train mode's default when it is unset."""
        return self.learning_rate or DEFAULT_LEARNING_RATE[self.train_mode]


class RewardConfig(RewardKnobs):
    """What `train_reward_model` takes: the knobs plus where it runs."""

    backbone: str = Field(
        min_length=1, description="Directory (or configured hub id) of the causal LM to start from."
    )
    device: str = knob("cpu", "torch device to train on.")


class RewardRunConfig(RewardKnobs):
    """The `config` of a `reward` run. Defaults are sized for a CPU worker."""

    snapshot_id: int | None = Field(None, description="train on this snapshot (default: a new one)")
    data: SnapshotConfig = Field(
        default_factory=SnapshotConfig, description="how judgments become training pairs"
    )
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share held out, by prompt")
    split_seed: int = Field(0, description="seeds the train/validation split")
    backbone: str | None = Field(None, description="model spec (default: the base policy)")
    train_mode: TrainMode = same_knob(
        RewardKnobs, "train_mode", default="last_n", note="a run's default: last_n, for a CPU"
    )
    checkpoint_every: int = same_knob(RewardKnobs, "checkpoint_every", default=50)
    num_processes: int = num_processes_knob()
