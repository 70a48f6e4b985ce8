"""Evaluate a candidate policy against its parent on held-out prompts.

Two numbers decide promotion: how much better the candidate scores under the reward (the same
reward source PPO used: a reward-model directory or a Python callable), and how far it moved from
its parent. The KL is estimated on the candidate's own samples,
`mean over responses of sum over tokens of (log pi(y_t) - log pi_parent(y_t))`, a Monte-Carlo
estimate of KL(pi || pi_parent) for the sampling distribution (logits divided by the sampling
temperature for both models, as in PPO). It is exactly 0 for a policy against itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from app.ml.hooks import Cancelled, Hooks, NullHooks
from app.ml.ppo import (
    Messages,
    PromptLike,
    RewardModelScorer,
    ScoreFn,
    as_messages,
    encode_prompts,
    first_eos_truncate,
    forward_logprobs,
    freeze,
    left_pad,
    load_reward_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    sample_responses,
    seed_everything,
)


def evaluate_policy(
    policy_dir: str | Path,
    parent_dir: str | Path,
    reward: str | Path | ScoreFn,
    prompts: Sequence[PromptLike],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    batch_size: int = 8,
    max_prompt_length: int = 256,
    seed: int = 0,
    num_samples: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    hooks: Hooks | None = None,
) -> dict[str, Any]:
    """Score candidate and parent on `prompts`, and the candidate's KL to the parent.

    Returns `{mean_score, parent_mean_score, score_gain, kl_to_parent, eos_rate, mean_length,
    num_prompts, samples}`; `samples` holds the first `num_samples` prompts with both models'
    responses and scores. Both models sample with the same seed, so evaluating a policy against
    itself gives identical responses, a zero gain and a zero KL.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (the KL is taken under the sampling policy)")
    messages = [as_messages(p) for p in prompts]
    if not messages:
        raise ValueError("no prompts")
    hooks = hooks or NullHooks()
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    seed_everything(seed)

    tokenizer = load_tokenizer(policy_dir)
    eos_id, pad_id = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    candidate = freeze(AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=torch_dtype))
    parent = freeze(AutoModelForCausalLM.from_pretrained(str(parent_dir), dtype=torch_dtype))
    candidate.to(torch_device)
    parent.to(torch_device)

    if callable(reward):
        score_fn: ScoreFn = reward

        def score(batch: list[Messages], texts: list[str], ids: list[list[int]]) -> torch.Tensor:
            return torch.as_tensor(score_fn(batch, texts, ids), dtype=torch.float32).reshape(-1)

    else:
        scorer = RewardModelScorer(
            load_reward_model(reward, torch_dtype, torch_device),
            load_tokenizer(reward),
            max_length=1024,
            batch_size=batch_size,
        )

        def score(batch: list[Messages], texts: list[str], ids: list[list[int]]) -> torch.Tensor:
            return scorer(batch, texts, torch_device).cpu()

    def generate(
        model: Any, query_ids: torch.Tensor, query_mask: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[str]]:
        raw, _ = sample_responses(
            model, query_ids, query_mask, max_new_tokens, temperature, eos_id, pad_id, generator
        )
        responses, mask = first_eos_truncate(raw, eos_id, pad_id)
        ids = [responses[i, : int(mask[i].sum())].tolist() for i in range(len(responses))]
        texts = [
            str(tokenizer.decode([t for t in row if t != eos_id], skip_special_tokens=True))
            for row in ids
        ]
        return responses, mask, ids, texts

    # Separate generators with the same seed: a model evaluated against itself samples the same.
    cand_gen = torch.Generator(device=torch_device).manual_seed(seed)
    parent_gen = torch.Generator(device=torch_device).manual_seed(seed)
    scores: list[float] = []
    parent_scores: list[float] = []
    kls: list[float] = []
    lengths: list[int] = []
    eos: list[bool] = []
    samples: list[dict[str, Any]] = []
    total = len(messages)
    for start in range(0, total, batch_size):
        if hooks.should_stop():
            raise Cancelled("evaluation cancelled")
        batch = messages[start : start + batch_size]
        query_ids, query_mask = left_pad(
            encode_prompts(tokenizer, batch, max_prompt_length), pad_id, torch_device
        )
        ctx = query_ids.shape[1]
        with torch.no_grad():
            responses, mask, ids, texts = generate(candidate, query_ids, query_mask, cand_gen)
            full = torch.cat([query_ids, responses], dim=1)
            attention = torch.cat([query_mask, mask.long()], dim=1)
            logp, _ = forward_logprobs(candidate, full, attention, ctx, temperature)
            parent_logp, _ = forward_logprobs(parent, full, attention, ctx, temperature)
            kls.extend(((logp - parent_logp) * mask).sum(1).tolist())
            _, _, p_ids, p_texts = generate(parent, query_ids, query_mask, parent_gen)
        batch_scores = score(batch, texts, ids).tolist()
        batch_parent_scores = score(batch, p_texts, p_ids).tolist()
        scores.extend(batch_scores)
        parent_scores.extend(batch_parent_scores)
        lengths.extend(len(row) for row in ids)
        eos.extend(bool(row) and row[-1] == eos_id for row in ids)
        for i in range(len(batch)):
            if len(samples) < num_samples:
                samples.append(
                    {
                        "prompt": batch[i][-1]["content"],
                        "response": texts[i],
                        "score": batch_scores[i],
                        "parent_response": p_texts[i],
                        "parent_score": batch_parent_scores[i],
                    }
                )
        hooks.progress(min(start + batch_size, total), total, "evaluating policy")

    mean_score = sum(scores) / len(scores)
    parent_mean = sum(parent_scores) / len(parent_scores)
    return {
        "mean_score": mean_score,
        "parent_mean_score": parent_mean,
        "score_gain": mean_score - parent_mean,
        "kl_to_parent": sum(kls) / len(kls),
        "eos_rate": sum(eos) / len(eos),
        "mean_length": sum(lengths) / len(lengths),
        "num_prompts": total,
        "samples": samples,
    }
