"""Atomic file writes for checkpoints and model artifacts: a reader never sees half a file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write `obj` with torch.save to a temp file beside `path`, then `os.replace` it into place.

    The file is fsynced before the rename and the directory after it: a crash (or a power cut)
    at any point leaves either the previous file or the new one whole under `path`, never a
    truncated one. A killed writer may leave its `.NAME.*.tmp` behind; nothing reads those."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place; a reader never sees a half-written one."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def save_model_dir(model: Any, tokenizer: Any, output_dir: Path, files: Mapping[str, str]) -> None:
    """Write a Hugging Face model directory atomically: `model` and `tokenizer` through their
    `save_pretrained`, plus `files` (name -> text, e.g. run info as JSON), into a temp directory
    beside `output_dir` that `replace_dir` then moves into place. A failure leaves nothing."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)
        replace_dir(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
