"""PPO: each piece against hand-computed values, then short end-to-end runs on tiny models."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification

from app.ml import ppo, rollout
from app.ml.decode import LlamaDecoder
from app.ml.generation import MIN_SHARED_PREFIX, _shared_prefix_length
from app.ml.hooks import Cancelled, RecordingHooks
from tests.tiny_models import make_tokenizer, save_tiny_model

E, P = 9, 0  # EOS and a distinct pad id for the tensor tests

PROMPTS = [
    "hi",
    "Explain how a reward model learns",
    "What is the capital of France?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem"}],
]

# The rule-based "rater" rewards tokens from a fixed tenth of the vocabulary.
REWARDED = range(100, 132)


def count_rewarded(_messages: list, _texts: list[str], ids: list[list[int]]) -> list[float]:
    return [float(sum(t in REWARDED for t in row)) for row in ids]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two cores shared with other jobs: tiny matmuls run far faster single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides: object) -> ppo.PPOConfig:
    values: dict[str, object] = dict(
        total_steps=3,
        batch_size=8,
        mini_batch_size=4,
        ppo_epochs=2,
        max_new_tokens=6,
        learning_rate=1e-2,
        temperature=1.0,
        missing_eos_penalty=None,
        kl_coef=0.05,
        sample_every=2,
        device="cpu",
    )
    values.update(overrides)
    return ppo.PPOConfig(**values)  # type: ignore[arg-type]


def save_tiny_reward_model(path: Path, pad_equals_eos: bool = True) -> Path:
    tok = make_tokenizer(pad_equals_eos=pad_equals_eos)
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---- response masks and first-EOS truncation ---------------------------------------------------


def test_response_mask_ends_at_first_eos_when_pad_equals_eos() -> None:
    # pad == EOS: rows are right-padded with EOS after the real end; row 2 has a second EOS
    # later on and row 3 never ends.
    responses = torch.tensor([[5, 7, E, E, E], [5, E, 3, E, E], [4, 4, 4, 4, 4]])
    mask = rollout.response_mask(responses, E)
    assert mask.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]
    truncated, mask2 = rollout.first_eos_truncate(responses, E, pad_token_id=P)
    assert torch.equal(mask, mask2)
    assert truncated.tolist() == [[5, 7, E, P, P], [5, E, P, P, P], [4, 4, 4, 4, 4]]


def test_response_mask_eos_first_token() -> None:
    mask = rollout.response_mask(torch.tensor([[E, 3, 4]]), E)
    assert mask.tolist() == [[True, False, False]]


# ---- per-token rewards ------------------------------------------------------------------------


def test_compute_rewards_right_padding_by_hand() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, -7.0, -7.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 3.0], [-2.0, -0.5, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0])
    rewards, non_score, kl = ppo.compute_rewards(scores, logprobs, ref, mask, beta=0.1)
    # kl = logp - ref on real tokens: row 0 [0.5, -1.0, 0.0], row 1 [1.0, -0.5].
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0], [1.0, -0.5, 0.0, 0.0]]))
    assert torch.allclose(non_score, torch.tensor([[-0.05, 0.1, 0.0, 0.0], [-0.1, 0.05, 0.0, 0.0]]))
    # Score on the last real token (index 2 and 1), not on the last column.
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-0.1, -0.95, 0.0, 0.0]]))


def test_compute_rewards_left_padding_places_score_on_last_real_token() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.bool)
    zeros = torch.zeros(2, 4)
    rewards, _, _ = ppo.compute_rewards(torch.tensor([3.0, 4.0]), zeros, zeros, mask, 0.2)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 4.0]]


def test_score_placement_with_pad_equal_to_eos() -> None:
    # The sampler pads finished rows with pad == EOS; the score must land on the FIRST EOS
    # (the response's last real token), not on the last EOS-valued column.
    responses = torch.tensor([[5, E, E, E], [5, 6, 7, E]])
    _, mask = rollout.first_eos_truncate(responses, E, pad_token_id=E)
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0, -2.0, -2.0], [-1.0, -1.0, -1.0, -1.5]])
    rewards, _, kl = ppo.compute_rewards(torch.tensor([1.0, 2.0]), lp, ref, mask, beta=0.5)
    assert torch.allclose(rewards[0], torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    assert torch.allclose(rewards[1], torch.tensor([0.0, 0.0, 0.0, 1.75]))
    assert torch.allclose(kl.sum(1), torch.tensor([2.0, 0.5]))


# ---- GAE ------------------------------------------------------------------------------------


def reference_gae(
    values: list[float], rewards: list[float], length: int, gamma: float, lam: float
) -> tuple[list[float], list[float]]:
    """The textbook recursion written out one real token at a time."""
    adv = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, [a + v for a, v in zip(adv, values[:length], strict=True)]


def test_gae_matches_hand_written_loop_on_2x4() -> None:
    values = torch.tensor([[0.5, -0.2, 0.1, 0.3], [1.0, 0.4, 7.0, 7.0]])
    rewards = torch.tensor([[0.0, 0.1, -0.2, 1.5], [-0.1, 2.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae_advantages(values, rewards, mask, gamma, lam)
    for row, length in ((0, 4), (1, 2)):
        exp_adv, exp_ret = reference_gae(
            values[row].tolist(), rewards[row].tolist(), length, gamma, lam
        )
        assert adv[row, :length].tolist() == pytest.approx(exp_adv, abs=1e-6)
        assert ret[row, :length].tolist() == pytest.approx(exp_ret, abs=1e-6)
        assert adv[row, length:].abs().sum() == 0  # padding (with big junk values) ignored
    # One entry by hand, gamma=1, lam=0.95 defaults: row 1, t=1 is terminal:
    # delta = 2.0 - 0.4 = 1.6; t=0: delta = -0.1 + 0.4 - 1.0 = -0.7, adv = -0.7 + 0.95 * 1.6.
    adv_default, _ = ppo.gae_advantages(values, rewards, mask)
    assert adv_default[1, :2].tolist() == pytest.approx([-0.7 + 0.95 * 1.6, 1.6], abs=1e-6)


# ---- whitening ------------------------------------------------------------------------------


def test_masked_whiten_by_hand_and_ignores_padding() -> None:
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    out = ppo.masked_whiten(values, mask)
    # Real values 1, 2, 3: mean 2, unbiased variance 1 -> -1, 0, 1.
    assert out[mask].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert out[~mask].abs().sum() == 0
    junk = values.clone()
    junk[~mask] = torch.tensor([1e6, -3.0, 7.0])
    assert torch.equal(ppo.masked_whiten(junk, mask), out)
    unshifted = ppo.masked_whiten(values, mask, shift_mean=False)
    assert unshifted[mask].tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)


# ---- clipped losses ---------------------------------------------------------------------------


def test_policy_loss_by_hand() -> None:
    ratios = torch.tensor([[1.5, 0.5, 1.1, 3.0]])
    new = torch.log(ratios)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = ppo.policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped);
    # token 2: max(-2.2, -2.2) = -2.2 (not clipped); token 3 is padding.
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-6)
    assert float(stats["clipfrac"]) == pytest.approx(2 / 3)
    assert float(stats["ratio"]) == pytest.approx((1.5 + 0.5 + 1.1) / 3, abs=1e-6)
    logs = [math.log(1.5), math.log(0.5), math.log(1.1)]
    assert float(stats["approxkl"]) == pytest.approx(0.5 * sum(x * x for x in logs) / 3, 1e-5)


def test_value_loss_by_hand() -> None:
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.5, 0.1, 40.0]])
    returns = torch.tensor([[1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    loss, clipfrac = ppo.value_loss(new, old, returns, mask, cliprange_value=0.2)
    # token 0: clipped value 0.2 -> max(0.25, 0.64) = 0.64; token 1: max(1.21, 1.21).
    assert float(loss) == pytest.approx(0.5 * (0.64 + 1.21) / 2, abs=1e-6)
    assert float(clipfrac) == pytest.approx(0.5)
    # A move inside the range is never counted, whatever the two losses' last bits say.
    old, new = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.15, -0.5]])
    both = torch.ones(1, 2, dtype=torch.bool)
    _, clipfrac = ppo.value_loss(new, old, torch.tensor([[1.0, 1.0]]), both, 0.2)
    assert float(clipfrac) == 0.0  # token 1 is clipped but the clip lowers its loss


# ---- KL controllers -----------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand() -> None:
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(12.0, n_samples=10)  # error 1.0 clipped to 0.2 -> x(1 + 0.02)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(3.0, n_samples=10)  # error -0.5 clipped to -0.2 -> x(1 - 0.02)
    assert ctl.value == pytest.approx(0.102 * 0.98)
    ctl.update(6.6, n_samples=100)  # error 0.1 inside the clip -> x1.1
    assert ctl.value == pytest.approx(0.102 * 0.98 * 1.1)
    restored = ppo.AdaptiveKLController(1.0, 6.0, 100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = ppo.FixedKLController(0.3)
    fixed.update(100.0, 10)
    assert fixed.value == 0.3


# ---- sampler and forward pass agree -------------------------------------------------------


@pytest.mark.parametrize("system", [False, True], ids=["own-prompts", "shared-system-prompt"])
@pytest.mark.parametrize("decoder", [True, False], ids=["llama-decoder", "generic-forward"])
def test_sampler_logprobs_match_training_forward_with_left_padding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, system: bool, decoder: bool
) -> None:
    model_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    tok = ppo.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    assert LlamaDecoder.supports(model)
    if not decoder:
        monkeypatch.setattr(LlamaDecoder, "supports", staticmethod(lambda model: False))
    messages = [ppo.as_messages(p) for p in PROMPTS]
    if system:  # the sampler then prefills the shared prefix once for all rows
        rule = {"role": "system", "content": "Answer briefly, kindly and only in plain words."}
        messages = [[rule, *m] for m in messages]
    queries = ppo.encode_prompts(tok, messages, 256)  # long enough to keep every system prompt
    assert len({len(q) for q in queries}) > 1  # real left padding happens
    assert (_shared_prefix_length(queries) >= MIN_SHARED_PREFIX) == system
    ids, qmask = ppo.left_pad(queries, tok.pad_token_id, torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    raw, sampled_lp = rollout.sample_responses(
        model, ids, qmask, 8, 0.7, tok.eos_token_id, tok.pad_token_id, gen
    )
    responses, mask = rollout.first_eos_truncate(raw, tok.eos_token_id, tok.pad_token_id)
    full = torch.cat([ids, responses], 1)
    attention = torch.cat([qmask, mask.long()], 1)
    lp, entropy = ppo.forward_logprobs(model, full, attention, ids.shape[1], 0.7, True)
    assert torch.allclose(lp[mask], sampled_lp[mask], atol=1e-4)
    assert entropy is not None and torch.isfinite(entropy[mask]).all()
    # The temperature really divides the logits: at 1.0 the same tokens score differently.
    lp1, _ = ppo.forward_logprobs(model, full, attention, ids.shape[1], 1.0)
    assert not torch.allclose(lp1[mask], lp[mask], atol=1e-3)


def test_trimmed_slice_scores_exactly_like_the_full_width_batch(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    tok = ppo.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    prompts = ["hi", "a much longer prompt with many more words in it than the first one"]
    queries = ppo.encode_prompts(tok, [ppo.as_messages(p) for p in prompts], 64)
    ids, qmask = ppo.left_pad(queries, tok.pad_token_id, torch.device("cpu"))
    eos = tok.eos_token_id
    # Row 0 ends after 2 tokens, row 1 after 4, in a batch 8 response tokens wide.
    responses = torch.tensor([[5, eos] + [eos] * 6, [6, 7, 8, eos] + [eos] * 4])
    responses, mask = rollout.first_eos_truncate(responses, eos, tok.pad_token_id)
    full = torch.cat([ids, responses], 1)
    attention = torch.cat([qmask, mask.long()], 1)
    ctx = ids.shape[1]
    whole, _ = ppo.forward_logprobs(model, full, attention, ctx, 0.7)

    # The short row alone: its prompt padding and the columns after its EOS go.
    t_ids, t_att, t_ctx, length = rollout.trim_padding(full[:1], attention[:1], ctx)
    assert (t_ctx, length) == (len(queries[0]), 2)
    assert t_att.all()
    alone, _ = ppo.forward_logprobs(model, t_ids, t_att, t_ctx, 0.7)
    assert torch.allclose(alone, whole[:1, :length], atol=1e-5)
    # Both rows: nothing of the prompt can go; the response keeps the longest one's length.
    t_ids, t_att, t_ctx, length = rollout.trim_padding(full, attention, ctx)
    assert (t_ctx, length, t_ids.shape[1]) == (ctx, 4, ctx + 4)
    value_model = LlamaForSequenceClassification.from_pretrained(
        str(save_tiny_reward_model(tmp_path / "rm"))
    ).eval()
    trimmed_values = ppo.token_values(value_model, t_ids, t_att)[:, t_ctx - 1 : -1]
    full_values = ppo.token_values(value_model, full, attention)[:, ctx - 1 : -1]
    assert torch.allclose(trimmed_values[mask[:, :4]], full_values[mask], atol=1e-5)


def test_skinny_decode_linears_match_f_linear_and_restore_the_layers(tmp_path: Path) -> None:
    from torch import nn

    from app.ml.generation import skinny_decode_linears

    model = AutoModelForCausalLM.from_pretrained(str(save_tiny_model(tmp_path / "p"))).eval()
    x = torch.randn(4, 3, model.config.hidden_size)
    layer = model.model.layers[0].mlp.gate_proj
    with skinny_decode_linears(model):
        assert "forward" in vars(layer)  # the few-row path is really in place
        for rows in (x[:1, :1], x[:, :1], x[:, :2], x):  # 1, 4, 8 and 12 rows
            out = layer(rows)
            assert torch.allclose(out, nn.functional.linear(rows, layer.weight), atol=1e-5)
            # Row-major, like F.linear's: a transposed layout would slow the layers after it.
            assert out.is_contiguous()
        with skinny_decode_linears(model):  # nested: the inner block leaves the outer's alone
            pass
        assert "forward" in vars(layer)
    assert not any("forward" in vars(m) for m in model.modules())


def test_inverse_cdf_sampler_draws_from_the_distribution() -> None:
    from app.ml.generation import inverse_cdf_sample

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 0.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [inverse_cdf_sample(probs, torch.rand(2, generator=gen)) for _ in range(20000)]
    )
    counts = torch.stack([torch.bincount(draws[:, r], minlength=5) for r in range(2)])
    assert counts[0, [0, 2]].sum() == 0  # a zero-probability token is never drawn
    assert torch.allclose(counts[0].float() / 20000, probs[0], atol=0.015)
    assert (draws[:, 1] == 4).all()
    # Unnormalised rows work too (the draw is scaled by each row's total), and a uniform of 0
    # still skips a leading zero-probability entry.
    assert inverse_cdf_sample(torch.tensor([[0.0, 3.0]]), torch.zeros(1)).item() == 1


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_reusing_the_rollout_value_pass_changes_nothing(tmp_path: Path, use_lora: bool) -> None:
    """The first minibatch of epoch one trains on the rollout's value graph; same trajectory."""
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    rm_dir = save_tiny_reward_model(tmp_path / "rm")
    results = {}
    for reuse in (True, False):
        config = tiny_config(
            total_steps=2,
            gradient_accumulation_steps=2,  # two micro-batches per minibatch, two minibatches
            rollout_forward_batch_size=3,  # the unreused rows in chunks of another size
            use_lora=use_lora,
            lora_r=4,
            lora_alpha=8,
            learning_rate=1e-3,
            reuse_rollout_values=reuse,
        )
        results[reuse] = ppo.train_ppo(
            config, policy_dir, str(rm_dir), PROMPTS, tmp_path / f"o{reuse}",
            tmp_path / f"c{reuse}",
        )  # fmt: skip
    reused, recomputed = results[True], results[False]
    for a, b in zip(reused.history, recomputed.history, strict=True):
        same = [k for k in a if not k.startswith("time/")]
        assert [a[k] for k in same] == pytest.approx([b[k] for k in same], rel=1e-4, abs=1e-5)
    assert reused.history[-1]["loss/value"] != 0.0  # the value model did train
    ma = AutoModelForCausalLM.from_pretrained(str(reused.output_dir)).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(str(recomputed.output_dir)).state_dict()
    for name, tensor in ma.items():
        assert torch.allclose(tensor, mb[name], atol=1e-5), name


def test_merged_lora_sampler_refuses_dora(tmp_path: Path) -> None:
    from peft import get_peft_model

    base = AutoModelForCausalLM.from_pretrained(str(save_tiny_model(tmp_path / "policy")))
    sampler = ppo.MergedLoraSampler(base)
    config = ppo.lora_config(4, 8, "all-linear", "CAUSAL_LM")
    config.use_dora = True  # its merge rescales W + BA per column: not W + BA
    with pytest.raises(ValueError, match="only plain LoRA"):
        sampler.attach(get_peft_model(base, config))


def test_merged_lora_sampler_scores_like_the_adapted_policy(tmp_path: Path) -> None:
    from peft import get_peft_model

    model_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    tok = ppo.load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    pristine = {k: v.clone() for k, v in base.state_dict().items()}
    sampler = ppo.MergedLoraSampler(base)
    policy = get_peft_model(base, ppo.lora_config(4, 8, "all-linear", "CAUSAL_LM")).eval()
    sampler.attach(policy)
    queries = ppo.encode_prompts(tok, [ppo.as_messages(p) for p in PROMPTS], 64)
    ids, qmask = ppo.left_pad(queries, tok.pad_token_id, torch.device("cpu"))
    for seed in (1, 2):  # the adapter moves between rollouts; each sync follows it
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.5)
        merged = sampler.sync()
        gen = torch.Generator().manual_seed(seed)
        raw, sampled_lp = rollout.sample_responses(
            merged, ids, qmask, 8, 0.7, tok.eos_token_id, tok.pad_token_id, gen
        )
        responses, mask = rollout.first_eos_truncate(raw, tok.eos_token_id, tok.pad_token_id)
        full = torch.cat([ids, responses], 1)
        attention = torch.cat([qmask, mask.long()], 1)
        lp, _ = ppo.forward_logprobs(policy, full, attention, ids.shape[1], 0.7)
        assert torch.allclose(lp[mask], sampled_lp[mask], atol=1e-4)
        with policy.disable_adapter():
            ref_lp, _ = ppo.forward_logprobs(policy, full, attention, ids.shape[1], 0.7)
        assert not torch.allclose(ref_lp[mask], lp[mask], atol=1e-3)  # the adapter matters
    # The policy's own base weights (the reference) were never written.
    for name, param in policy.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if key in pristine:
            assert torch.equal(param, pristine[key]), name


# ---- end to end -------------------------------------------------------------------------------


def test_ppo_raises_rule_based_reward_and_keeps_kl_bounded(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    config = tiny_config(
        total_steps=8, batch_size=16, mini_batch_size=8, ppo_epochs=4, max_new_tokens=8
    )
    hooks = RecordingHooks()
    seen_tables: list[int] = []
    result = ppo.train_ppo(
        config,
        policy_dir,
        count_rewarded,
        PROMPTS,
        tmp_path / "out",
        tmp_path / "ckpt",
        hooks,
        on_samples=lambda step, table: seen_tables.append(step),
    )
    scores = hooks.series("objective/scores")
    kls = hooks.series("objective/kl")
    rlhf = hooks.series("objective/rlhf_reward")
    assert len(scores) == config.total_steps
    assert sum(scores[-2:]) / 2 >= sum(scores[:2]) / 2 + 1.0
    assert sum(rlhf[-2:]) > sum(rlhf[:2])  # the KL-penalised objective rose, not just the score
    assert abs(kls[0]) < 1e-4  # the first rollout comes from the reference itself
    # A policy emitting only rewarded tokens would sit ~max_new_tokens*log(10) = 18 nats away.
    assert max(kls) < 0.75 * config.max_new_tokens * math.log(10)

    names = {
        "objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
        "policy/entropy", "policy/clipfrac", "policy/approxkl", "val/ratio", "val/clipfrac",
        "loss/policy", "loss/value", "response/length", "response/eos_rate", "objective/beta",
        "time/rollout", "time/update",
    }  # fmt: skip
    for _, values in hooks.metric_calls:
        assert names <= set(values)
        assert all(math.isfinite(v) for v in values.values())
    assert [c[0] for c in hooks.progress_calls] == list(range(1, 9))
    assert sorted(result.samples) == seen_tables == [1, 3, 5, 7, 8]
    row = result.samples[8][0]
    assert set(row) == {"prompt", "response", "score"} and isinstance(row["response"], str)

    trained = AutoModelForCausalLM.from_pretrained(str(result.output_dir))
    start = AutoModelForCausalLM.from_pretrained(str(policy_dir))
    assert not torch.allclose(trained.lm_head.weight, start.lm_head.weight)
    assert (result.output_dir / "tokenizer.json").exists()


def test_resume_equals_uninterrupted(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    config = tiny_config(total_steps=3, adaptive_kl=True, target_kl=0.5, kl_horizon=50)
    full = ppo.train_ppo(
        config, policy_dir, count_rewarded, PROMPTS, tmp_path / "a", tmp_path / "ca", None
    )

    with pytest.raises(Cancelled):
        ppo.train_ppo(
            config,
            policy_dir,
            count_rewarded,
            PROMPTS,
            tmp_path / "b",
            tmp_path / "cb",
            RecordingHooks(stop_after_progress=1),
        )
    assert (tmp_path / "cb" / ppo.CHECKPOINT_FILE).exists()
    assert not (tmp_path / "b").exists()
    hooks = RecordingHooks()
    resumed = ppo.train_ppo(
        config, policy_dir, count_rewarded, PROMPTS, tmp_path / "b", tmp_path / "cb", hooks
    )
    assert [c[0] for c in hooks.progress_calls] == [1, 2, 3]
    assert hooks.progress_calls[0][2] == "resumed from the checkpoint at step 1"
    for a, b in zip(full.history, resumed.history, strict=True):
        assert set(a) == set(b)
        same = [k for k in a if not k.startswith("time/")]  # wall-clock seconds differ
        assert [a[k] for k in same] == pytest.approx([b[k] for k in same], rel=1e-5, abs=1e-6)
    assert full.history[-1]["objective/beta"] != config.kl_coef  # adaptive state was carried
    assert resumed.samples == full.samples
    ma = AutoModelForCausalLM.from_pretrained(str(full.output_dir)).state_dict()
    mb = AutoModelForCausalLM.from_pretrained(str(resumed.output_dir)).state_dict()
    for name, tensor in ma.items():
        assert torch.allclose(tensor, mb[name], atol=1e-6), name


def test_resume_refuses_changed_settings(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy")
    config = tiny_config(total_steps=1, ppo_epochs=1)
    ppo.train_ppo(config, policy_dir, count_rewarded, PROMPTS, tmp_path / "o", tmp_path / "c")
    with pytest.raises(ValueError, match="learning_rate"):
        ppo.train_ppo(
            tiny_config(total_steps=2, ppo_epochs=1, learning_rate=1e-3),
            policy_dir,
            count_rewarded,
            PROMPTS,
            tmp_path / "o",
            tmp_path / "c",
        )


def test_missing_eos_penalty_applies_to_unfinished_responses(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    hooks = RecordingHooks()
    config = tiny_config(total_steps=1, ppo_epochs=1, max_new_tokens=3, missing_eos_penalty=2.5)
    ppo.train_ppo(
        config,
        policy_dir,
        lambda m, t, i: torch.ones(len(t)),
        PROMPTS,
        tmp_path / "o",
        tmp_path / "c",
        hooks,
    )
    (_, values), = hooks.metric_calls  # fmt: skip
    # A random 3-token response almost never holds EOS; the check holds whatever the rate.
    expected = 1.0 - 2.5 * (1.0 - values["response/eos_rate"])
    assert values["objective/scores"] == pytest.approx(expected)
    assert values["response/eos_rate"] < 1.0


def test_reward_model_with_lora_shares_weights_and_merges(tmp_path: Path) -> None:
    policy_dir = save_tiny_model(tmp_path / "policy", pad_equals_eos=True)
    rm_dir = save_tiny_reward_model(tmp_path / "rm")
    hooks = RecordingHooks()
    config = tiny_config(total_steps=2, use_lora=True, lora_r=4, lora_alpha=8)
    result = ppo.train_ppo(
        config, policy_dir, str(rm_dir), PROMPTS, tmp_path / "out", tmp_path / "ckpt", hooks
    )
    kls = hooks.series("objective/kl")
    assert abs(kls[0]) < 1e-4  # reference = adapter-disabled policy = the start
    assert kls[1] != 0.0  # and the adapters did move the policy

    # Scores equal what the plain reward model gives for the sampled texts: the value
    # adapter was disabled while scoring, so the RM was untouched by value training.
    rm = ppo.load_reward_model(rm_dir).model
    scorer = ppo.RewardModelScorer(rm, ppo.load_tokenizer(rm_dir), 1024, 8)
    for step, table in result.samples.items():
        prompts = [ppo.as_messages(next(p for p in PROMPTS if _last(p) == r["prompt"]))
                   for r in table]  # fmt: skip
        expected = scorer(prompts, [r["response"] for r in table], torch.device("cpu"))
        got = torch.tensor([r["score"] for r in table])
        assert torch.allclose(got, expected, atol=1e-4), step

    out = result.output_dir
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in k for k in model.state_dict())
    assert not (out / "adapter_config.json").exists()
    start = AutoModelForCausalLM.from_pretrained(str(policy_dir))
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight,
                              start.model.layers[0].self_attn.q_proj.weight)  # fmt: skip


def _last(prompt: object) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]  # type: ignore[index]


def test_encode_prompts_keeps_the_end_and_handles_no_template() -> None:
    tok = make_tokenizer(pad_equals_eos=True)
    [ids] = ppo.encode_prompts(tok, [ppo.as_messages("What is the capital of France?")], 4)
    full = ppo.encode_prompts(tok, [ppo.as_messages("What is the capital of France?")], 512)[0]
    assert ids == full[-4:]  # the start is cut, the generation prompt survives
    assert tok.decode(full).endswith("<|im_start|>assistant\n")
    tok.chat_template = None
    [plain] = ppo.encode_prompts(tok, [ppo.as_messages("hi")], 512)
    assert tok.decode(plain) == "hi\n\n"
