"""Sample K responses per prompt from a causal LM, in padded batches with a KV cache.

Reads top to bottom: the config, what a response is, how prompts become token ids, how work is
cut into batches, how one batch is decoded, and `generate_responses`, which ties them together.

Choices worth knowing:

* Prompts are left-padded and every row carries its own attention mask and position ids, so a
  prompt gives the same tokens whether it runs alone or in a batch. The end of a response is its
  first EOS token; padding is never looked at to find it (SmolLM2's pad token *is* its EOS).
* Each (prompt, sample) row draws from its own random generator, seeded from
  (seed, prompt index, sample index). Results therefore do not depend on `batch_size` or on how
  prompts were grouped, and the caller's global RNG is left alone.
* Rows that have finished are dropped from the batch (and from the KV cache) at once, so a batch
  costs what its remaining rows cost, and a prompt is reported done as soon as its K rows are.
* Work that rows share is done once: the K rows of a prompt share its prefill, and a prefix that
  all prompts of a batch share (a chat template's system prompt) is prefilled once per batch.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from app.kinds.generate import SamplingConfig
from app.ml.chat import inert_messages
from app.ml.decode import LlamaDecoder, skinny_linear
from app.ml.hooks import Cancelled, Hooks, NullHooks
from app.ml.loading import LoadedModel

ChatMessage = Mapping[str, str]
Prompt = str | Sequence[ChatMessage]
FinishReason = Literal["eos", "length"]
OnPromptDone = Callable[[int, list["GeneratedResponse"]], None]


@dataclass(frozen=True)
class GeneratedResponse:
    """One response. `token_ids` end with the EOS token when `finish_reason` is "eos"."""

    text: str
    token_ids: list[int]
    num_tokens: int
    truncated: bool
    finish_reason: FinishReason


# --- prompts -> token ids ------------------------------------------------------------------------


def prompt_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat messages: a string is one user message; a message list is checked."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages: list[dict[str, str]] = []
    for position, message in enumerate(prompt):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {position} is {type(message).__name__}, not a mapping")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"message {position} needs string 'role' and 'content' fields")
        messages.append({"role": role, "content": content})
    if not messages:
        raise ValueError("a prompt needs at least one message")
    return messages


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of a prompt, ending where the assistant's answer starts.

    Uses the tokenizer's chat template with `add_generation_prompt=True`. A tokenizer without a
    template (a base model) takes a string prompt as raw text.
    """
    messages = inert_messages(tokenizer, prompt_messages(prompt))
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The rendered template already holds its special tokens; adding BOS again would double it.
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
    elif isinstance(prompt, str):
        ids = tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]
    else:
        raise ValueError(
            "this tokenizer has no chat template, so chat-message prompts cannot be rendered; "
            "pass plain string prompts or use a chat model"
        )
    return [int(i) for i in ids]


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Token ids that end a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, Sequence):
        ids.update(int(i) for i in configured)
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token")
    return ids


# --- batches -------------------------------------------------------------------------------------

Row = tuple[int, int]  # (prompt index, sample index)
# Below this many tokens, an extra forward pass for a shared prompt prefix costs more than it saves.
MIN_SHARED_PREFIX = 8
# Decode steps between two checks of `should_stop` inside a batch.
STOP_CHECK_EVERY = 8


def plan_batches(
    prompt_lengths: Sequence[int], samples_per_prompt: int, batch_size: int
) -> list[list[Row]]:
    """Cut all (prompt, sample) rows into batches of at most `batch_size` rows.

    Prompts are ordered by length so each batch holds prompts of similar length (little
    padding), longest first so an out-of-memory error shows up in the first batch rather than
    the last; a prompt's samples stay adjacent so it finishes as early as possible.
    """
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-prompt_lengths[i], i))
    rows = [(i, k) for i in order for k in range(samples_per_prompt)]
    return [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one row's generator: a hash, so nearby seeds give unrelated streams."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --- one batch -----------------------------------------------------------------------------------


class CachedForward:
    """Calls the model's forward with the keyword names of the installed transformers version;
    a plain Llama model runs through `LlamaDecoder` instead, which is also its cache."""

    def __init__(self, model: nn.Module, max_new_tokens: int) -> None:
        self.model = model
        self.lean = LlamaDecoder.supports(model)
        self.max_new_tokens = max_new_tokens
        get_base_model: Any = getattr(model, "get_base_model", None)  # a peft wrapper
        base: Any = get_base_model() if callable(get_base_model) else model
        params = inspect.signature(base.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache`.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # Asking only for the last position's logits saves a (rows x prompt length x vocab)
        # matmul in the prefill, which for SmolLM2 costs more than the rest of the model.
        self.can_keep_last = "logits_to_keep" in params

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
    ) -> tuple[torch.Tensor, Any]:
        """Run `input_ids` on top of `cache` (None: a new one); return (last logits, cache)."""
        if self.lean:
            if cache is None:
                capacity = attention_mask.shape[1] + self.max_new_tokens
                cache = LlamaDecoder(self.model, input_ids.shape[0], capacity)
            return cache.forward(input_ids, position_ids, attention_mask), cache
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "use_cache": True,
        }
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        if self.can_keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[:, -1, :].float(), new_cache


def _next_tokens(
    logits: torch.Tensor, config: SamplingConfig, generators: list[torch.Generator]
) -> torch.Tensor:
    """Greedy or temperature + top-p sampling; each row draws from its own generator."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    sorted_logits, sorted_ids = torch.sort(logits / config.temperature, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    if config.top_p < 1.0:
        # Drop a token when the tokens ranked above it already reach top_p; the first is kept.
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= config.top_p, 0.0)
    # One uniform draw per row from the row's own generator (torch.multinomial takes one
    # generator for the whole batch, which would tie a row's sample to its batch neighbours).
    uniforms = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)
    return sorted_ids.gather(-1, inverse_cdf_sample(probs, uniforms)[:, None]).squeeze(-1)


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of `[batch, n]` (unnormalised) probabilities, from `[batch]` uniforms.

    A cumulative sum and a binary search: `torch.multinomial` instead draws an exponential for
    every entry (49k per row for SmolLM2), several milliseconds a token on a CPU.
    `right=True` never picks a zero-probability entry, even for a uniform of exactly 0.
    """
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    choice = torch.searchsorted(cdf, targets, right=True)
    return choice.clamp(max=probs.shape[-1] - 1).squeeze(-1)


@contextmanager
def skinny_decode_linears(model: nn.Module) -> Iterator[None]:
    """While in this block, `model`'s linear layers on the CPU compute few-row inputs as
    `(W @ x.T).T` (`app.ml.decode.skinny_linear`). The same products, summed in another order,
    so outputs agree with `F.linear` to float rounding. Only for inference: the layers get their
    own forward back on exit. On other devices nothing changes."""
    # A layer that already has a forward of its own (an enclosing block's) is left to that block,
    # so nested or concurrent blocks never remove each other's; at worst a layer falls back to
    # `F.linear`, which gives the same numbers.
    layers = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and "forward" not in vars(m)
    ]
    for layer in layers:
        layer.forward = partial(skinny_linear, layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            vars(layer).pop("forward", None)


def _shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens at the start of every prompt, leaving each prompt at least one token of its own."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for i in range(limit):
        if any(p[i] != first[i] for p in prompts[1:]):
            return i
    return max(limit, 0)


def prefill(
    forward: CachedForward,
    prompts: list[list[int]],
    pad_id: int,
    device: torch.device,
    stats: dict[str, float],
) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Run the prompts through the model; return last-position logits, KV cache, attention mask.

    Chat prompts usually start alike (SmolLM2's template puts the same system prompt in front of
    every one), so a prefix common to all rows is computed once and its cache copied to every row.
    Each row's own tokens follow, left-padded; the padding then sits between the shared prefix
    and the row's tokens, where the attention mask hides it.
    """
    shared = _shared_prefix_length(prompts)
    if shared < MIN_SHARED_PREFIX:
        shared = 0
    cache = None
    if shared:
        prefix = torch.tensor([prompts[0][:shared]], dtype=torch.long, device=device)
        positions = torch.arange(shared, device=device).unsqueeze(0)
        _, cache = forward(prefix, torch.ones_like(prefix), positions, None)
        cache.batch_repeat_interleave(len(prompts))
    width = max(len(p) - shared for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    own_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for j, ids in enumerate(prompts):
        own = ids[shared:]
        input_ids[j, width - len(own) :] = torch.tensor(own, dtype=torch.long)
        own_mask[j, width - len(own) :] = 1
    attention_mask = torch.cat([own_mask.new_ones((len(prompts), shared)), own_mask], 1).to(device)
    # Positions count real tokens only, as if the prompt ran alone without padding.
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, shared:]
    logits, cache = forward(input_ids.to(device), attention_mask, position_ids, cache)
    stats["shared_prefix_tokens"] += shared
    stats["padding_tokens"] += float((own_mask == 0).sum())
    return logits, cache, attention_mask


def _decode_batch(
    forward: CachedForward,
    rows: list[Row],
    prompt_ids: list[list[int]],
    config: SamplingConfig,
    stop_ids: set[int],
    pad_id: int,
    device: torch.device,
    stats: dict[str, float],
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[tuple[Row, list[int], FinishReason]]:
    """Decode one batch; yield each row's (row, token ids, finish reason) as soon as it ends.

    `should_stop` is polled every `STOP_CHECK_EVERY` tokens, so a cancel or a worker shutdown
    does not wait for a long batch to finish; rows not yet finished are dropped (`Cancelled`).
    """
    # Rows of the same prompt share its prefill: run each distinct prompt once, then copy its
    # cache and logits to every row of that prompt.
    unique = list(dict.fromkeys(prompt for prompt, _ in rows))
    logits, cache, attention_mask = prefill(
        forward, [prompt_ids[p] for p in unique], pad_id, device, stats
    )

    row_of_unique = {p: j for j, p in enumerate(unique)}
    expand = [row_of_unique[p] for p, _ in rows]
    if expand != list(range(len(unique))):
        index = torch.tensor(expand, device=device)
        cache.batch_select_indices(index)
        logits, attention_mask = logits[index], attention_mask[index]
    next_position = attention_mask.sum(dim=-1, keepdim=True)

    generators = [torch.Generator().manual_seed(row_seed(config.seed, p, k)) for p, k in rows]
    active = list(range(len(rows)))
    generated: list[list[int]] = [[] for _ in rows]
    for step in range(config.max_new_tokens):
        if step and step % STOP_CHECK_EVERY == 0 and should_stop():
            raise Cancelled(f"generation stopped mid-batch after {step} tokens")
        tokens = _next_tokens(logits, config, [generators[r] for r in active])
        keep: list[int] = []
        for slot, (r, token) in enumerate(zip(active, tokens.tolist(), strict=True)):
            generated[r].append(token)
            if token in stop_ids:
                yield rows[r], generated[r], "eos"
            elif len(generated[r]) >= config.max_new_tokens:
                yield rows[r], generated[r], "length"
            else:
                keep.append(slot)
        if not keep:
            return
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention_mask, next_position = attention_mask[index], next_position[index]
            tokens = tokens[index]
            active = [active[slot] for slot in keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], 1)
        logits, cache = forward(tokens.unsqueeze(-1), attention_mask, next_position, cache)
        next_position = next_position + 1


# --- the whole run -------------------------------------------------------------------------------


def generate_responses(
    loaded: LoadedModel | tuple[PreTrainedModel, PreTrainedTokenizerBase],
    prompts: Sequence[Prompt],
    config: SamplingConfig,
    hooks: Hooks = NullHooks(),
    on_prompt_done: OnPromptDone | None = None,
) -> list[list[GeneratedResponse]]:
    """Generate `config.num_responses` responses for each prompt; result[i] belongs to prompts[i].

    A prompt is a string (one user message) or a list of `{"role", "content"}` messages; the
    tokenizer's chat template renders it. `on_prompt_done(i, responses)` is called once per
    prompt, as soon as all its responses exist. `hooks.progress` is called after every batch and
    `hooks.should_stop()` checked before each, raising `Cancelled`. Greedy decoding
    (`do_sample=False`) decodes each prompt once and repeats the result K times.
    """
    if isinstance(loaded, LoadedModel):
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model, tokenizer = loaded
    if not prompts:
        return []
    device = next(model.parameters()).device
    prompt_ids = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    _check_context_length(model, prompt_ids, config.max_new_tokens)
    stop_ids = stop_token_ids(model, tokenizer)
    # Any id works as padding (the attention mask hides it); the pad token is just the natural one.
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)

    samples = config.num_responses if config.do_sample else 1
    batches = plan_batches([len(ids) for ids in prompt_ids], samples, config.batch_size)
    results: list[list[GeneratedResponse | None]] = [[None] * samples for _ in prompts]
    waiting = [samples] * len(prompts)
    final: list[list[GeneratedResponse]] = [[] for _ in prompts]
    forward = CachedForward(model, config.max_new_tokens)
    prompts_done = 0

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), skinny_decode_linears(model):
            for step, rows in enumerate(batches):
                if hooks.should_stop():
                    raise Cancelled(f"generation cancelled after {prompts_done} prompts")
                started = time.perf_counter()
                new_tokens = 0
                stats = {"shared_prefix_tokens": 0.0, "padding_tokens": 0.0}
                for (p, k), ids, reason in _decode_batch(
                    forward,
                    rows,
                    prompt_ids,
                    config,
                    stop_ids,
                    pad_id,
                    device,
                    stats,
                    hooks.should_stop,
                ):
                    results[p][k] = _make_response(tokenizer, ids, reason)
                    new_tokens += len(ids)
                    waiting[p] -= 1
                    if waiting[p] == 0:
                        final[p] = _complete(results[p], config.num_responses)
                        prompts_done += 1
                        if on_prompt_done is not None:
                            on_prompt_done(p, final[p])
                seconds = time.perf_counter() - started
                hooks.metrics(
                    step,
                    {
                        "generation/new_tokens": float(new_tokens),
                        "generation/tokens_per_s": new_tokens / max(seconds, 1e-9),
                        "generation/batch_rows": float(len(rows)),
                        "generation/shared_prefix_tokens": stats["shared_prefix_tokens"],
                        "generation/prompt_padding_tokens": stats["padding_tokens"],
                    },
                )
                hooks.progress(
                    prompts_done,
                    len(prompts),
                    f"batch {step + 1}/{len(batches)}: {len(rows)} sequences, "
                    f"{new_tokens} new tokens in {seconds:.1f}s",
                )
    finally:
        model.train(was_training)
    return final


def _check_context_length(
    model: PreTrainedModel, prompt_ids: list[list[int]], max_new_tokens: int
) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    for index, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it "
                f"exceeds the model's context of {limit} tokens. Shorten the prompt or lower "
                "max_new_tokens."
            )


def _make_response(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], reason: FinishReason
) -> GeneratedResponse:
    content = ids[:-1] if reason == "eos" else ids
    # No clean-up of spaces: the text must be exactly what the model wrote, markup included;
    # escaping it is the job of whatever renders it.
    text = tokenizer.decode(content, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return GeneratedResponse(
        text=str(text),
        token_ids=list(ids),
        num_tokens=len(ids),
        truncated=reason == "length",
        finish_reason=reason,
    )


def _complete(
    responses: list[GeneratedResponse | None], num_responses: int
) -> list[GeneratedResponse]:
    done = [r for r in responses if r is not None]
    if len(done) == num_responses:
        return done
    # Greedy: one decoded response stands for all K; copies keep their token lists independent.
    return [replace(done[0], token_ids=list(done[0].token_ids)) for _ in range(num_responses)]
