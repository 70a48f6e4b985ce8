"""DPO: every knob of `app.ml.dpo.train_dpo`, and a `dpo` run's config (which judgments)."""

from __future__ import annotations

from pydantic import Field

from app.kinds.data import SnapshotConfig
from app.kinds.knobs import Knobs, knob, must_divide, num_processes_knob


class DPOKnobs(Knobs):
    """Every tunable knob of a DPO run."""

    seed: int = knob(0, "Seed for Python, NumPy and torch; also fixes the order of the pairs.")
    epochs: int = knob(1, "Passes over the preference pairs.", ge=1, le=100)
    batch_size: int = knob(8, "Pairs per optimizer step.", ge=1, le=512)
    gradient_accumulation_steps: int = knob(
        1,
        "Micro-batches per step; the batch is split to bound activation memory. Must divide"
        " batch_size.",
        ge=1,
        le=256,
    )
    learning_rate: float | None = knob(
        None, "AdamW learning rate; unset: 1e-6, or 1e-5 with LoRA.", gt=0.0, le=1.0
    )
    max_grad_norm: float = knob(1.0, "Global gradient-norm clip per optimizer step.", gt=0.0)
    beta: float = knob(0.1, "Strength of the implicit KL penalty towards the reference.", gt=0.0)
    label_smoothing: float = knob(
        0.0,
        "Assumed probability that a label is flipped (conservative DPO); 0 = plain DPO.",
        ge=0.0,
        lt=0.5,
    )
    max_prompt_length: int = knob(
        256, "Prompt tokens kept (the start is cut, the end is kept).", ge=8, le=8192
    )
    max_length: int = knob(
        512, "Prompt + completion tokens kept (the completion end is cut).", ge=16, le=8192
    )
    use_lora: bool = knob(False, "Train LoRA adapters; the reference is the adapter-disabled base.")
    lora_r: int = knob(16, "LoRA rank.", ge=1, le=1024)
    lora_alpha: int = knob(32, "LoRA alpha (scale = alpha / r).", ge=1)
    lora_target_modules: str | list[str] = knob("all-linear", "Modules that get LoRA adapters.")
    checkpoint_every: int = knob(10, "Write a resumable checkpoint every this many steps.", ge=1)
    checkpoint_every_s: float = knob(
        60.0,
        "Also write one once this many seconds passed since the last, checked between steps"
        " (0: by step count only): a killed worker loses at most about this much work.",
        ge=0.0,
    )

    _accumulation_divides_batch = must_divide("gradient_accumulation_steps", "batch_size")

    def effective_learning_rate(self) -> float:
        """`learning_rate`, or the default for full fine-tuning or LoRA when it is unset."""
        return self.learning_rate or (1e-5 if self.use_lora else 1e-6)


class DPOConfig(DPOKnobs):
    """What `train_dpo` takes: the knobs plus where it runs."""

    device: str = knob("auto", "'auto' (CUDA when present), 'cpu', 'cuda', ...")
    dtype: str = knob("float32", "Weights dtype: float32 or bfloat16.")


class DPORunConfig(DPOKnobs):
    """The `config` of a `dpo` run: the knobs plus where the pairs come from."""

    snapshot_id: int | None = Field(None, description="train on this snapshot (default: a new one)")
    data: SnapshotConfig = Field(
        default_factory=SnapshotConfig, description="how judgments become training pairs"
    )
    reward_model_id: int | None = Field(
        None, description="reward model the evaluation uses (default: the active one)"
    )
    num_processes: int = num_processes_knob()
