"""PPO for RLHF: fine-tune a causal LM to score well under a reward while staying near its start.

Read top to bottom, like CleanRL's `ppo.py`:

1. `PPOConfig`, one field per knob, each with a help string.
2. Small pure functions (`response_mask`, `compute_rewards`, `gae_advantages`, `masked_whiten`,
   `policy_loss`, `value_loss`, the KL controllers) that the tests check against hand numbers.
3. Model plumbing: prompt encoding with left padding, a batched sampler with a KV cache, the
   forward pass that turns logits into per-token log-probabilities, the value/reward heads.
4. `train_ppo`: seeding, roles, then per step a rollout (sample, score, per-token rewards, GAE)
   followed by several PPO epochs over minibatches, metrics, samples and atomic checkpoints.

Written from the published details ("The N Implementation Details of RLHF with PPO", Ziegler et
al. 2019, Stiennon et al. 2020, Ouyang et al. 2022) since TRL dropped its PPO trainer after 1.12.

Roles. The *policy* is trained. The *reference* is a frozen copy of the starting policy or, with
LoRA, the same network with its adapter disabled. The *value model* starts from the reward model
(its backbone, with its scalar head applied at every token instead of only the last one). The
*reward* is either a sequence-classification reward model (a directory) or any Python callable
`score_fn(prompt_messages_list, response_texts, response_token_ids)` returning one score per
response, for rule-based rewards and simulated raters.

Conventions used throughout: `responses` are `[batch, resp_len]` token ids with everything after
the first EOS replaced by pad; `mask` is a bool tensor of the same shape, true for real response
tokens up to and including the first EOS. The pad id may equal the EOS id (SmolLM2), so the end of
a response is always the first EOS found by position, never "the first pad".
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.ml.chat import inert_messages
from app.ml.generation import CachedForward, inverse_cdf_sample, prefill, skinny_decode_linears
from app.ml.hooks import Cancelled, Hooks, NullHooks
from app.ml.io import atomic_torch_save, replace_dir
from app.ml.vocab_grads import embed, plain_embedding, plain_projection, project, zero_grad

Messages = list[dict[str, str]]
PromptLike = str | Sequence[Mapping[str, str]]
ScoreFn = Callable[[list[Messages], list[str], list[list[int]]], torch.Tensor | Sequence[float]]

CHECKPOINT_FILE = "ppo_checkpoint.pt"
# Settings that change speed or bookkeeping but not the trajectory: a checkpoint resumes under any.
_RESUMABLE_FIELDS = {
    "total_steps",
    "checkpoint_every",
    "sample_every",
    "num_sample_rows",
    "reuse_rollout_values",
}


# --------------------------------------------------------------------------------------------
# 1. Configuration
# --------------------------------------------------------------------------------------------


def config_field(default: Any, help: str) -> Any:
    """A dataclass field with a help string in its metadata (CLI/UI can show it)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_f = config_field  # short alias keeps the config table below readable


@dataclass
class PPOConfig:
    """Every knob of a PPO run. Defaults follow the published RLHF-with-PPO details."""

    seed: int = _f(0, "Seed for Python, NumPy and torch and for the run's own generators.")
    total_steps: int = _f(20, "PPO iterations; each is one rollout batch plus its updates.")
    batch_size: int = _f(16, "Prompts sampled (and responses generated) per PPO iteration.")
    mini_batch_size: int = _f(8, "Responses per optimizer step inside a PPO epoch.")
    gradient_accumulation_steps: int = _f(
        1, "Micro-batches per minibatch; the minibatch is split to bound activation memory."
    )
    ppo_epochs: int = _f(4, "Passes over each rollout batch (the same samples are reused).")
    learning_rate: float = _f(3e-6, "AdamW learning rate for policy and value parameters.")
    adam_eps: float = _f(1e-5, "AdamW epsilon; 1e-5 as in the OpenAI/CleanRL PPO baselines.")
    max_grad_norm: float = _f(1.0, "Global gradient-norm clip per optimizer step.")
    max_prompt_length: int = _f(256, "Prompt tokens kept (the start is cut, the end is kept).")
    max_new_tokens: int = _f(64, "Response length limit; longer responses are cut here.")
    temperature: float = _f(
        0.7, "Divides the logits when sampling AND in every training forward pass (must be > 0)."
    )
    missing_eos_penalty: float | None = _f(
        1.0, "Subtracted from the score of a response without EOS within the limit (None: off)."
    )
    kl_coef: float = _f(0.05, "Initial beta of the per-token penalty -beta*(logp - logp_ref).")
    adaptive_kl: bool = _f(False, "Adapt beta towards `target_kl` (Ziegler et al. 2019).")
    target_kl: float = _f(6.0, "Target sequence KL (nats) for the adaptive controller.")
    kl_horizon: int = _f(10000, "Horizon (in samples) of the adaptive controller.")
    gamma: float = _f(1.0, "Discount; 1.0 because the only real reward is at the end.")
    lam: float = _f(0.95, "GAE lambda.")
    cliprange: float = _f(0.2, "Policy ratio clip epsilon.")
    cliprange_value: float = _f(0.2, "Value clip around the rollout values.")
    vf_coef: float = _f(0.1, "Weight of the value loss in the joint loss.")
    whiten_rewards: bool = _f(False, "Whiten per-token rewards (without shifting) before GAE.")
    use_lora: bool = _f(
        False,
        "Train LoRA adapters; the reference is the adapter-disabled policy and the reward model "
        "is the adapter-disabled value model, so memory stays near one policy + one RM.",
    )
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r).")
    lora_target_modules: str | list[str] = _f("all-linear", "Modules that get LoRA adapters.")
    value_model_path: str | None = _f(
        None,
        "Where the value model starts. None: the reward model directory, or the policy (with a "
        "fresh scalar head) when the reward is a Python callable.",
    )
    rollout_forward_batch_size: int = _f(
        16, "Sequences per no-grad forward/generation chunk during the rollout."
    )
    reuse_rollout_values: bool = _f(
        True,
        "Run the rollout's value pass for the first minibatch with gradients and train on it "
        "in the first PPO epoch (same weights, same numbers), instead of running it twice. "
        "Holds that minibatch's value activations from the rollout to its update.",
    )
    reward_max_length: int = _f(1024, "Token limit of a reward-model input (start is cut).")
    sample_every: int = _f(5, "Store a table of sample responses every this many steps.")
    num_sample_rows: int = _f(4, "Rows in each sample table.")
    checkpoint_every: int = _f(1, "Write a resumable checkpoint every this many steps.")
    device: str = _f("auto", "'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = _f("float32", "Weights dtype: float32 or bfloat16 (bfloat16 on GPUs only).")

    def validate(self) -> None:
        """Raise ValueError for settings that cannot work together."""
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (it divides the logits)")
        if self.batch_size % self.mini_batch_size:
            raise ValueError("batch_size must be a multiple of mini_batch_size")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError("mini_batch_size must be a multiple of gradient_accumulation_steps")
        if self.total_steps < 1 or self.ppo_epochs < 1:
            raise ValueError("total_steps and ppo_epochs must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (stored in checkpoints and next to the output model)."""
        return dataclasses.asdict(self)


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


def response_mask(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Bool mask of real response tokens: everything up to and including the first EOS.

    A row without EOS is real over its whole length. Works when pad == EOS because the end is
    found by the *first* EOS position, and whatever follows it (pads or junk) is masked.
    """
    is_eos = responses == eos_token_id
    # Number of EOS tokens strictly before each position; a position is real while that is 0.
    eos_before = torch.cumsum(is_eos.int(), dim=1) - is_eos.int()
    return eos_before == 0


def first_eos_truncate(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every token after the first EOS by pad; return (truncated ids, real-token mask)."""
    mask = response_mask(responses, eos_token_id)
    return torch.where(mask, responses, torch.full_like(responses, pad_token_id)), mask


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true position of each row (left or right padded); -1 for empty rows."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


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
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
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
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------
# 3. Model plumbing
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """'auto' means the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    """Map a config string to a torch dtype (only the two we support for training)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(f"unsupported dtype {name!r}; use one of {sorted(dtypes)}")
    return dtypes[name]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def as_messages(prompt: PromptLike) -> Messages:
    """A prompt as chat messages: a plain string becomes one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has a pad id (EOS when it has none, as SmolLM2 does)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift the prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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


def _unwrapped(model: nn.Module) -> Any:
    """The transformers model inside a peft wrapper (with its adapter layers), else `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]


def _causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Embedding, nn.Linear] | None:
    """Backbone, input embedding and output projection of a causal LM (optionally wrapped by
    peft) whose logits are `lm_head(hidden)` and whose two matrices are plain modules; None for
    any other model, which then runs its own forward."""
    inner = _unwrapped(model)
    if getattr(inner.config, "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    embedding = plain_embedding(inner.get_input_embeddings())
    head = plain_projection(inner.get_output_embeddings())
    if embedding is None or head is None:
        return None
    return getattr(inner, inner.base_model_prefix), embedding, head


def vocab_matrices(*models: nn.Module) -> list[torch.Tensor]:
    """The trainable `[vocab, hidden]` weights of `models` whose gradients `vocab_grads` adds in
    place (tied matrices once): these keep their gradient buffers between steps."""
    found: dict[int, torch.Tensor] = {}
    for model in models:
        inner = _unwrapped(model)
        modules: list[nn.Module | None] = [plain_embedding(inner.get_input_embeddings())]
        if hasattr(inner, "get_output_embeddings"):
            modules.append(plain_projection(inner.get_output_embeddings()))
        for module in modules:
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.requires_grad:
                found[id(weight)] = weight
    return list(found.values())


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


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a sequence-classification model (optionally wrapped by peft) into body and head."""
    inner = _unwrapped(model)
    backbone = getattr(inner, inner.base_model_prefix)
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return backbone, head
    raise ValueError(f"{type(inner).__name__} has no scalar head named 'score' or 'classifier'")


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The scalar head applied at every position: `[batch, len]` values (or rewards). A plain
    input embedding runs through `vocab_grads.embed` (its gradient is added in place)."""
    backbone, head = _backbone_and_head(model)
    embedding = plain_embedding(backbone.get_input_embeddings())  # type: ignore[operator]
    tokens = (
        {"input_ids": input_ids}
        if embedding is None
        else {"inputs_embeds": embed(input_ids, embedding.weight)}
    )
    hidden = backbone(
        **tokens,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return head(hidden).squeeze(-1).float()


class RewardModelScorer:
    """Scores (prompt, response text) pairs with a sequence-classification reward model.

    The response is re-rendered with the reward model's own tokenizer and chat template, as the
    reward model saw its training pairs, and the score is read at the last real token found from
    the attention mask (never from the pad id, which may equal EOS).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        # With shared LoRA weights, `context` disables the value adapter to reach the pure RM.
        self.context = context

    def conversation_ids(self, messages: Messages, response: str) -> list[int]:
        """The tokens the reward model scores: the same rendering as app/ml/reward.py trains on
        (chat template; without one, plain turns joined by blank lines and a final EOS)."""
        conversation = inert_messages(
            self.tokenizer, [*messages, {"role": "assistant", "content": response}]
        )
        if self.tokenizer.chat_template:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        else:
            text = "\n\n".join(m["content"] for m in conversation)
            text += self.tokenizer.eos_token or ""
        return list(self.tokenizer(str(text), add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def __call__(
        self, prompts: list[Messages], texts: list[str], device: torch.device
    ) -> torch.Tensor:
        """One float score per response."""
        rendered = [
            self.conversation_ids(messages, text)[-self.max_length :]
            for messages, text in zip(prompts, texts, strict=True)
        ]
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        scores = []
        for start in range(0, len(rendered), self.batch_size):
            chunk = rendered[start : start + self.batch_size]
            input_ids, mask = left_pad(chunk, pad, device)
            with self.context():
                values = token_values(self.model, input_ids, mask)
            scores.append(values[torch.arange(len(chunk)), last_true_index(mask)])
        return torch.cat(scores)


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


def load_reward_model(path: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A frozen sequence-classification reward model (num_labels=1) in eval mode."""
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    return freeze(model.to(device))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: for the reference and reward models."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only (all of them, or just LoRA adapters and copied heads)."""
    # No clone: torch.save serialises at once, and a copy would double peak memory.
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back; the set of names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ValueError("checkpoint does not match the model's trainable parameters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))


def rng_state() -> dict[str, Any]:
    """Global RNG states (Python, NumPy, torch CPU and CUDA) for a checkpoint."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_adamw(params: list[nn.Parameter], lr: float, eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW without weight decay (RLHF fine-tuning should not shrink the start's weights),
    with the fused kernel: one pass over parameters and moments instead of several, which on a
    CPU saves a good share of each optimizer step for a full 135M-parameter policy + value."""
    return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=0.0, fused=True)


def lora_config(r: int, alpha: int, target: str | list[str], task_type: str) -> Any:
    """A LoRA config with dropout 0: PPO ratios need the same network in rollout and update."""
    from peft import LoraConfig

    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target, task_type=task_type
    )


def save_policy(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    info: Mapping[str, Any],
) -> None:
    """Write a plain HF causal LM (LoRA merged) plus tokenizer and run info, atomically."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        assert isinstance(model, PreTrainedModel)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2, default=str))
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, max(size, 1)):
        yield slice(start, min(start + size, n))


def _pad_right(
    tensors: list[torch.Tensor], value: float | int, width: int | None = None
) -> torch.Tensor:
    width = width or max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


# --------------------------------------------------------------------------------------------
# 4. Training
# --------------------------------------------------------------------------------------------


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
    """
    config.validate()
    hooks = hooks or NullHooks()
    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)
    prompt_messages = [as_messages(p) for p in prompts]
    if not prompt_messages:
        raise ValueError("no prompts")
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)

    # ---- Seeding: everything random below draws from these, so a resumed run can replay it.
    seed_everything(config.seed)
    sample_gen = torch.Generator(device=device).manual_seed(config.seed)  # token sampling
    shuffle_gen = torch.Generator().manual_seed(config.seed + 1)  # prompt order, minibatches

    # ---- Roles ----------------------------------------------------------------------------
    tokenizer = load_tokenizer(policy_dir)
    eos_id, pad_id = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    # `Any`: after peft wrapping these gain methods (disable_adapter, merge_and_unload).
    policy: Any = AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=dtype)
    policy.to(device)
    reward_path = None if callable(reward) else Path(reward)
    value_path = config.value_model_path or (reward_path if reward_path else policy_dir)
    # From a causal-LM directory the scalar head is new; it is the only part seeded randomly.
    value_model: Any = AutoModelForSequenceClassification.from_pretrained(
        str(value_path), num_labels=1, dtype=dtype
    )
    value_model.to(device)
    shares_reward_weights = False
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
        ref_model: nn.Module = policy
        ref_context: Callable[[], contextlib.AbstractContextManager[Any]] = policy.disable_adapter
        shares_reward_weights = reward_path is not None and config.value_model_path is None
    else:
        ref_model = freeze(AutoModelForCausalLM.from_pretrained(str(policy_dir), dtype=dtype))
        ref_model.to(device)
        ref_context = contextlib.nullcontext
    # Dropout off everywhere: the rollout and the update must score tokens with one network.
    policy.eval()
    value_model.eval()

    score_fn: ScoreFn | None = None
    rm_scorer: RewardModelScorer | None = None
    if reward_path is None:
        score_fn = reward  # type: ignore[assignment]
    else:
        rm_tokenizer = load_tokenizer(reward_path)
        if shares_reward_weights:
            # The value model's frozen base *is* the reward model; disable the adapter to use it.
            rm_model, rm_context = value_model, value_model.disable_adapter
        else:
            rm_model, rm_context = load_reward_model(reward_path, dtype, device), None
        rm_scorer = RewardModelScorer(
            rm_model,
            rm_tokenizer,
            config.reward_max_length,
            config.rollout_forward_batch_size,
            context=rm_context or contextlib.nullcontext,
        )

    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    optimizer = make_adamw(params, config.learning_rate, config.adam_eps)
    kl_ctl: FixedKLController | AdaptiveKLController = (
        AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        if config.adaptive_kl
        else FixedKLController(config.kl_coef)
    )

    # ---- Resume -----------------------------------------------------------------------------
    start_step = 0
    prompt_order: list[int] = []
    history: list[dict[str, float]] = []
    samples: dict[int, list[dict[str, Any]]] = {}
    checkpoint_path = checkpoint_dir / CHECKPOINT_FILE
    if resume and checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        _check_resumable(ckpt["config"], config.to_dict())
        load_trainable_state(policy, ckpt["policy"])
        load_trainable_state(value_model, ckpt["value"])
        optimizer.load_state_dict(ckpt["optimizer"])
        kl_ctl.load_state_dict(ckpt["kl_controller"])
        sample_gen.set_state(ckpt["sample_generator"])
        shuffle_gen.set_state(ckpt["shuffle_generator"])
        set_rng_state(ckpt["rng"])
        start_step = int(ckpt["step"])
        prompt_order = list(ckpt["prompt_order"])
        history = list(ckpt["history"])
        samples = {int(k): v for k, v in ckpt["samples"].items()}

    def save_checkpoint(step: int) -> None:
        atomic_torch_save(
            {
                "step": step,
                "config": config.to_dict(),
                "policy": trainable_state(policy),
                "value": trainable_state(value_model),
                "optimizer": optimizer.state_dict(),
                "kl_controller": kl_ctl.state_dict(),
                "sample_generator": sample_gen.get_state(),
                "shuffle_generator": shuffle_gen.get_state(),
                "rng": rng_state(),
                "prompt_order": list(prompt_order),
                "history": history,
                "samples": samples,
            },
            checkpoint_path,
        )

    def next_prompt_indices() -> list[int]:
        # Walk through shuffled epochs of the prompt set so every prompt gets its turn.
        chosen: list[int] = []
        while len(chosen) < config.batch_size:
            if not prompt_order:
                perm = torch.randperm(len(prompt_messages), generator=shuffle_gen)
                prompt_order.extend(perm.tolist())
            chosen.append(prompt_order.pop(0))
        return chosen

    def score(batch_messages: list[Messages], texts: list[str], ids: list[list[int]]) -> Any:
        if rm_scorer is not None:
            return rm_scorer(batch_messages, texts, device)
        assert score_fn is not None
        raw = score_fn(batch_messages, texts, ids)
        return torch.as_tensor(raw, dtype=torch.float32).reshape(-1).to(device)

    # ---- Main loop ----------------------------------------------------------------------------
    last_saved = start_step
    for step in range(start_step, config.total_steps):
        if hooks.should_stop():
            if last_saved != step:
                save_checkpoint(step)
            raise Cancelled(f"PPO cancelled before step {step + 1}")

        # -- Rollout: sample, score, turn into per-token rewards and advantages.
        rollout_start = time.perf_counter()
        indices = next_prompt_indices()
        batch_messages = [prompt_messages[i] for i in indices]
        queries = encode_prompts(tokenizer, batch_messages, config.max_prompt_length)
        query_ids, query_mask = left_pad(queries, pad_id, device)
        context_length = query_ids.shape[1]
        with torch.no_grad():
            sampler = policy if merged_sampler is None else merged_sampler.sync()
            chunks, sampled_logprobs = [], []
            for sl in _chunks(config.batch_size, config.rollout_forward_batch_size):
                out, out_logprobs = sample_responses(
                    sampler,
                    query_ids[sl],
                    query_mask[sl],
                    config.max_new_tokens,
                    config.temperature,
                    eos_id,
                    pad_id,
                    sample_gen,
                )
                chunks.append(out)
                sampled_logprobs.append(out_logprobs)
            responses, mask = first_eos_truncate(_pad_right(chunks, pad_id), eos_id, pad_id)
            # The sampler's log-probabilities are pi_old: the same network (with LoRA, its merged
            # copy) and temperature as the training forward (tests check they agree), so no
            # extra policy pass is needed.
            logprobs = _pad_right(sampled_logprobs, 0.0) * mask
            query_responses = torch.cat([query_ids, responses], dim=1)
            attention_mask = torch.cat([query_mask, mask.long()], dim=1)

            ref_l = []
            for sl in _chunks(config.batch_size, config.rollout_forward_batch_size):
                ids, att, ctx, _ = trim_padding(
                    query_responses[sl], attention_mask[sl], context_length
                )
                with ref_context():
                    ref_lp, _ = forward_logprobs(ref_model, ids, att, ctx, config.temperature)
                ref_l.append(ref_lp)
            width = responses.shape[1]
            ref_logprobs = _pad_right(ref_l, 0.0, width) * mask
            # The first epoch's order is drawn now: its first minibatch may train on these values.
            first_order = torch.randperm(config.batch_size, generator=shuffle_gen).to(device)
            values, kept_values = _rollout_values(
                config, value_model, query_responses, attention_mask, context_length, first_order
            )

            lengths = mask.sum(1)
            has_eos = ((responses == eos_id) & mask).any(1)
            token_lists = [responses[i, : int(lengths[i])].tolist() for i in range(len(indices))]
            texts = [
                str(tokenizer.decode([t for t in ids if t != eos_id], skip_special_tokens=True))
                for ids in token_lists
            ]
            raw_scores = score(batch_messages, texts, token_lists)
            scores = raw_scores
            if config.missing_eos_penalty is not None:
                scores = torch.where(has_eos, scores, scores - config.missing_eos_penalty)

            beta = kl_ctl.value
            rewards, non_score, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, beta)
            if config.whiten_rewards:
                rewards = masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = gae_advantages(values, rewards, mask, config.gamma, config.lam)
            advantages = masked_whiten(advantages, mask)
        rollout = _Rollout(
            query_responses, attention_mask, context_length, mask, logprobs, values, advantages,
            returns,
        )  # fmt: skip

        # -- Update: several epochs of clipped PPO over shuffled minibatches.
        update_start = time.perf_counter()
        stats = _ppo_update(
            config, policy, value_model, optimizer, params, rollout, shuffle_gen, first_order,
            kept_values,
        )  # fmt: skip
        del kept_values  # whatever the update did not consume (nothing, normally)
        update_end = time.perf_counter()

        sequence_kl = kl.sum(1)
        metrics = {
            "objective/kl": float(sequence_kl.mean()),
            "objective/scores": float(scores.mean()),
            "objective/non_score_reward": float(non_score.sum(1).mean()),
            "objective/rlhf_reward": float((scores + non_score.sum(1)).mean()),
            "objective/beta": float(beta),
            "response/length": float(lengths.float().mean()),
            "response/eos_rate": float(has_eos.float().mean()),
            **stats,
            "time/rollout": update_start - rollout_start,
            "time/update": update_end - update_start,
        }
        kl_ctl.update(metrics["objective/kl"], config.batch_size)
        done = step + 1
        history.append(metrics)
        hooks.metrics(done, metrics)
        if step % config.sample_every == 0 or done == config.total_steps:
            table = [
                {
                    "prompt": batch_messages[i][-1]["content"],
                    "response": texts[i],
                    "score": float(raw_scores[i]),
                }
                for i in range(min(config.num_sample_rows, len(texts)))
            ]
            samples[done] = table
            if on_samples is not None:
                on_samples(done, table)
        if done % config.checkpoint_every == 0 or done == config.total_steps:
            save_checkpoint(done)
            last_saved = done
        hooks.progress(
            done,
            config.total_steps,
            f"PPO step {done}/{config.total_steps}: score {metrics['objective/scores']:.3f}, "
            f"kl {metrics['objective/kl']:.3f}, length {metrics['response/length']:.1f}",
        )

    final_metrics = history[-1] if history else {}
    save_policy(
        policy,
        tokenizer,
        output_dir,
        {"algorithm": "ppo", "config": config.to_dict(), "metrics": final_metrics},
    )
    return PPOResult(output_dir, config.total_steps, final_metrics, history, samples)


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
        for n, sl in enumerate(_chunks(len(head), micro)):
            idx = head[sl]
            ids, att, ctx, length = trim_padding(
                query_responses[idx], attention_mask[idx], context_length
            )
            with torch.enable_grad():
                kept[n] = token_values(value_model, ids, att)[:, ctx - 1 : -1]
            values[idx, :length] = kept[n].detach()
    for sl in _chunks(len(rest), config.rollout_forward_batch_size):
        idx = rest[sl]
        ids, att, ctx, length = trim_padding(
            query_responses[idx], attention_mask[idx], context_length
        )
        values[idx, :length] = token_values(value_model, ids, att)[:, ctx - 1 : -1]
    return values, kept


def _ppo_update(
    config: PPOConfig,
    policy: nn.Module,
    value_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    rollout: _Rollout,
    shuffle_gen: torch.Generator,
    first_order: torch.Tensor,
    kept_values: dict[int, torch.Tensor],
) -> dict[str, float]:
    """`ppo_epochs` passes of clipped policy + value updates; returns mean diagnostics.

    `first_order` is epoch one's permutation (drawn at the rollout); `kept_values` are the
    rollout's value estimates with their graphs for the micro-batches of its first minibatch
    (see `_rollout_values`), consumed, and so released, as they are trained on.
    """
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
            order = torch.randperm(batch, generator=shuffle_gen).to(rollout.mask.device)
        for mb_start in range(0, batch, config.mini_batch_size):
            minibatch = order[mb_start : mb_start + config.mini_batch_size]
            zero_grad(params, keep=vocab)
            for n, mc_start in enumerate(range(0, len(minibatch), micro)):
                idx = minibatch[mc_start : mc_start + micro]
                ids, att, ctx, length = trim_padding(
                    rollout.query_responses[idx], rollout.attention_mask[idx], context_length
                )
                mask = rollout.mask[idx, :length]
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
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
    out = {k: v / max(count, 1) for k, v in totals.items()}
    for k, v in out.items():
        if not math.isfinite(v):
            raise FloatingPointError(f"PPO diverged: {k} = {v}")
    return out


def _check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to continue a checkpoint under settings that would change its trajectory."""
    changed = sorted(
        k for k in current if k not in _RESUMABLE_FIELDS and saved.get(k) != current.get(k)
    )
    if changed:
        raise ValueError(f"checkpoint was written with different settings: {changed}")
