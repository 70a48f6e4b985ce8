"""Seeding and resumable training state: one atomic checkpoint file for PPO, DPO and reward runs.

A checkpoint holds everything a trainer needs to continue where it stopped and end exactly
where an uninterrupted run would have: the trainable weights of each model (all of them, or
only LoRA adapters and copied heads), the optimizer and the learning-rate scheduler, the
global RNG states (Python, NumPy, torch on the CPU and every CUDA device) and the run's own
`torch.Generator`s, the step, the config, the identity of the data (a snapshot id, a pair
count), and what the trainer adds of its own (metrics history, the adaptive-beta state, the
prompt order, ...). It is written to a temp file, flushed to disk and moved into place
(`atomic_torch_save`), so a crash while writing leaves the previous checkpoint whole: the load
reads only the real name, never a temp file a killed writer left beside it.

When to write one is `CheckpointSchedule`'s call: every `checkpoint_every` steps, and also once
`checkpoint_every_s` seconds passed since the last one (checked at step boundaries), so a killed
worker loses at most about that much work however long a step is. Under DDP rank 0's clock
decides for every rank, since the ranks must enter the checkpoint's barrier together.

A checkpoint resumes only under the settings it was written with, except the fields its
trainer names as resumable (bookkeeping such as `checkpoint_every`, which cannot change the
trajectory), and only on the same data; anything else is refused with a `ValueError` naming
what changed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from app.ml.io import atomic_torch_save

# Bumped when the layout changes, so an old file is refused by name instead of by a KeyError.
FORMAT = 2


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Global RNG states (Python, NumPy, torch CPU and CUDA) for a checkpoint."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters only (all of them, or just LoRA adapters and copied heads).

    On the CPU these share storage with the live parameters: clone them to keep a copy."""
    # No clone: torch.save serialises at once, and a copy would double peak memory.
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy saved trainable parameters back; the set of names must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise ValueError("checkpoint does not match the model's trainable parameters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.device, p.dtype))


def check_resumable(
    saved: Mapping[str, Any], current: Mapping[str, Any], resumable: Collection[str]
) -> None:
    """Refuse to continue a checkpoint under settings that would change its trajectory: every
    field outside `resumable` must be what it was (a field added or removed counts too)."""
    changed = sorted(
        k for k in {*saved, *current} if k not in resumable and saved.get(k) != current.get(k)
    )
    if changed:
        raise ValueError(f"checkpoint was written with different settings: {changed}")


class CheckpointSchedule:
    """Says at each step boundary whether a checkpoint is due: every `every_steps` steps (0:
    never by count) or once `every_s` seconds passed since the last one (0: never by time).

    The time rule bounds what a kill costs; the count rule stays for reproducible layouts.
    Call `saved()` after each write (any write, a cancel's included) to restart the clock.
    """

    def __init__(
        self,
        every_steps: int,
        every_s: float,
        *,
        device: torch.device | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_steps = every_steps
        self.every_s = every_s
        self.device = device  # under DDP: the rank's device, for the broadcast
        self._clock = clock
        self._last = clock()

    def due(self, step: int) -> bool:
        """Whether to checkpoint after `step` finished steps (the same answer on every rank)."""
        by_count = self.every_steps > 0 and step % self.every_steps == 0
        if by_count or self.every_s <= 0:
            return by_count  # a pure function of the step: every rank agrees without asking
        late = self._clock() - self._last >= self.every_s
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([int(late)], device=self.device or torch.device("cpu"))
            dist.broadcast(flag, src=0)
            late = bool(flag.item())
        return late

    def saved(self) -> None:
        """A checkpoint was just written: the time rule counts from now."""
        self._last = self._clock()


@dataclass
class TrainCheckpoint:
    """A trainer's checkpoint file and the live objects it saves and restores.

    Build it once the models, optimizer and generators exist; `load` (when resuming) and
    `save` then move their whole state in and out. `path=None` disables checkpointing.
    """

    path: Path | None
    config: Mapping[str, Any]
    resumable: Collection[str]  # config fields that may change between save and resume
    models: Mapping[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)
    # What the run trains on; every entry must match on resume (e.g. {"snapshot_id": 3}).
    data: Mapping[str, Any] = field(default_factory=dict)

    def save(self, step: int, extra: Mapping[str, Any] | None = None) -> None:
        """Write the state after `step` finished steps, with the trainer's own `extra` state."""
        if self.path is None:
            return
        state = {
            "format": FORMAT,
            "step": step,
            "config": dict(self.config),
            "data": dict(self.data),
            "models": {name: trainable_state(m) for name, m in self.models.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "generators": {name: g.get_state() for name, g in self.generators.items()},
            "rng": rng_state(),
            "extra": dict(extra or {}),
        }
        atomic_torch_save(state, self.path)

    def load(self) -> tuple[int, dict[str, Any]] | None:
        """Restore everything from the file, if there is one; return (step, extra) or None.

        Refuses (`ValueError`) a file of another format, settings or data before touching any
        live object."""
        if self.path is None:
            return None
        # A writer killed mid-write left its temp file; the file under the real name is whole.
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        if not self.path.exists():
            return None
        # Our own file, holding RNG states (tuples, numpy arrays) that weights_only refuses.
        saved = torch.load(self.path, map_location="cpu", weights_only=False)
        if saved.get("format") != FORMAT:
            raise ValueError(
                f"{self.path} was written by another version of Verdict (format "
                f"{saved.get('format')}, this one reads {FORMAT}); delete it to start over"
            )
        check_resumable(saved["config"], self.config, self.resumable)
        for key in sorted({*saved["data"], *self.data}):
            was, now = saved["data"].get(key), self.data.get(key)
            if was != now:
                raise ValueError(f"checkpoint belongs to other data: {key} {was!r}, not {now!r}")
        for name, model in self.models.items():
            load_trainable_state(model, saved["models"][name])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        for name, generator in self.generators.items():
            generator.set_state(saved["generators"][name])
        set_rng_state(saved["rng"])
        return int(saved["step"]), dict(saved["extra"])
