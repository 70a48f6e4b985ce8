"""Generation runs executed by real Celery worker processes (see conftest: both brokers)."""

from __future__ import annotations

import itertools
import signal

import pytest
import sqlalchemy as sa

from app.core.db import unit_of_work
from app.jobs import runner
from app.kinds.queues import GPU_QUEUE
from app.models import AuditEvent, ComparisonPair, Response, Run, RunMetric
from app.services import dispatch, projects, runs
from tests.workers.conftest import Stack, wait_for

pytestmark = pytest.mark.worker

FINISHED = ("succeeded", "failed", "cancelled")


def _responses(stack: Stack) -> list[Response]:
    with stack.session() as s:
        return list(s.scalars(sa.select(Response).order_by(Response.id)))


def _pairs(stack: Stack) -> list[ComparisonPair]:
    with stack.session() as s:
        return list(s.scalars(sa.select(ComparisonPair).order_by(ComparisonPair.id)))


def _start(stack: Stack, project_slug: str, config: dict[str, object]) -> Run:
    with stack.session() as s:
        project = projects.get_project(s, project_slug)
        return runs.create_run(s, project, "generate", config, settings=stack.settings)


def _assert_k_responses_and_pairs(stack: Stack, n_prompts: int, k: int) -> None:
    responses = _responses(stack)
    by_prompt = {
        pid: list(group)
        for pid, group in itertools.groupby(
            sorted(responses, key=lambda r: r.prompt_id), key=lambda r: r.prompt_id
        )
    }
    assert len(by_prompt) == n_prompts
    assert all(len(group) == k for group in by_prompt.values())
    pairs = _pairs(stack)
    assert len(pairs) == n_prompts * k * (k - 1) // 2
    for pair in pairs:
        ids = {r.id for r in by_prompt[pair.prompt_id]}
        assert {pair.response_a_id, pair.response_b_id} <= ids
        assert pair.kind == "standard"


def test_generation_run_stores_k_responses_per_prompt_and_pairs(live: Stack) -> None:
    live.project(n_prompts=5, slug="gen", responses_per_prompt=3, max_new_tokens=24, overlap=2)
    run = _start(live, "gen", {"batch_size": 3, "first_batch_prompts": 1})
    seen: set[int] = set()

    def finished() -> bool:
        row = live.run_row(run.id)
        seen.add(row.progress_done)
        return row.status in FINISHED

    wait_for(finished, 120, "the generation run to end", interval=0.05)
    row = live.run_row(run.id)
    assert row.status == "succeeded", row.error or row.log_tail
    assert (row.progress_done, row.progress_total) == (5, 5)
    # Progress moved: it was seen part-way, not only at 0 and at the end.
    assert seen & {1, 2, 3, 4}, seen
    assert row.attempts == 1 and row.worker and row.started_at and row.finished_at
    assert row.result["responses"] == 15 and row.result["pairs"] == 15
    assert "succeeded" in row.log_tail
    _assert_k_responses_and_pairs(live, n_prompts=5, k=3)

    responses = _responses(live)
    assert all(r.model_version_id is not None for r in responses)
    params = responses[0].generation_params
    assert params["run_id"] == run.id and params["max_new_tokens"] == 24
    assert params["finish_reason"] in ("eos", "length")
    assert all(r.truncated == (r.generation_params["finish_reason"] == "length") for r in responses)
    assert all(p.required_judgments == 2 for p in _pairs(live))
    with live.session() as s:
        names = set(s.scalars(sa.select(RunMetric.name).where(RunMetric.run_id == run.id)))
    assert "generation/tokens_per_s" in names

    # A second run finds nothing left to do: every prompt has its K responses.
    again = _start(live, "gen", {})
    done = live.wait_status(again.id, FINISHED)
    assert done.status == "succeeded" and done.result["responses"] == 0
    assert len(_responses(live)) == 15


def test_cancel_stops_a_running_run_and_drops_a_queued_one(live: Stack) -> None:
    # Far more than it gets through before the cancel, on a fast machine too (it is cancelled).
    n_prompts = 400
    live.project(n_prompts=n_prompts, slug="cancel", max_new_tokens=48)
    first = _start(live, "cancel", {"batch_size": 2})
    second = _start(live, "cancel", {"batch_size": 2})
    wait_for(lambda: live.run_row(first.id).progress_done >= 1, 120, "the first run to progress")

    # The app's own session (on SQLite its transactions begin immediate): a test session reads
    # deferred, and upgrading that read to cancel_run's write fails at once with "database is
    # locked" when the worker committed progress in between.
    with unit_of_work(live.database_url) as s:
        queued = runs.cancel_run(s, runs.get_run(s, second.id), settings=live.settings)
        assert queued.status == "cancelled"  # a queued run ends at once
        running = runs.cancel_run(s, runs.get_run(s, first.id), settings=live.settings)
        assert running.status == "running" and running.cancel_requested

    row = live.wait_status(first.id, FINISHED, timeout=60)
    assert row.status == "cancelled" and row.finished_at is not None and row.error is None
    stored = _responses(live)
    # Stopped part-way, and only whole prompts were stored (K responses each, with their pair).
    assert 0 < len(stored) < 2 * n_prompts and len(stored) % 2 == 0
    assert len(_pairs(live)) == len(stored) // 2

    # The worker receives the cancelled run's message and does not run it. Redis carries the
    # revoke broadcast to the worker; whichever arrives first, Celery discards the message or
    # the claim guard on the run row turns it away. The SQLite broker has no broadcast, so
    # there the guard alone does it.
    worker = live.worker
    assert worker is not None
    discarded = f"Discarding revoked task: verdict.execute_run[{second.task_id}]"
    guarded = f"run {second.id}: delivery of task {second.task_id} skipped"
    wait_for(
        lambda: discarded in worker.output() or guarded in worker.output(),
        30,
        "the worker to drop the queued run",
    )
    if live.broker == "redis":
        flagged = f"Tasks flagged as revoked: {second.task_id}"
        wait_for(lambda: flagged in worker.output(), 30, "the revoke to reach the worker")
    row = live.run_row(second.id)
    assert row.status == "cancelled" and row.attempts == 0 and row.started_at is None
    assert all(r.generation_params["run_id"] == first.id for r in _responses(live))


def test_a_task_delivered_twice_runs_once(live: Stack) -> None:
    live.project(n_prompts=3, slug="dup")
    run = _start(live, "dup", {"batch_size": 4})
    assert run.task_id is not None
    # The same message again, as a broker redelivery or a double publish would send it.
    dispatch.enqueue(
        live.broker_url, dispatch.RUN_TASK, [run.id], queue=GPU_QUEUE, task_id=run.task_id
    )
    row = live.wait_status(run.id, FINISHED)
    assert row.status == "succeeded", row.error
    assert live.worker is not None
    wait_for(
        lambda: f"run {run.id}: delivery of task {run.task_id} skipped" in live.worker.output(),
        30,
        "the second delivery to be skipped",
    )
    assert live.run_row(run.id).attempts == 1
    _assert_k_responses_and_pairs(live, n_prompts=3, k=2)


def test_bad_model_path_fails_the_run_with_the_reason_and_the_worker_lives_on(
    live: Stack,
) -> None:
    live.project(n_prompts=2, slug="bad", base_policy="/nonexistent/verdict-model")
    live.project(n_prompts=2, slug="good")
    bad = _start(live, "bad", {})
    row = live.wait_status(bad.id, FINISHED)
    assert row.status == "failed"
    assert row.error is not None
    assert row.error.startswith("ModelLoadError: Model directory '/nonexistent/verdict-model'")
    assert "does not exist" in row.error and "failed: ModelLoadError" in row.log_tail
    assert _responses(live) == []

    assert live.worker is not None and live.worker.alive()
    good = _start(live, "good", {})
    assert live.wait_status(good.id, FINISHED).status == "succeeded"


def test_killed_worker_is_noticed_by_the_reaper_and_the_run_resumes(live: Stack) -> None:
    live.project(n_prompts=8, slug="kill", max_new_tokens=32)
    run = _start(live, "kill", {"batch_size": 2})
    wait_for(lambda: live.run_row(run.id).progress_done >= 2, 120, "the run to progress")
    assert live.worker is not None
    live.worker.signal(signal.SIGKILL)
    live.worker.proc.wait(10)
    killed = live.run_row(run.id)
    assert killed.status == "running" and killed.attempts == 1
    stored_before = len(_responses(live))

    beat = live.start_beat()
    # The reaper (sent by beat) needs a worker on the default queue: start the next one.
    live.start_worker()
    row = live.wait_status(run.id, FINISHED, timeout=150)
    assert row.status == "succeeded", row.error or row.log_tail
    assert row.attempts == 2
    assert "reaper: no heartbeat from worker" in row.log_tail and "requeued" in row.log_tail
    assert beat.alive()
    with live.session() as s:
        reaped = s.scalars(sa.select(AuditEvent).where(AuditEvent.action == "run.reap")).one()
    assert reaped.target_id == run.id and reaped.data["outcome"] == "queued"
    # Resumed, not restarted: every prompt has exactly K responses, including the ones stored
    # before the kill.
    assert stored_before >= 4
    _assert_k_responses_and_pairs(live, n_prompts=8, k=2)


def test_a_stopped_worker_requeues_its_run_and_the_next_one_finishes_it(live: Stack) -> None:
    """Ctrl-C of the demo mid-generation, then a new start: the run continues and ends."""
    live.project(n_prompts=12, slug="stop", max_new_tokens=32)
    run = _start(live, "stop", {"batch_size": 2})
    waiting = _start(live, "stop", {"batch_size": 2})  # queued behind it, never started
    wait_for(lambda: live.run_row(run.id).progress_done >= 2, 120, "the run to progress")
    assert live.worker is not None
    live.worker.stop()  # SIGTERM: Celery's warm shutdown, as the demo sends on Ctrl-C
    stopped = live.run_row(run.id)
    assert stopped.status == "queued", stopped.log_tail
    assert "requeued: the worker shut down" in stopped.log_tail
    stored_before = len(_responses(live))
    assert 0 < stored_before < 24

    live.start_worker(sole=True)
    row = live.wait_status(run.id, FINISHED, timeout=150)
    assert row.status == "succeeded", row.error or row.log_tail
    assert row.attempts == 2
    # The run queued behind it ran too (whichever of the two came first answered the rest).
    assert live.wait_status(waiting.id, FINISHED, timeout=60).status == "succeeded"
    # Resumed where it stopped: every prompt has exactly K responses, none twice.
    _assert_k_responses_and_pairs(live, n_prompts=12, k=2)


def test_a_worker_killed_outright_is_recovered_at_the_next_sole_start(live: Stack) -> None:
    """The demo killed (no warm shutdown): its only worker's next start requeues the orphaned
    run at once, without waiting for the heartbeat timeout and the reaper."""
    live.project(n_prompts=8, slug="orphan", max_new_tokens=32)
    run = _start(live, "orphan", {"batch_size": 2})
    wait_for(lambda: live.run_row(run.id).progress_done >= 2, 120, "the run to progress")
    assert live.worker is not None
    live.worker.signal(signal.SIGKILL)
    live.worker.proc.wait(10)
    assert live.run_row(run.id).status == "running"

    live.start_worker(sole=True)  # no beat: only the start-up recovery can pick the run up
    row = live.wait_status(run.id, FINISHED, timeout=120)
    assert row.status == "succeeded", row.error or row.log_tail
    assert row.attempts == 2 and "reaper: no heartbeat" in row.log_tail
    _assert_k_responses_and_pairs(live, n_prompts=8, k=2)


def test_a_run_whose_message_was_lost_is_sent_again(live: Stack) -> None:
    """A queued run no message will ever deliver (its message was lost with a broker restart):
    the next worker start sends it again, and so does the reaper once the queue is idle."""
    live.project(n_prompts=2, slug="lost")
    assert live.worker is not None
    live.worker.stop()
    with unit_of_work(live.database_url) as s:
        project = projects.get_project(s, "lost")
        # A broker that forgets: the message is "sent" and gone, as in a restarted broker.
        lost = runs.create_run(
            s, project, "generate", {}, settings=live.settings.model_copy(
                update={"broker_url": "memory://"}
            ),
        )  # fmt: skip
    live.start_worker()
    assert live.wait_status(lost.id, FINISHED, timeout=60).status == "succeeded"

    with unit_of_work(live.database_url) as s:
        project = projects.get_project(s, "lost")
        again = runs.create_run(
            s, project, "generate", {}, settings=live.settings.model_copy(
                update={"broker_url": "memory://"}
            ),
        )  # fmt: skip
    with unit_of_work(live.database_url) as s:
        assert runner.resend_waiting_runs(s, live.settings, older_than_s=60) == []  # too young
        resent = runner.resend_waiting_runs(s, live.settings, older_than_s=0)
    assert [r.id for r in resent] == [again.id]
    done = live.wait_status(again.id, FINISHED, timeout=60)
    assert done.status == "succeeded" and "its message was lost; sent again" in done.log_tail
