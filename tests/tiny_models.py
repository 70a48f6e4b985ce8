"""Tiny random language models for tests: a byte-level BPE tokenizer and a 2-layer Llama.

Nothing here touches a model hub. Like SmolLM2, the tokenizer has a ChatML template and can be
built with its pad token equal to its EOS token, so tests meet the same pitfalls as production.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Explain how a reward model learns from human preferences.",
    "Write a short poem about the sea. Answer concisely and kindly.",
    "What is the capital of France? Paris is the capital of France.",
    "def add(a, b):\n    return a + b\n",
    "Human: hello there\n\nAssistant: Hi! How can I help you today?",
    "yes no maybe good bad better worse helpful harmless honest",
] * 4


def make_tokenizer(pad_equals_eos: bool = False, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small built-in corpus (covers every byte)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>" if pad_equals_eos else "<pad>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_causal_lm(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden: int = 32, layers: int = 2
) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough to train in seconds on a CPU."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(path: Path, seed: int = 0, pad_equals_eos: bool = False) -> Path:
    """Write a tiny causal LM and its tokenizer to `path` in Hugging Face format."""
    tok = make_tokenizer(pad_equals_eos=pad_equals_eos)
    model = make_causal_lm(tok, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
