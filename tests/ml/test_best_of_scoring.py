"""Best-of-K's packed scoring (`app.ml.best_of_scoring`) against one plain forward pass per
(prompt, answer) sequence of the same tiny reward model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app.ml.best_of_scoring import ANSWERS_PER_ROW, score_answer_groups
from app.ml.generation import Prompt, prompt_messages
from app.ml.reward import LoadedRewardModel, load_reward_model
from tests.tiny_models import save_tiny_model


def save_tiny_reward_model(out: Path, seed: int = 3) -> Path:
    """A randomly initialised 1-output sequence classifier on a tiny Llama backbone."""
    if not (out / "config.json").exists():
        lm_dir = save_tiny_model(out.parent / f"{out.name}-lm", seed=seed)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(lm_dir, num_labels=1)
        tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        model.config.pad_token_id = tokenizer.pad_token_id
        # Random heads start near 0 for every input; a wider head spreads the scores apart.
        with torch.no_grad():
            model.score.weight.mul_(50.0)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def plain_score(reward: LoadedRewardModel, prompt: Prompt, answer: str) -> float:
    """The reward of one sequence, run alone through transformers' own forward."""
    messages = [*prompt_messages(prompt), {"role": "assistant", "content": answer}]
    text = reward.tokenizer.apply_chat_template(messages, tokenize=False)
    ids = reward.tokenizer(str(text), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(reward.model(input_ids=ids).logits[0, 0])


@pytest.fixture(scope="module")
def reward(tmp_path_factory: pytest.TempPathFactory) -> LoadedRewardModel:
    return load_reward_model(save_tiny_reward_model(tmp_path_factory.mktemp("rm") / "rm"))


PROMPTS: list[Prompt] = [
    "What is the capital of France?",
    [
        {"role": "system", "content": "Answer concisely and kindly."},
        {"role": "user", "content": "Write a short poem about the sea."},
    ],
    "hi",
]
ANSWERS = [
    ["Paris.", "Paris is the capital of France.", "I do not know", "Lyon"],
    ["The sea is blue.", "", "Waves, waves, waves and more waves over the sand", "no"],
    [f"answer number {i}" for i in range(ANSWERS_PER_ROW + 2)],  # two rows of unequal width
]


@pytest.mark.parametrize("rows_per_forward", [1, 2, 8])
def test_packed_scores_equal_one_forward_per_sequence(
    reward: LoadedRewardModel, rows_per_forward: int
) -> None:
    got = score_answer_groups(reward, PROMPTS, ANSWERS, rows_per_forward=rows_per_forward)
    assert [len(g) for g in got] == [len(a) for a in ANSWERS]
    for prompt, answers, scores in zip(PROMPTS, ANSWERS, got, strict=True):
        expected = [plain_score(reward, prompt, a) for a in answers]
        assert scores == pytest.approx(expected, abs=1e-4)
    # The scores tell the answers apart (the test would mean little if they were all equal).
    assert len({round(s, 3) for s in got[0]}) == 4


def test_bad_input_is_refused(reward: LoadedRewardModel) -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 groups"):
        score_answer_groups(reward, PROMPTS[:2], ANSWERS[:1])
    with pytest.raises(ValueError, match="rows_per_forward must be at least 1"):
        score_answer_groups(reward, PROMPTS, ANSWERS, rows_per_forward=0)
