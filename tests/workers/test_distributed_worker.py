"""Reward runs with `num_processes: 2` on a real worker: torchrun with two gloo ranks, followed
(progress, metrics), cancelled (no rank outlives it) and resumed after a worker shutdown like a
one-process run. Tiny model, synthetic judgments (see test_reward_worker)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from app.core.db import unit_of_work
from app.models import ModelVersion, Project, Run, RunMetric
from app.services import runs
from tests.workers.conftest import Stack, wait_for
from tests.workers.test_reward_worker import seed_judgments

pytestmark = pytest.mark.worker

FINISHED = ("succeeded", "failed", "cancelled")
# Fast steps: the frozen part is computed once, only the top layer trains.
CONFIG = {"train_mode": "last_n", "last_n_layers": 1, "learning_rate": 3e-3, "batch_size": 5,
          "val_fraction": 0.25, "max_length": 64, "num_processes": 2}  # fmt: skip


def start_reward_run(live: Stack, n_judgments: int, **config: object) -> Run:
    project_id = seed_judgments(live, n_judgments)
    with live.session() as s:
        project = s.get(Project, project_id)
        assert project is not None
        return runs.create_run(s, project, "reward", {**CONFIG, **config}, settings=live.settings)


def launch_processes(live: Stack, run_id: int, attempt: int = 1) -> list[int]:
    """Pids of the processes (torchrun and its ranks) of this attempt's launch."""
    marker = str(live.var_dir / "launches" / f"run-{run_id}-attempt-{attempt}").encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and b"app.ml.distributed" in cmdline:
            pids.append(int(proc.name))
    return pids


def loss_steps(live: Stack, run_id: int) -> list[int]:
    with live.session() as s:
        return list(
            s.scalars(
                sa.select(RunMetric.step)
                .where(RunMetric.run_id == run_id, RunMetric.name == "loss/train")
                .order_by(RunMetric.step)
            )
        )


def test_a_two_process_reward_run_trains_with_progress_and_metrics(live: Stack) -> None:
    run = start_reward_run(live, 40, epochs=2)
    done = live.wait_status(run.id, FINISHED, timeout=240)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert "training in 2 processes (torchrun, DDP)" in done.log_tail
    # 30 training pairs, batches of 5, 2 epochs: 12 steps, each reported once by rank 0.
    assert done.progress_done == done.progress_total == 12
    assert loss_steps(live, run.id) == list(range(1, 13))
    with live.session() as s:
        version = s.scalar(sa.select(ModelVersion).where(ModelVersion.run_id == run.id))
    assert version is not None and version.status == "active"
    assert version.metrics["train_examples"] == 30 and "best_val_accuracy" in version.metrics
    assert not launch_processes(live, run.id)
    assert not (live.var_dir / "launches" / f"run-{run.id}-attempt-1").exists()


def test_cancelling_a_two_process_run_stops_both_ranks(live: Stack) -> None:
    run = start_reward_run(live, 40, max_steps=100_000, checkpoint_every=0)
    wait_for(lambda: live.run_row(run.id).progress_done >= 3, 180, "the ranks to train")
    # torchrun and two ranks of this run are alive.
    assert len(launch_processes(live, run.id)) >= 3
    with unit_of_work(live.database_url) as s:
        runs.cancel_run(s, runs.get_run(s, run.id), settings=live.settings)
    row = live.wait_status(run.id, FINISHED, timeout=90)
    assert row.status == "cancelled" and row.error is None, row.log_tail
    wait_for(lambda: not launch_processes(live, run.id), 15, "every rank to end")
    assert row.progress_done < 100_000


def test_a_worker_shutdown_requeues_the_run_and_the_next_worker_resumes_it(live: Stack) -> None:
    run = start_reward_run(live, 40, max_steps=150, checkpoint_every=0)
    wait_for(lambda: live.run_row(run.id).progress_done >= 5, 180, "the ranks to train")
    assert live.worker is not None
    live.worker.stop()  # SIGTERM: warm shutdown; the ranks checkpoint and end
    stopped = live.run_row(run.id)
    assert stopped.status == "queued", stopped.log_tail
    assert "requeued: the worker shut down" in stopped.log_tail
    assert not launch_processes(live, run.id)
    before = loss_steps(live, run.id)
    assert 5 <= len(before) < 150

    live.start_worker()
    row = live.wait_status(run.id, FINISHED, timeout=240)
    assert row.status == "succeeded", (row.error, row.log_tail)
    # Exactly 2: a worker in its warm shutdown that is handed the re-sent message (the SQLite
    # broker does that) leaves the run queued without claiming it (app/jobs/runner.py).
    assert row.attempts == 2, row.log_tail
    # Resumed from the checkpoint written at the stop: every step once, none trained twice.
    assert loss_steps(live, run.id) == list(range(1, 151))


def test_a_two_process_ppo_run_trains_against_the_reward_model(live: Stack) -> None:
    from tests.workers.test_policy_worker import create, project_with_reward_model

    project_id, _ = project_with_reward_model(live, "ppo-ddp")
    run = create(
        live, project_id, "ppo",
        {"total_steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1,
         "max_new_tokens": 6, "learning_rate": 1e-3, "sample_every": 1, "num_processes": 2},
    )  # fmt: skip
    done = live.wait_status(run.id, FINISHED, timeout=240)
    assert done.status == "succeeded", (done.error, done.log_tail)
    assert "training in 2 processes (torchrun, DDP)" in done.log_tail
    assert done.progress_done == done.progress_total == 2
    with live.session() as s:
        steps = list(
            s.scalars(
                sa.select(RunMetric.step)
                .where(RunMetric.run_id == run.id, RunMetric.name == "objective/kl")
                .order_by(RunMetric.step)
            )
        )
        version = s.scalar(sa.select(ModelVersion).where(ModelVersion.run_id == run.id))
    assert steps == [1, 2]  # rank 0 reported each step once
    assert version is not None and version.metrics["algorithm"] == "ppo"
    assert set(done.result["samples"]) == {"1", "2"}
    assert "step 1 sample (score" in done.log_tail  # logged from the result after training
    assert not launch_processes(live, run.id)
