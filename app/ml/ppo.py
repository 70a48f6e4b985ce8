"""PPO for RLHF: fine-tune a causal LM to score well under a reward while staying near its start.

Read top to bottom, like CleanRL's `ppo.py`:

1. Configuration: `PPOConfig` (defined torch-free in `app.kinds.ppo`, one field per knob with
   bounds and help), the settings a checkpoint may resume under, and `PPOResult`.
2. Pure pieces the tests check against hand numbers: the masked statistics (`masked_mean`,
   `masked_var`, `masked_whiten`), `compute_rewards`, `gae_advantages`, `policy_loss`,
   `value_loss` and the KL controllers.
3. PPO's own plumbing: the vocabulary matrices whose gradient buffers stay allocated
   (`vocab_matrices`), and the value model's pass over a rollout (`_rollout_values`).
4. `train_ppo`, in phases: `_setup` (seeding, the roles, optimizer and beta), then per step
   `_rollout` (sample, score, per-token rewards, GAE), `_ppo_update` (several epochs of
   clipped minibatch updates) and `_log_step` (metrics and sample tables), with an atomic
   checkpoint (`app.ml.checkpoint`) every `checkpoint_every` steps or `checkpoint_every_s`
   seconds, whichever comes first, and on cancel.
5. Under torchrun (`ranks`, `app.ml.distributed`): each rank rolls out its shard of the
   prompts, the shards are gathered (`_gather_shards`) so the rewards, whitening, GAE and the
   KL controller see the global batch, and the update splits each micro-batch across the
   ranks (`_my_part`) through one DDP over policy and value model (`_PolicyAndValue`).

What PPO shares with the critic-free trainers (`app.ml.critic_free`: RLOO, GRPO) is in
`app.ml.rollout`: sampling a batch with its log-probabilities, the reference's pass, cutting at
the first EOS, trimming a slice's padding. What it shares with DPO and evaluation lives
elsewhere: prompt encoding, the sampler, the
log-probability forward pass, LoRA and saving the policy in `app.ml.policy`; the reward model,
`token_values` (a scalar head at every token: the value model's read-out) and
`RewardModelScorer` in `app.ml.reward`; device, dtype and tokenizer in `app.ml.loading`.

Written from the published details ("The N Implementation Details of RLHF with PPO", Ziegler et
al. 2019, Stiennon et al. 2020, Ouyang et al. 2022) since TRL dropped its PPO trainer after 1.12.

Roles. The *policy* is trained. The *reference* is a frozen copy of the starting policy or, with
LoRA, the same network with its adapter disabled. The *value model* starts from the reward model
(its backbone, with its scalar head applied at every token instead of only the last one). The
*reward* is either a sequence-classification reward model (a directory) or any Python callable
`score_fn(prompt_messages_list, response_texts, response_token_ids)` returning one score per
response, for rule-based rewards and simulated raters.

Conventions used throughout (`app.ml.policy`): `responses` are `[batch, resp_len]` token ids
with everything after the first EOS replaced by pad; `mask` is a bool tensor of the same shape,
true for real response tokens up to and including the first EOS. The pad id may equal the EOS
id (SmolLM2), so the end of a response is always the first EOS found by position, never "the
first pad".
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from app.kinds.ppo import PPOConfig
from app.ml.checkpoint import CheckpointSchedule, TrainCheckpoint, seed_everything
from app.ml.distributed import Ranks
from app.ml.hooks import Cancelled, Hooks, NullHooks
from app.ml.loading import dtype_for, load_tokenizer, pick_device
from app.ml.policy import (
    MergedLoraSampler,
    Messages,
    PromptLike,
    as_messages,
    encode_prompts,
    forward_logprobs,
    last_true_index,
    left_pad,
    load_policy,
    lora_config,
    make_adamw,
    reference_policy,
    response_texts,
    save_policy,
    unwrap_peft,
)
from app.ml.reward import (
    RewardModelScorer,
    ScoreFn,
    load_reward_model,
    reward_scores,
    token_values,
)
from app.ml.rollout import (
    chunks,
    next_prompt_indices,
    pad_right,
    reference_logprobs,
    sample_rollout,
    trim_padding,
)
from app.ml.vocab_grads import plain_embedding, plain_projection, zero_grad

# --------------------------------------------------------------------------------------------
# 1. Configuration: `PPOConfig`, every knob with its bounds and help (defined in app.kinds.ppo)
# --------------------------------------------------------------------------------------------

CHECKPOINT_FILE = "ppo_checkpoint.pt"
# Settings that change speed or bookkeeping but not the trajectory: a checkpoint resumes under any.
_RESUMABLE_FIELDS = {
    "total_steps",
    "checkpoint_every",
    "checkpoint_every_s",
    "sample_every",
    "num_sample_rows",
    "reuse_rollout_values",
}


@dataclass
class PPOResult:
    """What a finished run hands back: where the policy is, and what happened on the way."""

    output_dir: Path
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    samples: dict[int, list[dict[str, Any]]]


# --------------------------------------------------------------------------------------------
# 2. Pure pieces (tested against hand-computed values)
# --------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is true (over all of them, or along `dim`)."""
    mask_f = mask.to(values.dtype)
    if dim is None:
        return (values * mask_f).sum() / mask_f.sum().clamp(min=1)
    return (values * mask_f).sum(dim) / mask_f.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked positions (Bessel-corrected by default)."""
    mean = masked_mean(values, mask)
    centered = values - mean
    var = masked_mean(centered**2, mask)
    if unbiased:
        n = mask.sum().to(values.dtype)
        if n < 2:
            return torch.zeros((), dtype=values.dtype, device=values.device)
        var = var * n / (n - 1)
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) using statistics of real positions only.

    Padded positions neither enter the statistics nor keep a value: they come back as 0, so a
    later masked sum cannot pick them up by accident.
    """
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * (logp - logp_ref) everywhere, plus the score at the last token.

    Returns `(rewards, non_score_rewards, kl)`, each `[batch, len]` and zero at masked positions.
    The score goes to the last *real* token found from the mask, so it lands on the EOS when
    there is one, whether the rows are left or right padded and whatever the pad id is.
    """
    mask_f = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask_f
    non_score = -beta * kl
    rewards = non_score.clone()
    last = last_true_index(mask)
    rows = torch.nonzero(last >= 0).squeeze(1)  # a row with no real token gets no score
    rewards[rows, last[rows]] += scores[rows].to(rewards.dtype)
    return rewards, non_score, kl


def gae_advantages(
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    Values and rewards at masked positions are treated as 0, so the value after the last real
    token (the terminal state) is 0. Outputs are zero at masked positions.
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    rewards = rewards * mask_f
    length = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        # A masked position resets the running sum so padding cannot leak into real tokens.
        last_gae = last_gae * mask_f[:, t]
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = (advantages + values) * mask_f
    return advantages * mask_f, returns


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (a mean over real tokens) and its diagnostics.

    Diagnostics: `clipfrac` (share of tokens where the clipped term was the larger loss),
    `approxkl` (0.5 * mean squared log-ratio) and `ratio` (mean probability ratio).
    """
    logratio = new_logprobs - old_logprobs
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean(logratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2) over real tokens; and clipfrac.

    clipfrac counts the tokens whose clip is active (|v - v_old| > the range) and decides the
    max. Comparing the two losses alone would also count rounding: `v_old + (v - v_old)` is
    not always `v` in floating point.
    """
    delta = new_values - old_values
    clipped_values = old_values + torch.clamp(delta, -cliprange_value, cliprange_value)
    loss_unclipped = (new_values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        active = (delta.abs() > cliprange_value) & (loss_clipped > loss_unclipped)
        clipfrac = masked_mean(active.float(), mask)
    return loss, clipfrac


class FixedKLController:
    """A constant beta; same interface as the adaptive one."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_samples: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        """Beta, for a checkpoint."""
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Take back what `state_dict` saved."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): move beta proportionally to how far the KL is from its target.

    `beta *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_samples / horizon`; the clip keeps one
    noisy batch from swinging beta, the horizon sets how many samples a correction takes.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        """Adjust beta after a batch of `n_samples` responses whose mean KL was `current_kl`."""
        proportional_error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + proportional_error * n_samples / self.horizon

    def state_dict(self) -> dict[str, float]:
        """The adapted beta, for a checkpoint (target and horizon come from the config)."""
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Take back what `state_dict` saved."""
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------
# 3. PPO's own plumbing: padding, vocabulary matrices, the value pass over a rollout
# --------------------------------------------------------------------------------------------


def vocab_matrices(*models: nn.Module) -> list[torch.Tensor]:
    """The trainable `[vocab, hidden]` weights of `models` whose gradients `vocab_grads` adds in
    place (tied matrices once): these keep their gradient buffers between steps."""
    found: dict[int, torch.Tensor] = {}
    for model in models:
        inner = unwrap_peft(model)
        modules: list[nn.Module | None] = [plain_embedding(inner.get_input_embeddings())]
        if hasattr(inner, "get_output_embeddings"):
            modules.append(plain_projection(inner.get_output_embeddings()))
        for module in modules:
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.requires_grad:
                found[id(weight)] = weight
    return list(found.values())


def _rollout_values(
    config: PPOConfig,
    value_model: nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    first_order: torch.Tensor,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The value model's `[batch, resp_len]` estimates, and the graphs the first epoch reuses.

    Until the first optimizer step the update trains the very network the rollout scores
    with, so the first minibatch's value forward pass in epoch one would repeat this one
    number for number. With `reuse_rollout_values` that minibatch is scored here, micro-batch
    by micro-batch as the update will slice it, with gradients on; the returned dict maps each
    micro-batch's position in the minibatch to its values *with* their graph, and the update
    trains on them instead of running the value model again. The other rows are scored
    without gradients.
    """
    batch, width = query_responses.shape[0], query_responses.shape[1] - context_length
    values = torch.zeros(batch, width, device=query_responses.device)
    kept: dict[int, torch.Tensor] = {}
    rest = first_order
    if config.reuse_rollout_values:
        micro = config.mini_batch_size // config.gradient_accumulation_steps
        head, rest = first_order[: config.mini_batch_size], first_order[config.mini_batch_size :]
        for n, sl in enumerate(chunks(len(head), micro)):
            idx = head[sl]
            ids, att, ctx, length = trim_padding(
                query_responses[idx], attention_mask[idx], context_length
            )
            with torch.enable_grad():
                kept[n] = token_values(value_model, ids, att)[:, ctx - 1 : -1]
            values[idx, :length] = kept[n].detach()
    for sl in chunks(len(rest), config.rollout_forward_batch_size):
        idx = rest[sl]
        ids, att, ctx, length = trim_padding(
            query_responses[idx], attention_mask[idx], context_length
        )
        values[idx, :length] = token_values(value_model, ids, att)[:, ctx - 1 : -1]
    return values, kept


def _rank_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of `rank` at `step` under DDP: independent streams, replayable."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0])


def _gather_shards(ranks: Ranks, pad_id: int, **part: Any) -> dict[str, Any]:
    """The ranks' rollout shards as the one global batch, in rank (= prompt) order, everywhere.

    Prompt ids and mask are left-padded, the per-token tensors right-padded to the widest
    shard: the layout one process gives the whole batch (`left_pad`, `pad_right`), so the
    rewards, whitening and GAE that follow compute exactly what one process computes from
    the same rollout. `mask` comes as integers (gathered and padded), and goes back as bools.
    """
    device = part["query_ids"].device
    local = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in part.items()}
    parts = ranks.gather(local)
    context = max(p["query_ids"].shape[1] for p in parts)
    width = max(p["responses"].shape[1] for p in parts)

    def left(name: str, value: int) -> torch.Tensor:
        padded = [F.pad(p[name], (context - p[name].shape[1], 0), value=value) for p in parts]
        return torch.cat(padded).to(device)

    def right(name: str, value: float | int) -> torch.Tensor:
        return pad_right([p[name] for p in parts], value, width).to(device)

    return {
        "query_ids": left("query_ids", pad_id),
        "query_mask": left("query_mask", 0),
        "responses": right("responses", pad_id),
        "mask": right("mask", 0).bool(),
        **{name: right(name, 0.0) for name in ("logprobs", "ref_logprobs", "values")},
        "raw_scores": torch.cat([p["raw_scores"] for p in parts]).to(device),
        "texts": [text for p in parts for text in p["texts"]],
    }


def _my_part(run: _Run, idx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's contiguous part of the micro-batch `idx` (rows of the rollout), and its
    share of the micro-batch's real tokens: the weight of its token means (policy and value
    loss, diagnostics), which then sum over the ranks to the micro-batch's own means.

    One process: all of it, share 1. A rank whose part is empty (a micro-batch smaller than
    the world) runs one row at share 0, because every rank joins each DDP all-reduce."""
    if run.ranks is None:
        return idx, 1.0
    rows = run.ranks.shard(range(len(idx)))
    if not rows:
        return idx[:1], 0.0
    part = idx[rows[0] : rows[-1] + 1]
    return part, float(mask[part].sum()) / max(float(mask[idx].sum()), 1.0)


def _grad_of(weight: torch.Tensor) -> torch.Tensor:
    if weight.grad is None:  # not reached by this rank's backward: it contributes zeros
        weight.grad = torch.zeros_like(weight)
    return weight.grad


class _PolicyAndValue(nn.Module):
    """The update's forward of both trained models as one module, for one DDP wrapper: the
    policy's log-probabilities (and entropy) of the response tokens, the value model's values.
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.policy, self.value_model, self.temperature = policy, value_model, temperature

    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        logprobs, entropy = forward_logprobs(
            self.policy, ids, attention_mask, context_length, self.temperature, with_entropy=True
        )
        values = token_values(self.value_model, ids, attention_mask)
        return logprobs, entropy, values[:, context_length - 1 : -1]


def _wrap_for_update(run: _Run, ranks: Ranks) -> nn.Module:
    """Policy and value model under one DDP. The vocabulary matrices are left out of it: their
    gradients are added in place (`app.ml.vocab_grads`), never through the autograd hooks DDP
    reduces with, so `_ppo_update` averages them itself before each optimizer step."""
    module = _PolicyAndValue(run.policy, run.value_model, run.config.temperature)
    vocab = {id(w) for w in vocab_matrices(run.policy, run.value_model)}
    ignore = [name for name, p in module.named_parameters() if id(p) in vocab]
    return ranks.wrap(module, ignore)


# --------------------------------------------------------------------------------------------
# 4. Training: setup, then per step rollout, update, logging and checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What a run holds from step to step: its roles, optimizer, generators and history."""

    config: PPOConfig
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    # `Any`: after peft wrapping these gain methods (disable_adapter, merge_and_unload).
    policy: Any
    ref_model: nn.Module
    ref_context: Callable[[], contextlib.AbstractContextManager[Any]]
    merged_sampler: MergedLoraSampler | None  # with LoRA: the policy the rollout samples from
    value_model: Any
    reward: RewardModelScorer | ScoreFn
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    kl_ctl: FixedKLController | AdaptiveKLController
    sample_gen: torch.Generator  # token sampling
    shuffle_gen: torch.Generator  # prompt order, minibatches
    prompt_order: list[int] = field(default_factory=list)  # what is left of the prompt epoch
    history: list[dict[str, float]] = field(default_factory=list)
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # Under torchrun: this process's rank, and the DDP wrapper the update's forward runs through.
    ranks: Ranks | None = None
    trained: nn.Module | None = None

    @property
    def eos_id(self) -> int:
        """The policy's EOS id: a response ends at its first one."""
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        """The policy's pad id (it may equal the EOS id)."""
        return int(self.tokenizer.pad_token_id)

    def checkpoint(self, path: Path) -> TrainCheckpoint:
        """The run's checkpoint file, saving and restoring these roles and generators."""
        return TrainCheckpoint(
            path,
            self.config.to_dict(),
            _RESUMABLE_FIELDS,
            models={"policy": self.policy, "value": self.value_model},
            optimizer=self.optimizer,
            generators={"sample": self.sample_gen, "shuffle": self.shuffle_gen},
        )

    def own_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond weights, optimizer and RNG: beta, data order, history."""
        return {
            "kl_controller": self.kl_ctl.state_dict(),
            "prompt_order": list(self.prompt_order),
            "history": self.history,
            "samples": self.samples,
        }

    def load_own_state(self, state: Mapping[str, Any]) -> None:
        """Take back what `own_state` saved."""
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.prompt_order = list(state["prompt_order"])
        self.history = list(state["history"])
        self.samples = {int(k): v for k, v in state["samples"].items()}


@dataclass
class _Rollout:
    """One batch of experience; every tensor is `[batch, resp_len]` unless noted."""

    query_responses: torch.Tensor  # [batch, ctx + resp_len]
    attention_mask: torch.Tensor  # [batch, ctx + resp_len]
    context_length: int
    mask: torch.Tensor
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    # Epoch one's permutation [batch], drawn at the rollout, and the value graphs its first
    # minibatch trains on (see `_rollout_values`).
    first_order: torch.Tensor
    kept_values: dict[int, torch.Tensor]
    # What the step's metrics and sample table read.
    messages: list[Messages]
    texts: list[str]
    raw_scores: torch.Tensor  # [batch], as the reward gave them
    scores: torch.Tensor  # [batch], after the missing-EOS penalty
    non_score: torch.Tensor
    kl: torch.Tensor
    beta: float
    lengths: torch.Tensor  # [batch]
    has_eos: torch.Tensor  # [batch]


def train_ppo(
    config: PPOConfig,
    policy_dir: str | Path,
    reward: str | Path | ScoreFn,
    prompts: Sequence[PromptLike],
    output_dir: str | Path,
    checkpoint_dir: str | Path,
    hooks: Hooks | None = None,
    resume: bool = True,
    on_samples: Callable[[int, list[dict[str, Any]]], None] | None = None,
    ranks: Ranks | None = None,
) -> PPOResult:
    """Fine-tune the policy in `policy_dir` with PPO; write it to `output_dir` in HF format.

    `reward` is a reward-model directory or a callable
    `score_fn(prompt_messages_list, response_texts, response_token_ids) -> scores`.
    `prompts` are chat-message lists (or plain strings, taken as one user turn).
    Metrics go to `hooks.metrics` every step, a sample table every `sample_every` steps to
    `on_samples` (and into `PPOResult.samples`). When `hooks.should_stop()` turns true between
    steps the run checkpoints and raises `Cancelled`; with `resume=True` a later call continues
    from the latest checkpoint in `checkpoint_dir` and ends exactly where an uninterrupted run
    would have.

    Under torchrun, `ranks` (`app.ml.distributed`) trains under DDP: `batch_size` stays the
    global batch of prompts; each rank samples, scores and values its shard of them, the shards
    are gathered so that rewards, whitening, GAE, the KL controller and the minibatch order see
    the whole batch on every rank, and each micro-batch of the update is split across the ranks
    (`_my_part`). Rank 0 reports, checkpoints and saves.
    """
    hooks = hooks or NullHooks()
    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)
    prompt_messages = [as_messages(p) for p in prompts]
    if not prompt_messages:
        raise ValueError("no prompts")
    if ranks is not None and config.batch_size < ranks.world_size:
        raise ValueError(f"batch_size {config.batch_size} < {ranks.world_size} processes")
    run = _setup(config, policy_dir, reward, ranks)
    checkpoint = run.checkpoint(checkpoint_dir / CHECKPOINT_FILE)
    start_step = 0
    if resume and (resumed := checkpoint.load()) is not None:
        start_step, own_state = resumed
        run.load_own_state(own_state)
        hooks.progress(
            start_step, config.total_steps, f"resumed from the checkpoint at step {start_step}"
        )

    if ranks is not None:
        run.trained = _wrap_for_update(run, ranks)
    last_saved = start_step
    schedule = CheckpointSchedule(
        config.checkpoint_every,
        config.checkpoint_every_s,
        device=ranks.device if ranks is not None else None,
    )

    def save_checkpoint(step: int) -> None:
        if ranks is None or ranks.is_main:
            checkpoint.save(step, run.own_state())
        if ranks is not None:
            ranks.barrier()  # nobody moves on (or exits) before rank 0's file is whole
        schedule.saved()

    for step in range(start_step, config.total_steps):
        if hooks.should_stop() if ranks is None else ranks.should_stop(hooks):
            if last_saved != step:
                save_checkpoint(step)
            raise Cancelled(f"PPO cancelled before step {step + 1}")
        if ranks is not None:
            # Each rank its own sampling stream, a function of (seed, step, rank): the ranks
            # draw independently, and a resumed run replays them (the checkpoint holds only
            # rank 0's generator).
            run.sample_gen.manual_seed(_rank_seed(config.seed, step, ranks.rank))
        rollout_start = time.perf_counter()
        indices = next_prompt_indices(
            run.prompt_order, len(prompt_messages), config.batch_size, run.shuffle_gen
        )
        rollout = _rollout(run, [prompt_messages[i] for i in indices])
        update_start = time.perf_counter()
        stats = _ppo_update(run, rollout)
        timings = {
            "time/rollout": update_start - rollout_start,
            "time/update": time.perf_counter() - update_start,
        }
        done = step + 1
        metrics = _log_step(run, rollout, {**stats, **timings}, done, hooks, on_samples)
        if done == config.total_steps or schedule.due(done):
            save_checkpoint(done)
            last_saved = done
        hooks.progress(
            done,
            config.total_steps,
            f"PPO step {done}/{config.total_steps}: score {metrics['objective/scores']:.3f}, "
            f"kl {metrics['objective/kl']:.3f}, length {metrics['response/length']:.1f}",
        )

    final_metrics = run.history[-1] if run.history else {}
    info = {"algorithm": "ppo", "config": config.to_dict(), "metrics": final_metrics}
    if ranks is None or ranks.is_main:
        save_policy(run.policy, run.tokenizer, output_dir, info)
    return PPOResult(output_dir, config.total_steps, final_metrics, run.history, run.samples)


def _setup(
    config: PPOConfig,
    policy_dir: str | Path,
    reward: str | Path | ScoreFn,
    ranks: Ranks | None = None,
) -> _Run:
    """Seed everything, then build the roles (policy, reference, value model, reward), the
    optimizer and the KL controller. The order is part of the seeding: the value model's new
    head and the LoRA matrices draw from the global generator in this order (the same on every
    rank: DDP's start-up broadcast of rank 0's weights then changes nothing)."""
    device = ranks.device if ranks is not None else pick_device(config.device)
    dtype = dtype_for(device, config.dtype)

    # ---- Seeding: everything random below draws from these, so a resumed run can replay it.
    seed_everything(config.seed)
    sample_gen = torch.Generator(device=device).manual_seed(config.seed)
    shuffle_gen = torch.Generator().manual_seed(config.seed + 1)

    # ---- Roles ----------------------------------------------------------------------------
    tokenizer = load_tokenizer(policy_dir)
    policy = load_policy(policy_dir, dtype, device)
    reward_path = None if callable(reward) else Path(reward)
    value_path = config.value_model_path or (reward_path if reward_path else policy_dir)
    # From a causal-LM directory the scalar head is new; it is the only part seeded randomly.
    value_model: Any = AutoModelForSequenceClassification.from_pretrained(
        str(value_path), num_labels=1, dtype=dtype
    )
    value_model.to(device)
    merged_sampler: MergedLoraSampler | None = None
    if config.use_lora:
        from peft import get_peft_model

        merged_sampler = MergedLoraSampler(policy)
        policy = get_peft_model(
            policy,
            lora_config(config.lora_r, config.lora_alpha, config.lora_target_modules, "CAUSAL_LM"),
        )
        merged_sampler.attach(policy)
        # SEQ_CLS makes peft keep a trainable copy of the scalar head next to the frozen one.
        value_model = get_peft_model(
            value_model,
            lora_config(config.lora_r, config.lora_alpha, config.lora_target_modules, "SEQ_CLS"),
        )
    ref_model, ref_context = reference_policy(policy, policy_dir, dtype, device, config.use_lora)
    # Dropout off everywhere: the rollout and the update must score tokens with one network.
    policy.eval()
    value_model.eval()
    scorer: RewardModelScorer | ScoreFn
    if callable(reward):
        scorer = reward
    else:
        scorer = _reward_model_scorer(config, Path(reward), value_model, device, dtype)

    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    kl_ctl: FixedKLController | AdaptiveKLController = (
        AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        if config.adaptive_kl
        else FixedKLController(config.kl_coef)
    )
    return _Run(
        config=config, device=device, tokenizer=tokenizer, policy=policy, ref_model=ref_model,
        ref_context=ref_context, merged_sampler=merged_sampler, value_model=value_model,
        reward=scorer, params=params,
        optimizer=make_adamw(params, config.effective_learning_rate(), config.adam_eps),
        kl_ctl=kl_ctl, sample_gen=sample_gen, shuffle_gen=shuffle_gen, ranks=ranks,
    )  # fmt: skip


def _reward_model_scorer(
    config: PPOConfig,
    reward_path: Path,
    value_model: Any,
    device: torch.device,
    dtype: torch.dtype,
) -> RewardModelScorer:
    """The reward model in `reward_path` as a scorer of the rollout's responses.

    With LoRA and no separate value model, the value model's frozen base *is* the reward model:
    it scores with the value adapter disabled, and no second copy is loaded."""
    if config.use_lora and config.value_model_path is None:
        model, tokenizer = value_model, load_tokenizer(reward_path)
        context = value_model.disable_adapter
    else:
        loaded = load_reward_model(reward_path, device, dtype=dtype)
        model, tokenizer, context = loaded.model, loaded.tokenizer, contextlib.nullcontext
    return RewardModelScorer(
        model,
        tokenizer,
        config.reward_max_length,
        config.rollout_forward_batch_size,
        context=context,
    )


def _rollout(run: _Run, batch_messages: list[Messages]) -> _Rollout:
    """Sample a response to each prompt, score it, and turn the scores into per-token rewards
    and whitened advantages. No gradients, except the value graphs kept for the update.

    Under DDP this rank samples, scores and values only its shard of `batch_messages`; the
    shards are then gathered (`_gather_shards`), so what follows sees the global batch laid out
    as one process lays it out, on every rank."""
    config, device, eos_id, ranks = run.config, run.device, run.eos_id, run.ranks
    mine = batch_messages if ranks is None else ranks.shard(batch_messages)
    queries = encode_prompts(run.tokenizer, mine, config.max_prompt_length)
    query_ids, query_mask = left_pad(queries, run.pad_id, device)
    context_length = query_ids.shape[1]
    with torch.no_grad():
        responses, mask, logprobs = sample_rollout(run, query_ids, query_mask)
        query_responses = torch.cat([query_ids, responses], dim=1)
        attention_mask = torch.cat([query_mask, mask.long()], dim=1)
        ref_logprobs = reference_logprobs(run, query_responses, attention_mask, mask)
        # The first epoch's order is drawn now: its first minibatch may train on these values.
        first_order = torch.randperm(config.batch_size, generator=run.shuffle_gen).to(device)
        if ranks is None:
            values, kept_values = _rollout_values(
                config, run.value_model, query_responses, attention_mask, context_length,
                first_order,
            )  # fmt: skip
        else:
            # No graphs to keep: under DDP the update's forward runs through `run.trained`.
            values, kept_values = _rollout_values(
                config.model_copy(update={"reuse_rollout_values": False}), run.value_model,
                query_responses, attention_mask, context_length,
                torch.arange(len(mine), device=device),
            )  # fmt: skip
        token_lists, texts = response_texts(run.tokenizer, responses, mask)
        raw_scores = reward_scores(run.reward, mine, texts, token_lists, device)
        if ranks is not None:
            parts = _gather_shards(
                ranks, run.pad_id, query_ids=query_ids, query_mask=query_mask,
                responses=responses, mask=mask.long(), logprobs=logprobs,
                ref_logprobs=ref_logprobs, values=values, raw_scores=raw_scores, texts=texts,
            )  # fmt: skip
            query_ids, responses, mask = parts["query_ids"], parts["responses"], parts["mask"]
            logprobs, ref_logprobs = parts["logprobs"], parts["ref_logprobs"]
            values, raw_scores, texts = parts["values"], parts["raw_scores"], parts["texts"]
            context_length = query_ids.shape[1]
            query_responses = torch.cat([query_ids, responses], dim=1)
            attention_mask = torch.cat([parts["query_mask"], mask.long()], dim=1)

        lengths = mask.sum(1)
        has_eos = ((responses == eos_id) & mask).any(1)
        scores = raw_scores
        if config.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - config.missing_eos_penalty)

        beta = run.kl_ctl.value
        rewards, non_score, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, beta)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae_advantages(values, rewards, mask, config.gamma, config.lam)
        advantages = masked_whiten(advantages, mask)
    return _Rollout(
        query_responses=query_responses, attention_mask=attention_mask,
        context_length=context_length, mask=mask, logprobs=logprobs, values=values,
        advantages=advantages, returns=returns, first_order=first_order,
        kept_values=kept_values, messages=batch_messages, texts=texts, raw_scores=raw_scores,
        scores=scores, non_score=non_score, kl=kl, beta=beta, lengths=lengths, has_eos=has_eos,
    )  # fmt: skip


def _ppo_update(run: _Run, rollout: _Rollout) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy + value updates; returns mean diagnostics.

    Epoch one takes the rollout's `first_order`; its first minibatch trains on the rollout's
    `kept_values` (the value estimates with their graphs, see `_rollout_values`), consumed, and
    so released, as they are trained on.

    Under DDP each rank runs its part of every micro-batch (`_my_part`) through `run.trained`;
    its losses and diagnostics are weighted by its share of the micro-batch's tokens, so DDP's
    gradient average and the summed diagnostics are one process's.
    """
    config, policy, value_model, params = run.config, run.policy, run.value_model, run.params
    ranks, trained = run.ranks, run.trained
    first_order, kept_values = rollout.first_order, rollout.kept_values
    batch = rollout.query_responses.shape[0]
    micro = config.mini_batch_size // config.gradient_accumulation_steps
    context_length = rollout.context_length
    # Their gradient buffers stay allocated from minibatch to minibatch (see `vocab_grads`).
    vocab = vocab_matrices(policy, value_model)
    totals: dict[str, float] = {}
    count = 0
    for epoch in range(config.ppo_epochs):
        if epoch == 0:
            order = first_order
        else:
            order = torch.randperm(batch, generator=run.shuffle_gen).to(rollout.mask.device)
        for mb_start in range(0, batch, config.mini_batch_size):
            minibatch = order[mb_start : mb_start + config.mini_batch_size]
            zero_grad(params, keep=vocab)
            for n, mc_start in enumerate(range(0, len(minibatch), micro)):
                idx, share = _my_part(run, minibatch[mc_start : mc_start + micro], rollout.mask)
                ids, att, ctx, length = trim_padding(
                    rollout.query_responses[idx], rollout.attention_mask[idx], context_length
                )
                mask = rollout.mask[idx, :length]
                if trained is not None:  # both models in one DDP forward (`_PolicyAndValue`)
                    new_logprobs, entropy, new_values = trained(ids, att, ctx)
                else:
                    new_logprobs, entropy = forward_logprobs(
                        policy, ids, att, ctx, config.temperature, with_entropy=True
                    )
                    if epoch == 0 and mb_start == 0 and n in kept_values:
                        new_values = kept_values.pop(n)
                    else:
                        new_values = token_values(value_model, ids, att)[:, ctx - 1 : -1]
                pg_loss, pg_stats = policy_loss(
                    new_logprobs,
                    rollout.logprobs[idx, :length],
                    rollout.advantages[idx, :length],
                    mask,
                    config.cliprange,
                )
                vf_loss, vf_clipfrac = value_loss(
                    new_values,
                    rollout.values[idx, :length],
                    rollout.returns[idx, :length],
                    mask,
                    config.cliprange_value,
                )
                loss = (pg_loss + config.vf_coef * vf_loss) / config.gradient_accumulation_steps
                if ranks is not None:  # DDP averages the ranks' gradients: undo the 1/world
                    loss = loss * (share * ranks.world_size)
                loss.backward()
                assert entropy is not None
                step_stats = {
                    "loss/policy": float(pg_loss.detach()),
                    "loss/value": float(vf_loss.detach()),
                    "policy/clipfrac": float(pg_stats["clipfrac"]),
                    "policy/approxkl": float(pg_stats["approxkl"]),
                    "policy/entropy": float(masked_mean(entropy.detach(), mask)),
                    "val/ratio": float(pg_stats["ratio"]),
                    "val/clipfrac": float(vf_clipfrac),
                }
                for k, v in step_stats.items():
                    totals[k] = totals.get(k, 0.0) + v * share
                count += 1
            if ranks is not None:  # their gradients bypass autograd, and so DDP's all-reduce
                ranks.average([_grad_of(w) for w in vocab])
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            run.optimizer.step()
    kept_values.clear()  # whatever the update did not consume (nothing, normally)
    if ranks is not None:  # each micro-batch's diagnostics: the sum of the ranks' shares
        totals = ranks.sum(totals)
    out = {k: v / max(count, 1) for k, v in totals.items()}
    for k, v in out.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"PPO diverged: {k} = {v}")
    return out


def _log_step(
    run: _Run,
    rollout: _Rollout,
    stats: dict[str, float],
    done: int,
    hooks: Hooks,
    on_samples: Callable[[int, list[dict[str, Any]]], None] | None,
) -> dict[str, float]:
    """The step's metrics (namespaced, to `hooks.metrics` and the history), beta's adaptation,
    and every `sample_every` steps and at the end a sample table (raw scores)."""
    config = run.config
    sequence_kl = rollout.kl.sum(1)
    non_score = rollout.non_score.sum(1)
    metrics = {
        "objective/kl": float(sequence_kl.mean()),
        "objective/scores": float(rollout.scores.mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((rollout.scores + non_score).mean()),
        "objective/beta": float(rollout.beta),
        "response/length": float(rollout.lengths.float().mean()),
        "response/eos_rate": float(rollout.has_eos.float().mean()),
        **stats,
    }
    run.kl_ctl.update(metrics["objective/kl"], config.batch_size)
    run.history.append(metrics)
    hooks.metrics(done, metrics)
    if (done - 1) % config.sample_every == 0 or done == config.total_steps:
        table = [
            {
                "prompt": rollout.messages[i][-1]["content"],
                "response": rollout.texts[i],
                "score": float(rollout.raw_scores[i]),
            }
            for i in range(min(config.num_sample_rows, len(rollout.texts)))
        ]
        run.samples[done] = table
        if on_samples is not None:
            on_samples(done, table)
    return metrics
