"""`LlamaDecoder` gives the model's own logits, and PPO's sampler draws the same tokens with it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from app.ml import policy
from app.ml.decode import LlamaDecoder
from app.ml.policy import position_ids_from_mask

VOCAB = 60


def tiny_llama(**overrides: object) -> LlamaForCausalLM:
    settings: dict[str, object] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, as SmolLM2
        "pad_token_id": 0,
        "eos_token_id": 1,
    }
    settings.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**settings)).eval()


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def reference_logits(
    model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The last position's logits from the model's own forward over the whole sequence."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return out.logits[:, -1].float()


@pytest.mark.parametrize("rows", [3, 1], ids=["three-rows", "one-row"])
def test_prefill_and_decode_steps_equal_the_models_forward(rows: int) -> None:
    model = tiny_llama()
    ids, mask = (t[:rows] for t in left_padded())
    decoder = LlamaDecoder(model, rows, capacity=ids.shape[1] + 5)
    positions = position_ids_from_mask(mask)

    logits = decoder.forward(ids, positions, mask)
    torch.testing.assert_close(logits, reference_logits(model, ids, mask), rtol=1e-5, atol=1e-5)

    next_position = positions[:, -1:] + 1
    for _ in range(5):
        token = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        logits = decoder.forward(token, next_position, mask)
        next_position = next_position + 1
        torch.testing.assert_close(logits, reference_logits(model, ids, mask), rtol=1e-5, atol=1e-5)


def test_the_cache_grows_and_its_rows_can_be_repeated_and_selected() -> None:
    model = tiny_llama()
    ids, mask = left_padded()
    positions = position_ids_from_mask(mask)
    # One row's prompt, shared by three rows, as generation does for samples of one prompt.
    decoder = LlamaDecoder(model, 1, capacity=2)  # smaller than the prompt: it must grow
    decoder.forward(ids[1:2, :5], positions[1:2, :5], mask[1:2, :5])
    decoder.batch_repeat_interleave(3)
    logits = decoder.forward(
        ids[1:2, 5:].expand(3, -1), positions[1:2, 5:].expand(3, -1), mask[1:2].expand(3, -1)
    )
    expected = reference_logits(model, ids[1:2], mask[1:2])
    torch.testing.assert_close(logits, expected.expand(3, -1), rtol=1e-5, atol=1e-5)

    # Rows 0 and 2 go on; each continues exactly as the full forward says.
    decoder.batch_select_indices(torch.tensor([0, 2]))
    token = torch.tensor([[5], [7]])
    full = torch.cat([ids[1:2].expand(2, -1), token], 1)
    full_mask = torch.ones_like(full)
    logits = decoder.forward(token, positions[1:2, -1:].expand(2, -1) + 1, full_mask)
    torch.testing.assert_close(
        logits, reference_logits(model, full, full_mask), rtol=1e-5, atol=1e-5
    )


def test_only_plain_llama_models_are_supported() -> None:
    from peft import LoraConfig, get_peft_model

    assert LlamaDecoder.supports(tiny_llama())
    assert not LlamaDecoder.supports(tiny_llama(attention_bias=True))
    assert not LlamaDecoder.supports(tiny_llama(mlp_bias=True))
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    assert not LlamaDecoder.supports(qwen)
    adapted = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert not LlamaDecoder.supports(adapted)
    assert not LlamaDecoder.supports(adapted.get_base_model())  # its layers are LoRA layers
    with pytest.raises(ValueError, match="not a plain Llama"):
        LlamaDecoder(qwen, 1, 4)


def test_sampling_draws_the_same_tokens_with_and_without_the_decoder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_llama()
    ids, mask = left_padded()

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        return policy.sample_responses(model, ids, mask, 8, 0.7, 1, 0, generator)

    fast_tokens, fast_logprobs = sample()
    monkeypatch.setattr(LlamaDecoder, "supports", staticmethod(lambda model: False))
    tokens, logprobs = sample()

    assert torch.equal(fast_tokens, tokens)
    torch.testing.assert_close(fast_logprobs, logprobs, rtol=1e-5, atol=1e-5)
