"""Evaluate a candidate policy against its parent on held-out prompts.

Two numbers decide promotion: how much better the candidate scores under the reward (the same
reward source PPO used: a reward-model directory or a Python callable), and how far it moved from
its parent. The KL is estimated on the candidate's own samples,
`mean over responses of sum over tokens of (log pi(y_t) - log pi_parent(y_t))`, a Monte-Carlo
estimate of KL(pi || pi_parent) for the sampling distribution (logits divided by the sampling
temperature for both models, as in PPO). It is exactly 0 for a policy against itself.

A point gain says nothing about how far it would move on other prompts, so the gain comes with
a paired bootstrap interval over the prompts (`app.ml.bootstrap`), at the run's `confidence`,
and with the share of prompts the candidate won, with its own interval; the promotion rule can
require the interval's lower end to clear its threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from app.kinds.evaluate import EvaluationKnobs
from app.ml.bootstrap import paired_bootstrap
from app.ml.checkpoint import seed_everything
from app.ml.hooks import Cancelled, Hooks, NullHooks
from app.ml.loading import dtype_for, load_tokenizer, pick_device
from app.ml.policy import (
    PromptLike,
    as_messages,
    encode_prompts,
    forward_logprobs,
    left_pad,
    load_policy,
    response_mask,
    response_texts,
    sample_responses,
)
from app.ml.reward import RewardModelScorer, ScoreFn, load_reward_model, reward_scores


def evaluate_policy(
    policy_dir: str | Path,
    parent_dir: str | Path,
    reward: str | Path | ScoreFn,
    prompts: Sequence[PromptLike],
    config: EvaluationKnobs | None = None,
    *,
    device: str = "auto",
    dtype: str = "float32",
    hooks: Hooks | None = None,
    **knobs: Any,
) -> dict[str, Any]:
    """Score candidate and parent on `prompts`, and the candidate's KL to the parent.

    Returns `{mean_score, parent_mean_score, score_gain, score_gain_interval, win_share,
    win_share_interval, confidence, bootstrap_resamples, kl_to_parent, eos_rate, mean_length,
    num_prompts, samples}`: the intervals are `[low, high]` at `confidence` from a paired
    bootstrap over the prompts, seeded with `seed`; `win_share` is the share of prompts the
    candidate scored higher on (ties count half); `samples` holds the first `num_samples`
    prompts with both models' responses and scores. Both models sample with the same seed, so
    evaluating a policy against itself gives identical responses, a zero gain and a zero KL.
    The knobs come as `config` or as keywords (`max_new_tokens=32`); the temperature must be
    > 0, since the KL is taken under the sampling policy.
    """
    # Keyword knobs override `config`; both are checked against the one definition.
    cfg = EvaluationKnobs.model_validate({**(config or EvaluationKnobs()).model_dump(), **knobs})
    messages = [as_messages(p) for p in prompts]
    if not messages:
        raise ValueError("no prompts")
    hooks = hooks or NullHooks()
    torch_device = pick_device(device)
    torch_dtype = dtype_for(torch_device, dtype)
    seed_everything(cfg.seed)

    tokenizer = load_tokenizer(policy_dir)
    eos_id, pad_id = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    candidate = load_policy(policy_dir, torch_dtype, torch_device, frozen=True)
    parent = load_policy(parent_dir, torch_dtype, torch_device, frozen=True)
    scorer: RewardModelScorer | ScoreFn
    if callable(reward):
        scorer = reward
    else:
        loaded = load_reward_model(reward, torch_device, dtype=torch_dtype)
        scorer = RewardModelScorer(loaded.model, loaded.tokenizer, 1024, cfg.batch_size)

    def generate(
        model: Any, query_ids: torch.Tensor, query_mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[str]]:
        responses, _ = sample_responses(
            model,
            query_ids,
            query_mask,
            cfg.max_new_tokens,
            cfg.temperature,
            eos_id,
            pad_id,
            generator,
        )
        # The sampler pads each row after its first EOS already; the mask marks what is real.
        mask = response_mask(responses, eos_id)
        ids, texts = response_texts(tokenizer, responses, mask)
        return responses, mask, ids, texts

    # Separate generators with the same seed: a model evaluated against itself samples the same.
    cand_gen = torch.Generator(device=torch_device).manual_seed(cfg.seed)
    parent_gen = torch.Generator(device=torch_device).manual_seed(cfg.seed)
    scores: list[float] = []
    parent_scores: list[float] = []
    kls: list[float] = []
    lengths: list[int] = []
    eos: list[bool] = []
    samples: list[dict[str, Any]] = []
    total = len(messages)
    for start in range(0, total, cfg.batch_size):
        if hooks.should_stop():
            raise Cancelled("evaluation cancelled")
        batch = messages[start : start + cfg.batch_size]
        query_ids, query_mask = left_pad(
            encode_prompts(tokenizer, batch, cfg.max_prompt_length), pad_id, torch_device
        )
        ctx = query_ids.shape[1]
        with torch.no_grad():
            responses, mask, ids, texts = generate(candidate, query_ids, query_mask, cand_gen)
            full = torch.cat([query_ids, responses], dim=1)
            attention = torch.cat([query_mask, mask.long()], dim=1)
            logp, _ = forward_logprobs(candidate, full, attention, ctx, cfg.temperature)
            parent_logp, _ = forward_logprobs(parent, full, attention, ctx, cfg.temperature)
            kls.extend(((logp - parent_logp) * mask).sum(1).tolist())
            _, _, p_ids, p_texts = generate(parent, query_ids, query_mask, parent_gen)
        batch_scores = reward_scores(scorer, batch, texts, ids, torch_device).tolist()
        batch_parent_scores = reward_scores(scorer, batch, p_texts, p_ids, torch_device).tolist()
        scores.extend(batch_scores)
        parent_scores.extend(batch_parent_scores)
        lengths.extend(len(row) for row in ids)
        eos.extend(bool(row) and row[-1] == eos_id for row in ids)
        for i in range(len(batch)):
            if len(samples) < cfg.num_samples:
                samples.append(
                    {
                        "prompt": batch[i][-1]["content"],
                        "response": texts[i],
                        "score": batch_scores[i],
                        "parent_response": p_texts[i],
                        "parent_score": batch_parent_scores[i],
                    }
                )
        hooks.progress(min(start + cfg.batch_size, total), total, "evaluating policy")

    boot = paired_bootstrap(
        scores,
        parent_scores,
        confidence=cfg.confidence,
        resamples=cfg.bootstrap_resamples,
        seed=cfg.seed,
    )
    return {
        "mean_score": sum(scores) / len(scores),
        "parent_mean_score": sum(parent_scores) / len(parent_scores),
        "score_gain": boot.gain,  # the mean of per-prompt differences, as the interval is
        "score_gain_interval": list(boot.gain_interval),
        "win_share": boot.win_share,
        "win_share_interval": list(boot.win_share_interval),
        "confidence": boot.confidence,
        "bootstrap_resamples": boot.resamples,
        "kl_to_parent": sum(kls) / len(kls),
        "eos_rate": sum(eos) / len(eos),
        "mean_length": sum(lengths) / len(lengths),
        "num_prompts": total,
        "samples": samples,
    }
