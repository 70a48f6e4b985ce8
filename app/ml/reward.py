"""Reward model training: a Bradley–Terry model of human preferences, one file, top to bottom.

    config → tokenize pairs (shared prefix) → pack rows → model → rewards → loss and metrics
    → training loop (checkpoints, cancellation, early stopping) → save → load and score

The last part is the one reward-model loader (`load_reward_model`) and every way of scoring with
a reward model: one prompt with many responses (`score_responses`), and a batch of different
prompts (`RewardModelScorer`, which PPO and evaluation use). `token_values` reads the scalar head
at every token, which is also how PPO's value model works.

Where the speed comes from. The chosen and the rejected answer of a pair continue the same
conversation, and the conversation is most of the tokens (on HH-RLHF with SmolLM2's tokenizer, 114
of a pair's 149 tokens per sequence). So each pair becomes ONE row

    [ shared prefix | chosen | rejected ]

with a 4D attention mask in which the rejected tokens see the prefix but not the chosen ones, and
position ids that restart the rejected answer where the prefix ended. Every token then sees exactly
what it would see in its own separate sequence, so the rewards equal those of two separate forward
passes (a test checks this), while the prefix is encoded once instead of twice. Rows are grouped by
length before batching, so padding wastes little. The same packing scores K responses to one prompt.

The reward of a sequence is the score head applied at its last real token, which is always located
from the layout (the mask), never as "the token before the first pad": SmolLM2's pad token is its
EOS token.

Modes: `full` trains every weight; `lora` trains LoRA adapters and the score head (merged before
saving); `last_n` trains only the last N decoder layers, the final norm and the score head, and
computes the frozen lower part once per pair before training, so every epoch runs only N layers.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.kinds.reward import RewardConfig
from app.ml.chat import inert_messages
from app.ml.checkpoint import (
    CheckpointSchedule,
    TrainCheckpoint,
    load_trainable_state,
    seed_everything,
    trainable_state,
)
from app.ml.counts import decided_pairs, distinct_pairs, wilson_interval
from app.ml.distributed import Ranks
from app.ml.hooks import Cancelled, Hooks, NullHooks
from app.ml.io import save_model_dir
from app.ml.loading import load_tokenizer, pick_device
from app.ml.policy import (
    Messages,
    freeze,
    last_true_index,
    left_pad,
    lora_config,
    position_ids_from_mask,
    unwrap_peft,
)
from app.ml.preferences import PreferenceExample
from app.ml.vocab_grads import embed, plain_embedding

CHECKPOINT_NAME = "checkpoint.pt"
METADATA_NAME = "verdict_reward.json"
# A run may resume on another device and checkpoint on another schedule; every other setting
# must be what it started with.
_RESUMABLE_FIELDS = {"device", "checkpoint_every", "checkpoint_every_s"}
# A reward given as a callable: (prompt messages, response texts, response token ids) -> scores.
ScoreFn = Callable[[list[Messages], list[str], list[list[int]]], torch.Tensor | Sequence[float]]


# ---------------------------------------------------------------------------------------------
# Data: chat messages → token ids with the shared prefix split off
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPair:
    """A preference pair as tokens: the shared prefix, both continuations, margin and label."""

    prefix: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float
    label: float

    @property
    def row_length(self) -> int:
        """Tokens in the packed row `[prefix | chosen | rejected]`."""
        return len(self.prefix) + len(self.chosen) + len(self.rejected)


def _conversation_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict[str, str]], response: str
) -> list[int]:
    messages = inert_messages(tokenizer, [*prompt, {"role": "assistant", "content": response}])
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        # A base model without a chat template: plain turns, and EOS so the end is marked.
        text = "\n\n".join(m["content"] for m in messages) + (tokenizer.eos_token or "")
    assert isinstance(text, str)
    # The template already holds every special token it wants; do not add a BOS a second time.
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def encode_responses(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict[str, str]],
    responses: Sequence[str],
    max_length: int,
) -> tuple[list[int], list[list[int]]]:
    """Tokenize `prompt` + each response as the chat template renders it; split off the prefix.

    Returns (prefix, continuations) with `prefix + continuations[i]` exactly the tokens of the
    i-th full sequence. The prefix is the longest common token prefix (so a template or a BPE
    merge across the boundary can never make it wrong), shortened so every continuation keeps at
    least one token. Sequences over `max_length` lose the start of the prefix first (at most
    half of `max_length` is kept for it when responses are long), then the end of the responses.
    """
    full = [_conversation_ids(tokenizer, prompt, r) for r in responses]
    shared = min(len(ids) for ids in full) - 1
    for i in range(shared):
        if any(ids[i] != full[0][i] for ids in full[1:]):
            shared = i
            break
    prefix = full[0][:shared]
    continuations = [ids[shared:] for ids in full]

    longest = max(len(c) for c in continuations)
    keep = min(len(prefix), max(max_length - longest, max_length // 2))
    prefix = prefix[len(prefix) - keep :]
    room = max_length - keep
    return prefix, [c[:room] for c in continuations]


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, example: PreferenceExample, max_length: int
) -> EncodedPair:
    """Tokenize one preference example into its shared prefix and two continuations."""
    prefix, (chosen, rejected) = encode_responses(
        tokenizer, example.prompt, [example.chosen, example.rejected], max_length
    )
    return EncodedPair(prefix, chosen, rejected, float(example.margin), float(example.label))


# ---------------------------------------------------------------------------------------------
# Packing: one row per prompt, [prefix | response 1 | response 2 | ...], block attention mask
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedRows:
    """A batch laid out by `pack_rows`, ready for the decoder."""

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, 1, T, T] bool, True where a query may attend a key
    ends: torch.Tensor  # [B, K] index of the last token of each response
    lengths: list[int]  # real tokens per row


def pack_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> PackedRows:
    """Lay out each (prefix, responses) as one row; every row must have the same number K.

    A response token attends causally to the prefix and to its own response only; its position
    id continues from the end of the prefix, as in a sequence of its own. Padding sits at the
    right of a row and no real token attends to it.
    """
    k = len(rows[0][1])
    lengths = [len(p) + sum(len(c) for c in cs) for p, cs in rows]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    # Segment 0 is the prefix, 1..K the responses, -1 padding.
    segments = torch.full((len(rows), width), -1, dtype=torch.long)
    ends = torch.zeros((len(rows), k), dtype=torch.long)
    for b, (prefix, continuations) in enumerate(rows):
        if len(continuations) != k:
            raise ValueError("every row needs the same number of responses")
        p = len(prefix)
        input_ids[b, :p] = torch.tensor(list(prefix), dtype=torch.long)
        position_ids[b, :p] = torch.arange(p)
        segments[b, :p] = 0
        start = p
        for j, cont in enumerate(continuations):
            n = len(cont)
            input_ids[b, start : start + n] = torch.tensor(list(cont), dtype=torch.long)
            position_ids[b, start : start + n] = torch.arange(p, p + n)
            segments[b, start : start + n] = j + 1
            ends[b, j] = start + n - 1
            start += n
    index = torch.arange(width)
    causal = index[None, :] <= index[:, None]  # [query, key]
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    # Padding queries may see other padding: every query row must attend somewhere, or SDPA
    # yields NaN, and their outputs are never read.
    mask = causal[None] & ((seg_k == 0) | (seg_k == seg_q))
    return PackedRows(
        input_ids=input_ids.to(device),
        position_ids=position_ids.to(device),
        attention_mask=mask[:, None].to(device),
        ends=ends.to(device),
        lengths=lengths,
    )


def pack_pairs(
    pairs: Sequence[EncodedPair], pad_id: int, device: torch.device | str = "cpu"
) -> PackedRows:
    """Pack preference pairs; `ends[:, 0]` is the chosen and `ends[:, 1]` the rejected reward."""
    return pack_rows([(p.prefix, (p.chosen, p.rejected)) for p in pairs], pad_id, device)


# ---------------------------------------------------------------------------------------------
# Model and forward passes
# ---------------------------------------------------------------------------------------------


def _decoder(model: PreTrainedModel) -> nn.Module:
    """The transformer body under the score head (`model.model` for Llama-like models)."""
    body: nn.Module = getattr(model, model.base_model_prefix)
    return body


def _score_at(model: PreTrainedModel, hidden: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    # Gather first: the head then runs on B*K vectors instead of every position.
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device)[:, None], ends]
    score: nn.Module = model.score  # type: ignore[assignment]
    rewards: torch.Tensor = score(picked).squeeze(-1).float()
    return rewards


def packed_rewards(model: PreTrainedModel, rows: PackedRows) -> torch.Tensor:
    """Rewards [B, K] of packed rows: the score head at the last token of each response."""
    hidden = _decoder(model)(
        input_ids=rows.input_ids,
        attention_mask=rows.attention_mask,
        position_ids=rows.position_ids,
        use_cache=False,
    ).last_hidden_state
    return _score_at(model, hidden, rows.ends)


def rewards_at_last_token(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Rewards [B] of an ordinary padded batch (left or right padding), read at the last real
    token that `attention_mask` marks; positions are counted from the first real token."""
    mask = attention_mask.long()
    position_ids = position_ids_from_mask(mask)
    index = torch.arange(mask.shape[1], device=mask.device)
    last = (index * mask).argmax(-1)
    hidden = _decoder(model)(
        input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    return _score_at(model, hidden, last[:, None])[:, 0]


def _run_layers(
    decoder: nn.Module, hidden: torch.Tensor, rows: PackedRows, layers: Sequence[nn.Module]
) -> torch.Tensor:
    rotary: nn.Module = decoder.rotary_emb  # type: ignore[assignment]
    position_embeddings = rotary(hidden, position_ids=rows.position_ids)
    for layer in layers:
        out = layer(
            hidden,
            attention_mask=rows.attention_mask,
            position_ids=rows.position_ids,
            position_embeddings=position_embeddings,
        )
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def lower_hidden_states(model: PreTrainedModel, rows: PackedRows, n_frozen: int) -> torch.Tensor:
    """`last_n` mode: hidden states [B, T, H] entering decoder layer `n_frozen`."""
    decoder = _decoder(model)
    embed_tokens: nn.Module = decoder.embed_tokens  # type: ignore[assignment]
    layers: nn.ModuleList = decoder.layers  # type: ignore[assignment]
    return _run_layers(decoder, embed_tokens(rows.input_ids), rows, list(layers[:n_frozen]))


def upper_rewards(
    model: PreTrainedModel, hidden: torch.Tensor, rows: PackedRows, n_frozen: int
) -> torch.Tensor:
    """`last_n` mode: rewards [B, K] from the hidden states entering layer `n_frozen`."""
    decoder = _decoder(model)
    layers: nn.ModuleList = decoder.layers  # type: ignore[assignment]
    norm: nn.Module = decoder.norm  # type: ignore[assignment]
    hidden = norm(_run_layers(decoder, hidden, rows, list(layers[n_frozen:])))
    return _score_at(model, hidden, rows.ends)


def build_reward_model(
    config: RewardConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, nn.Module]:
    """A 1-output sequence classifier from the backbone, with the configured part trainable.

    Returns (model, root): `model` is the Hugging Face classifier the forward passes use; `root`
    owns the trainable parameters (the peft wrapper in `lora` mode, else `model` itself).
    """
    torch.manual_seed(config.seed)  # the new score head (and LoRA A matrices) start from the seed
    model = AutoModelForSequenceClassification.from_pretrained(
        config.backbone, num_labels=1, dtype=torch.float32
    )
    # Plain transformers reads a sequence's score before the first pad; it needs the id to find it.
    model.config.pad_token_id = tokenizer.pad_token_id
    # Dropout stays off throughout: eval mode changes nothing else for these models.
    model.eval()
    root: nn.Module = model
    if config.train_mode == "lora":
        from peft import get_peft_model

        targets = [m.strip() for m in config.lora_target_modules.split(",") if m.strip()]
        root = get_peft_model(
            model, lora_config(config.lora_r, config.lora_alpha, targets, "SEQ_CLS")
        )
        root.eval()
    elif config.train_mode == "last_n":
        layers: nn.ModuleList = _decoder(model).layers  # type: ignore[assignment]
        if not 1 <= config.last_n_layers <= len(layers):
            raise ValueError(f"last_n_layers must be in 1..{len(layers)}")
        model.requires_grad_(False)
        for module in [*layers[len(layers) - config.last_n_layers :], _decoder(model).norm]:
            module.requires_grad_(True)
        model.score.requires_grad_(True)
    return model, root


# ---------------------------------------------------------------------------------------------
# Loss and metrics
# ---------------------------------------------------------------------------------------------


def preference_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor,
    label: torch.Tensor,
    center_coefficient: float = 0.0,
) -> torch.Tensor:
    """Per-pair Bradley–Terry loss `-logsigmoid(r_c - r_r - margin)`; a soft label l (0.5 for a
    tie) gives `-(l logsig(d) + (1-l) logsig(-d))`; centering adds c·(r_c + r_r)²."""
    d = r_chosen - r_rejected - margin
    loss = -(label * F.logsigmoid(d) + (1.0 - label) * F.logsigmoid(-d))
    if center_coefficient:
        loss = loss + center_coefficient * (r_chosen + r_rejected) ** 2
    return loss


def expected_calibration_error(prob_preferred: torch.Tensor, bins: int = 10) -> float:
    """ECE of the model's probability that the human-preferred response wins (10 bins)."""
    if prob_preferred.numel() == 0:
        return 0.0
    confidence = torch.maximum(prob_preferred, 1.0 - prob_preferred)
    correct = (prob_preferred > 0.5).float()
    # Confidence lies in [0.5, 1]; bin that range.
    which = ((confidence - 0.5) * 2 * bins).long().clamp(0, bins - 1)
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs().item()
            total += gap * in_bin.float().mean().item()
    return total


def preference_metrics(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor,
    label: torch.Tensor,
    center_coefficient: float = 0.0,
) -> dict[str, float]:
    """Loss, accuracy (ties left out), mean reward margin, calibration and mean reward."""
    loss = preference_loss(r_chosen, r_rejected, margin, label, center_coefficient).mean()
    decided = label != 0.5
    diff = r_chosen - r_rejected
    # Probability the model gives to the side the human preferred.
    prob = torch.where(label > 0.5, torch.sigmoid(diff), torch.sigmoid(-diff))[decided]
    accuracy = (prob > 0.5).float().mean().item() if decided.any() else float("nan")
    return {
        "loss": loss.item(),
        "accuracy": accuracy,
        "margin": diff.mean().item(),
        "ece": expected_calibration_error(prob),
        "reward_mean": torch.cat([r_chosen, r_rejected]).mean().item(),
    }


# ---------------------------------------------------------------------------------------------
# Batching and schedule
# ---------------------------------------------------------------------------------------------


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, group_batches: int, seed: int, epoch: int
) -> list[list[int]]:
    """A seeded shuffle of pair indices cut into batches of similar row length.

    Pairs are shuffled, taken `batch_size * group_batches` at a time, sorted by length within
    that group and cut into batches; the batch order is shuffled again. The result depends only
    on (seed, epoch), so a resumed run finds its place from the step number alone.
    """
    rng = np.random.default_rng([seed, epoch])
    order = [int(i) for i in rng.permutation(len(lengths))]
    group = batch_size * max(1, group_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[int(i)] for i in rng.permutation(len(batches))]


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---------------------------------------------------------------------------------------------
# Rewards of many pairs (evaluation), with or without the `last_n` cache
# ---------------------------------------------------------------------------------------------


@dataclass
class _PairSet:
    """Encoded pairs plus, in `last_n` mode, the cached frozen-part hidden state of each row."""

    pairs: list[EncodedPair]
    cache: list[torch.Tensor] | None = None

    def rewards(
        self, model: PreTrainedModel, indices: Sequence[int], pad_id: int, n_frozen: int | None
    ) -> torch.Tensor:
        rows = pack_pairs([self.pairs[i] for i in indices], pad_id, model.device)
        if self.cache is None or n_frozen is None:
            return packed_rewards(model, rows)
        width = rows.input_ids.shape[1]
        hidden = torch.stack(
            [F.pad(self.cache[i], (0, 0, 0, width - self.cache[i].shape[0])) for i in indices]
        ).to(model.device)
        return upper_rewards(model, hidden, rows, n_frozen)

    def targets(self, indices: Sequence[int], device: torch.device) -> tuple[torch.Tensor, ...]:
        margin = torch.tensor([self.pairs[i].margin for i in indices], device=device)
        label = torch.tensor([self.pairs[i].label for i in indices], device=device)
        return margin, label


def _batches_by_length(pairs: Sequence[EncodedPair], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].row_length)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def _build_cache(
    model: PreTrainedModel, pairs: list[EncodedPair], pad_id: int, n_frozen: int, batch_size: int
) -> list[torch.Tensor]:
    cache: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    for batch in _batches_by_length(pairs, batch_size):
        rows = pack_pairs([pairs[i] for i in batch], pad_id, model.device)
        hidden = lower_hidden_states(model, rows, n_frozen)
        for row, i in enumerate(batch):
            cache[i] = hidden[row, : rows.lengths[row]].detach().cpu().clone()
    return cache


@torch.no_grad()
def _check_split_forward(
    model: PreTrainedModel, pair: EncodedPair, pad_id: int, n_frozen: int
) -> None:
    """`last_n` runs the decoder layer by layer; refuse a backbone where that is not what its
    own forward computes (extra embedding scaling, other layer signatures, ...)."""
    decoder = _decoder(model)
    missing = [
        a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, a)
    ]
    if missing:
        raise ValueError(f"train_mode 'last_n' does not support this backbone (no {missing})")
    rows = pack_pairs([pair], pad_id, model.device)
    split = upper_rewards(model, lower_hidden_states(model, rows, n_frozen), rows, n_frozen)
    if not torch.allclose(split, packed_rewards(model, rows), rtol=1e-3, atol=1e-3):
        raise ValueError("train_mode 'last_n' does not reproduce this backbone's forward pass")


@torch.no_grad()
def _evaluate_set(
    model: PreTrainedModel,
    data: _PairSet,
    pad_id: int,
    n_frozen: int | None,
    batch_size: int,
    center_coefficient: float,
) -> dict[str, float]:
    chosen, rejected, margins, labels = [], [], [], []
    for batch in _batches_by_length(data.pairs, batch_size):
        rewards = data.rewards(model, batch, pad_id, n_frozen)
        margin, label = data.targets(batch, rewards.device)
        chosen.append(rewards[:, 0])
        rejected.append(rewards[:, 1])
        margins.append(margin)
        labels.append(label)
    return preference_metrics(
        torch.cat(chosen),
        torch.cat(rejected),
        torch.cat(margins),
        torch.cat(labels),
        center_coefficient,
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    """What `train_reward_model` hands back: where the model is and how training went."""

    output_dir: Path
    steps: int
    final_metrics: dict[str, float]
    best_val_accuracy: float | None
    best_step: int | None
    # Examples are judgments (one per rater under the "separate" aggregation); pairs are the
    # distinct comparison pairs among them (`app.ml.counts`).
    train_examples: int
    train_pairs: int
    val_examples: int
    val_pairs: int
    best_val_accuracy_pairs: int  # the decided distinct validation pairs it was measured on
    best_val_accuracy_ci95: tuple[float, float] | None  # Wilson, over those pairs
    train_seconds: float  # training only: steps and the `last_n` cache, not evaluations or saving
    stopped_early: bool


class _PairRewards(nn.Module):
    """`_PairSet.rewards` as a module's forward, so DDP sees the forward its gradients follow."""

    def __init__(
        self, model: PreTrainedModel, pairs: _PairSet, pad_id: int, n_frozen: int | None
    ) -> None:
        super().__init__()
        self.model = model
        self.pairs, self.pad_id, self.n_frozen = pairs, pad_id, n_frozen

    def forward(self, indices: Sequence[int]) -> torch.Tensor:
        return self.pairs.rewards(self.model, indices, self.pad_id, self.n_frozen)


def _copy_of_trainable(root: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights as a copy that later steps cannot change (the best so far)."""
    return {n: t.clone() for n, t in trainable_state(root).items()}


def train_reward_model(
    config: RewardConfig,
    train: Sequence[PreferenceExample],
    val: Sequence[PreferenceExample],
    output_dir: Path,
    checkpoint_dir: Path | None = None,
    hooks: Hooks | None = None,
    resume: bool = True,
    snapshot_id: int | None = None,
    ranks: Ranks | None = None,
) -> RewardResult:
    """Train a reward model on `train`, evaluate on `val`, and save it to `output_dir`.

    Metrics go to `hooks.metrics` every step (`loss/train`, `accuracy/train`, `margin/mean`,
    `grad/norm`, `lr`) and at each evaluation (`loss/val`, `accuracy/val`, `margin/val`,
    `calibration/ece`, `reward/mean`); `hooks.progress` every step. When `hooks.should_stop()`
    turns true between steps, a checkpoint is written (if `checkpoint_dir` is given) and
    `Cancelled` is raised. With `resume`, an existing checkpoint in `checkpoint_dir` from the
    same config and snapshot is continued, ending exactly where an uninterrupted run would.
    The output is a Hugging Face directory (model + tokenizer) written atomically.

    Under torchrun, `ranks` (`app.ml.distributed`) trains under DDP: each rank takes its shard
    of every batch, `batch_size` stays global, rank 0 reports, checkpoints and saves.
    """
    hooks = hooks if hooks is not None else NullHooks()

    # --- seeding -----------------------------------------------------------------------------
    seed_everything(config.seed)
    device = ranks.device if ranks is not None else pick_device(config.device)

    # --- data --------------------------------------------------------------------------------
    tokenizer = load_tokenizer(config.backbone)
    pad_id = int(tokenizer.pad_token_id)
    train_set = _PairSet([encode_pair(tokenizer, e, config.max_length) for e in train])
    val_set = _PairSet([encode_pair(tokenizer, e, config.max_length) for e in val])
    if not train_set.pairs:
        raise ValueError("no training pairs")
    row_lengths = [p.row_length for p in train_set.pairs]

    # --- model -------------------------------------------------------------------------------
    model, root = build_reward_model(config, tokenizer)
    model.to(device)  # type: ignore[arg-type]
    trainable = [p for p in root.parameters() if p.requires_grad]
    n_frozen: int | None = None
    train_seconds = 0.0
    if config.train_mode == "last_n":
        n_frozen = len(_decoder(model).layers) - config.last_n_layers  # type: ignore[arg-type]
        _check_split_forward(model, train_set.pairs[0], pad_id, n_frozen)
        started = time.perf_counter()
        # The frozen lower part gives the same hidden states every epoch: compute them once.
        train_set.cache = _build_cache(model, train_set.pairs, pad_id, n_frozen, config.batch_size)
        train_seconds += time.perf_counter() - started
        val_set.cache = _build_cache(model, val_set.pairs, pad_id, n_frozen, config.batch_size)

    # --- optimizer and schedule --------------------------------------------------------------
    batches_per_epoch = math.ceil(len(train_set.pairs) / config.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accumulation)
    total_steps = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(
        trainable, lr=config.peak_learning_rate(), weight_decay=config.weight_decay
    )
    warmup_steps = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup_steps, total_steps, config.min_lr_ratio)
    )

    # --- state, and resume -------------------------------------------------------------------
    step = 0
    best_accuracy: float | None = None
    best_step: int | None = None
    best_params: dict[str, torch.Tensor] | None = None
    evals_without_gain = 0
    eval_history: dict[int, dict[str, float]] = {}
    # The data position needs no saving: an epoch's batch order is a function of (seed, epoch).
    checkpoint = TrainCheckpoint(
        checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir else None,
        config.to_dict(),
        _RESUMABLE_FIELDS,
        models={"trainable": root},
        optimizer=optimizer,
        scheduler=scheduler,
        data={"snapshot_id": snapshot_id},
    )
    resumed = checkpoint.load() if resume else None
    if resumed is not None:
        step, extra = resumed
        best_accuracy, best_step = extra["best_accuracy"], extra["best_step"]
        best_params, evals_without_gain = extra["best_params"], extra["evals_without_gain"]
        eval_history = extra["eval_history"]
        train_seconds += extra["train_seconds"]
        hooks.progress(step, total_steps, f"resumed from the checkpoint at step {step}")
    schedule = CheckpointSchedule(
        config.checkpoint_every,
        config.checkpoint_every_s,
        device=device if ranks is not None else None,
    )

    def save_checkpoint() -> None:
        if ranks is not None and not ranks.is_main:
            ranks.barrier()  # rank 0 writes it; nobody moves on (or exits) before it is whole
            return
        checkpoint.save(
            step,
            {
                "best_accuracy": best_accuracy,
                "best_step": best_step,
                "best_params": best_params,
                "evals_without_gain": evals_without_gain,
                "eval_history": eval_history,
                "train_seconds": train_seconds,
            },
        )
        if ranks is not None:
            ranks.barrier()
        schedule.saved()

    def stop_requested() -> bool:
        return hooks.should_stop() if ranks is None else ranks.should_stop(hooks)

    # Under DDP the forward runs through the wrapper, whose backward all-reduces the gradients.
    ddp = ranks.wrap(_PairRewards(model, train_set, pad_id, n_frozen)) if ranks else None

    # --- training loop -----------------------------------------------------------------------
    epoch_cache: dict[int, list[list[int]]] = {}
    stopped_early = False
    metrics: dict[str, float] = {}
    while step < total_steps:
        started = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache = {
                epoch: length_grouped_batches(
                    row_lengths, config.batch_size, config.length_group_batches, config.seed, epoch
                )
            }
        micro = epoch_cache[epoch][
            within * config.grad_accumulation : (within + 1) * config.grad_accumulation
        ]
        n_pairs = sum(len(b) for b in micro)

        optimizer.zero_grad(set_to_none=True)
        chosen, rejected, margins, labels = [], [], [], []
        for batch in micro:
            if ranks is None or ddp is None:
                rewards = train_set.rewards(model, batch, pad_id, n_frozen)
                margin, label = train_set.targets(batch, rewards.device)
                loss = preference_loss(
                    rewards[:, 0], rewards[:, 1], margin, label, config.center_rewards_coefficient
                )
                # Sum over pairs / pairs in the step: the step's mean loss, whatever the split.
                (loss.sum() / n_pairs).backward()
            else:
                # This rank's shard; DDP averages over the ranks, so the sum is scaled by their
                # number. An empty shard runs one pair at weight 0: every rank joins each reduce.
                mine = ranks.shard(batch)
                rewards = ddp(mine or batch[:1])
                margin, label = train_set.targets(mine or batch[:1], rewards.device)
                loss = preference_loss(
                    rewards[:, 0], rewards[:, 1], margin, label, config.center_rewards_coefficient
                )
                (loss.sum() * (ranks.world_size if mine else 0) / n_pairs).backward()
                if not mine:
                    continue
            chosen.append(rewards[:, 0].detach())
            rejected.append(rewards[:, 1].detach())
            margins.append(margin)
            labels.append(label)
        if ranks is not None:  # the step's metrics are over the whole global batch
            chosen, rejected, margins, labels = (
                [ranks.cat(torch.cat(xs) if xs else torch.empty(0, device=device))]
                for xs in (chosen, rejected, margins, labels)
            )
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        train_seconds += time.perf_counter() - started

        stats = preference_metrics(
            torch.cat(chosen),
            torch.cat(rejected),
            torch.cat(margins),
            torch.cat(labels),
            config.center_rewards_coefficient,
        )
        metrics = {
            "loss/train": stats["loss"],
            "accuracy/train": stats["accuracy"],
            "margin/mean": stats["margin"],
            "grad/norm": float(grad_norm),
            "lr": float(lr),
        }

        eval_due = step == total_steps or (config.eval_every > 0 and step % config.eval_every == 0)
        if val_set.pairs and eval_due:
            ev = _evaluate_set(
                model,
                val_set,
                pad_id,
                n_frozen,
                config.batch_size,
                config.center_rewards_coefficient,
            )
            eval_metrics = {
                "loss/val": ev["loss"],
                "accuracy/val": ev["accuracy"],
                "margin/val": ev["margin"],
                "calibration/ece": ev["ece"],
                "reward/mean": ev["reward_mean"],
            }
            eval_history[step] = eval_metrics
            metrics.update(eval_metrics)
            if best_accuracy is None or ev["accuracy"] > best_accuracy:
                best_accuracy, best_step, evals_without_gain = ev["accuracy"], step, 0
                if config.restore_best:
                    best_params = _copy_of_trainable(root)
            else:
                evals_without_gain += 1
            if (
                config.early_stopping_patience
                and evals_without_gain >= config.early_stopping_patience
            ):
                stopped_early = True

        hooks.metrics(step, metrics)
        hooks.progress(step, total_steps, f"step {step}/{total_steps} loss {stats['loss']:.4f}")
        if stopped_early:
            break
        if step < total_steps and stop_requested():
            save_checkpoint()
            raise Cancelled(f"reward training cancelled at step {step}")
        if step < total_steps and schedule.due(step):
            save_checkpoint()

    # --- output ------------------------------------------------------------------------------
    final_metrics = dict(metrics)
    if config.restore_best and best_params is not None and best_step != step:
        load_trainable_state(root, best_params)
        final_metrics.update(eval_history[best_step] if best_step is not None else {})
    if ranks is None or ranks.is_main:
        _save_output(model, root, tokenizer, config, output_dir, snapshot_id, final_metrics)
    return RewardResult(
        output_dir=output_dir,
        steps=step,
        final_metrics=final_metrics,
        best_val_accuracy=best_accuracy,
        best_step=best_step,
        train_examples=len(train_set.pairs),
        train_pairs=distinct_pairs(train),
        val_examples=len(val_set.pairs),
        val_pairs=distinct_pairs(val),
        best_val_accuracy_pairs=decided_pairs(val),
        best_val_accuracy_ci95=(
            None if best_accuracy is None else wilson_interval(best_accuracy, decided_pairs(val))
        ),
        train_seconds=train_seconds,
        stopped_early=stopped_early,
    )


def _save_output(
    model: PreTrainedModel,
    root: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    config: RewardConfig,
    output_dir: Path,
    snapshot_id: int | None,
    metrics: dict[str, float],
) -> None:
    if config.train_mode == "lora":
        # Plain transformers must load the result: fold the adapters into the weights.
        model = root.merge_and_unload()  # type: ignore[operator]
    model.config.pad_token_id = tokenizer.pad_token_id
    metadata = {
        "kind": "reward",
        "reward_at": "last real token of prompt+response, chat template applied",
        "max_length": config.max_length,
        "snapshot_id": snapshot_id,
        "config": config.to_dict(),
        "metrics": metrics,
    }
    metadata_text = json.dumps(metadata, indent=2, sort_keys=True)
    save_model_dir(model, tokenizer, output_dir, {METADATA_NAME: metadata_text})


# ---------------------------------------------------------------------------------------------
# Loading and scoring
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadedRewardModel:
    """A reward model ready to score: the frozen model, its tokenizer, its trained length."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_length: int


def load_reward_model(
    path: str | Path, device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.float32
) -> LoadedRewardModel:
    """Load a saved reward model (any 1-output sequence classifier directory) for scoring.

    The one reward-model loader, for scoring runs, PPO and evaluation alike: the model frozen
    in eval mode on `device` (`pick_device` spelling) in `dtype`, its tokenizer
    (`load_tokenizer`), and the max length it was trained with (2048 without Verdict's
    metadata, for a reward model trained elsewhere)."""
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    freeze(model)
    model.to(pick_device(device))
    metadata = Path(path) / METADATA_NAME
    max_length = json.loads(metadata.read_text())["max_length"] if metadata.exists() else 2048
    return LoadedRewardModel(model, load_tokenizer(path), int(max_length))


@torch.no_grad()
def score_responses(
    model: LoadedRewardModel | str | Path,
    prompt_messages: list[dict[str, str]],
    responses: Sequence[str],
    max_length: int | None = None,
    responses_per_row: int = 8,
) -> list[float]:
    """Rewards of `responses` as answers to `prompt_messages` (chat messages), in order.

    The prompt is encoded once per row of up to `responses_per_row` responses. `max_length`
    defaults to the one the model was trained with.
    """
    loaded = model if isinstance(model, LoadedRewardModel) else load_reward_model(model)
    limit = max_length or loaded.max_length
    pad_id = int(loaded.tokenizer.pad_token_id)
    scores: list[float] = []
    for start in range(0, len(responses), responses_per_row):
        chunk = list(responses[start : start + responses_per_row])
        prefix, continuations = encode_responses(loaded.tokenizer, prompt_messages, chunk, limit)
        rows = pack_rows([(prefix, continuations)], pad_id, loaded.model.device)
        scores.extend(packed_rewards(loaded.model, rows)[0].tolist())
    return scores


@torch.no_grad()
def evaluate_reward_model(
    model: LoadedRewardModel | str | Path,
    examples: Sequence[PreferenceExample],
    max_length: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Held-out metrics of a saved reward model: `accuracy`, `loss`, `margin`, `ece`."""
    loaded = model if isinstance(model, LoadedRewardModel) else load_reward_model(model)
    limit = max_length or loaded.max_length
    data = _PairSet([encode_pair(loaded.tokenizer, e, limit) for e in examples])
    return _evaluate_set(
        loaded.model, data, int(loaded.tokenizer.pad_token_id), None, batch_size, 0.0
    )


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split a sequence-classification model (optionally wrapped by peft) into body and head."""
    inner = unwrap_peft(model)
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
    the attention mask (never from the pad id, which may equal EOS). This is for a batch of
    different prompts, as PPO and evaluation score them; `score_responses` packs one prompt's
    many responses into one row instead.
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
        """The tokens the reward model scores: the rendering it was trained on."""
        return _conversation_ids(self.tokenizer, messages, response)

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


def reward_scores(
    reward: RewardModelScorer | ScoreFn,
    prompts: list[Messages],
    texts: list[str],
    token_ids: list[list[int]],
    device: torch.device,
) -> torch.Tensor:
    """One float32 score per response on `device`, from a reward model or a callable reward
    (which gets the prompts, the decoded texts and the token ids)."""
    if isinstance(reward, RewardModelScorer):
        return reward(prompts, texts, device)
    raw = reward(prompts, texts, token_ids)
    return torch.as_tensor(raw, dtype=torch.float32).reshape(-1).to(device)
