"""A causal LM as a policy: the plumbing PPO, DPO and evaluation share.

Read top to bottom:

1. Prompts: chat messages (`as_messages`) rendered with the generation prompt and cut from the
   left (`encode_prompts`), then left padded into a batch (`left_pad`).
2. Masks: positions counted over real tokens (`position_ids_from_mask`), the real tokens of a
   sampled response (`response_mask`) and their texts (`response_texts`), the last real
   position of a row (`last_true_index`).
3. Sampling with a KV cache (`sample_responses`) and the forward pass that scores the same
   tokens as per-token log-probabilities (`forward_logprobs`); the two agree (tested).
4. Models: loading (`load_policy`), freezing, the reference (`reference_policy`), LoRA
   (`lora_config`, `MergedLoraSampler`), the optimizer (`make_adamw`) and the atomic output
   directory (`save_policy`).

Conventions used throughout: `responses` are `[batch, resp_len]` token ids with everything after
the first EOS replaced by pad; their mask is true for real response tokens up to and including
the first EOS. The pad id may equal the EOS id (SmolLM2; see `app.ml.loading.load_tokenizer`),
so the end of a response is always the first EOS found by position, never "the first pad".
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.ml.chat import inert_messages
from app.ml.generation import CachedForward, inverse_cdf_sample, prefill, skinny_decode_linears
from app.ml.io import save_model_dir
from app.ml.vocab_grads import embed, plain_embedding, plain_projection, project

Messages = list[dict[str, str]]
PromptLike = str | Sequence[Mapping[str, str]]


# --------------------------------------------------------------------------------------------
# 1. Prompts
# --------------------------------------------------------------------------------------------


def as_messages(prompt: PromptLike) -> Messages:
    """A prompt as chat messages: a plain string becomes one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages], max_length: int
) -> list[list[int]]:
    """Chat-template each prompt with the generation prompt; keep its last `max_length` tokens.

    The chat template already holds every special token it wants, so none are added again."""
    encoded = []
    for untrusted in prompts:
        messages = inert_messages(tokenizer, untrusted)
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            # A base model without a template: the turns as plain text, as reward.py renders them.
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        encoded.append(list(ids[-max_length:]))
    return encoded


def left_pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to one length so every prompt ends where generation starts; (ids, mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------------------------
# 2. Masks
# --------------------------------------------------------------------------------------------


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift the prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Bool mask of real response tokens: everything up to and including the first EOS.

    A row without EOS is real over its whole length. Works when pad == EOS because the end is
    found by the *first* EOS position, and whatever follows it (pads or junk) is masked.
    """
    is_eos = responses == eos_token_id
    # Number of EOS tokens strictly before each position; a position is real while that is 0.
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return eos_before == 0


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true position of each row (left or right padded); -1 for empty rows."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def response_texts(
    tokenizer: PreTrainedTokenizerBase, responses: torch.Tensor, mask: torch.Tensor
) -> tuple[list[list[int]], list[str]]:
    """Each response's real token ids (EOS kept) and its text (EOS and special tokens dropped):
    what a reward callable receives."""
    eos_id = tokenizer.eos_token_id
    token_ids = [responses[i, : int(mask[i].sum())].tolist() for i in range(len(responses))]
    texts = [
        str(tokenizer.decode([t for t in ids if t != eos_id], skip_special_tokens=True))
        for ids in token_ids
    ]
    return token_ids, texts


# --------------------------------------------------------------------------------------------
# 3. Sampling and scoring tokens
# --------------------------------------------------------------------------------------------


_FORWARD_PARAMS = inspect.signature(LlamaForCausalLM.forward).parameters

# Only the response positions need logits: skipping the prompt's saves a large share of the
# lm_head work (49k x 576 per token for SmolLM2). Older releases spell it differently or lack it.
_KEEP_KWARG = next(
    (k for k in ("logits_to_keep", "num_logits_to_keep") if k in _FORWARD_PARAMS), None
)


def keep_last_logits(n: int) -> dict[str, int]:
    """Forward kwargs that make a causal LM return logits for the last `n` positions only."""
    return {_KEEP_KWARG: n} if _KEEP_KWARG else {}


@torch.no_grad()
def sample_responses(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample responses for a left-padded batch with a KV cache; returns (responses, logprobs).

    Plain ancestral sampling from softmax(logits / temperature), no top-k/top-p, so the training
    forward pass (which divides by the same temperature) scores the very distribution sampled
    from. Generation stops when every row has produced an EOS; later tokens of a finished row
    are pad. `logprobs` are the sampled tokens' log-probabilities (useful to check consistency).
    """
    batch, device = query_ids.shape[0], query_ids.device
    forward = CachedForward(model, max_new_tokens)
    prompts = [row[keep].tolist() for row, keep in zip(query_ids, query_mask.bool(), strict=True)]
    stats = {"shared_prefix_tokens": 0.0, "padding_tokens": 0.0}
    # Generation's prefill: a prefix every prompt shares (a chat template's system prompt) runs
    # once; each row's own tokens follow, with any padding between the two, masked.
    with skinny_decode_linears(model):
        logits, cache, attention = prefill(forward, prompts, pad_token_id, device, stats)
        next_position = attention.sum(dim=-1, keepdim=True)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens: list[torch.Tensor] = []
        token_logprobs: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(logits / temperature, dim=-1)
            uniforms = torch.rand(batch, generator=generator, device=logits.device)
            token = inverse_cdf_sample(logp.exp(), uniforms)
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            tokens.append(token)
            token_logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
            finished = finished | (token == eos_token_id)
            if bool(finished.all()):
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            logits, cache = forward(token[:, None], attention, next_position, cache)
            next_position = next_position + 1
    return torch.stack(tokens, dim=1), torch.stack(token_logprobs, dim=1)


# Causal-LM families whose logits are exactly `lm_head(last_hidden_state)`: no softcapping or
# logit scale after it (Gemma 2 and Cohere have one), so `_causal_lm_parts` may compute them itself.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def unwrap_peft(model: nn.Module) -> Any:
    """The transformers model inside a peft wrapper (with its adapter layers), else `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]


def _causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Embedding, nn.Linear] | None:
    """Backbone, input embedding and output projection of a causal LM (optionally wrapped by
    peft) whose logits are `lm_head(hidden)` and whose two matrices are plain modules; None for
    any other model, which then runs its own forward."""
    inner = unwrap_peft(model)
    if getattr(inner.config, "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    embedding = plain_embedding(inner.get_input_embeddings())
    head = plain_projection(inner.get_output_embeddings())
    if embedding is None or head is None:
        return None
    return getattr(inner, inner.base_model_prefix), embedding, head


def forward_logprobs(
    model: nn.Module,
    query_responses: torch.Tensor,
    attention_mask: torch.Tensor,
    context_length: int,
    temperature: float,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of the response tokens (after `context_length`) under `model`.

    Logits are divided by the sampling temperature so the ratio pi/pi_old and the KL compare
    the distribution that was actually sampled from. Optionally also the per-token entropy.
    Only the response positions get logits. For the plain-headed families of
    `_causal_lm_parts` the embedding and the output projection run through `vocab_grads`, so a
    trainable vocabulary matrix gets its gradient added in place.
    """
    response_length = query_responses.shape[1] - context_length
    positions = position_ids_from_mask(attention_mask)
    parts = _causal_lm_parts(model)
    if parts is None:
        out = model(
            input_ids=query_responses,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
            **keep_last_logits(response_length + 1),
        )
        # Position ctx-1 predicts the first response token; the last position predicts nothing.
        logits = out.logits[:, -(response_length + 1) : -1]
    else:
        backbone, embedding, head = parts
        hidden = backbone(
            inputs_embeds=embed(query_responses, embedding.weight),
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
        ).last_hidden_state
        logits = project(hidden[:, context_length - 1 : -1], head.weight)
    logits = logits.float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    responses = query_responses[:, context_length:]
    logprobs = logp_all.gather(2, responses.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():  # a diagnostic: keep the [batch, len, vocab] product out of the graph
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


# --------------------------------------------------------------------------------------------
# 4. Models: load, freeze, reference, LoRA, optimizer, save
# --------------------------------------------------------------------------------------------


def load_policy(
    path: str | Path, dtype: torch.dtype, device: torch.device, frozen: bool = False
) -> Any:
    """The causal LM in `path` on `device` in `dtype`; `frozen` also freezes it (`freeze`).

    `Any`: after peft wrapping a policy gains methods (disable_adapter, merge_and_unload)."""
    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if frozen:
        freeze(model)
    model.to(device)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: for the reference and reward models."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def reference_policy(
    policy: Any, policy_dir: str | Path, dtype: torch.dtype, device: torch.device, use_lora: bool
) -> tuple[nn.Module, Callable[[], contextlib.AbstractContextManager[Any]]]:
    """The reference a policy is held near, and the context to score it in.

    With LoRA it is the policy itself with its adapter disabled inside the context: no second
    copy of the weights. Otherwise it is a frozen copy of the start, loaded from `policy_dir`.
    """
    if use_lora:
        return policy, policy.disable_adapter
    return load_policy(policy_dir, dtype, device, frozen=True), contextlib.nullcontext


def lora_config(r: int, alpha: int, target: str | list[str], task_type: str) -> Any:
    """A LoRA config with dropout 0: PPO ratios need the same network in rollout and update."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target, task_type=task_type
    )


class MergedLoraSampler:
    """A frozen copy of the base policy whose adapted weights are `W + ΔW` of the LoRA policy.

    Sampling token by token through peft's LoRA layers adds two small matmuls, a scale and an
    add to every linear layer at every step; on a CPU that per-op cost is a large share of a
    decode step. The rollout samples from this merged copy instead. `sync()` rewrites each
    adapted weight from the untouched base plus the current adapter delta, so nothing drifts
    (merging into the live base and unmerging again would not round-trip exactly in float).
    The copy costs one more set of policy weights, which LoRA saved many times over.
    """

    def __init__(self, base: nn.Module) -> None:
        self.model = freeze(copy.deepcopy(base))
        self._pairs: list[tuple[Any, nn.Linear]] = []

    def attach(self, peft_policy: Any) -> None:
        """Pair each LoRA layer of the wrapped policy with the copy's plain linear layer."""
        from peft.tuners.lora import LoraLayer

        inner = peft_policy.get_base_model()
        names = {id(m): n for n, m in inner.named_modules()}
        for module in inner.modules():
            if isinstance(module, LoraLayer):
                target = self.model.get_submodule(names[id(module)])
                assert isinstance(target, nn.Linear), f"LoRA on {type(target).__name__}"
                if not _plain_lora(module, list(module.active_adapters)):
                    raise ValueError(
                        f"{names[id(module)]}: only plain LoRA (W + scale * B @ A) can be merged "
                        "for sampling; DoRA and transposed weights are not supported"
                    )
                self._pairs.append((module, target))
        if not self._pairs:
            raise ValueError("the LoRA policy has no adapted linear layers")

    @torch.no_grad()
    def sync(self) -> nn.Module:
        """Rewrite every adapted weight as `W + scale * B @ A`; returns the merged model."""
        for lora_layer, target in self._pairs:
            base, adapters = lora_layer.base_layer.weight, list(lora_layer.active_adapters)
            target.weight.copy_(base)  # then one fused multiply-add per adapter
            for name in adapters:
                b, a = lora_layer.lora_B[name].weight, lora_layer.lora_A[name].weight
                target.weight.addmm_(b, a, alpha=float(lora_layer.scaling[name]))
        return self.model


def _plain_lora(layer: Any, adapters: list[str]) -> bool:
    """Whether each adapter's delta is exactly `scaling * B.weight @ A.weight`."""
    return not getattr(layer, "fan_in_fan_out", False) and all(
        name in layer.lora_A
        and isinstance(layer.lora_A[name], nn.Linear)
        and not layer.use_dora.get(name, False)
        for name in adapters
    )


def make_adamw(params: list[nn.Parameter], lr: float, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW without weight decay (RLHF fine-tuning should not shrink the start's weights),
    with the fused kernel: one pass over parameters and moments instead of several, which on a
    CPU saves a good share of each optimizer step for a full 135M-parameter policy + value."""
    return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=0.0, fused=True)


def save_policy(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    info: Mapping[str, Any],
) -> None:
    """Write a plain HF causal LM (LoRA merged) plus tokenizer and run info, atomically."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    assert isinstance(model, PreTrainedModel)
    info_text = json.dumps(info, indent=2, default=str)
    save_model_dir(model, tokenizer, output_dir, {"training_info.json": info_text})
