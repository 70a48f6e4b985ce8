"""A worker SIGKILLed mid-training costs at most `checkpoint_every_s` of work: the reaper
requeues the run, the next worker resumes it from the checkpoint the time rule wrote, and it
ends where an uninterrupted run of the same config ends (the trainers are seeded).

`checkpoint_every` is set beyond the run's length, so every checkpoint here is one the time
rule (`checkpoint_every_s: 0.5`) wrote. Tiny random models; a reward run on the embedded stack
(SQLite broker and database) and a PPO run on the production one (Redis and PostgreSQL).
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select

from app.ml.ppo import CHECKPOINT_FILE as PPO_CHECKPOINT
from app.ml.reward import CHECKPOINT_NAME as REWARD_CHECKPOINT
from app.models import AuditEvent, ModelVersion, Project, Run, RunMetric
from app.services import runs
from tests.workers.conftest import Stack, wait_for
from tests.workers.test_policy_worker import project_with_reward_model
from tests.workers.test_reward_worker import seed_judgments

pytestmark = [pytest.mark.worker, pytest.mark.slow]

FINISHED = ("succeeded", "failed", "cancelled")
RESUMED = re.compile(r"resumed from the checkpoint at step (\d+)")


def _create(live: Stack, project_id: int, kind: str, config: dict[str, Any]) -> Run:
    with live.session() as s:
        project = s.get(Project, project_id)
        assert project is not None
        return runs.create_run(s, project, kind, config, settings=live.settings)


def _checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint at `path`, once one is there."""
    if not path.exists():
        return None
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def _kill_after_a_timed_checkpoint(live: Stack, run: Run, checkpoint: Path) -> int:
    """Wait for the first checkpoint and a few steps past it, then SIGKILL the worker.
    Returns the step the run had reached."""

    def past_first_checkpoint() -> bool:
        row = live.run_row(run.id)
        assert row.status in ("queued", "running"), f"the run ended first:\n{row.log_tail}"
        first = _checkpoint_step(checkpoint)
        return first is not None and row.progress_done >= first + 2

    wait_for(past_first_checkpoint, 180, "the first (timed) checkpoint and two steps past it")
    assert live.worker is not None
    live.worker.signal(signal.SIGKILL)
    live.worker.proc.wait(10)
    killed = live.run_row(run.id)
    assert killed.status == "running" and killed.attempts == 1
    assert killed.progress_total is not None
    assert killed.progress_done < killed.progress_total, "the run ended before the kill"
    return killed.progress_done


def _rerun(live: Stack, run: Run) -> tuple[Run, int, list[int]]:
    """Start beat (the reaper) and a new worker; follow the rerun to its end. Returns the
    finished row, the step it says it resumed from, and the progress seen while it ran."""
    live.start_beat()
    live.start_worker()
    seen: list[int] = []
    resumed_at: set[int] = set()

    def finished() -> Run | None:
        row = live.run_row(run.id)
        # The log tail keeps the last 40 lines, one per step: read it while the rerun goes.
        resumed_at.update(int(m) for m in RESUMED.findall(row.log_tail))
        if row.status == "running" and row.attempts == 2:
            seen.append(row.progress_done)
        return row if row.status in FINISHED else None

    row: Run = wait_for(finished, 240, f"run {run.id} to finish after the kill", interval=0.05)
    assert row.status == "succeeded", (row.error, row.log_tail)
    assert row.attempts == 2
    with live.session() as s:
        reaped = s.scalars(select(AuditEvent).where(AuditEvent.action == "run.reap")).one()
    assert reaped.target_id == run.id and reaped.data["outcome"] == "queued"
    assert len(resumed_at) == 1, resumed_at
    return row, resumed_at.pop(), seen


def _metric_rows_per_step(live: Stack, run_id: int, name: str) -> dict[int, int]:
    with live.session() as s:
        rows = s.execute(
            select(RunMetric.step, func.count())
            .where(RunMetric.run_id == run_id, RunMetric.name == name)
            .group_by(RunMetric.step)
        )
        return {int(step): int(n) for step, n in rows}


def _version(live: Stack, run_id: int) -> ModelVersion:
    with live.session() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.run_id == run_id))
    assert version is not None and version.artifact_path
    return version


def _assert_same_weights(a: ModelVersion, b: ModelVersion, atol: float) -> None:
    wa = load_file(str(Path(str(a.artifact_path)) / "model.safetensors"))
    wb = load_file(str(Path(str(b.artifact_path)) / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


def _assert_resumed_not_restarted(
    resumed_at: int, killed_at: int, seen: list[int], per_step: dict[int, int], total: int
) -> None:
    # The time rule wrote a checkpoint well into the run, and the rerun started from it (PPO
    # writes a step's checkpoint before reporting its progress: it may be one step ahead).
    assert 0 < resumed_at <= killed_at + 1 and killed_at < total
    # Progress went from the claim's 0 straight to the checkpoint's step, never counting up
    # from the start again.
    reported = [p for p in seen if p > 0]
    assert reported and min(reported) >= resumed_at, seen
    # Steps up to the checkpoint ran once; only the ones after it, lost with the kill, twice.
    assert sorted(per_step) == list(range(1, total + 1))
    assert all(per_step[s] == 1 for s in range(1, resumed_at + 1)), per_step
    assert all(per_step[s] == 2 for s in range(resumed_at + 1, killed_at + 1)), per_step
    assert all(per_step[s] == 1 for s in range(killed_at + 2, total + 1)), per_step


REWARD_STEPS = 200
REWARD_CONFIG = {
    "train_mode": "full",
    "max_steps": REWARD_STEPS,
    "learning_rate": 1e-3,
    "batch_size": 8,
    "val_fraction": 0.25,
    "max_length": 64,
    "checkpoint_every": 100_000,
    "checkpoint_every_s": 0.5,
}


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_a_killed_reward_run_resumes_from_its_timed_checkpoint(live: Stack) -> None:
    project_id = seed_judgments(live, 48)
    run = _create(live, project_id, "reward", REWARD_CONFIG)
    checkpoint = Path(live.settings.artifacts_dir) / "runs" / str(run.id) / REWARD_CHECKPOINT
    killed_at = _kill_after_a_timed_checkpoint(live, run, checkpoint)
    row, resumed_at, seen = _rerun(live, run)
    per_step = _metric_rows_per_step(live, run.id, "loss/train")
    _assert_resumed_not_restarted(resumed_at, killed_at, seen, per_step, REWARD_STEPS)
    assert row.progress_done == row.progress_total == REWARD_STEPS

    # The same config on the same snapshot, never interrupted, ends in the same place.
    straight = _create(
        live, project_id, "reward", {**REWARD_CONFIG, "snapshot_id": row.snapshot_id}
    )
    done = live.wait_status(straight.id, FINISHED, timeout=180)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert "resumed" not in done.log_tail
    killed, uninterrupted = _version(live, run.id), _version(live, straight.id)
    for name in ("loss/val", "accuracy/val", "loss/train", "margin/val", "reward/mean"):
        assert killed.metrics[name] == pytest.approx(uninterrupted.metrics[name], abs=1e-4), name
    _assert_same_weights(killed, uninterrupted, atol=1e-4)


PPO_STEPS = 60
PPO_CONFIG = {
    "total_steps": PPO_STEPS,
    "batch_size": 4,
    "mini_batch_size": 2,
    "ppo_epochs": 1,
    "max_new_tokens": 8,
    "learning_rate": 1e-3,
    "checkpoint_every": 100_000,
    "checkpoint_every_s": 0.5,
}


@pytest.mark.parametrize("stack", ["redis"], indirect=True)
def test_a_killed_ppo_run_resumes_from_its_timed_checkpoint(live: Stack) -> None:
    project_id, _ = project_with_reward_model(live, "ppo-kill")
    run = _create(live, project_id, "ppo", PPO_CONFIG)
    checkpoint = Path(live.settings.artifacts_dir) / "runs" / str(run.id) / PPO_CHECKPOINT
    killed_at = _kill_after_a_timed_checkpoint(live, run, checkpoint)
    row, resumed_at, seen = _rerun(live, run)
    per_step = _metric_rows_per_step(live, run.id, "objective/kl")
    _assert_resumed_not_restarted(resumed_at, killed_at, seen, per_step, PPO_STEPS)

    straight = _create(live, project_id, "ppo", PPO_CONFIG)
    done = live.wait_status(straight.id, FINISHED, timeout=180)
    assert done.status == "succeeded", (done.error, done.log_tail)
    killed, uninterrupted = _version(live, run.id), _version(live, straight.id)
    assert killed.parent_id == uninterrupted.parent_id  # both started from the same policy
    train_a, train_b = killed.metrics["train"], uninterrupted.metrics["train"]
    same = sorted(k for k in train_a if not k.startswith("time/"))  # wall-clock seconds differ
    assert same and same == sorted(k for k in train_b if not k.startswith("time/"))
    assert [train_a[k] for k in same] == pytest.approx([train_b[k] for k in same], abs=1e-4)
    _assert_same_weights(killed, uninterrupted, atol=1e-4)
