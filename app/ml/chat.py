"""Untrusted text inside a chat template: it must never spell one of the template's own tokens.

A chat template is rendered to a string and then tokenized, and a tokenizer splits out every
added token (`<|im_end|>`, `<|endoftext|>`, ...) wherever it appears in that string. A prompt
or a model's answer that contains the text `<|im_end|>` would therefore close its own turn and
could open a new one with another role: prompt injection through the template. Before
rendering, each message's content gets a zero-width space after the first character of any
added token it spells, so the tokenizer reads ordinary text where the author wrote ordinary
text. Only the model's input changes; stored prompts and responses keep their exact text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from transformers import PreTrainedTokenizerBase

ZERO_WIDTH_SPACE = "\u200b"


def control_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Every string the tokenizer would turn into an added token, longest first."""
    tokens = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    return sorted((t for t in tokens if len(t) > 1), key=len, reverse=True)


def inert_text(text: str, controls: Iterable[str]) -> str:
    """`text` with each control string broken by a zero-width space after its first character."""
    for token in controls:
        if token in text:
            text = text.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
    return text


def inert_messages(
    tokenizer: PreTrainedTokenizerBase, messages: Iterable[Mapping[str, str]]
) -> list[dict[str, str]]:
    """Chat messages whose contents cannot spell a control token of `tokenizer`."""
    controls = control_strings(tokenizer)
    return [{**m, "content": inert_text(m["content"], controls)} for m in messages]
