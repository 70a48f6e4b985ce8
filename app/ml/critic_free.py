"""RLOO and GRPO: RL from a reward without a value model, each answer judged against its group.

PPO (`app.ml.ppo`) learns a value model to tell a good answer from a lucky one. Here every
prompt is answered K times (`num_generations`), and an answer's advantage is how much better it
scored than the other answers to the same prompt: a baseline that costs K-1 extra samples, which
are training signal themselves, instead of a second network to train, run and keep in memory.

Read top to bottom:

1. Configuration: `CriticFreeConfig` (torch-free, in `app.kinds.critic_free`), the settings a
   checkpoint may resume under, and `CriticFreeResult`.
2. Pure pieces the tests check against hand numbers: `group_rewards` (the score, less the KL
   penalty when it goes in the reward), `rloo_advantages`, `grpo_advantages`,
   `scale_advantages`, `k3_kl` and `critic_free_loss`.
3. `train_critic_free`, in phases: `_setup` (seeding, policy, reference, reward, optimizer), then
   per step `_rollout` (K samples per prompt, scores, advantages), `_update` (clipped
   minibatch updates) and `_log_step`, with an atomic checkpoint (`app.ml.checkpoint`) every
   `checkpoint_every` steps or `checkpoint_every_s` seconds, and on cancel.

The estimators (`estimator`):

- RLOO (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"): the whole answer is one
  action. Its reward is the score minus beta times its sequence KL to the reference
  (`kl_placement="reward"`), and its advantage is that reward minus the mean reward of the other
  K-1 answers to the prompt: `A_i = r_i - (sum_j r_j - r_i) / (K-1)`, an unbiased baseline since
  it never includes the answer itself. With `whiten_advantages` the batch's advantages are then
  scaled to unit variance (not shifted: their mean is already zero per group), so the step size
  does not depend on the reward model's scale.
- GRPO (Shao et al. 2024, DeepSeekMath): `A_i = (r_i - mean(r)) / (std(r) + eps)` over the group,
  on the score alone; the KL goes into the loss (`kl_placement="loss"`) as beta times the k3
  estimate `exp(ref - logp) - (ref - logp) - 1` per token, which is never negative and unbiased
  for KL(pi || ref) under samples from pi. With `scale_by_group_std=False` only the mean is
  subtracted (Dr. GRPO, Liu et al. 2025).

Both placements work with both estimators; the defaults follow each paper. Putting the KL in the
reward makes the advantage trade score against drift directly; GRPO keeps it out because its
normalisation by the group's spread would otherwise rescale the KL with the score's noise.

The loss is the clipped surrogate of PPO (`app.ml.ppo.policy_loss`) with the answer's advantage at
every one of its tokens, averaged over the minibatch's real tokens (a token-level mean: a long
answer is not worth less per token, DAPO's choice). With `epochs=1` and one minibatch per batch
the ratio is 1 and this is REINFORCE with the group baseline; more epochs or minibatches reuse
the samples under the clip, as PPO does.

EOS handling is PPO's: a response is cut after its first EOS (`app.ml.rollout`), and one without
an EOS within `max_new_tokens` has `missing_eos_penalty` subtracted from its score. LoRA works
as in PPO: the rollout samples from a merged copy, the reference is the adapter-disabled policy.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from app.kinds.critic_free import CriticFreeConfig
from app.ml.checkpoint import CheckpointSchedule, TrainCheckpoint, seed_everything
from app.ml.hooks import Cancelled, Hooks, NullHooks
from app.ml.loading import dtype_for, load_tokenizer, pick_device
from app.ml.policy import (
    MergedLoraSampler,
    Messages,
    PromptLike,
    as_messages,
    encode_prompts,
    forward_logprobs,
    left_pad,
    load_policy,
    lora_config,
    make_adamw,
    reference_policy,
    response_texts,
    save_policy,
)
from app.ml.ppo import masked_mean, policy_loss, vocab_matrices
from app.ml.reward import RewardModelScorer, ScoreFn, load_reward_model, reward_scores
from app.ml.rollout import (
    chunks,
    next_prompt_indices,
    reference_logprobs,
    sample_rollout,
    trim_padding,
)
from app.ml.vocab_grads import zero_grad

# --------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------

CHECKPOINT_FILE = "critic_free_checkpoint.pt"
# Settings that change speed or bookkeeping but not the trajectory: a checkpoint resumes under any.
_RESUMABLE_FIELDS = {
    "total_steps",
    "checkpoint_every",
    "checkpoint_every_s",
    "sample_every",
    "num_sample_rows",
}


@dataclass
class CriticFreeResult:
    """What a finished run hands back: where the policy is, and what happened on the way."""

    output_dir: Path
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    samples: dict[int, list[dict[str, Any]]]


# --------------------------------------------------------------------------------------------
# 2. Pure pieces (tested against hand-computed values)
# --------------------------------------------------------------------------------------------


def group_rewards(
    scores: torch.Tensor, sequence_kl: torch.Tensor, beta: float, kl_placement: str
) -> torch.Tensor:
    """Each answer's reward `[batch * K]`: its score, less `beta * sequence_kl` when the KL goes
    in the reward; the score alone when it goes in the loss."""
    if kl_placement == "reward":
        return scores - beta * sequence_kl
    return scores.clone()


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out advantages: `r_i - mean of the other k-1 rewards of its group`.

    `rewards` is `[batch * k]` with each prompt's k answers consecutive. Equal to
    `k / (k-1) * (r_i - group mean)`."""
    grouped = rewards.view(-1, k)
    others = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).reshape(-1)


def grpo_advantages(
    rewards: torch.Tensor, k: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Group-normalised advantages: `(r_i - group mean) / (group std + eps)` (Bessel-corrected
    std, as in the GRPO reference code), or only the mean subtracted with `scale_by_std=False`.
    A group of equal rewards gives zeros: it says nothing about which answer is better."""
    grouped = rewards.view(-1, k)
    centered = grouped - grouped.mean(1, keepdim=True)
    if scale_by_std:
        centered = centered / (grouped.std(1, keepdim=True) + eps)
    return centered.reshape(-1)


def scale_advantages(advantages: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Divide by the batch's standard deviation (no shift): unit scale, same signs; a batch
    whose advantages are all zero stays zero."""
    if advantages.numel() < 2:
        return advantages
    return advantages / (advantages.std() + eps)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate `exp(ref - logp) - (ref - logp) - 1` (Schulman's k3):
    zero where the two agree, positive everywhere else, unbiased under samples from pi."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def critic_free_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    kl_loss_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate with each answer's advantage (`[batch]`) at every one of its
    tokens, plus `kl_loss_coef` times the token mean of `k3_kl` (0 when the KL is in the
    reward); token means over the real tokens of the slice. Returns the loss and diagnostics
    (`clipfrac`, `approxkl`, `ratio`, `kl_loss`)."""
    per_token = advantages.unsqueeze(1).expand_as(new_logprobs)
    loss, stats = policy_loss(new_logprobs, old_logprobs, per_token, mask, cliprange)
    kl_term = masked_mean(k3_kl(new_logprobs, ref_logprobs), mask)
    if kl_loss_coef:
        loss = loss + kl_loss_coef * kl_term
    return loss, {**stats, "kl_loss": kl_term.detach()}


# --------------------------------------------------------------------------------------------
# 3. Training: setup, then per step rollout, update, logging and checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What a run holds from step to step: policy, reference, reward, optimizer, generators."""

    config: CriticFreeConfig
    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    policy: Any  # after peft wrapping it gains disable_adapter and merge_and_unload
    ref_model: torch.nn.Module
    ref_context: Callable[[], contextlib.AbstractContextManager[Any]]
    merged_sampler: MergedLoraSampler | None
    reward: RewardModelScorer | ScoreFn
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    sample_gen: torch.Generator  # token sampling
    shuffle_gen: torch.Generator  # prompt order, minibatches
    prompt_order: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def eos_id(self) -> int:
        """The policy's EOS id: a response ends at its first one."""
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        """The policy's pad id (it may equal the EOS id)."""
        return int(self.tokenizer.pad_token_id)

    def checkpoint(self, path: Path) -> TrainCheckpoint:
        """The run's checkpoint file, saving and restoring the policy and generators."""
        return TrainCheckpoint(
            path,
            self.config.to_dict(),
            _RESUMABLE_FIELDS,
            models={"policy": self.policy},
            optimizer=self.optimizer,
            generators={"sample": self.sample_gen, "shuffle": self.shuffle_gen},
        )

    def own_state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond weights, optimizer and RNG: data order, history."""
        return {
            "prompt_order": list(self.prompt_order),
            "history": self.history,
            "samples": self.samples,
        }

    def load_own_state(self, state: Mapping[str, Any]) -> None:
        """Take back what `own_state` saved."""
        self.prompt_order = list(state["prompt_order"])
        self.history = list(state["history"])
        self.samples = {int(k): v for k, v in state["samples"].items()}


@dataclass
class _Rollout:
    """One batch of K answers per prompt; per-token tensors are `[batch * K, resp_len]`."""

    query_responses: torch.Tensor  # [batch * K, ctx + resp_len]
    attention_mask: torch.Tensor
    context_length: int
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor  # [batch * K]
    messages: list[Messages]
    texts: list[str]
    raw_scores: torch.Tensor  # [batch * K], as the reward gave them
    scores: torch.Tensor  # after the missing-EOS penalty
    sequence_kl: torch.Tensor  # [batch * K], log-ratio summed over each answer's tokens
    lengths: torch.Tensor
    has_eos: torch.Tensor


def train_critic_free(
    config: CriticFreeConfig,
    policy_dir: str | Path,
    reward: str | Path | ScoreFn,
    prompts: Sequence[PromptLike],
    output_dir: str | Path,
    checkpoint_dir: str | Path,
    hooks: Hooks | None = None,
    resume: bool = True,
    on_samples: Callable[[int, list[dict[str, Any]]], None] | None = None,
) -> CriticFreeResult:
    """Fine-tune the policy in `policy_dir` with RLOO or GRPO (`config.estimator`); write it to
    `output_dir` in HF format.

    `reward` is a reward-model directory or a callable
    `score_fn(prompt_messages_list, response_texts, response_token_ids) -> scores`.
    `prompts` are chat-message lists (or plain strings, taken as one user turn). Metrics go to
    `hooks.metrics` every step (PPO's names where they mean the same), a sample table every
    `sample_every` steps to `on_samples`. When `hooks.should_stop()` turns true between steps the
    run checkpoints and raises `Cancelled`; with `resume=True` a later call continues from the
    latest checkpoint in `checkpoint_dir` and ends exactly where an uninterrupted run would have.
    """
    hooks = hooks or NullHooks()
    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)
    prompt_messages = [as_messages(p) for p in prompts]
    if not prompt_messages:
        raise ValueError("no prompts")
    run = _setup(config, policy_dir, reward)
    checkpoint = run.checkpoint(checkpoint_dir / CHECKPOINT_FILE)
    start_step = 0
    if resume and (resumed := checkpoint.load()) is not None:
        start_step, own_state = resumed
        run.load_own_state(own_state)
        hooks.progress(
            start_step, config.total_steps, f"resumed from the checkpoint at step {start_step}"
        )
    schedule = CheckpointSchedule(config.checkpoint_every, config.checkpoint_every_s)
    last_saved = start_step
    name = config.estimator.upper()

    for step in range(start_step, config.total_steps):
        if hooks.should_stop():
            if last_saved != step:
                checkpoint.save(step, run.own_state())
            raise Cancelled(f"{name} cancelled before step {step + 1}")
        rollout_start = time.perf_counter()
        indices = next_prompt_indices(
            run.prompt_order, len(prompt_messages), config.batch_size, run.shuffle_gen
        )
        rollout = _rollout(run, [prompt_messages[i] for i in indices])
        update_start = time.perf_counter()
        stats = _update(run, rollout)
        timings = {
            "time/rollout": update_start - rollout_start,
            "time/update": time.perf_counter() - update_start,
        }
        done = step + 1
        metrics = _log_step(run, rollout, {**stats, **timings}, done, hooks, on_samples)
        if done == config.total_steps or schedule.due(done):
            checkpoint.save(done, run.own_state())
            schedule.saved()
            last_saved = done
        hooks.progress(
            done,
            config.total_steps,
            f"{name} step {done}/{config.total_steps}: score {metrics['objective/scores']:.3f},"
            f" kl {metrics['objective/kl']:.3f}, length {metrics['response/length']:.1f}",
        )

    final_metrics = run.history[-1] if run.history else {}
    info = {"algorithm": config.estimator, "config": config.to_dict(), "metrics": final_metrics}
    save_policy(run.policy, run.tokenizer, output_dir, info)
    return CriticFreeResult(output_dir, config.total_steps, final_metrics, run.history, run.samples)


def _setup(config: CriticFreeConfig, policy_dir: str | Path, reward: str | Path | ScoreFn) -> _Run:
    """Seed everything, then build the policy (LoRA-wrapped if asked), the reference, the
    reward and the optimizer. The LoRA matrices draw from the global generator just seeded."""
    device = pick_device(config.device)
    dtype = dtype_for(device, config.dtype)
    seed_everything(config.seed)
    sample_gen = torch.Generator(device=device).manual_seed(config.seed)
    shuffle_gen = torch.Generator().manual_seed(config.seed + 1)

    tokenizer = load_tokenizer(policy_dir)
    policy: Any = load_policy(policy_dir, dtype, device)
    merged_sampler: MergedLoraSampler | None = None
    if config.use_lora:
        from peft import get_peft_model

        merged_sampler = MergedLoraSampler(policy)
        policy = get_peft_model(
            policy,
            lora_config(config.lora_r, config.lora_alpha, config.lora_target_modules, "CAUSAL_LM"),
        )
        merged_sampler.attach(policy)
    ref_model, ref_context = reference_policy(policy, policy_dir, dtype, device, config.use_lora)
    policy.eval()  # dropout off: the rollout and the update must score tokens with one network
    scorer: RewardModelScorer | ScoreFn
    if callable(reward):
        scorer = reward
    else:
        loaded = load_reward_model(reward, device, dtype=dtype)
        scorer = RewardModelScorer(
            loaded.model, loaded.tokenizer, config.reward_max_length,
            config.rollout_forward_batch_size,
        )  # fmt: skip
    params = [p for p in policy.parameters() if p.requires_grad]
    return _Run(
        config=config, device=device, tokenizer=tokenizer, policy=policy, ref_model=ref_model,
        ref_context=ref_context, merged_sampler=merged_sampler, reward=scorer, params=params,
        optimizer=make_adamw(params, config.effective_learning_rate(), config.adam_eps),
        sample_gen=sample_gen, shuffle_gen=shuffle_gen,
    )  # fmt: skip


def _rollout(run: _Run, batch_messages: list[Messages]) -> _Rollout:
    """Answer each prompt K times, score the answers, and read each one's advantage from its
    group. No gradients."""
    config, device, k = run.config, run.device, run.config.num_generations
    messages = [m for m in batch_messages for _ in range(k)]  # a prompt's K rows are adjacent
    queries = encode_prompts(run.tokenizer, messages, config.max_prompt_length)
    query_ids, query_mask = left_pad(queries, run.pad_id, device)
    with torch.no_grad():
        responses, mask, logprobs = sample_rollout(run, query_ids, query_mask)
        query_responses = torch.cat([query_ids, responses], dim=1)
        attention_mask = torch.cat([query_mask, mask.long()], dim=1)
        ref_lp = reference_logprobs(run, query_responses, attention_mask, mask)
        token_lists, texts = response_texts(run.tokenizer, responses, mask)
        raw_scores = reward_scores(run.reward, messages, texts, token_lists, device)
        has_eos = ((responses == run.eos_id) & mask).any(1)
        scores = raw_scores
        if config.missing_eos_penalty is not None:
            scores = torch.where(has_eos, scores, scores - config.missing_eos_penalty)
        sequence_kl = ((logprobs - ref_lp) * mask).sum(1)
        rewards = group_rewards(scores, sequence_kl, config.kl_coef, config.kl_placement)
        if config.estimator == "rloo":
            advantages = rloo_advantages(rewards, k)
            if config.whiten_advantages:
                advantages = scale_advantages(advantages)
        else:
            advantages = grpo_advantages(rewards, k, config.scale_by_group_std)
    return _Rollout(
        query_responses=query_responses, attention_mask=attention_mask,
        context_length=query_ids.shape[1], mask=mask, logprobs=logprobs, ref_logprobs=ref_lp,
        advantages=advantages, messages=messages, texts=texts, raw_scores=raw_scores,
        scores=scores, sequence_kl=sequence_kl, lengths=mask.sum(1), has_eos=has_eos,
    )  # fmt: skip


def _update(run: _Run, rollout: _Rollout) -> dict[str, float]:
    """`epochs` passes of clipped minibatch updates over the batch; returns mean diagnostics."""
    config, policy, params = run.config, run.policy, run.params
    batch = rollout.query_responses.shape[0]
    micro = config.mini_batch_size // config.gradient_accumulation_steps
    kl_loss_coef = config.kl_coef if config.kl_placement == "loss" else 0.0
    vocab = vocab_matrices(policy)  # gradient buffers kept from step to step (`vocab_grads`)
    totals: dict[str, float] = {}
    count = 0
    for _ in range(config.epochs):
        order = torch.randperm(batch, generator=run.shuffle_gen).to(rollout.mask.device)
        for mb_start in range(0, batch, config.mini_batch_size):
            minibatch = order[mb_start : mb_start + config.mini_batch_size]
            zero_grad(params, keep=vocab)
            for sl in chunks(len(minibatch), micro):
                idx = minibatch[sl]
                ids, att, ctx, length = trim_padding(
                    rollout.query_responses[idx], rollout.attention_mask[idx],
                    rollout.context_length,
                )  # fmt: skip
                mask = rollout.mask[idx, :length]
                new_logprobs, entropy = forward_logprobs(
                    policy, ids, att, ctx, config.temperature, with_entropy=True
                )
                loss, stats = critic_free_loss(
                    new_logprobs, rollout.logprobs[idx, :length],
                    rollout.ref_logprobs[idx, :length], rollout.advantages[idx], mask,
                    config.cliprange, kl_loss_coef,
                )  # fmt: skip
                (loss / config.gradient_accumulation_steps).backward()
                assert entropy is not None
                step_stats = {
                    "loss/policy": float(loss.detach()),
                    "loss/kl": float(stats["kl_loss"]),
                    "policy/clipfrac": float(stats["clipfrac"]),
                    "policy/approxkl": float(stats["approxkl"]),
                    "policy/entropy": float(masked_mean(entropy, mask)),
                    "val/ratio": float(stats["ratio"]),
                }
                for key, value in step_stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                count += 1
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            run.optimizer.step()
    out = {key: value / max(count, 1) for key, value in totals.items()}
    for key, value in out.items():
        if not math.isfinite(value):
            raise FloatingPointError(f"{config.estimator.upper()} diverged: {key} = {value}")
    return out


def _log_step(
    run: _Run,
    rollout: _Rollout,
    stats: dict[str, float],
    done: int,
    hooks: Hooks,
    on_samples: Callable[[int, list[dict[str, Any]]], None] | None,
) -> dict[str, float]:
    """The step's metrics (PPO's names where they mean the same, to `hooks.metrics` and the
    history), and every `sample_every` steps and at the end a sample table (raw scores)."""
    config, k = run.config, run.config.num_generations
    grouped = rollout.scores.view(-1, k)
    penalised = rollout.scores - config.kl_coef * rollout.sequence_kl
    metrics = {
        "objective/kl": float(rollout.sequence_kl.mean()),
        "objective/scores": float(rollout.scores.mean()),
        "objective/rlhf_reward": float(penalised.mean()),
        "objective/beta": float(config.kl_coef),
        # How far apart a prompt's K answers score: the signal the group baseline works with.
        "objective/group_score_std": float(grouped.std(1).mean()),
        "objective/advantage_abs": float(rollout.advantages.abs().mean()),
        "response/length": float(rollout.lengths.float().mean()),
        "response/eos_rate": float(rollout.has_eos.float().mean()),
        **stats,
    }
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
