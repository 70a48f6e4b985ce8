"""RLOO and GRPO (`app.ml.critic_free`): each pure piece against hand-computed numbers, then tiny
models: the rule reward rises with the KL bounded, LoRA and full fine-tuning, resume and cancel."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from app.kinds.critic_free import CriticFreeConfig, GRPORunConfig, RLOORunConfig
from app.ml import critic_free as cf
from app.ml.hooks import Cancelled, RecordingHooks
from tests.ml.test_ppo import PROMPTS, count_rewarded, save_tiny_reward_model
from tests.tiny_models import save_tiny_model


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two cores shared with other jobs: tiny matmuls run far faster single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides: object) -> CriticFreeConfig:
    values: dict[str, object] = dict(
        total_steps=3,
        batch_size=4,
        num_generations=4,
        mini_batch_size=8,
        epochs=1,
        max_new_tokens=6,
        learning_rate=1e-2,
        temperature=1.0,
        missing_eos_penalty=None,
        kl_coef=0.05,
        sample_every=2,
        device="cpu",
    )
    values.update(overrides)
    return CriticFreeConfig(**values)  # type: ignore[arg-type]


# ---- pure pieces, by hand -----------------------------------------------------------------------


def test_rloo_advantage_is_reward_minus_the_mean_of_the_others() -> None:
    # Two prompts, K = 3. Prompt 1: rewards 1, 2, 6 -> others' means 4, 3.5, 1.5.
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])
    adv = cf.rloo_advantages(rewards, 3)
    assert adv.tolist() == pytest.approx([1 - 4, 2 - 3.5, 6 - 1.5, 0.0, 0.0, 0.0])
    # Equivalently k/(k-1) * (r - group mean): the mean of prompt 1 is 3.
    assert adv[:3].tolist() == pytest.approx([1.5 * (1 - 3), 1.5 * (2 - 3), 1.5 * (6 - 3)])


def test_grpo_advantage_is_the_group_z_score() -> None:
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])  # K = 2: groups (1, 3) and (2, 2)
    adv = cf.grpo_advantages(rewards, 2, eps=0.0 + 1e-12)
    # Group (1, 3): mean 2, Bessel std sqrt(2) -> -1/sqrt(2), +1/sqrt(2); group (2, 2): zeros.
    s = 1 / math.sqrt(2)
    assert adv.tolist() == pytest.approx([-s, s, 0.0, 0.0])
    assert cf.grpo_advantages(rewards, 2, scale_by_std=False).tolist() == [-1.0, 1.0, 0.0, 0.0]


def test_group_rewards_put_the_kl_in_the_reward_or_leave_it_out() -> None:
    scores, kl = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -2.0])
    assert cf.group_rewards(scores, kl, 0.5, "reward").tolist() == [-1.0, 3.0]
    assert cf.group_rewards(scores, kl, 0.5, "loss").tolist() == [1.0, 2.0]


def test_scale_advantages_keeps_signs_and_reaches_unit_std() -> None:
    adv = torch.tensor([3.0, -3.0, 1.0, -1.0])
    out = cf.scale_advantages(adv)
    # Bessel std of (3, -3, 1, -1) = sqrt(20 / 3).
    assert out.tolist() == pytest.approx((adv / math.sqrt(20 / 3)).tolist())
    assert cf.scale_advantages(torch.zeros(4)).tolist() == [0.0] * 4


def test_k3_kl_by_hand() -> None:
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.5), math.log(0.5)]])
    # Token 1 agrees: 0. Token 2: ratio ref/pi = 2 -> 2 - ln 2 - 1.
    assert cf.k3_kl(logp, ref)[0].tolist() == pytest.approx([0.0, 1 - math.log(2)])
    assert bool((cf.k3_kl(torch.randn(3, 5), torch.randn(3, 5)) >= 0).all())


def test_critic_free_loss_by_hand() -> None:
    # One answer of two real tokens (the third is padding), advantage 2, ratio exp(0.1) inside
    # the clip on token 1 and exp(0.5) outside it on token 2.
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.1, 0.5, 9.0]])
    ref = torch.zeros(1, 3)
    mask = torch.tensor([[True, True, False]])
    loss, stats = cf.critic_free_loss(new, old, ref, torch.tensor([2.0]), mask, 0.2, 0.0)
    # Positive advantage: loss per token = -A * min(ratio, 1 + eps).
    expected = (-2 * math.exp(0.1) - 2 * 1.2) / 2
    assert float(loss) == pytest.approx(expected)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)
    k3 = [math.exp(-0.1) + 0.1 - 1, math.exp(-0.5) + 0.5 - 1]
    assert float(stats["kl_loss"]) == pytest.approx(sum(k3) / 2)
    with_kl, _ = cf.critic_free_loss(new, old, ref, torch.tensor([2.0]), mask, 0.2, 0.5)
    assert float(with_kl) == pytest.approx(expected + 0.5 * sum(k3) / 2)


def test_a_group_of_equal_scores_gives_no_gradient(tmp_path: Path) -> None:
    """Every answer scoring the same says nothing: GRPO's advantages are 0 and the policy does
    not move (with the KL in the reward at beta 0)."""
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    config = tiny_config(
        estimator="grpo", kl_placement="reward", kl_coef=0.0, total_steps=1, learning_rate=1e-1
    )
    result = cf.train_critic_free(
        config, policy_dir, lambda m, t, i: [1.0] * len(t), PROMPTS, tmp_path / "o", tmp_path / "c"
    )
    assert result.history[0]["objective/advantage_abs"] == 0.0
    trained = AutoModelForCausalLM.from_pretrained(str(result.output_dir)).state_dict()
    start = AutoModelForCausalLM.from_pretrained(str(policy_dir)).state_dict()
    for name, tensor in start.items():
        assert torch.equal(tensor, trained[name]), name


# ---- knobs --------------------------------------------------------------------------------------


def test_minibatch_must_divide_the_answers() -> None:
    with pytest.raises(ValidationError, match=r"must divide batch_size x num_generations \(3 x 4"):
        tiny_config(batch_size=3, num_generations=4, mini_batch_size=8)
    with pytest.raises(ValidationError, match="num_generations"):
        tiny_config(num_generations=1)


def test_run_configs_fix_the_estimator_and_their_kl_placement() -> None:
    assert RLOORunConfig().estimator == "rloo" and RLOORunConfig().kl_placement == "reward"
    grpo = GRPORunConfig()
    assert grpo.estimator == "grpo" and grpo.kl_placement == "loss" and grpo.kl_coef == 0.04
    with pytest.raises(ValidationError, match="estimator"):
        RLOORunConfig(estimator="grpo")  # type: ignore[arg-type]


# ---- tiny models --------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_raises_rule_based_reward_and_keeps_kl_bounded(tmp_path: Path, estimator: str) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    extra: dict[str, object] = {"estimator": estimator}
    if estimator == "grpo":
        extra.update(kl_placement="loss", kl_coef=0.04)
    config = tiny_config(
        total_steps=10, batch_size=4, num_generations=4, mini_batch_size=8, max_new_tokens=8,
        epochs=2, **extra,
    )  # fmt: skip
    hooks = RecordingHooks()
    seen: list[int] = []
    result = cf.train_critic_free(
        config, policy_dir, count_rewarded, PROMPTS, tmp_path / "out", tmp_path / "ckpt", hooks,
        on_samples=lambda step, table: seen.append(step),
    )  # fmt: skip
    scores, kls = hooks.series("objective/scores"), hooks.series("objective/kl")
    assert len(scores) == config.total_steps
    assert sum(scores[-2:]) / 2 >= sum(scores[:2]) / 2 + 1.0, scores
    assert abs(kls[0]) < 1e-4  # the first rollout comes from the reference itself
    # A policy emitting only rewarded tokens would sit ~max_new_tokens*log(10) = 18 nats away.
    assert max(kls) < 0.75 * config.max_new_tokens * math.log(10)
    names = {
        "objective/kl", "objective/scores", "objective/rlhf_reward", "objective/beta",
        "objective/group_score_std", "objective/advantage_abs", "policy/entropy",
        "policy/clipfrac", "policy/approxkl", "val/ratio", "loss/policy", "loss/kl",
        "response/length", "response/eos_rate", "time/rollout", "time/update",
    }  # fmt: skip
    for _, values in hooks.metric_calls:
        assert names <= set(values)
        assert all(math.isfinite(v) for v in values.values())
    assert sorted(result.samples) == seen == [1, 3, 5, 7, 9, 10]
    trained = AutoModelForCausalLM.from_pretrained(str(result.output_dir))
    start = AutoModelForCausalLM.from_pretrained(str(policy_dir))
    assert not torch.allclose(trained.lm_head.weight, start.lm_head.weight)
    info = (result.output_dir / "training_info.json").read_text()
    assert f'"algorithm": "{estimator}"' in info


def test_lora_trains_the_adapters_and_saves_them_merged(tmp_path: Path) -> None:
    """With LoRA only the adapters train (the tiny model's tied output matrix stays, so its
    reward barely moves: what is checked is the plumbing), the reference is the
    adapter-disabled policy (KL 0 at the first rollout), and the saved model is merged."""
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    config = tiny_config(total_steps=2, use_lora=True, learning_rate=1e-1, lora_r=8)
    hooks = RecordingHooks()
    result = cf.train_critic_free(
        config, policy_dir, count_rewarded, PROMPTS, tmp_path / "o", tmp_path / "c", hooks
    )
    kls = hooks.series("objective/kl")
    assert abs(kls[0]) < 1e-4 and kls[1] > 1e-4  # the second rollout samples the adapted policy
    trained = AutoModelForCausalLM.from_pretrained(str(result.output_dir)).state_dict()
    start = AutoModelForCausalLM.from_pretrained(str(policy_dir)).state_dict()
    assert set(trained) == set(start)  # a plain model: no adapter weights left
    changed = {name for name, t in trained.items() if not torch.allclose(t, start[name])}
    assert changed and all("proj" in name for name in changed)  # the adapted linear layers


def test_resume_after_cancel_equals_uninterrupted(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    config = tiny_config(total_steps=3, epochs=2)
    full = cf.train_critic_free(
        config, policy_dir, count_rewarded, PROMPTS, tmp_path / "a", tmp_path / "ca"
    )
    with pytest.raises(Cancelled, match="RLOO cancelled before step 2"):
        cf.train_critic_free(
            config, policy_dir, count_rewarded, PROMPTS, tmp_path / "b", tmp_path / "cb",
            RecordingHooks(stop_after_progress=1),
        )  # fmt: skip
    assert (tmp_path / "cb" / cf.CHECKPOINT_FILE).exists()
    assert not (tmp_path / "b").exists()
    hooks = RecordingHooks()
    resumed = cf.train_critic_free(
        config, policy_dir, count_rewarded, PROMPTS, tmp_path / "b", tmp_path / "cb", hooks
    )
    assert [c[0] for c in hooks.progress_calls] == [1, 2, 3]
    assert hooks.progress_calls[0][2] == "resumed from the checkpoint at step 1"
    for a, b in zip(full.history, resumed.history, strict=True):
        same = [k for k in a if not k.startswith("time/")]
        assert [a[k] for k in same] == pytest.approx([b[k] for k in same], rel=1e-5, abs=1e-6)
    assert resumed.samples == full.samples
    ma = AutoModelForCausalLM.from_pretrained(str(full.output_dir)).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(str(resumed.output_dir)).state_dict()
    for name, tensor in ma.items():
        assert torch.allclose(tensor, mb[name], atol=1e-6), name


def test_resume_refuses_a_changed_estimator(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy")
    config = tiny_config(total_steps=1)
    cf.train_critic_free(
        config, policy_dir, count_rewarded, PROMPTS, tmp_path / "o", tmp_path / "c"
    )
    with pytest.raises(ValueError, match="estimator"):
        cf.train_critic_free(
            tiny_config(total_steps=2, estimator="grpo"), policy_dir, count_rewarded, PROMPTS,
            tmp_path / "o", tmp_path / "c",
        )  # fmt: skip


def test_missing_eos_penalty_and_a_reward_model_directory(tmp_path: Path) -> None:
    """The reward is a saved reward model here (scored through `RewardModelScorer`), and an
    answer without EOS within the limit loses `missing_eos_penalty` from its score."""
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    reward_dir = save_tiny_reward_model(tmp_path / "rm")
    hooks = RecordingHooks()
    config = tiny_config(total_steps=1, max_new_tokens=3, missing_eos_penalty=2.5)
    cf.train_critic_free(
        config, policy_dir, lambda m, t, i: torch.ones(len(t)), PROMPTS, tmp_path / "o",
        tmp_path / "c", hooks,
    )  # fmt: skip
    (_, values), = hooks.metric_calls  # fmt: skip
    expected = 1.0 - 2.5 * (1.0 - values["response/eos_rate"])
    assert values["objective/scores"] == pytest.approx(expected)
    result = cf.train_critic_free(
        tiny_config(total_steps=1), policy_dir, reward_dir, PROMPTS, tmp_path / "o2",
        tmp_path / "c2",
    )  # fmt: skip
    assert math.isfinite(result.metrics["objective/scores"])
    assert result.metrics["objective/group_score_std"] > 0  # a real model tells answers apart
