"""What every on-policy trainer's rollout shares: sampling a batch of responses with their
log-probabilities, the reference's log-probabilities of them, cutting each response at its
first EOS, and the padding bookkeeping of slicing a batch into chunks.

PPO (`app.ml.ppo`) and the critic-free trainers (`app.ml.critic_free`: RLOO, GRPO) call these
with their run object, which only needs the attributes `RolloutRun` names: the policy (and,
with LoRA, the merged copy that samples), the reference and how to enter it, the sampling
generator, the EOS and pad ids, and three knobs.

Conventions (`app.ml.policy`): `responses` are `[batch, resp_len]` token ids with everything
after the first EOS replaced by pad; `mask` is true for real response tokens up to and
including the first EOS. The pad id may equal the EOS id (SmolLM2), so the end of a response
is always the first EOS found by position, never "the first pad".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from app.ml.policy import MergedLoraSampler, forward_logprobs, response_mask, sample_responses


class RolloutKnobs(Protocol):
    """The knobs the rollout reads (fields of `PPOConfig` and `CriticFreeConfig`)."""

    @property
    def rollout_forward_batch_size(self) -> int: ...
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...


class RolloutRun(Protocol):
    """What a trainer's run object holds for its rollout."""

    @property
    def config(self) -> RolloutKnobs: ...
    @property
    def policy(self) -> Any: ...
    @property
    def merged_sampler(self) -> MergedLoraSampler | None: ...
    @property
    def ref_model(self) -> nn.Module: ...
    @property
    def ref_context(self) -> Callable[[], contextlib.AbstractContextManager[Any]]: ...
    @property
    def sample_gen(self) -> torch.Generator: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...


def first_eos_truncate(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every token after the first EOS by pad; return (truncated ids, real-token mask)."""
    mask = response_mask(responses, eos_token_id)
    return torch.where(mask, responses, torch.full_like(responses, pad_token_id)), mask


def trim_padding(
    query_responses: torch.Tensor, attention_mask: torch.Tensor, context_length: int
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Drop the columns that are padding in every row of a (micro-)batch.

    A rollout batch is as wide as its longest prompt plus its longest response; a slice of it
    usually is not. Leading all-pad columns (its prompts are shorter than the batch's longest)
    and trailing ones (all its responses ended early) are masked out of attention, and
    positions come from the mask, so the kept columns score exactly as before while the slice
    stops paying for its neighbours' lengths. Returns `(ids, mask, context_length,
    response_length)` of the trimmed slice; per-token tensors keep their first
    `response_length` columns.
    """
    real = attention_mask.bool().any(0)
    first = int(real[:context_length].int().argmax())
    # The first response token is real in every row, so the response keeps at least one column.
    last = max(int(real.nonzero().max()) + 1, context_length + 1)
    ids, mask = query_responses[:, first:last], attention_mask[:, first:last]
    return ids, mask, context_length - first, last - context_length


def chunks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices of `range(n)`, each at most `size` long."""
    for start in range(0, n, max(size, 1)):
        yield slice(start, min(start + size, n))


def pad_right(
    tensors: list[torch.Tensor], value: float | int, width: int | None = None
) -> torch.Tensor:
    """Concatenate `[rows, len_i]` tensors along rows, right-padded with `value` to `width`
    (default: the widest)."""
    width = width or max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


def next_prompt_indices(
    order: list[int], num_prompts: int, batch_size: int, generator: torch.Generator
) -> list[int]:
    """The next `batch_size` prompt indices, popped from `order` (what is left of the current
    shuffled epoch, refilled with a new permutation when empty) so every prompt gets its turn."""
    chosen: list[int] = []
    while len(chosen) < batch_size:
        if not order:
            order.extend(torch.randperm(num_prompts, generator=generator).tolist())
        chosen.append(order.pop(0))
    return chosen


def sample_rollout(
    run: RolloutRun, query_ids: torch.Tensor, query_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample the responses in chunks; return (responses, mask, log pi_old).

    The sampler's log-probabilities are pi_old: the same network (with LoRA, its merged copy)
    and temperature as the training forward (tests check they agree), so no extra policy pass
    is needed."""
    config, eos_id, pad_id = run.config, run.eos_id, run.pad_id
    sampler = run.policy if run.merged_sampler is None else run.merged_sampler.sync()
    outs, sampled_logprobs = [], []
    for sl in chunks(query_ids.shape[0], config.rollout_forward_batch_size):
        out, out_logprobs = sample_responses(
            sampler,
            query_ids[sl],
            query_mask[sl],
            config.max_new_tokens,
            config.temperature,
            eos_id,
            pad_id,
            run.sample_gen,
        )
        outs.append(out)
        sampled_logprobs.append(out_logprobs)
    responses, mask = first_eos_truncate(pad_right(outs, pad_id), eos_id, pad_id)
    return responses, mask, pad_right(sampled_logprobs, 0.0) * mask


def reference_logprobs(
    run: RolloutRun,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """log pi_ref of the response tokens, chunk by chunk, each chunk trimmed of its padding."""
    context_length = query_responses.shape[1] - mask.shape[1]
    ref_l = []
    for sl in chunks(query_responses.shape[0], run.config.rollout_forward_batch_size):
        ids, att, ctx, _ = trim_padding(query_responses[sl], attention_mask[sl], context_length)
        with run.ref_context():
            ref_lp, _ = forward_logprobs(run.ref_model, ids, att, ctx, run.config.temperature)
        ref_l.append(ref_lp)
    return pad_right(ref_l, 0.0, mask.shape[1]) * mask
