"""Loading models and tokenizers: local directories, clear errors, pad tokens, the SmolLM2 cache."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from app.ml import loading
from app.ml.loading import (
    LoadedModel,
    ModelLoadError,
    dtype_for,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    prepare_tokenizer,
    resolve_model_dir,
)
from tests.tiny_models import make_causal_lm, save_tiny_model


def test_device_and_dtype_rule() -> None:
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert dtype_for(torch.device("cpu")) is torch.float32
    assert dtype_for(torch.device("cuda")) is torch.bfloat16


def test_tiny_model_loads_from_local_dir(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "tiny")

    loaded = load_causal_lm(str(model_dir), artifacts_dir=tmp_path / "artifacts", device="cpu")

    assert isinstance(loaded, LoadedModel)
    assert loaded.source == model_dir
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype is torch.float32
    assert next(loaded.model.parameters()).dtype is torch.float32
    assert not loaded.model.training
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token_id != loaded.tokenizer.eos_token_id
    ids = loaded.tokenizer("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = loaded.model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(loaded.tokenizer))
    assert torch.isfinite(logits).all()


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelLoadError) as err:
        resolve_model_dir(str(missing), tmp_path / "artifacts")
    message = str(err.value)
    assert str(missing) in message
    assert "does not exist" in message


def test_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(str(empty), artifacts_dir=tmp_path / "artifacts", device="cpu")


def test_hub_id_without_allow_hub_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Resolve relative to an empty directory, so "someorg/some-model" is certainly not local.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_causal_lm("someorg/some-model", artifacts_dir=tmp_path / "artifacts", device="cpu")
    message = str(err.value)
    assert "VERDICT_ALLOW_HUB_DOWNLOADS" in message
    assert "hub downloads are disabled" in message
    assert "someorg/some-model" in message


def test_hub_id_with_allow_hub_is_passed_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir("someorg/some-model", tmp_path, allow_hub=True) == "someorg/some-model"


def test_pad_distinct_from_eos_when_saved_tokenizer_has_pad_equal_eos(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "tiny", pad_equals_eos=True)

    tokenizer = load_tokenizer(model_dir)
    prepare_tokenizer(tokenizer)  # what load_causal_lm does for serving
    loaded = load_causal_lm(str(model_dir), artifacts_dir=tmp_path / "artifacts", device="cpu")

    for tok in (tokenizer, loaded.tokenizer):
        assert tok.eos_token == "<|im_end|>"
        assert tok.pad_token_id is not None
        assert tok.pad_token_id != tok.eos_token_id
        assert tok.padding_side == "left"
    # An existing special token is reused, so the vocabulary (and the embeddings) keep their size.
    assert loaded.tokenizer.pad_token == "<|endoftext|>"
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(loaded.tokenizer)
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id
    assert any("<|endoftext|>" in line for line in loaded.adjustments)


def _word_tokenizer_without_pad_candidates() -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "again": 4}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="hello"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def test_pad_token_is_added_and_embeddings_resized_when_no_candidate_exists(
    tmp_path: Path,
) -> None:
    tokenizer = _word_tokenizer_without_pad_candidates()
    model = make_causal_lm(tokenizer)
    model_dir = tmp_path / "word-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows_before = model.get_input_embeddings().weight.shape[0]

    loaded = load_causal_lm(str(model_dir), artifacts_dir=tmp_path / "artifacts", device="cpu")

    tok = loaded.tokenizer
    assert tok.pad_token == loading.ADDED_PAD_TOKEN
    assert tok.pad_token_id not in (tok.eos_token_id, tok.bos_token_id)
    assert len(tok) == rows_before + 1
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(tok)
    assert any("resized" in line for line in loaded.adjustments)


def test_prepare_tokenizer_keeps_a_distinct_pad() -> None:
    tokenizer = _word_tokenizer_without_pad_candidates()
    tokenizer.add_special_tokens({"pad_token": "<mypad>"})
    pad_id = tokenizer.pad_token_id

    changes = prepare_tokenizer(tokenizer)

    assert tokenizer.pad_token_id == pad_id
    assert tokenizer.padding_side == "left"
    assert all("pad token" not in line for line in changes)


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_cache_matches_gguf_and_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = loading.smollm2_gguf_path()
    artifacts = tmp_path / "artifacts"

    cache_dir = resolve_model_dir("smollm2", artifacts)

    assert cache_dir == loading.smollm2_cache_dir(artifacts)
    assert (cache_dir / "config.json").is_file()
    assert (cache_dir / "model.safetensors").is_file()
    assert "quantization_config" not in (cache_dir / "config.json").read_text()
    leftovers = [p.name for p in cache_dir.parent.iterdir() if ".tmp" in p.name]
    assert leftovers == []

    loaded = load_causal_lm("smollm2", artifacts, device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    input_ids = loaded.tokenizer(ids, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cached_logits = loaded.model(input_ids=input_ids).logits
        gguf_logits = reference(input_ids=input_ids).logits
    assert cached_logits.shape == gguf_logits.shape
    assert torch.allclose(cached_logits, gguf_logits, rtol=0.0, atol=1e-5)
    assert loaded.tokenizer.pad_token_id != loaded.tokenizer.eos_token_id

    # A second resolve finds the cache: the directory is not rebuilt and the GGUF is not read.
    weights_mtime = os.stat(cache_dir / "model.safetensors").st_mtime_ns

    def no_gguf_conversion(*args: object, **kwargs: object) -> None:
        raise AssertionError("the GGUF file was converted again instead of reusing the cache")

    monkeypatch.setattr(loading, "_convert_gguf", no_gguf_conversion)
    assert resolve_model_dir("smollm2", artifacts) == cache_dir
    assert load_causal_lm("smollm2", artifacts, device="cpu").source == cache_dir
    assert os.stat(cache_dir / "model.safetensors").st_mtime_ns == weights_mtime


def _fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes) -> Path:
    gguf = tmp_path / "pkg" / loading.SMOLLM2_GGUF
    gguf.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_bytes(content)
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: gguf)
    return gguf


def test_concurrent_cache_builds_convert_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gguf(tmp_path, monkeypatch, b"gguf")
    calls: list[Path] = []
    inside = threading.Semaphore(1)

    def slow_convert(gguf: Path, out_dir: Path) -> None:
        # Two converters inside at once would make this non-blocking acquire fail.
        assert inside.acquire(blocking=False), "two conversions ran at the same time"
        try:
            calls.append(out_dir)
            time.sleep(0.3)
            (out_dir / "config.json").write_text("{}")
        finally:
            inside.release()

    monkeypatch.setattr(loading, "_convert_gguf", slow_convert)
    artifacts = tmp_path / "artifacts"
    with ThreadPoolExecutor(max_workers=3) as pool:
        dirs = list(pool.map(lambda _: loading.ensure_smollm2_cache(artifacts), range(3)))

    assert len(calls) == 1
    assert dirs == [loading.smollm2_cache_dir(artifacts)] * 3
    assert (dirs[0] / "config.json").is_file()
    assert sorted(p.name for p in dirs[0].parent.iterdir() if not p.name.endswith(".lock")) == [
        loading.SMOLLM2_CACHE_NAME
    ]


def test_cache_is_rebuilt_when_the_gguf_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = _fake_gguf(tmp_path, monkeypatch, b"old")
    calls: list[bytes] = []

    def convert(source: Path, out_dir: Path) -> None:
        calls.append(source.read_bytes())
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    artifacts = tmp_path / "artifacts"
    loading.ensure_smollm2_cache(artifacts)
    loading.ensure_smollm2_cache(artifacts)
    gguf.write_bytes(b"a newer, larger file")
    loading.ensure_smollm2_cache(artifacts)

    assert calls == [b"old", b"a newer, larger file"]


def test_failed_conversion_leaves_no_cache_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_gguf(tmp_path, monkeypatch, b"gguf")

    def broken(source: Path, out_dir: Path) -> None:
        (out_dir / "partial.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(loading, "_convert_gguf", broken)
    artifacts = tmp_path / "artifacts"
    with pytest.raises(ModelLoadError, match="disk full"):
        resolve_model_dir("smollm2", artifacts)
    base = loading.smollm2_cache_dir(artifacts).parent
    assert [p.name for p in base.iterdir() if not p.name.endswith(".lock")] == []
