"""In-place gradients of the vocabulary matrices give what plain autograd gives."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from app.ml import ppo, vocab_grads
from app.ml.policy import _causal_lm_parts, position_ids_from_mask

VOCAB, CTX, TEMPERATURE = 50, 7, 0.7


def tiny_pair(tied: bool) -> tuple[LlamaForCausalLM, LlamaForSequenceClassification]:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=0,
        num_labels=1,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), LlamaForSequenceClassification(config).eval()


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(1, VOCAB, (2, 12))
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding in one row
        batches.append((ids, mask))
    return batches


def plain_losses(policy: LlamaForCausalLM, value_model: LlamaForSequenceClassification) -> None:
    """The same losses through Hugging Face's own forward: F.embedding, nn.Linear, autograd."""
    for ids, mask in micro_batches():
        positions = position_ids_from_mask(mask)
        logits = policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        logp = torch.log_softmax(logits[:, CTX - 1 : -1] / TEMPERATURE, -1)
        logprobs = logp.gather(2, ids[:, CTX:, None]).squeeze(-1)
        hidden = value_model.model(
            input_ids=ids, attention_mask=mask, position_ids=positions
        ).last_hidden_state
        values = value_model.score(hidden).squeeze(-1)[:, CTX - 1 : -1]
        (logprobs * torch.arange(5.0)).sum().backward()
        values.square().sum().backward()


def fast_losses(policy: LlamaForCausalLM, value_model: LlamaForSequenceClassification) -> None:
    for ids, mask in micro_batches():
        logprobs, _ = ppo.forward_logprobs(policy, ids, mask, CTX, TEMPERATURE)
        values = ppo.token_values(value_model, ids, mask)[:, CTX - 1 : -1]
        (logprobs * torch.arange(5.0)).sum().backward()
        values.square().sum().backward()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_in_place_vocab_gradients_equal_plain_autograd(tied: bool) -> None:
    policy, value_model = tiny_pair(tied)
    plain_losses(policy, value_model)
    expected = {
        (m, n): p.grad.clone()
        for m, model in (("policy", policy), ("value", value_model))
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    policy.zero_grad(set_to_none=True)
    value_model.zero_grad(set_to_none=True)

    assert _causal_lm_parts(policy) is not None  # the in-place path really runs
    fast_losses(policy, value_model)
    got = {
        (m, n): p.grad
        for m, model in (("policy", policy), ("value", value_model))
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    assert got.keys() == expected.keys()
    for key, grad in expected.items():
        assert torch.allclose(got[key], grad, rtol=1e-5, atol=1e-6), key
    embedding = policy.get_input_embeddings().weight
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0

    # Tied matrices count once; the value model has no output projection of its own.
    vocab = ppo.vocab_matrices(policy, value_model)
    assert len(vocab) == (2 if tied else 3)
    buffers = {id(w): w.grad for w in vocab}
    params = list(policy.parameters()) + list(value_model.parameters())
    vocab_grads.zero_grad(params, keep=vocab)
    for w in vocab:
        assert w.grad is buffers[id(w)] and not w.grad.any()  # same buffer, zeroed
    rest = [p for p in params if all(p is not w for w in vocab)]
    assert all(p.grad is None for p in rest)

    # The next step's gradients, summed into the kept buffers, are again plain autograd's.
    fast_losses(policy, value_model)
    for (m, n), grad in expected.items():
        model = policy if m == "policy" else value_model
        got_grad = dict(model.named_parameters())[n].grad
        assert got_grad is not None and torch.allclose(got_grad, grad, rtol=1e-5, atol=1e-6)


def test_frozen_vocab_matrices_get_no_gradient_but_the_rest_does() -> None:
    policy, value_model = tiny_pair(tied=True)
    policy.get_input_embeddings().weight.requires_grad_(False)
    value_model.get_input_embeddings().weight.requires_grad_(False)
    plain_losses(policy, value_model)
    expected = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    fast_losses(policy, value_model)
    assert policy.get_input_embeddings().weight.grad is None
    assert value_model.get_input_embeddings().weight.grad is None
    assert ppo.vocab_matrices(policy, value_model) == []
    for name, grad in expected.items():
        got = dict(policy.named_parameters())[name].grad
        assert got is not None and torch.allclose(got, grad, rtol=1e-5, atol=1e-6), name


def test_models_with_a_processed_head_keep_their_own_forward() -> None:
    policy, _ = tiny_pair(tied=True)
    policy.config.model_type = "gemma2"  # final-logit softcapping follows its lm_head
    assert _causal_lm_parts(policy) is None
