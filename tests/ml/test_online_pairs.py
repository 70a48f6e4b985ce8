"""On-policy DPO pairs: the ranking and the pick by hand, then a tiny policy and a tiny reward
model: every kept pair clears the margin under the reward model's own scores, the pairs are a
function of the seed, they round-trip through their file, and a cancel stops the sampling."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from app.kinds.dpo import OnlinePairKnobs
from app.ml import online_pairs
from app.ml.hooks import Cancelled, RecordingHooks
from app.ml.loading import LoadedModel, load_causal_lm
from app.ml.reward import LoadedRewardModel, load_reward_model, score_responses
from tests.tiny_models import save_tiny_model

PROMPTS = [
    "What is the capital of France?",
    "Explain how a reward model learns",
    "Write a short poem about the sea.",
    "hi",
    "yes or no?",
    "def add(a, b):",
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two cores shared with other jobs: tiny matmuls run far faster single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedModel, LoadedRewardModel]:
    root = tmp_path_factory.mktemp("online-pairs")
    policy_dir = save_tiny_model(root / "policy", pad_equals_eos=True)
    reward_dir = root / "reward"
    rm = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    rm.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():  # a randomly initialised head barely tells answers apart: widen it
        rm.score.weight.mul_(100.0)
    rm.save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return load_causal_lm(str(policy_dir), root, device="cpu"), load_reward_model(reward_dir)


def knobs(**overrides: object) -> OnlinePairKnobs:
    values: dict[str, object] = dict(
        samples_per_prompt=4, max_new_tokens=8, temperature=1.0, min_score_margin=0.0
    )
    values.update(overrides)
    return OnlinePairKnobs(**values)  # type: ignore[arg-type]


def test_a_truncated_answer_ranks_below_an_ended_one_by_the_penalty() -> None:
    assert online_pairs.ranking_scores([1.0, 0.5, 0.2], [True, False, False], 1.0) == [
        0.0,
        0.5,
        0.2,
    ]
    assert online_pairs.ranking_scores([1.0, 0.5], [True, False], None) == [1.0, 0.5]


def test_the_pair_is_picked_on_the_penalised_scores_by_hand() -> None:
    prompt = [{"role": "user", "content": "q"}]
    texts = ["a", "b", "c", "d"]
    rewards = [1.0, 0.5, 0.2, -0.4]
    cut = [True, False, False, False]
    # Penalised scores (0.0, 0.5, 0.2, -0.4): top "b", bottom "d", margin 0.9.
    pair = online_pairs.pair_of(3, prompt, texts, rewards, cut, knobs(pair_selection="top_bottom"))
    assert (pair.chosen, pair.rejected) == ("b", "d")
    assert pair.margin == pytest.approx(0.9)
    assert (pair.chosen_reward, pair.rejected_reward) == (0.5, -0.4)
    assert (pair.chosen_truncated, pair.rejected_truncated, pair.prompt_index) == (False, False, 3)
    # The two best: "b" (0.5) over "c" (0.2); the cut "a" (1.0 - 1.0 = 0.0) comes third.
    pair = online_pairs.pair_of(0, prompt, texts, rewards, cut, knobs(pair_selection="top_two"))
    assert (pair.chosen, pair.rejected, pair.margin) == ("b", "c", pytest.approx(0.3))
    # Without the penalty the truncated "a" is the top answer.
    pair = online_pairs.pair_of(
        0, prompt, texts, rewards, cut, knobs(pair_selection="top_two", missing_eos_penalty=None)
    )
    assert (pair.chosen, pair.rejected, pair.chosen_truncated) == ("a", "b", True)
    assert pair.preference().label == 1.0 and pair.preference().chosen == "a"


def test_every_kept_pair_clears_the_margin_under_the_reward_model(
    models: tuple[LoadedModel, LoadedRewardModel],
) -> None:
    policy, reward = models
    config = knobs(min_score_margin=0.75, missing_eos_penalty=0.5)
    result = online_pairs.policy_pairs(policy, reward, PROMPTS, config)
    assert result.prompts == len(PROMPTS) and result.answers == 4 * len(PROMPTS)
    assert len(result.pairs) + result.dropped_low_margin + result.dropped_identical == len(PROMPTS)
    # The margin is one a few of these pairs miss: the filter both keeps and drops.
    assert 0 < len(result.pairs) < len(PROMPTS) and result.dropped_low_margin > 0
    penalty = {True: 0.5, False: 0.0}
    for pair in result.pairs:
        assert pair.prompt == [{"role": "user", "content": PROMPTS[pair.prompt_index]}]
        assert pair.chosen != pair.rejected
        # The reward model scores both answers again, one by one: the margin holds.
        chosen, rejected = (
            score_responses(reward, pair.prompt, [text])[0] for text in (pair.chosen, pair.rejected)
        )
        assert chosen == pytest.approx(pair.chosen_reward, abs=1e-4)
        assert rejected == pytest.approx(pair.rejected_reward, abs=1e-4)
        ranked_chosen = chosen - penalty[pair.chosen_truncated]
        ranked_rejected = rejected - penalty[pair.rejected_truncated]
        assert ranked_chosen >= ranked_rejected + config.min_score_margin - 1e-4
        assert pair.margin == pytest.approx(ranked_chosen - ranked_rejected, abs=1e-4)
    stats = result.stats()
    assert stats["pairs"] == len(result.pairs)
    assert stats["mean_margin"] == pytest.approx(
        sum(p.margin for p in result.pairs) / len(result.pairs)
    )
    # A margin above every pair's drops them all, and says so.
    widest = max(p.margin for p in result.pairs)
    strict = online_pairs.policy_pairs(policy, reward, PROMPTS, knobs(min_score_margin=widest + 1))
    assert (
        strict.pairs == [] and strict.dropped_low_margin == len(PROMPTS) - strict.dropped_identical
    )


def test_the_pairs_are_a_function_of_the_seed(
    models: tuple[LoadedModel, LoadedRewardModel],
) -> None:
    policy, reward = models
    first = online_pairs.policy_pairs(policy, reward, PROMPTS, knobs(pair_selection="top_random"))
    # Another decode batch size groups the rows differently; the pairs stay the same.
    again = online_pairs.policy_pairs(
        policy, reward, PROMPTS, knobs(pair_selection="top_random", generation_batch_size=3)
    )
    assert again.pairs == first.pairs
    other = online_pairs.policy_pairs(
        policy, reward, PROMPTS, knobs(pair_selection="top_random", sampling_seed=1)
    )
    assert [(p.chosen, p.rejected) for p in other.pairs] != [
        (p.chosen, p.rejected) for p in first.pairs
    ]


def test_the_pairs_round_trip_through_their_file_under_their_key(
    models: tuple[LoadedModel, LoadedRewardModel], tmp_path: Path
) -> None:
    policy, reward = models
    result = online_pairs.policy_pairs(policy, reward, PROMPTS[:3], knobs())
    path = tmp_path / "pairs.json"
    key = {"config": knobs().to_dict(), "prompt_ids": [1, 2, 3]}
    assert online_pairs.load_pairs(path, key) is None
    online_pairs.save_pairs(path, result, key)
    assert online_pairs.load_pairs(path, key) == result
    assert online_pairs.load_pairs(path, {**key, "prompt_ids": [1, 2, 4]}) is None
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.json"]  # no temp file left behind


def test_a_cancel_stops_the_sampling(models: tuple[LoadedModel, LoadedRewardModel]) -> None:
    policy, reward = models
    hooks = RecordingHooks(stop_after_progress=1)
    with pytest.raises(Cancelled):
        online_pairs.policy_pairs(
            policy, reward, PROMPTS, knobs(generation_batch_size=4), hooks=hooks
        )


def test_a_reward_function_that_miscounts_is_refused(
    models: tuple[LoadedModel, LoadedRewardModel],
) -> None:
    policy, _ = models
    with pytest.raises(ValueError, match="gave 1 scores for 4 answers"):
        online_pairs.policy_pairs(policy, lambda prompt, texts: [0.0], PROMPTS[:1], knobs())
