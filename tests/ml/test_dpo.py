"""DPO: the loss by hand, learning a synthetic preference, resume, LoRA."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.ml import dpo
from app.ml.hooks import Cancelled, RecordingHooks
from app.ml.loading import load_tokenizer
from tests.tiny_models import save_tiny_model

PROMPTS = [
    "What is the capital of France?",
    "Explain how a reward model learns",
    "Write a short poem about the sea.",
    "hi",
]
CHOSEN = "Paris is the capital of France."
REJECTED = "bad worse maybe no"
PAIRS = [{"prompt": p, "chosen": CHOSEN, "rejected": REJECTED} for p in PROMPTS] + [
    dpo.PreferencePair([{"role": "user", "content": p}], CHOSEN, REJECTED) for p in PROMPTS
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two cores shared with other jobs: tiny matmuls run far faster single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def config(**overrides: object) -> dpo.DPOConfig:
    values: dict[str, object] = dict(
        epochs=2, batch_size=4, learning_rate=5e-3, beta=0.1, checkpoint_every=1, device="cpu"
    )
    values.update(overrides)
    return dpo.DPOConfig(**values)  # type: ignore[arg-type]


def margin(model_dir: Path) -> float:
    """Mean log pi(chosen) - log pi(rejected) over the synthetic pairs."""
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    pairs = [dpo._as_pair(p) for p in PAIRS]
    items = dpo.tokenize_pairs(tok, pairs, 256, 512)
    ids, attention, completion = dpo._collate(items, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logps = dpo.completion_logps(model, ids, attention, completion)
    n = len(items)
    return float((logps[:n] - logps[n:]).mean())


def test_dpo_loss_by_hand() -> None:
    t = torch.tensor
    losses, chosen, rejected = dpo.dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), 0.5)
    # logits = 0.5 * ((-1 + 2) - (-3 + 2)) = 1 -> loss = log(1 + e^-1)
    assert float(losses[0]) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-6)
    assert float(chosen[0]) == pytest.approx(0.5)
    assert float(rejected[0]) == pytest.approx(-0.5)
    smoothed, _, _ = dpo.dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), 0.5, 0.1)
    expected = 0.9 * math.log1p(math.exp(-1.0)) + 0.1 * math.log1p(math.exp(1.0))
    assert float(smoothed[0]) == pytest.approx(expected, abs=1e-6)


def test_soft_labels_smooth_each_pair_by_hand() -> None:
    t = torch.tensor
    # Labels p = (1, 0.8, 0.5) with the run's smoothing 0.1: P(chosen better) = 0.9p + 0.1(1-p)
    # = (0.9, 0.74, 0.5), so the pairs' smoothing is (0.1, 0.26, 0.5).
    smoothing = dpo.pair_smoothing(t([1.0, 0.8, 0.5]), 0.1)
    assert smoothing.tolist() == pytest.approx([0.1, 0.26, 0.5], abs=1e-6)
    assert dpo.pair_smoothing(t([1.0, 0.8]), 0.0).tolist() == pytest.approx([0.0, 0.2], abs=1e-6)
    # Three copies of the hand-computed pair above (logits = 1), one smoothing each.
    losses, _, _ = dpo.dpo_loss(
        t([-1.0] * 3), t([-3.0] * 3), t([-2.0] * 3), t([-2.0] * 3), 0.5, smoothing
    )
    good, bad = math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))
    expected = [(1 - e) * good + e * bad for e in (0.1, 0.26, 0.5)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)


def test_completion_tokens_end_with_eos_and_exclude_prompt() -> None:
    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer(pad_equals_eos=True)
    [(prompt, chosen, rejected)] = dpo.tokenize_pairs(
        tok, [dpo.PreferencePair("hi", "yes", "no")], 256, 512
    )
    assert chosen[-1] == tok.eos_token_id and rejected[-1] == tok.eos_token_id
    assert tok.decode(chosen[:-1]) == "yes"
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    ids, attention, completion = dpo._collate(
        [(prompt, chosen, rejected)], tok.pad_token_id, torch.device("cpu")
    )
    # Completion positions hold exactly the completion tokens, padding is not attended.
    assert ids[0][completion[0]].tolist() == chosen
    assert ids[1][completion[1]].tolist() == rejected
    assert int(attention[1].sum()) == len(prompt) + len(rejected)


def test_dpo_raises_chosen_over_rejected_margin(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    hooks = RecordingHooks()
    result = dpo.train_dpo(config(), policy_dir, PAIRS, tmp_path / "out", tmp_path / "ckpt", hooks)
    assert result.steps == 4
    losses = hooks.series("loss/dpo")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert losses[-1] < losses[0]
    margins = hooks.series("rewards/margins")
    assert margins[-1] > margins[0]
    assert hooks.series("rewards/accuracy")[-1] == 1.0
    for _, values in hooks.metric_calls:
        assert {
            "loss/dpo",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracy",
        } <= set(values)
    assert margin(result.output_dir) > margin(policy_dir) + 1.0


def test_dpo_resume_equals_uninterrupted(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy")
    cfg = config(checkpoint_every=3)
    full = dpo.train_dpo(cfg, policy_dir, PAIRS, tmp_path / "a", tmp_path / "ca")
    with pytest.raises(Cancelled):
        dpo.train_dpo(cfg, policy_dir, PAIRS, tmp_path / "b", tmp_path / "cb", RecordingHooks(2))
    hooks = RecordingHooks()
    resumed = dpo.train_dpo(cfg, policy_dir, PAIRS, tmp_path / "b", tmp_path / "cb", hooks)
    assert [c[0] for c in hooks.progress_calls] == [2, 3, 4]
    assert hooks.progress_calls[0][2] == "resumed from the checkpoint at step 2"
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    ma = AutoModelForCausalLM.from_pretrained(str(full.output_dir)).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(str(resumed.output_dir)).state_dict()
    for name, tensor in ma.items():
        assert torch.allclose(tensor, mb[name], atol=1e-6), name


def test_dpo_lora_reference_is_base_and_output_is_merged(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    hooks = RecordingHooks()
    cfg = config(epochs=1, use_lora=True, lora_r=4, lora_alpha=8, learning_rate=2e-2)
    result = dpo.train_dpo(cfg, policy_dir, PAIRS, tmp_path / "out", tmp_path / "ckpt", hooks)
    losses = hooks.series("loss/dpo")
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)
    assert losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(str(result.output_dir))
    assert not any("lora" in k for k in model.state_dict())
    assert margin(result.output_dir) > margin(policy_dir)


def test_dpo_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        dpo.train_dpo(config(label_smoothing=0.7), tmp_path, PAIRS, tmp_path / "o", tmp_path)
    with pytest.raises(ValueError):
        dpo.train_dpo(config(), tmp_path, [], tmp_path / "o", tmp_path)
