"""DPO: fine-tune a causal LM directly on preference pairs, without a reward model or sampling.

Direct Preference Optimization (Rafailov et al. 2023) minimises, per pair,

    -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

(with optional label smoothing, the "conservative DPO" of Mitchell 2023, for noisy labels).
The reference is a frozen copy of the starting policy or, with LoRA, the adapter-disabled policy.

Why our own and not TRL's `DPOTrainer`: a Verdict run must report progress and metrics through
`Hooks`, stop cleanly between steps on cancel, write atomic checkpoints holding everything needed
to resume bit-for-bit, and take plain data without the `datasets`/`accelerate` stack. The loss
itself is twenty lines; the run contract is the bulk, and it is the same as PPO's (docs/ml.md),
with the plumbing shared: prompts, LoRA and saving from `app.ml.policy`, device, dtype and
tokenizer from `app.ml.loading`, seeding and the checkpoint from `app.ml.checkpoint`.

A completion is tokenised as the policy would produce it: its text tokens followed by EOS,
appended to the chat-templated prompt with the generation prompt, exactly the tokens PPO samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from app.kinds.dpo import DPOConfig
from app.ml.checkpoint import CheckpointSchedule, TrainCheckpoint, seed_everything
from app.ml.distributed import Ranks
from app.ml.hooks import Cancelled, Hooks, NullHooks
from app.ml.loading import dtype_for, load_tokenizer, pick_device
from app.ml.policy import (
    PromptLike,
    as_messages,
    encode_prompts,
    keep_last_logits,
    load_policy,
    lora_config,
    make_adamw,
    position_ids_from_mask,
    reference_policy,
    save_policy,
)

CHECKPOINT_FILE = "dpo_checkpoint.pt"
# Bookkeeping only: a checkpoint resumes under any value of these.
_RESUMABLE_FIELDS = {"checkpoint_every", "checkpoint_every_s"}


@dataclass
class PreferencePair:
    """One judgment as plain data: the prompt, the preferred and the dispreferred response.

    `label` is the probability that `chosen` is the better one: 1.0 for a human's judgment, the
    posterior of a reliability-weighted snapshot otherwise (`snapshots.to_examples`). A label
    below 1 trains like conservative DPO with that pair's own smoothing (see `pair_smoothing`).
    """

    prompt: PromptLike
    chosen: str
    rejected: str
    label: float = 1.0


@dataclass
class DPOResult:
    """Where the trained policy is, and the metrics on the way."""

    output_dir: Path
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards beta*(logpi - logpi_ref) of both sides.

    Inputs are summed completion log-probabilities, one per pair; `label_smoothing` is one
    number for every pair or one per pair (`pair_smoothing`). Returns
    `(losses, chosen_rewards, rejected_rewards)`; the rewards are detached (for metrics only).
    """
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratio - rejected_logratio)
    losses = (
        -F.logsigmoid(logits) * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    )
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def pair_smoothing(labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Per-pair smoothing ε_i for `dpo_loss`: the probability that `chosen` is the worse side.

    A pair's own label p_i (P(chosen is better)) and the run's `label_smoothing` ε (the chance
    any label is flipped) combine to P(chosen better) = p_i(1 − ε) + (1 − p_i)ε, so
    ε_i = 1 − that. With p_i = 1 this is ε: hard labels train exactly as before.
    """
    return 1.0 - (labels * (1.0 - label_smoothing) + (1.0 - labels) * label_smoothing)


def completion_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum of log pi(token) over the completion positions of each right-padded sequence."""
    # Logits only from the position before the earliest completion token: prompts need none.
    first = int(completion_mask.float().argmax(-1).min().clamp(min=1)) - 1
    keep = input_ids.shape[1] - first
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **keep_last_logits(keep),
    )
    logp = torch.log_softmax(out.logits[:, -keep:-1].float(), dim=-1)
    token_logp = logp.gather(2, input_ids[:, first + 1 :].unsqueeze(-1)).squeeze(-1)
    return (token_logp * completion_mask[:, first + 1 :].to(token_logp.dtype)).sum(-1)


def _as_pair(pair: PreferencePair | Mapping[str, Any]) -> PreferencePair:
    """A pair given as a mapping (`prompt`, `chosen`, `rejected`) as a `PreferencePair`."""
    if isinstance(pair, PreferencePair):
        return pair
    return PreferencePair(pair["prompt"], str(pair["chosen"]), str(pair["rejected"]))


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    max_prompt_length: int,
    max_length: int,
) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen completion ids, rejected completion ids) per pair, truncated."""
    prompts = encode_prompts(tokenizer, [as_messages(p.prompt) for p in pairs], max_prompt_length)
    eos = int(tokenizer.eos_token_id)
    out = []
    for prompt_ids, pair in zip(prompts, pairs, strict=True):
        room = max(max_length - len(prompt_ids), 1)
        sides = []
        for text in (pair.chosen, pair.rejected):
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
            sides.append(ids[:room])
        out.append((prompt_ids, sides[0], sides[1]))
    return out


def _collate(
    items: Sequence[tuple[list[int], list[int], list[int]]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen sequences then rejected ones, right padded: (ids, attention, completion mask)."""
    rows = [(p, c) for p, c, _ in items] + [(p, r) for p, _, r in items]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = True
    return ids.to(device), attention.to(device), completion.to(device)


def train_dpo(
    config: DPOConfig,
    policy_dir: str | Path,
    pairs: Sequence[PreferencePair | Mapping[str, Any]],
    output_dir: str | Path,
    checkpoint_dir: str | Path,
    hooks: Hooks | None = None,
    resume: bool = True,
    ranks: Ranks | None = None,
) -> DPOResult:
    """Train the policy in `policy_dir` with DPO on `pairs`; write it to `output_dir` (HF format).

    `pairs` are `PreferencePair`s or mappings with `prompt` (text or chat messages), `chosen` and
    `rejected` (response texts). Metrics go to `hooks.metrics` every step; on
    `hooks.should_stop()` the run checkpoints and raises `Cancelled`; `resume=True` continues from
    `checkpoint_dir` and ends where an uninterrupted run would have.

    Under torchrun, `ranks` (`app.ml.distributed`) trains under DDP: each rank takes its shard
    of every micro-batch, `batch_size` stays global, rank 0 reports, checkpoints and saves.
    """
    hooks = hooks or NullHooks()
    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)
    data = [_as_pair(p) for p in pairs]
    if not data:
        raise ValueError("no preference pairs")
    device = ranks.device if ranks is not None else pick_device(config.device)
    dtype = dtype_for(device, config.dtype)

    # ---- Seeding: the pair order of epoch e is a permutation drawn from seed + e, so a resumed
    # run recomputes it instead of storing it.
    seed_everything(config.seed)

    tokenizer = load_tokenizer(policy_dir)
    pad_id = int(tokenizer.pad_token_id)
    encoded = tokenize_pairs(tokenizer, data, config.max_prompt_length, config.max_length)
    policy = load_policy(policy_dir, dtype, device)
    if config.use_lora:
        from peft import get_peft_model

        policy = get_peft_model(
            policy,
            lora_config(config.lora_r, config.lora_alpha, config.lora_target_modules, "CAUSAL_LM"),
        )
    ref_model, ref_context = reference_policy(policy, policy_dir, dtype, device, config.use_lora)
    policy.eval()  # dropout off: the implicit reward compares two passes of the same network

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_adamw(params, config.effective_learning_rate())
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    start_step = 0
    history: list[dict[str, float]] = []
    checkpoint = TrainCheckpoint(
        checkpoint_dir / CHECKPOINT_FILE,
        config.to_dict(),
        _RESUMABLE_FIELDS,
        models={"policy": policy},
        optimizer=optimizer,
        data={"num_pairs": len(encoded)},
    )
    if resume and (resumed := checkpoint.load()) is not None:
        start_step, extra = resumed
        history = list(extra["history"])
        hooks.progress(start_step, total_steps, f"resumed from the checkpoint at step {start_step}")
    schedule = CheckpointSchedule(
        config.checkpoint_every,
        config.checkpoint_every_s,
        device=ranks.device if ranks is not None else None,
    )

    def save_checkpoint(step: int) -> None:
        if ranks is None or ranks.is_main:
            checkpoint.save(step, {"history": history})
        if ranks is not None:
            ranks.barrier()  # nobody moves on (or exits) before rank 0's file is whole
        schedule.saved()

    def stop_requested() -> bool:
        return hooks.should_stop() if ranks is None else ranks.should_stop(hooks)

    # Under DDP the policy's forward runs through the wrapper, whose backward all-reduces.
    trained: Any = ranks.wrap(policy) if ranks is not None else policy
    last_saved = start_step
    micro = config.batch_size // config.gradient_accumulation_steps
    for step in range(start_step, total_steps):
        if stop_requested():
            if last_saved != step:
                save_checkpoint(step)
            raise Cancelled(f"DPO cancelled before step {step + 1}")
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(
            len(encoded), generator=torch.Generator().manual_seed(config.seed + epoch)
        ).tolist()
        batch = order[offset * config.batch_size : (offset + 1) * config.batch_size]

        optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "accuracy": 0.0}
        for start in range(0, len(batch), micro):
            chunk = batch[start : start + micro]
            # Under DDP: this rank's shard, its sum scaled by the ranks' number (DDP averages);
            # an empty shard runs one pair at weight 0, since every rank joins each all-reduce.
            mine = chunk if ranks is None else ranks.shard(chunk)
            part = mine or chunk[:1]
            items = [encoded[i] for i in part]
            n = len(items)
            ids, attention, completion = _collate(items, pad_id, device)
            # One forward for chosen and rejected together: half the kernel launches.
            with torch.no_grad(), ref_context():
                ref = completion_logps(ref_model, ids, attention, completion)
            logps = completion_logps(trained, ids, attention, completion)
            labels = torch.tensor(
                [data[i].label for i in part],
                dtype=logps.dtype,
                device=logps.device,
            )
            smoothing = pair_smoothing(labels, config.label_smoothing)
            losses, chosen_r, rejected_r = dpo_loss(
                logps[:n], logps[n:], ref[:n], ref[n:], config.beta, smoothing
            )
            total = losses.sum()
            if ranks is not None:
                total = total * (ranks.world_size if mine else 0)
            # Weight by the micro-batch share so an uneven last batch still averages correctly.
            (total / len(batch)).backward()
            if not mine:
                continue
            sums["loss"] += float(losses.detach().sum())
            sums["chosen"] += float(chosen_r.sum())
            sums["rejected"] += float(rejected_r.sum())
            sums["accuracy"] += float((chosen_r > rejected_r).float().sum())
        if ranks is not None:  # the step's metrics are over the whole global batch
            sums = ranks.sum(sums)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()

        done = step + 1
        metrics = {
            "loss/dpo": sums["loss"] / len(batch),
            "rewards/chosen": sums["chosen"] / len(batch),
            "rewards/rejected": sums["rejected"] / len(batch),
            "rewards/margins": (sums["chosen"] - sums["rejected"]) / len(batch),
            "rewards/accuracy": sums["accuracy"] / len(batch),
            "epoch": epoch + (offset + 1) / steps_per_epoch,
        }
        if not math.isfinite(metrics["loss/dpo"]):
            raise FloatingPointError(f"DPO diverged at step {done}")
        history.append(metrics)
        hooks.metrics(done, metrics)
        if done == total_steps or schedule.due(done):
            save_checkpoint(done)
            last_saved = done
        hooks.progress(
            done,
            total_steps,
            f"DPO step {done}/{total_steps}: loss {metrics['loss/dpo']:.4f}, "
            f"margin {metrics['rewards/margins']:.4f}",
        )

    final = history[-1] if history else {}
    if ranks is None or ranks.is_main:
        save_policy(
            policy, tokenizer, output_dir, {"algorithm": "dpo", "config": config.to_dict(), **final}
        )
    return DPOResult(output_dir, total_steps, final, history)
