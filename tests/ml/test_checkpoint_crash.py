"""Crash safety of the train-state checkpoint: when one is due (by step count or by elapsed
time), and what a writer killed halfway through leaves (the previous checkpoint, whole)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from torch import nn

from app.core.config import ROOT_DIR
from app.kinds.dpo import DPOKnobs
from app.kinds.ppo import PPOKnobs
from app.kinds.reward import RewardKnobs
from app.ml import dpo, ppo, reward
from app.ml.checkpoint import CheckpointSchedule, TrainCheckpoint


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_checkpoint_is_due_every_n_steps_or_after_n_seconds() -> None:
    clock = FakeClock()
    schedule = CheckpointSchedule(every_steps=10, every_s=60.0, clock=clock)
    assert [s for s in range(1, 25) if schedule.due(s)] == [10, 20]  # no time passed
    clock.now += 59.9
    assert not schedule.due(21)
    clock.now += 0.1
    assert schedule.due(21) and schedule.due(22)  # late until one is written
    schedule.saved()
    assert not schedule.due(23)
    clock.now += 60
    assert schedule.due(23)


def test_either_rule_can_be_switched_off() -> None:
    clock = FakeClock()
    by_time = CheckpointSchedule(every_steps=0, every_s=1.0, clock=clock)
    assert not by_time.due(50)
    clock.now += 1
    assert by_time.due(51)
    by_count = CheckpointSchedule(every_steps=3, every_s=0.0, clock=clock)
    clock.now += 1e6
    assert [s for s in range(1, 8) if by_count.due(s)] == [3, 6]


@pytest.mark.parametrize("knobs", [RewardKnobs, PPOKnobs, DPOKnobs])
def test_every_trainer_has_the_time_rule_at_60_s_by_default(knobs: type[BaseModel]) -> None:
    info = knobs.model_fields["checkpoint_every_s"]
    assert info.default == 60.0 and info.description


@pytest.mark.parametrize(
    "resumable", [reward._RESUMABLE_FIELDS, ppo._RESUMABLE_FIELDS, dpo._RESUMABLE_FIELDS]
)
def test_the_schedule_may_change_between_save_and_resume(resumable: set[str]) -> None:
    assert {"checkpoint_every", "checkpoint_every_s"} <= resumable


def _checkpoint(path: Path, value: float) -> TrainCheckpoint:
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(value)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return TrainCheckpoint(path, {"lr": 0.1}, set(), models={"m": model}, optimizer=optimizer)


def _weight(checkpoint: TrainCheckpoint) -> float:
    weight = checkpoint.models["m"].weight
    assert isinstance(weight, torch.Tensor)
    return float(weight.mean())


# The child writes step 1, then starts writing step 2 (with a large tensor in it) and stops
# halfway, with half of the bytes on disk, as a process does when it is killed mid-write.
WRITER = textwrap.dedent(
    """
    import io, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    from app.ml.checkpoint import TrainCheckpoint

    def _checkpoint(path, value):  # as in the test module, without importing the trainers
        model = nn.Linear(2, 1)
        with torch.no_grad():
            model.weight.fill_(value)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return TrainCheckpoint(path, {"lr": 0.1}, set(), models={"m": model}, optimizer=optimizer)

    path = Path(sys.argv[1])
    _checkpoint(path, 1.0).save(1, {"note": "first"})
    real_save = torch.save

    def half_then_hang(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        print("writing", len(data), flush=True)
        time.sleep(600)

    torch.save = half_then_hang
    _checkpoint(path, 2.0).save(2, {"note": "second", "big": torch.zeros(4_000_000)})
    """
)


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=ROOT_DIR,
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        assert line.startswith("writing"), line
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == -signal.SIGKILL
    partial = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 8_000_000  # half of 16 MB

    resumed = _checkpoint(path, 0.0)
    loaded = resumed.load()
    assert loaded == (1, {"note": "first"})
    assert _weight(resumed) == 1.0
    assert not partial[0].exists()  # the dead writer's temp file is cleared away


def test_a_truncated_temp_file_beside_the_checkpoint_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    _checkpoint(path, 1.0).save(3, {})
    other = tmp_path / "other.pt"
    _checkpoint(other, 2.0).save(4, {})
    data = other.read_bytes()
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(data[: len(data) // 3])
    resumed = _checkpoint(path, 0.0)
    assert resumed.load() == (3, {})
    assert _weight(resumed) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "other.pt"]


def test_under_ddp_rank_0s_clock_decides_for_both_ranks(tmp_path: Path) -> None:
    """Two ranks checkpointing by time: each decision is broadcast, so both enter the
    checkpoint's barrier at the same steps (a disagreement would hang the run)."""
    from app.ml.distributed import launch
    from app.ml.hooks import RecordingHooks
    from app.ml.reward import RewardConfig
    from tests.ml.test_reward import synthetic_examples
    from tests.tiny_models import save_tiny_model

    backbone = save_tiny_model(tmp_path / "lm", pad_equals_eos=True)
    config = RewardConfig(
        backbone=str(backbone), max_length=64, batch_size=4, epochs=1, learning_rate=1e-3,
        checkpoint_every=0, checkpoint_every_s=1e-9, device="cpu",
    )  # fmt: skip
    kwargs = {
        "config": config, "train": synthetic_examples(20, seed=0), "val": [],
        "output_dir": tmp_path / "out", "checkpoint_dir": tmp_path / "ck",
    }  # fmt: skip
    result = launch("reward", kwargs, 2, tmp_path / "launch", RecordingHooks())
    assert result.steps == 5
    # Only the time rule could write it (no count rule, no cancel); never after the last step.
    assert _step_of(tmp_path / "ck" / reward.CHECKPOINT_NAME) == 4


def _step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
