"""The runs service without a worker: creating, guarding, cancelling, reaping, the registry,
and a generation run executed in-process (the handler a worker would call)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import make_sessionmaker, unit_of_work
from app.jobs import runner
from app.kinds.registry import RUN_KINDS
from app.models import (
    AuditEvent,
    ComparisonPair,
    ModelVersion,
    Project,
    Prompt,
    Response,
    Run,
    utcnow,
)
from app.services import generation, projects, prompts, registry, runs
from app.services.errors import Conflict, InvalidInput
from tests.conftest import Factory, empty_all_tables, engine_for, run_verdict
from tests.tiny_models import save_tiny_model


def broker_messages(settings: Settings) -> int:
    """Task messages waiting in the embedded SQLite broker (the real one, not a fake)."""
    path = Path(settings.broker_url.removeprefix("sqla+sqlite:///"))
    if not path.exists():
        return 0
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM kombu_message WHERE visible").fetchone()[0])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def add_prompts(session: Session, project: Project, n: int) -> list[int]:
    records = [prompts.PromptRecord(line=i, text=f"prompt {i}?") for i in range(1, n + 1)]
    return prompts.store_prompts(session, project, records, source="test").prompt_ids


def test_create_run_adds_a_queued_row_and_the_commit_sends_its_task(
    session: Session, settings: Settings, factory: Factory
) -> None:
    project = factory.project()
    admin = factory.user("admin")
    run = runs.create_run(
        session, project, "generate", {"limit": 3}, settings=settings, actor_id=admin.id
    )
    assert broker_messages(settings) == 0  # nothing is sent before the row is committed
    session.commit()
    assert broker_messages(settings) == 1
    session.expire_all()
    row = session.get(Run, run.id)
    assert row is not None and row.status == "queued" and row.task_id
    # The stored config is complete: every knob of the kind, with its value.
    assert row.config == {
        "prompt_ids": None, "limit": 3, "responses_per_prompt": None, "temperature": None,
        "top_p": None, "max_new_tokens": None, "batch_size": 16, "first_batch_prompts": 0,
        "seed": None, "best_of_k": None, "pair_selection": None, "reward_model_id": None,
    }  # fmt: skip
    assert row.created_by_id == admin.id and row.trigger == "api"
    event = session.scalars(sa.select(AuditEvent).where(AuditEvent.action == "run.create")).one()
    assert event.target_id == run.id


def test_a_rolled_back_run_is_never_sent(
    session: Session, settings: Settings, factory: Factory
) -> None:
    runs.create_run(session, factory.project(), "generate", settings=settings)
    session.rollback()
    session.commit()
    assert factory.count(Run) == 0 and broker_messages(settings) == 0


def test_unknown_kinds_are_refused_naming_the_registered_ones(
    session: Session, settings: Settings, factory: Factory
) -> None:
    project = factory.project()
    with pytest.raises(InvalidInput) as caught:
        runs.create_run(session, project, "train", {}, settings=settings)
    assert caught.value.message == ("unknown run kind 'train'; use one of " + ", ".join(RUN_KINDS))
    assert caught.value.errors[0].field == "kind"
    # Kinds the API serves itself (score, sample) are not launchable from the runs API.
    with pytest.raises(InvalidInput, match="unknown run kind 'sample'"):
        runs.create_run(session, project, "sample", {}, settings=settings, launchable_only=True)
    session.rollback()
    assert factory.count(Run) == 0 and broker_messages(settings) == 0


def test_invalid_generate_config_is_refused_field_by_field(
    session: Session, settings: Settings, factory: Factory
) -> None:
    project = factory.project()
    other = factory.project()
    foreign = add_prompts(session, other, 1)
    with pytest.raises(InvalidInput) as caught:
        runs.create_run(session, project, "generate", {"top_k": 5}, settings=settings)
    assert caught.value.errors[0].field == "config.top_k"
    with pytest.raises(InvalidInput, match="not prompts of project"):
        runs.create_run(session, project, "generate", {"prompt_ids": foreign}, settings=settings)
    assert factory.count(Run) == 0


def test_claim_lets_one_delivery_run_and_fences_the_attempt(
    session: Session, settings: Settings, factory: Factory
) -> None:
    run = runs.create_run(session, factory.project(), "generate", settings=settings)
    session.commit()
    # Any delivery of the run's messages may claim it while it is queued; only the first does.
    assert runner.claim_run(session, run.id, worker="w1") == 1
    assert runner.claim_run(session, run.id, worker="w2") is None
    session.expire_all()
    row = session.get(Run, run.id)
    assert row is not None
    assert (row.status, row.worker, row.attempts) == ("running", "w1", 1)
    assert row.started_at is not None and row.heartbeat_at is not None
    session.commit()
    # The reaper takes the run over (say w1 only looked dead) and w3 claims attempt 2: w1's
    # writes no longer land, and it notices that it lost the run.
    slow = runner.RunHooks(settings.database_url, run.id, 1, heartbeat_interval_s=60)
    session.execute(sa.update(Run).where(Run.id == run.id).values(status="queued"))
    session.commit()
    assert runner.claim_run(session, run.id, worker="w3") == 2
    slow.progress(5, 10, "from the old attempt")
    assert slow.lost and slow.should_stop()
    session.expire_all()
    row = session.get(Run, run.id)
    assert row is not None and row.worker == "w3" and row.progress_done == 0
    assert "from the old attempt" not in row.log_tail


def test_cancel_queued_running_and_finished_runs(
    session: Session, settings: Settings, factory: Factory
) -> None:
    project = factory.project()
    queued = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    running = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    assert running.task_id is not None
    runner.claim_run(session, running.id, worker="w")

    out = runs.cancel_run(session, queued, settings=settings)
    session.commit()
    assert out.status == "cancelled" and out.cancel_requested and out.finished_at is not None
    # A cancelled run can never be claimed by its (possibly still queued) message.
    assert queued.task_id is not None
    assert runner.claim_run(session, queued.id, worker="w") is None

    out = runs.cancel_run(session, running, settings=settings)
    session.commit()
    assert out.status == "running" and out.cancel_requested and out.finished_at is None

    with pytest.raises(Conflict, match="already ended"):
        runs.cancel_run(session, queued, settings=settings)
    assert factory.count(AuditEvent) >= 2


def test_create_run_if_idle_starts_only_one(
    session: Session, settings: Settings, factory: Factory
) -> None:
    project = factory.project()
    first = runs.create_run_if_idle(session, project, "generate", settings=settings)
    session.commit()
    second = runs.create_run_if_idle(session, project, "generate", settings=settings)
    session.commit()
    assert first is not None and second is None
    assert factory.count(Run) == 1


def _running_run(
    session: Session, project: Project, settings: Settings, *, beat_age_s: float, attempts: int = 1
) -> Run:
    run = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    assert run.task_id is not None
    runner.claim_run(session, run.id, worker="dead@host")
    session.execute(
        sa.update(Run)
        .where(Run.id == run.id)
        .values(heartbeat_at=utcnow() - timedelta(seconds=beat_age_s), attempts=attempts)
    )
    session.commit()
    return run


def test_reaper_requeues_resumable_runs_and_fails_exhausted_ones(
    session: Session, settings: Settings, factory: Factory
) -> None:
    project = factory.project()
    timeout = settings.worker_heartbeat_timeout_s
    dead = _running_run(session, project, settings, beat_age_s=timeout + 5)
    exhausted = _running_run(
        session, project, settings, beat_age_s=timeout + 5, attempts=runner.MAX_ATTEMPTS
    )
    alive = _running_run(session, project, settings, beat_age_s=1)
    cancelling = _running_run(session, project, settings, beat_age_s=timeout + 5)
    session.execute(sa.update(Run).where(Run.id == cancelling.id).values(cancel_requested=True))
    session.commit()
    messages_before = broker_messages(settings)
    old_task = dead.task_id

    changed = runner.reap_stale_runs(session, settings)

    assert {r.id for r in changed} == {dead.id, exhausted.id, cancelling.id}
    session.expire_all()
    requeued = session.get(Run, dead.id)
    assert requeued is not None and requeued.status == "queued" and requeued.worker is None
    assert "reaper: no heartbeat" in requeued.log_tail
    # Sent again under the same task id: whichever message comes first claims the run.
    assert requeued.task_id == old_task
    assert broker_messages(settings) == messages_before + 1
    failed = session.get(Run, exhausted.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error is not None and "heartbeat timeout" in failed.error
    assert session.get(Run, cancelling.id).status == "cancelled"  # type: ignore[union-attr]
    assert session.get(Run, alive.id).status == "running"  # type: ignore[union-attr]


def test_eta_follows_the_observed_rate(session: Session, factory: Factory) -> None:
    run = Run(
        project_id=factory.project().id,
        kind="generate",
        status="running",
        progress_done=10,
        progress_total=40,
        started_at=utcnow() - timedelta(seconds=20),
    )
    eta = runs.eta_seconds(run)
    assert eta is not None and 59 <= eta <= 61
    run.status = "succeeded"
    assert runs.eta_seconds(run) is None


def test_registry_base_policy_is_created_once_and_promotion_archives(
    session: Session, settings: Settings, factory: Factory
) -> None:
    project = factory.project(base_policy="/models/base")
    base = registry.ensure_base_policy(session, project, settings)
    assert registry.ensure_base_policy(session, project, settings).id == base.id
    assert (base.version, base.status, base.base_model) == (0, "active", "/models/base")
    assert registry.active_policy(session, project, settings).id == base.id

    tuned = registry.create_version(
        session, project, "policy", base_model=base.base_model, artifact_path="/a/v1", parent=base
    )
    registry.activate(session, tuned)
    session.commit()
    session.expire_all()
    assert registry.active_policy(session, project, settings).id == tuned.id
    assert session.get(ModelVersion, base.id).status == "archived"  # type: ignore[union-attr]
    assert registry.previous_policy(session, tuned) is not None
    assert registry.model_spec(tuned) == "/a/v1" and registry.model_spec(base) == "/models/base"
    path = registry.artifact_dir(settings, project, "policy", 1)
    assert path == settings.artifacts_dir / "projects" / str(project.id) / "policy-v1"


def test_upload_queues_generation_only_for_prompts_without_responses(
    session: Session, settings: Settings, factory: Factory
) -> None:
    project = factory.project()
    records = [
        prompts.PromptRecord(line=1, text="needs answers"),
        prompts.PromptRecord(
            line=2,
            text="comes with answers",
            responses=[prompts.ResponseIn("a"), prompts.ResponseIn("b")],
        ),
    ]
    result = prompts.store_prompts(session, project, records, source="test")
    run = generation.queue_generation_after_upload(
        session, project, result.prompt_ids, settings=settings
    )
    assert run is not None and run.trigger == "upload"
    assert run.config["prompt_ids"] == result.prompt_ids[:1]

    projects.update_project(session, project, settings={"auto_generate": False})
    more = add_prompts(session, project, 2)
    assert (
        generation.queue_generation_after_upload(session, project, more, settings=settings) is None
    )
    assert factory.count(Run) == 1


def _execute(session: Session, settings: Settings, run: Run) -> str:
    assert run.task_id is not None
    return runner.execute_run(run.id, task_id=run.task_id, worker="in-test", settings=settings)


def test_generation_with_a_trained_policy_adds_version_eval_pairs(
    session: Session, settings: Settings, factory: Factory, tiny_dir: Path, tmp_path: Path
) -> None:
    project = factory.project(
        base_policy=str(tiny_dir), max_new_tokens=6, version_eval_rate=1.0, overlap=2
    )
    first = add_prompts(session, project, 2)
    base_run = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    assert _execute(session, settings, base_run) == "succeeded"

    base = registry.active_policy(session, project, settings)
    tuned_dir = save_tiny_model(tmp_path / "tuned", seed=1)
    tuned = registry.create_version(
        session, project, "policy", base_model=base.base_model, artifact_path=str(tuned_dir),
        parent=base,
    )  # fmt: skip
    registry.activate(session, tuned)
    fresh = add_prompts(session, project, 1)  # the previous policy never answered this one
    run = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    assert _execute(session, settings, run) == "succeeded"

    session.expire_all()
    eval_pairs = list(
        session.scalars(sa.select(ComparisonPair).where(ComparisonPair.kind == "version_eval"))
    )
    assert {p.prompt_id for p in eval_pairs} == set(first + fresh)
    for pair in eval_pairs:
        a = session.get(Response, pair.response_a_id)
        b = session.get(Response, pair.response_b_id)
        assert a is not None and b is not None
        assert (a.model_version_id, b.model_version_id) == (tuned.id, base.id)
        assert pair.required_judgments == 2
    # The backfilled answer of the previous policy for the new prompt.
    backfilled = session.scalars(
        sa.select(Response).where(
            Response.prompt_id == fresh[0], Response.model_version_id == base.id
        )
    ).all()
    assert len(backfilled) == 1 and backfilled[0].generation_params["purpose"] == "version_eval"
    row = session.get(Run, run.id)
    assert row is not None and row.result["version_eval_pairs"] == 3
    assert row.result["responses"] == 6  # 3 prompts x K=2 from the tuned policy
    assert session.scalar(sa.select(sa.func.count()).select_from(Prompt)) == 3


def test_a_failing_handler_marks_the_run_failed_and_reraises(
    session: Session, settings: Settings, factory: Factory
) -> None:
    project = factory.project(base_policy="not/a-local-dir")
    add_prompts(session, project, 1)
    run = runs.create_run(session, project, "generate", settings=settings)
    session.commit()
    with pytest.raises(Exception, match="hub downloads are disabled"):
        _execute(session, settings, run)
    session.expire_all()
    row = session.get(Run, run.id)
    assert row is not None and row.status == "failed" and row.finished_at is not None
    assert row.error is not None and row.error.startswith(
        "ModelLoadError: Model spec 'not/a-local-dir'"
    )


# --- the CLI over this service (real `verdict` processes) --------------------------------------


@pytest.fixture
def cli_env(sqlite_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {
        **os.environ,
        "VERDICT_DATABASE_URL": sqlite_url,
        "VERDICT_VAR_DIR": str(tmp_path / "var"),
        "COLUMNS": "200",
    }
    empty_all_tables(sqlite_url)


def test_cli_lists_watches_and_refuses_unknown_kinds(
    cli_env: dict[str, str], sqlite_url: str, tmp_path: Path
) -> None:
    settings = Settings(database_url=sqlite_url, var_dir=tmp_path / "var")
    with unit_of_work(make_sessionmaker(engine_for(sqlite_url))) as session:
        project = projects.create_project(session, "cli", "CLI")
        failed = runs.create_run(session, project, "generate", settings=settings)
        live = runs.create_run(session, project, "generate", settings=settings)
    for run in (failed, live):
        with unit_of_work(make_sessionmaker(engine_for(sqlite_url))) as session:
            runner.claim_run(session, run.id, worker="w")
    assert failed.task_id is not None and live.task_id is not None
    runner.RunHooks(sqlite_url, failed.id, 1, heartbeat_interval_s=60).finish(
        "failed", error="ModelLoadError: no such model"
    )

    listed = run_verdict("runs", "list", "--project", "cli", env=cli_env)
    assert listed.returncode == 0, listed.stderr
    assert "failed" in listed.stdout and "running" in listed.stdout

    watch_failed = run_verdict("runs", "watch", str(failed.id), env=cli_env)
    assert watch_failed.returncode == 1
    assert "ModelLoadError: no such model" in watch_failed.stderr

    # `watch` follows a live run and returns when it ends.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "runs", "watch", str(live.id), "--interval", "0.2"],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    hooks = runner.RunHooks(sqlite_url, live.id, 1, heartbeat_interval_s=60)
    hooks.progress(1, 2, "half way")
    time.sleep(3)
    assert watcher.poll() is None  # still watching a running run
    hooks.finish("succeeded", result={"responses": 4})
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0, err
    assert '"responses": 4' in out

    unknown = run_verdict("runs", "start", "--project", "cli", "--kind", "train", env=cli_env)
    assert unknown.returncode == 2 and "unknown run kind 'train'" in unknown.stderr
