"""Best-of-K's scoring: the reward model's score of each of a prompt's K answers, for many prompts.

`app.kinds.pairs` decides which two answers make the pair from these scores; it imports no
torch, this module does the forward passes. The layout is the reward model's own (`app.ml.reward`):
a prompt's answers continue the same conversation, so they share one packed row

    [ prompt | answer 1 | answer 2 | ... ]

in which each answer attends to the prompt and to itself only, and its score is read at its last
token. The prompt is encoded once instead of K times, and the scores equal those of K separate
sequences (`tests/ml/test_best_of_scoring.py` checks it against `RewardModelScorer`). Rows of
different prompts go through the model together, `rows_per_forward` at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from app.ml.generation import Prompt, prompt_messages
from app.ml.reward import LoadedRewardModel, encode_responses, pack_rows, packed_rewards

# A row's attention mask is quadratic in its length, so a long K is split over several rows.
ANSWERS_PER_ROW = 8


@torch.no_grad()
def score_answer_groups(
    reward: LoadedRewardModel,
    prompts: Sequence[Prompt],
    answers: Sequence[Sequence[str]],
    rows_per_forward: int = 4,
) -> list[list[float]]:
    """`result[i][j]`: the reward of `answers[i][j]` as the answer to `prompts[i]`.

    A prompt is a string or chat messages, as `generate_responses` takes it. Every sequence is
    cut to the reward model's trained length as `encode_responses` cuts it.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} groups of answers")
    if rows_per_forward < 1:
        raise ValueError(f"rows_per_forward must be at least 1, got {rows_per_forward}")
    tokenizer = reward.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # (prompt index, first answer index, prefix, continuations), grouped by answers per row:
    # the rows of one forward must hold equally many answers.
    by_width: dict[int, list[tuple[int, int, list[int], list[list[int]]]]] = {}
    for i, (prompt, texts) in enumerate(zip(prompts, answers, strict=True)):
        messages = prompt_messages(prompt)
        for start in range(0, len(texts), ANSWERS_PER_ROW):
            chunk = list(texts[start : start + ANSWERS_PER_ROW])
            prefix, continuations = encode_responses(tokenizer, messages, chunk, reward.max_length)
            by_width.setdefault(len(chunk), []).append((i, start, prefix, continuations))
    scores = [[math.nan] * len(texts) for texts in answers]
    for width, rows in by_width.items():
        for first in range(0, len(rows), rows_per_forward):
            part = rows[first : first + rows_per_forward]
            packed = pack_rows([(p, c) for _, _, p, c in part], int(pad), reward.model.device)
            values = packed_rewards(reward.model, packed).tolist()
            for (i, start, _, _), row in zip(part, values, strict=True):
                scores[i][start : start + width] = row
    return scores
