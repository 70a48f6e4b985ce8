"""DPO: every knob of `app.ml.dpo.train_dpo`, every knob of the on-policy pairs
(`app.ml.online_pairs.policy_pairs`), and a `dpo` run's config: where its pairs come from.

A `dpo` run trains on human-judged pairs from a snapshot (`pair_source: "human"`), on the
policy's own fresh answers ranked by a reward model (`"policy"`, on-policy or iterative DPO),
or on both (`"mixed"`). The policy-pair knobs live in `OnlinePairKnobs` so the ML function takes
exactly them; the run config reuses them, with the sampling ones defaulting to the project's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.kinds.data import SnapshotConfig
from app.kinds.knobs import Knobs, knob, must_divide, num_processes_knob, same_knob
from app.kinds.pairs import PairRule


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


PairSource = Literal["human", "policy", "mixed"]


class OnlinePairKnobs(Knobs):
    """How the policy's own answers become preference pairs (`app.ml.online_pairs`)."""

    samples_per_prompt: int = knob(
        4, "K: answers the policy samples per training prompt; one pair per prompt.", ge=2, le=16
    )
    pair_selection: PairRule = Field(
        "top_bottom",
        description="which two of the K reward-scored answers make the pair (app.kinds.pairs):"
        " the top against the lowest, against a random other, or the two best",
    )
    min_score_margin: float = knob(
        0.1,
        "A pair whose chosen answer outscores the rejected one by less than this (in reward"
        " units, after the EOS penalty) is dropped: answers the reward model cannot tell apart"
        " teach noise. 0.1 is P(chosen better) = sigmoid(0.1) = 0.52 under Bradley-Terry.",
        ge=0.0,
    )
    temperature: float = knob(0.7, "Sampling temperature of the policy's answers.", gt=0.0, le=2.0)
    max_new_tokens: int = knob(
        64, "Length limit of the policy's answers; longer ones are cut here.", ge=1, le=4096
    )
    missing_eos_penalty: float | None = knob(
        1.0,
        "Subtracted from the reward of an answer cut at max_new_tokens (no EOS) before ranking,"
        " as PPO does, so an ended answer beats a truncated one of equal reward (None: off).",
        ge=0.0,
    )
    generation_batch_size: int = knob(
        16, "Sequences (prompt x sample rows) decoded together while sampling.", ge=1, le=1024
    )
    sampling_seed: int = knob(
        0, "Seeds every answer's generator and the pair choice: same seed, same pairs."
    )


_PROJECT = "default: the project's setting, at most 256 tokens"


class DPORunConfig(OnlinePairKnobs, DPOKnobs):
    """The `config` of a `dpo` run: the knobs plus where the pairs come from."""

    pair_source: PairSource = Field(
        "human",
        description="human: judged pairs from a snapshot; policy: the active policy's own"
        " answers to training prompts, ranked by the reward model; mixed: both",
    )
    max_policy_prompts: int | None = Field(
        None,
        ge=1,
        description="policy pairs: a seeded sample of at most this many training prompts"
        " (default: all of them)",
    )
    temperature: float | None = same_knob(  # type: ignore[assignment]
        OnlinePairKnobs, "temperature", default=None, note="default: the project's setting"
    )
    max_new_tokens: int | None = same_knob(  # type: ignore[assignment]
        OnlinePairKnobs, "max_new_tokens", default=None, note=_PROJECT
    )
    sampling_seed: int | None = same_knob(  # type: ignore[assignment]
        OnlinePairKnobs,
        "sampling_seed",
        default=None,
        note="default: the run id, so each round's run draws fresh prompts and answers",
    )

    snapshot_id: int | None = Field(None, description="train on this snapshot (default: a new one)")
    data: SnapshotConfig = Field(
        default_factory=SnapshotConfig, description="how judgments become training pairs"
    )
    reward_model_id: int | None = Field(
        None,
        description="reward model that ranks the policy pairs (pair_source policy or mixed) and"
        " that the evaluation uses (default: the active one)",
    )
    num_processes: int = num_processes_knob()
