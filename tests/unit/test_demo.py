"""The demo's processes: every queue work is sent to has a consumer, and model runs have their
own worker so the periodic checks never wait behind one."""

from __future__ import annotations

from pathlib import Path

from app.core.config import Settings
from app.demo import demo_children
from app.kinds.queues import DEFAULT_QUEUE, GPU_QUEUE
from app.kinds.registry import RUN_KINDS
from workers.celery_app import make_celery


def worker_queues(tmp_path: Path) -> dict[str, set[str]]:
    settings = Settings(var_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'v.db'}")
    queues = {}
    for child in demo_children(settings, "127.0.0.1", 8000):
        if "worker" in child.argv:
            queues[child.name] = set(child.argv[child.argv.index("-Q") + 1].split(","))
    return queues


def test_model_runs_and_housekeeping_have_separate_workers(tmp_path: Path) -> None:
    queues = worker_queues(tmp_path)
    assert queues == {"worker": {GPU_QUEUE}, "housekeeping": {DEFAULT_QUEUE}}


def test_every_queue_that_receives_work_has_a_demo_consumer(tmp_path: Path) -> None:
    consumed = set().union(*worker_queues(tmp_path).values())
    settings = Settings(var_dir=tmp_path, broker_url=f"sqla+sqlite:///{tmp_path / 'b.sqlite'}")
    periodic = {
        entry["options"]["queue"] for entry in make_celery(settings).conf.beat_schedule.values()
    }
    run_queues = {kind.queue for kind in RUN_KINDS.values()}
    assert periodic | run_queues <= consumed
    assert not periodic & run_queues  # no periodic check queues behind a model run


def test_the_demo_workers_recover_what_a_stopped_demo_left(tmp_path: Path) -> None:
    """Each demo worker is `verdict worker --sole`: the only worker of its queue, so at start it
    requeues that queue's runs still marked running and resends its queued ones."""
    settings = Settings(var_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'v.db'}")
    workers = [c for c in demo_children(settings, "127.0.0.1", 8000) if "worker" in c.argv]
    assert len(workers) == 2
    for child in workers:
        assert child.argv[1:4] == ["-m", "app.cli", "worker"] and "--sole" in child.argv
    names = {child.argv[child.argv.index("--name") + 1] for child in workers}
    assert len(names) == 2  # two workers on one host need different node names
