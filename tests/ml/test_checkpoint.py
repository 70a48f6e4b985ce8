"""The one train-state checkpoint, the device/dtype rule and the tokenizer's pad-token rule."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from app.ml.checkpoint import FORMAT, TrainCheckpoint, seed_everything
from app.ml.loading import dtype_for, load_tokenizer, pick_device
from tests.tiny_models import make_tokenizer


def _parts(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, object, torch.Generator]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)  # a frozen part is neither saved nor restored
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler, torch.Generator().manual_seed(seed)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
    loss = model(torch.randn(5, 3)).square().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()  # type: ignore[attr-defined]
    optimizer.zero_grad()


def _checkpoint(path: Path, seed: int = 0, **config: object) -> tuple[TrainCheckpoint, tuple]:
    parts = _parts(seed)
    model, optimizer, scheduler, generator = parts
    ckpt = TrainCheckpoint(
        path,
        {"lr": 0.1, "every": 1, **config},
        {"every"},
        models={"model": model},
        optimizer=optimizer,
        scheduler=scheduler,  # type: ignore[arg-type]
        generators={"shuffle": generator},
        data={"snapshot_id": 3},
    )
    return ckpt, parts


def test_save_then_load_restores_every_part_and_the_random_streams(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    seed_everything(0)
    ckpt, (model, optimizer, scheduler, generator) = _checkpoint(path)
    _train_step(model, optimizer, scheduler)
    torch.randperm(7, generator=generator)
    ckpt.save(1, {"history": [1.0]})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind

    # What an uninterrupted run draws and computes next.
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    expected_perm = torch.randperm(7, generator=generator)
    _train_step(model, optimizer, scheduler)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    # A fresh process: the same start (frozen parts included), other random streams.
    resumed_ckpt, (model2, optimizer2, scheduler2, generator2) = _checkpoint(path)
    seed_everything(123)
    with torch.no_grad():
        for param in model2.parameters():
            if param.requires_grad:
                param.add_(1.0)  # only the file can bring the trained values back
    frozen_before = model2[0].weight.clone()
    step, extra = resumed_ckpt.load() or (0, {})
    assert (step, extra) == (1, {"history": [1.0]})
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected_draws
    assert torch.equal(torch.randperm(7, generator=generator2), expected_perm)
    assert scheduler2.last_epoch == 1  # type: ignore[attr-defined]
    _train_step(model2, optimizer2, scheduler2)
    for name, tensor in model2.state_dict().items():
        if name == "0.weight":
            assert torch.equal(tensor, frozen_before)  # frozen weights are not in the file
        else:
            assert torch.equal(tensor, expected[name]), name


def test_load_refuses_changed_settings_other_data_and_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    ckpt, _ = _checkpoint(path)
    assert ckpt.load() is None  # nothing written yet
    ckpt.save(2)

    changed, _ = _checkpoint(path, lr=0.2)
    with pytest.raises(ValueError, match=r"different settings: \['lr'\]"):
        changed.load()
    resumable, _ = _checkpoint(path, every=5)  # bookkeeping may change
    assert resumable.load() is not None

    other_data, _ = _checkpoint(path)
    other_data.data = {"snapshot_id": 4}
    with pytest.raises(ValueError, match="snapshot_id 3, not 4"):
        other_data.load()

    old = torch.load(path, weights_only=False)
    old["format"] = FORMAT - 1
    torch.save(old, path)
    with pytest.raises(ValueError, match="another version"):
        ckpt.load()


def test_no_path_means_no_checkpoint(tmp_path: Path) -> None:
    ckpt, _ = _checkpoint(tmp_path / "unused.pt")
    ckpt.path = None
    ckpt.save(1)
    assert ckpt.load() is None
    assert list(tmp_path.iterdir()) == []


def test_one_device_and_dtype_rule() -> None:
    assert pick_device() == pick_device("auto")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    cpu = torch.device("cpu")
    assert dtype_for(cpu) is torch.float32
    assert dtype_for(torch.device("cuda"), "auto") is torch.bfloat16
    assert dtype_for(cpu, "bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unsupported dtype"):
        dtype_for(cpu, "float16")


@pytest.mark.parametrize("pad", ["eos", "none", "own"])
def test_tokenizer_pad_rule(tmp_path: Path, pad: str) -> None:
    tok = make_tokenizer(pad_equals_eos=pad == "eos")
    if pad == "none":
        tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    # The files' own pad token, else EOS; nothing is added to the vocabulary.
    expected = {"eos": "<|im_end|>", "none": "<|im_end|>", "own": "<pad>"}[pad]
    assert loaded.pad_token == expected
    assert len(loaded) == len(tok)
