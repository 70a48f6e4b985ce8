"""Reward model training on tiny random models: learning, exactness of the fast paths, resume."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from app.ml.hooks import Cancelled, RecordingHooks
from app.ml.loading import load_tokenizer
from app.ml.preferences import PreferenceExample, split_by_prompt
from app.ml.reward import (
    RewardConfig,
    build_reward_model,
    encode_pair,
    load_reward_model,
    lower_hidden_states,
    pack_pairs,
    packed_rewards,
    preference_loss,
    rewards_at_last_token,
    score_responses,
    train_reward_model,
    upper_rewards,
)
from tests.tiny_models import save_tiny_model

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a reward model learns.",
    "hello there",
    "def add(a, b):",
    "Answer concisely and kindly.",
]
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "yes",
    "no",
    "maybe",
    "bad",
    "better",
    "worse",
    "honest",
]
MARKER = "helpful"


def synthetic_examples(n: int, seed: int) -> list[PreferenceExample]:
    """The response that contains the marker word is the preferred one."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = rng.randrange(len(PROMPTS))
        chosen = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        chosen.insert(rng.randint(0, len(chosen)), MARKER)
        rejected = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        out.append(
            PreferenceExample(
                prompt=[{"role": "user", "content": f"{PROMPTS[p]} #{i % 5}"}],
                chosen=" ".join(chosen),
                rejected=" ".join(rejected),
                group=f"{p}-{i % 5}",
            )
        )
    return out


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # pad == eos, like SmolLM2: the case where "the first pad" would be the wrong token.
    return save_tiny_model(tmp_path_factory.mktemp("base") / "lm", pad_equals_eos=True)


def tiny_config(backbone: Path, **overrides: object) -> RewardConfig:
    values: dict[str, object] = {
        "backbone": str(backbone),
        "learning_rate": 3e-3,
        "batch_size": 8,
        "epochs": 2,
        "warmup_ratio": 0.0,
        "eval_every": 4,
        "last_n_layers": 1,
    }
    values.update(overrides)
    return RewardConfig(**values)  # type: ignore[arg-type]


# --- learning ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "lora", "last_n"])
def test_tiny_model_learns_marker_preference(backbone: Path, tmp_path: Path, mode: str) -> None:
    train, val = synthetic_examples(64, seed=0), synthetic_examples(32, seed=1)
    hooks = RecordingHooks()
    result = train_reward_model(
        tiny_config(backbone, train_mode=mode), train, val, tmp_path / "rm", hooks=hooks
    )

    losses = hooks.series("loss/train")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.1
    assert result.best_val_accuracy is not None and result.best_val_accuracy >= 0.9
    assert hooks.series("accuracy/val")[-1] >= 0.9
    assert [call[0] for call in hooks.progress_calls] == list(range(1, result.steps + 1))
    for name in ("accuracy/train", "margin/mean", "lr", "calibration/ece", "loss/val"):
        assert hooks.series(name), name

    before = load_file(str(backbone / "model.safetensors"))
    after = load_file(str(tmp_path / "rm" / "model.safetensors"))
    top, bottom = "model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(before[top], after[top])  # LoRA is merged into the saved weights
    if mode == "last_n":
        assert torch.equal(before[bottom], after[bottom])
        assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    else:
        assert not torch.equal(before[bottom], after[bottom])


def test_soft_label_and_margin_loss() -> None:
    d = torch.tensor([2.0, -1.0])
    zero = torch.zeros(2)
    hard = preference_loss(d, zero, zero, torch.ones(2))
    assert torch.allclose(hard, -torch.nn.functional.logsigmoid(d))
    tie = preference_loss(d, zero, zero, torch.full((2,), 0.5))
    assert torch.allclose(tie, preference_loss(-d, zero, zero, torch.full((2,), 0.5)))
    with_margin = preference_loss(d, zero, torch.ones(2), torch.ones(2))
    assert torch.allclose(with_margin, -torch.nn.functional.logsigmoid(d - 1))


# --- exactness of the reward read-out and the fast paths -----------------------------------


def _model(backbone: Path, mode: str = "full") -> tuple[object, object]:
    tokenizer = load_tokenizer(backbone)
    model, _ = build_reward_model(tiny_config(backbone, train_mode=mode), tokenizer)
    # A nonzero bias-free head with larger weights makes differences visible.
    torch.nn.init.normal_(model.score.weight, std=1.0)
    return model, tokenizer


def _separate_reward(model: object, ids: list[int]) -> float:
    """The plain computation: one unpadded sequence, reward at its last token."""
    out = model(input_ids=torch.tensor([ids]))  # type: ignore[operator]
    return float(out.logits[0, 0])


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_real_token_reward_ignores_padding(backbone: Path, side: str) -> None:
    model, tokenizer = _model(backbone)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    texts = ["<|im_start|>user\nhello there<|im_end|>\n", "yes<|im_end|>"]
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # The second one ends in EOS == pad; "the token before the first pad" would miss it.
    assert seqs[1][-1] == tokenizer.pad_token_id
    width = max(len(s) for s in seqs)
    ids = torch.full((2, width), tokenizer.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, span] = torch.tensor(s)
        mask[i, span] = 1
    with torch.no_grad():
        batched = rewards_at_last_token(model, ids, mask)  # type: ignore[arg-type]
        alone = torch.tensor(
            [
                float(rewards_at_last_token(model, torch.tensor([s]), torch.ones(1, len(s)))[0])  # type: ignore[arg-type]
                for s in seqs
            ]
        )
        plain_first = _separate_reward(model, seqs[0])
    assert torch.allclose(batched, alone, atol=1e-5)
    assert abs(plain_first - float(alone[0])) < 1e-5


def test_shared_prefix_rows_equal_separate_sequences(backbone: Path) -> None:
    model, tokenizer = _model(backbone)
    examples = synthetic_examples(5, seed=3)
    # Edge case: one response is a prefix of the other, so the shared prefix must back off.
    examples.append(
        PreferenceExample(
            prompt=[{"role": "user", "content": "hi"}], chosen="yes", rejected="yes no"
        )
    )
    pairs = [encode_pair(tokenizer, e, max_length=512) for e in examples]
    rows = pack_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        packed = packed_rewards(model, rows)  # type: ignore[arg-type]
        separate = torch.tensor(
            [
                [
                    _separate_reward(model, p.prefix + p.chosen),
                    _separate_reward(model, p.prefix + p.rejected),
                ]
                for p in pairs
            ]
        )
    assert max(p.row_length for p in pairs) > min(
        p.row_length for p in pairs
    )  # padding is exercised
    assert all(len(p.prefix) > 0 for p in pairs)
    assert torch.allclose(packed, separate, atol=1e-5)
    # The prefix + continuation is exactly the templated conversation.
    e, p = examples[0], pairs[0]
    text = tokenizer.apply_chat_template(
        [*e.prompt, {"role": "assistant", "content": e.chosen}], tokenize=False
    )
    assert p.prefix + p.chosen == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_shared_prefix_gradients_equal_separate_sequences(backbone: Path) -> None:
    model, tokenizer = _model(backbone)
    pairs = [encode_pair(tokenizer, e, max_length=512) for e in synthetic_examples(3, seed=4)]
    packed = packed_rewards(model, pack_pairs(pairs, tokenizer.pad_token_id))  # type: ignore[arg-type]
    packed.sum().backward()
    grad_packed = model.model.layers[0].self_attn.q_proj.weight.grad.clone()  # type: ignore[attr-defined]
    model.zero_grad()  # type: ignore[attr-defined]
    total = sum(
        model(input_ids=torch.tensor([p.prefix + c])).logits[0, 0]  # type: ignore[operator]
        for p in pairs
        for c in (p.chosen, p.rejected)
    )
    total.backward()
    grad_plain = model.model.layers[0].self_attn.q_proj.weight.grad  # type: ignore[attr-defined]
    assert torch.allclose(grad_packed, grad_plain, atol=1e-5)


def test_truncation_keeps_sequences_within_max_length(backbone: Path) -> None:
    tokenizer = load_tokenizer(backbone)
    long = PreferenceExample(
        prompt=[{"role": "user", "content": "the quick brown fox " * 30}],
        chosen="yes " * 40,
        rejected="no",
    )
    pair = encode_pair(tokenizer, long, max_length=48)
    assert len(pair.prefix) + len(pair.chosen) <= 48
    assert len(pair.prefix) + len(pair.rejected) <= 48
    assert pair.prefix and pair.rejected


def test_last_n_cached_path_matches_full_forward(backbone: Path) -> None:
    model, tokenizer = _model(backbone, mode="last_n")
    pairs = [encode_pair(tokenizer, e, max_length=512) for e in synthetic_examples(4, seed=5)]
    rows = pack_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        fused = packed_rewards(model, rows)  # type: ignore[arg-type]
        hidden = lower_hidden_states(model, rows, n_frozen=1)  # type: ignore[arg-type]
        split = upper_rewards(model, hidden, rows, n_frozen=1)  # type: ignore[arg-type]
    assert torch.allclose(fused, split, atol=1e-5)


# --- split by prompt -----------------------------------------------------------------------


def test_split_by_prompt_keeps_groups_apart_and_is_seeded() -> None:
    examples = [
        PreferenceExample(
            prompt=[{"role": "user", "content": f"p{i % 20}"}], chosen="a", rejected="b"
        )
        for i in range(200)
    ]
    train, val = split_by_prompt(examples, val_fraction=0.2, seed=7)
    assert len(train) + len(val) == 200
    assert {e.group_key for e in train}.isdisjoint({e.group_key for e in val})
    assert 30 <= len(val) <= 50
    again = split_by_prompt(examples, val_fraction=0.2, seed=7)
    assert (train, val) == again
    other = split_by_prompt(examples, val_fraction=0.2, seed=8)
    assert {e.group_key for e in other[1]} != {e.group_key for e in val}


def test_split_by_prompt_uses_explicit_groups() -> None:
    examples = [
        PreferenceExample(
            prompt=[{"role": "user", "content": f"q{i}"}],
            chosen="a",
            rejected="b",
            group=f"g{i % 3}",
        )
        for i in range(30)
    ]
    train, val = split_by_prompt(examples, val_fraction=0.3, seed=0)
    assert train and val
    assert set(Counter(e.group for e in val).values()) == {10}
    assert {e.group for e in train}.isdisjoint({e.group for e in val})


# --- resume, save, load --------------------------------------------------------------------


def test_resume_after_cancel_equals_uninterrupted_run(backbone: Path, tmp_path: Path) -> None:
    train, val = synthetic_examples(24, seed=0), synthetic_examples(8, seed=1)
    config = tiny_config(
        backbone, epochs=2, grad_accumulation=2, batch_size=4, eval_every=2, warmup_ratio=0.2
    )
    straight_hooks = RecordingHooks()
    straight = train_reward_model(
        config, train, val, tmp_path / "a", hooks=straight_hooks, snapshot_id=3
    )

    ckpt_dir = tmp_path / "ckpt"
    with pytest.raises(Cancelled):
        train_reward_model(
            config,
            train,
            val,
            tmp_path / "b",
            ckpt_dir,
            RecordingHooks(stop_after_progress=4),
            snapshot_id=3,
        )
    assert (ckpt_dir / "checkpoint.pt").exists() and not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="snapshot"):
        train_reward_model(config, train, val, tmp_path / "b", ckpt_dir, snapshot_id=4)
    resumed_hooks = RecordingHooks()
    resumed = train_reward_model(
        config, train, val, tmp_path / "b", ckpt_dir, resumed_hooks, snapshot_id=3
    )

    assert resumed.steps == straight.steps
    # The resumed run says where it picked up, then counts on from there (never from 0).
    assert resumed_hooks.progress_calls[0][::2] == (4, "resumed from the checkpoint at step 4")
    assert [c[0] for c in resumed_hooks.progress_calls[1:]] == list(range(5, straight.steps + 1))
    tail = straight_hooks.metric_calls[4:]
    assert [s for s, _ in resumed_hooks.metric_calls] == [s for s, _ in tail]
    for (_, got), (_, want) in zip(resumed_hooks.metric_calls, tail, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert resumed.best_val_accuracy == straight.best_val_accuracy


def test_saved_model_loads_with_plain_transformers_and_scores_alike(
    backbone: Path, tmp_path: Path
) -> None:
    train_reward_model(
        tiny_config(backbone, train_mode="lora", epochs=1),
        synthetic_examples(16, 0),
        [],
        tmp_path / "rm",
    )
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    loaded = load_reward_model(tmp_path / "rm")
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    responses = ["Paris is the capital of France.", "yes", "no maybe helpful"]
    scores = score_responses(loaded, prompt, responses)
    assert score_responses(tmp_path / "rm", prompt, responses) == pytest.approx(scores, abs=1e-6)
    for response, score in zip(responses, scores, strict=True):
        text = loaded.tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": response}], tokenize=False
        )
        ids = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert float(plain(input_ids=ids).logits[0, 0]) == pytest.approx(score, abs=1e-5)
    assert len(set(scores)) == 3
