"""Batched generation on tiny models: batching must not change answers, ends must be found right."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from app.ml.decode import LlamaDecoder
from app.ml.generation import (
    MIN_SHARED_PREFIX,
    GeneratedResponse,
    Prompt,
    SamplingConfig,
    encode_prompt,
    generate_responses,
    plan_batches,
)
from app.ml.hooks import Cancelled, RecordingHooks
from app.ml.loading import load_causal_lm
from tests.tiny_models import make_causal_lm, make_tokenizer, save_tiny_model

# Clearly different lengths, a multi-turn chat with <|im_end|> inside the prompt, and markup.
PROMPTS: list[Prompt] = [
    "hi",
    "Explain how a reward model learns from human preferences, with examples. " * 3,
    [
        {"role": "system", "content": "Answer concisely and kindly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And why?"},
    ],
    "yes no maybe",
    "def add(a, b):\n    return a + b\n",
    "<script>alert('x')</script>",
]


def with_eos_bias(model: LlamaForCausalLM, eos_id: int, bias: float) -> LlamaForCausalLM:
    """Give the output layer a bias that pushes the EOS logit up (bias > 0) or down (bias < 0)."""
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_id] = bias
    model.lm_head = head
    return model


def context_sensitive_lm(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A tiny random model whose greedy answers depend on the prompt and end at varied steps.

    At the default init scale a 2-layer random model mostly echoes its last input token, so every
    chat prompt (all ending in "assistant\\n") would get the same answer; larger weights make the
    prompt matter, and a mild EOS bias makes some answers end early and others run to the limit.
    """
    model = make_causal_lm(tokenizer, seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layers" in name and "norm" not in name:
                param.mul_(10.0)
        model.lm_head.weight.mul_(10.0)
    return with_eos_bias(model, tokenizer.eos_token_id, 1.0)


def bigram_lm(tokenizer: PreTrainedTokenizerFast, chain: Sequence[int]) -> LlamaForCausalLM:
    """A model that deterministically continues token chain[i] with chain[i + 1].

    Embeddings are one-hot and the layers' outputs are zeroed, so the last hidden state is the
    current token and the output layer is a successor table. Tokens off the chain continue with
    chain[1], which is never EOS, so nothing but the chain can end a response.
    """
    assert len(set(chain)) == len(chain), "each token needs a single successor"
    vocab = len(tokenizer)
    hidden = -(-vocab // 4) * 4  # a multiple of the head count
    model = make_causal_lm(tokenizer, hidden=hidden)
    successor = {a: b for a, b in zip(chain, chain[1:], strict=False)}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab, hidden))
        table = torch.zeros(vocab, hidden)
        for token in range(vocab):
            table[successor.get(token, chain[1]), token] = 1.0
        model.lm_head.weight.copy_(table)
    return model


def hf_greedy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: Prompt, max_new: int
) -> list[int]:
    """Reference: transformers' own generate on the prompt alone (no padding), cut at first EOS."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tokens = out[0, ids.shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def token_ids(results: list[list[GeneratedResponse]]) -> list[list[list[int]]]:
    return [[r.token_ids for r in responses] for responses in results]


@pytest.mark.parametrize("pad_equals_eos", [False, True])
def test_greedy_batched_equals_one_at_a_time(pad_equals_eos: bool) -> None:
    tokenizer = make_tokenizer(pad_equals_eos=pad_equals_eos)
    model = context_sensitive_lm(tokenizer)
    config = SamplingConfig(num_responses=1, do_sample=False, max_new_tokens=24, batch_size=16)

    batched = generate_responses((model, tokenizer), PROMPTS, config)
    one_by_one = [generate_responses((model, tokenizer), [p], config)[0] for p in PROMPTS]

    assert token_ids(batched) == token_ids(one_by_one)
    reference = [hf_greedy(model, tokenizer, p, config.max_new_tokens) for p in PROMPTS]
    assert [responses[0].token_ids for responses in batched] == reference
    # The batch really mixed rows that end early (at different steps) with rows that ran out.
    lengths = {r[0].num_tokens for r in batched if r[0].finish_reason == "eos"}
    assert len(lengths) >= 2
    assert any(r[0].truncated for r in batched)
    prompt_lengths = {len(encode_prompt(tokenizer, p)) for p in PROMPTS}
    assert max(prompt_lengths) > 3 * min(prompt_lengths)


def test_shared_system_prompt_is_prefilled_once_without_changing_answers() -> None:
    tokenizer = make_tokenizer(pad_equals_eos=True)
    model = context_sensitive_lm(tokenizer)
    system = {"role": "system", "content": "Answer concisely and kindly. Be helpful and honest."}
    questions = ["hi", "What is the capital of France? Explain.", "yes", "def add(a, b):"]
    prompts: list[Prompt] = [[system, {"role": "user", "content": q}] for q in questions]
    config = SamplingConfig(num_responses=2, do_sample=False, max_new_tokens=16, batch_size=8)
    hooks = RecordingHooks()

    batched = generate_responses((model, tokenizer), prompts, config, hooks=hooks)

    assert hooks.series("generation/shared_prefix_tokens")[0] >= MIN_SHARED_PREFIX
    reference = [hf_greedy(model, tokenizer, p, config.max_new_tokens) for p in prompts]
    assert [[r.token_ids for r in responses] for responses in batched] == [
        [ids, ids] for ids in reference
    ]


def test_sampling_is_seeded_per_row_and_independent_of_batching() -> None:
    tokenizer = make_tokenizer()
    model = context_sensitive_lm(tokenizer)
    config = SamplingConfig(num_responses=3, max_new_tokens=12, batch_size=16, seed=7)

    first = generate_responses((model, tokenizer), PROMPTS, config)
    again = generate_responses((model, tokenizer), PROMPTS, config)
    # Batches of 2 rows split a prompt's 3 samples across batches.
    small_batches = generate_responses(
        (model, tokenizer), PROMPTS, SamplingConfig(**{**vars(config), "batch_size": 2})
    )
    other_seed = generate_responses(
        (model, tokenizer), PROMPTS, SamplingConfig(**{**vars(config), "seed": 8})
    )

    assert token_ids(first) == token_ids(again)
    assert token_ids(first) == token_ids(small_batches)
    assert token_ids(first) != token_ids(other_seed)
    assert all(len(responses) == 3 for responses in first)
    assert any(len({tuple(r.token_ids) for r in responses}) > 1 for responses in first)


def test_k_responses_per_prompt() -> None:
    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer)

    sampled = generate_responses(
        (model, tokenizer), PROMPTS[:3], SamplingConfig(num_responses=4, max_new_tokens=5)
    )
    greedy = generate_responses(
        (model, tokenizer),
        PROMPTS[:3],
        SamplingConfig(num_responses=3, max_new_tokens=5, do_sample=False),
    )

    assert [len(r) for r in sampled] == [4, 4, 4]
    assert [len(r) for r in greedy] == [3, 3, 3]
    for responses in sampled + greedy:
        for response in responses:
            assert isinstance(response, GeneratedResponse)
            assert response.num_tokens == len(response.token_ids)
            assert 1 <= response.num_tokens <= 5
    # Greedy answers are identical, but each is its own object.
    first, second, _ = greedy[0]
    assert first.token_ids == second.token_ids
    assert first.token_ids is not second.token_ids


def test_eos_ends_the_response_and_markup_round_trips_as_text() -> None:
    tokenizer = make_tokenizer()
    eos = tokenizer.eos_token_id
    last_prompt_token = encode_prompt(tokenizer, "hello")[-1]
    script = tokenizer.encode("<script>", add_special_tokens=False)
    # A special token inside the answer must vanish from the text but stay in the token ids.
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    answer = [*script[:3], special, *script[3:], eos]
    model = bigram_lm(tokenizer, [last_prompt_token, *answer])

    [[response]] = generate_responses(
        (model, tokenizer),
        ["hello"],
        SamplingConfig(num_responses=1, max_new_tokens=20),
    )

    assert response.text == "<script>"
    assert response.token_ids == answer
    assert response.num_tokens == len(answer)
    assert response.finish_reason == "eos"
    assert response.truncated is False


def test_truncated_when_max_new_tokens_ends_it_first() -> None:
    tokenizer = make_tokenizer()
    last_prompt_token = encode_prompt(tokenizer, "hello")[-1]
    script = tokenizer.encode("<script>", add_special_tokens=False)
    model = bigram_lm(tokenizer, [last_prompt_token, *script, tokenizer.eos_token_id])

    [[response]] = generate_responses(
        (model, tokenizer), ["hello"], SamplingConfig(num_responses=1, max_new_tokens=3)
    )

    assert response.token_ids == script[:3]
    assert response.text == "<sc"
    assert response.truncated is True
    assert response.finish_reason == "length"


def test_truncated_when_eos_is_suppressed() -> None:
    tokenizer = make_tokenizer()
    model = with_eos_bias(make_causal_lm(tokenizer), tokenizer.eos_token_id, -1e4)

    results = generate_responses(
        (model, tokenizer), PROMPTS, SamplingConfig(num_responses=2, max_new_tokens=6)
    )

    for responses in results:
        for response in responses:
            assert response.truncated is True
            assert response.finish_reason == "length"
            assert response.num_tokens == 6
            assert tokenizer.eos_token_id not in response.token_ids


def test_not_truncated_when_eos_is_favoured() -> None:
    tokenizer = make_tokenizer(pad_equals_eos=True)
    model = with_eos_bias(make_causal_lm(tokenizer), tokenizer.eos_token_id, 1e4)

    results = generate_responses(
        (model, tokenizer), PROMPTS, SamplingConfig(num_responses=2, max_new_tokens=6)
    )

    for responses in results:
        for response in responses:
            assert response.token_ids == [tokenizer.eos_token_id]
            assert response.text == ""
            assert response.truncated is False
            assert response.finish_reason == "eos"


def test_on_prompt_done_once_per_prompt_as_batches_finish() -> None:
    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer)
    events: list[tuple[str, int]] = []

    class Hooks(RecordingHooks):
        def progress(self, done: int, total: int | None, message: str = "") -> None:
            super().progress(done, total, message)
            events.append(("progress", done))

    def on_done(index: int, responses: list[GeneratedResponse]) -> None:
        assert len(responses) == 2
        events.append(("prompt", index))

    hooks = Hooks()
    results = generate_responses(
        (model, tokenizer),
        PROMPTS,
        SamplingConfig(num_responses=2, max_new_tokens=4, batch_size=4),
        hooks=hooks,
        on_prompt_done=on_done,
    )

    done = [index for kind, index in events if kind == "prompt"]
    assert sorted(done) == list(range(len(PROMPTS)))
    # 12 rows in batches of 4: progress after each batch, and the first prompts are delivered
    # before the first progress report, i.e. before the run ends.
    assert [done for done, _, _ in hooks.progress_calls] == [2, 4, 6]
    assert events.index(("progress", 2)) == 2
    assert all(len(r) == 2 for r in results)


def test_cancel_between_batches_raises_cancelled() -> None:
    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer)
    delivered: list[int] = []
    hooks = RecordingHooks(stop_after_progress=1)

    with pytest.raises(Cancelled):
        generate_responses(
            (model, tokenizer),
            PROMPTS,
            SamplingConfig(num_responses=1, max_new_tokens=4, batch_size=2),
            hooks=hooks,
            on_prompt_done=lambda index, _: delivered.append(index),
        )

    assert len(hooks.progress_calls) == 1
    assert len(delivered) == 2
    assert not model.training


class StopOnCall:
    """`should_stop` turns true at its n-th call; records how often it was asked."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def progress(self, done: int, total: int | None, message: str = "") -> None:
        pass

    def metrics(self, step: int, values: dict[str, float]) -> None:
        pass

    def should_stop(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def test_cancel_inside_a_long_batch_does_not_wait_for_it_to_end() -> None:
    tokenizer = make_tokenizer()
    model = with_eos_bias(make_causal_lm(tokenizer), tokenizer.eos_token_id, -1e4)
    hooks = StopOnCall(n=2)  # 1st call: before the batch; 2nd: inside it
    delivered: list[int] = []

    with pytest.raises(Cancelled, match="mid-batch"):
        generate_responses(
            (model, tokenizer),
            PROMPTS,
            SamplingConfig(num_responses=1, max_new_tokens=200, batch_size=16),
            hooks=hooks,
            on_prompt_done=lambda index, _: delivered.append(index),
        )
    assert delivered == [] and hooks.calls == 2


def test_string_and_chat_message_prompts() -> None:
    tokenizer = make_tokenizer()
    model = make_causal_lm(tokenizer)
    as_string = "What is the capital of France?"
    as_messages = [{"role": "user", "content": as_string}]

    ids = encode_prompt(tokenizer, as_string)
    assert ids == encode_prompt(tokenizer, as_messages)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")

    config = SamplingConfig(num_responses=1, do_sample=False, max_new_tokens=5)
    [from_string], [from_messages] = generate_responses(
        (model, tokenizer), [as_string, as_messages], config
    )
    assert from_string.token_ids == from_messages.token_ids


def test_untrusted_prompt_text_is_kept_verbatim() -> None:
    tokenizer = make_tokenizer()
    nasty = "<script>alert('x')</script> & <b>\"quoted\"</b>"
    assert nasty in tokenizer.decode(encode_prompt(tokenizer, nasty))
    with pytest.raises(ValueError, match="role"):
        encode_prompt(tokenizer, [{"content": "no role"}])


def test_generation_with_a_loaded_model(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "tiny", pad_equals_eos=True)
    loaded = load_causal_lm(str(model_dir), artifacts_dir=tmp_path, device="cpu")
    hooks = RecordingHooks()

    results = generate_responses(
        loaded, ["hello", "hi"], SamplingConfig(max_new_tokens=4, batch_size=2), hooks=hooks
    )

    assert [len(r) for r in results] == [2, 2]
    assert hooks.series("generation/batch_rows") == [2.0, 2.0]
    assert all(v > 0 for v in hooks.series("generation/new_tokens"))


def test_plan_batches_groups_prompts_of_similar_length() -> None:
    lengths = [5, 50, 6, 48, 7, 49]
    batches = plan_batches(lengths, samples_per_prompt=2, batch_size=6)
    assert batches == [
        [(1, 0), (1, 1), (5, 0), (5, 1), (3, 0), (3, 1)],
        [(4, 0), (4, 1), (2, 0), (2, 1), (0, 0), (0, 1)],
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"num_responses": 0},
        {"max_new_tokens": 0},
        {"batch_size": 0},
        {"temperature": 0.0},
        {"top_p": 0.0},
        {"top_p": 1.5},
    ],
)
def test_sampling_config_rejects_nonsense(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingConfig(**bad)  # type: ignore[arg-type]


def test_sampling_config_documents_every_field() -> None:
    assert all(f.description for f in SamplingConfig.model_fields.values())


def test_the_llama_decoder_gives_the_answers_of_the_models_own_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokenizer = make_tokenizer()
    model = context_sensitive_lm(tokenizer)
    # A bias-free head, so `LlamaDecoder` takes the model; a louder EOS row ends some answers early.
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.weight[tokenizer.eos_token_id] *= 3.0
    model.lm_head = head
    assert LlamaDecoder.supports(model)
    system = {"role": "system", "content": "Answer concisely and kindly. Be helpful and honest."}
    questions = [p for p in PROMPTS if isinstance(p, str)]
    prompts: list[Prompt] = [[system, {"role": "user", "content": q}] for q in questions[:3]]
    prompts += PROMPTS  # and prompts with no shared prefix
    config = SamplingConfig(num_responses=3, max_new_tokens=12, batch_size=6, seed=5)

    hooks = RecordingHooks()
    lean = generate_responses((model, tokenizer), prompts, config, hooks=hooks)
    assert max(hooks.series("generation/shared_prefix_tokens")) >= MIN_SHARED_PREFIX
    monkeypatch.setattr(LlamaDecoder, "supports", staticmethod(lambda model: False))
    generic = generate_responses((model, tokenizer), prompts, config)

    assert token_ids(lean) == token_ids(generic)
    # Rows ended at different steps, so finished rows were dropped from the cache mid-batch.
    assert len({r.num_tokens for responses in lean for r in responses}) > 1
