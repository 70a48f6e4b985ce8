"""Policy evaluation: keys, scores against the parent, KL of a policy to itself, the score
gain's interval."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from app.ml.evaluation import evaluate_policy
from app.ml.hooks import Cancelled, RecordingHooks
from tests.ml.test_ppo import save_tiny_reward_model
from tests.tiny_models import save_tiny_model

PROMPTS = ["hi", "What is the capital of France?", "Write a poem", "Explain reward models"]
KEYS = {
    "mean_score",
    "parent_mean_score",
    "score_gain",
    "score_gain_interval",
    "win_share",
    "win_share_interval",
    "confidence",
    "bootstrap_resamples",
    "kl_to_parent",
    "eos_rate",
    "mean_length",
    "num_prompts",
    "samples",
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two cores shared with other jobs: tiny matmuls run far faster single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def length_score(_messages: list, texts: list[str], ids: list[list[int]]) -> list[float]:
    return [float(len(row)) for row in ids]


def token_score(_messages: list, texts: list[str], ids: list[list[int]]) -> list[float]:
    # A score that tells answers apart even when they all run to the length limit.
    return [sum(row) / max(len(row), 1) for row in ids]


def test_policy_against_itself_has_zero_kl_and_gain(tmp_path: Path) -> None:
    policy = save_tiny_model(tmp_path / "p", pad_equals_eos=True)
    hooks = RecordingHooks()
    result = evaluate_policy(
        policy, policy, length_score, PROMPTS, max_new_tokens=6, batch_size=3, hooks=hooks
    )
    assert set(result) == KEYS
    assert result["kl_to_parent"] == pytest.approx(0.0, abs=1e-6)
    assert result["score_gain"] == pytest.approx(0.0, abs=1e-9)
    # The same answers on every prompt: every difference is 0, and so is every resample's.
    assert result["score_gain_interval"] == [0.0, 0.0]
    assert result["win_share"] == 0.5 and result["win_share_interval"] == [0.5, 0.5]
    assert result["confidence"] == 0.95 and result["bootstrap_resamples"] == 2000
    assert result["mean_score"] == pytest.approx(result["mean_length"])
    assert 1 <= result["mean_length"] <= 6
    assert result["num_prompts"] == 4 and len(result["samples"]) == 4
    sample = result["samples"][0]
    assert sample["response"] == sample["parent_response"]
    assert set(sample) == {"prompt", "response", "score", "parent_response", "parent_score"}
    assert [c[0] for c in hooks.progress_calls] == [3, 4]


def test_different_parent_has_positive_kl_with_reward_model(tmp_path: Path) -> None:
    policy = save_tiny_model(tmp_path / "p", seed=0)
    parent = save_tiny_model(tmp_path / "q", seed=1)
    rm = save_tiny_reward_model(tmp_path / "rm", pad_equals_eos=False)
    result = evaluate_policy(
        policy, parent, str(rm), PROMPTS, max_new_tokens=5, temperature=1.0, num_samples=2
    )
    # Two unrelated random models: the Monte-Carlo KL estimate is clearly positive.
    assert result["kl_to_parent"] > 0.1
    assert len(result["samples"]) == 2
    scores = [result["mean_score"], result["parent_mean_score"], result["score_gain"]]
    assert all(isinstance(s, float) and s == s for s in scores)
    assert result["score_gain"] == pytest.approx(result["mean_score"] - result["parent_mean_score"])


def test_the_score_gain_comes_with_its_interval_at_the_run_confidence(tmp_path: Path) -> None:
    policy = save_tiny_model(tmp_path / "p", seed=0)
    parent = save_tiny_model(tmp_path / "q", seed=1)
    prompts = [f"Question number {i}: say something" for i in range(12)]
    knobs = {"max_new_tokens": 6, "temperature": 1.0, "batch_size": 12, "num_samples": 0}
    wide = evaluate_policy(policy, parent, token_score, prompts, confidence=0.99, **knobs)
    narrow = evaluate_policy(
        policy, parent, token_score, prompts, confidence=0.5, bootstrap_resamples=500, **knobs
    )
    # Two unrelated random models: their answers' scores differ by different amounts per prompt.
    gain = wide["score_gain"]
    low, high = wide["score_gain_interval"]
    assert low < gain < high and wide["confidence"] == 0.99
    assert narrow["score_gain"] == gain  # the same seeded answers
    n_low, n_high = narrow["score_gain_interval"]
    assert low < n_low <= gain <= n_high < high
    assert narrow["bootstrap_resamples"] == 500
    w_low, w_high = wide["win_share_interval"]
    assert 0.0 <= w_low <= wide["win_share"] <= w_high <= 1.0
    assert wide["num_prompts"] == 12


def test_evaluation_cancels_and_validates(tmp_path: Path) -> None:
    policy = save_tiny_model(tmp_path / "p")
    with pytest.raises(Cancelled):
        evaluate_policy(
            policy, policy, length_score, PROMPTS, batch_size=2, hooks=RecordingHooks(1)
        )
    with pytest.raises(ValueError):
        evaluate_policy(policy, policy, length_score, PROMPTS, temperature=0.0)
    with pytest.raises(ValueError, match="confidence"):
        evaluate_policy(policy, policy, length_score, PROMPTS, confidence=1.0)
    with pytest.raises(ValueError, match="bootstrap_resamples"):
        evaluate_policy(policy, policy, length_score, PROMPTS, bootstrap_resamples=10)
