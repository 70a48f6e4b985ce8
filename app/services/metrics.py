"""The metrics `/metrics` reads from the database at scrape time.

These describe the deployment, not one process: every web process (and every host) would count
the same judgments, runs and workers, so they are read from the rows when scraped rather than
counted in memory. Each query is small and indexed; a scrape costs a few milliseconds however
many judgments are stored:

* queue depth: open pairs per project through the partial index `ix_comparison_pairs_open`
  (only pairs that still need judgments are in it);
* judgments of the last minute per project: a range of `ix_judgments_project_created`;
* runs by kind and status: one GROUP BY over the runs table (thousands of rows, not millions);
* worker heartbeat age: the `workers` table (`services/presence.py`);
* run progress: the `progress_done` of running runs (optimizer steps for reward, PPO and DPO
  runs, prompts for generation), exposed as a counter per run, so `rate()` is the step rate
  wherever the run trains: the worker writes the row, any web process reads it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.models import ComparisonPair, Judgment, Project, Run, utcnow
from app.models.projects import OPEN_PAIR_PREDICATE
from app.services.presence import heartbeat_ages

JUDGMENT_WINDOW_S = 60


def database_metrics(session: Session, *, now: datetime | None = None) -> list[Metric]:
    """Every database-derived metric family, read in the caller's transaction."""
    now = now or utcnow()
    return [
        _queue_depth(session),
        _recent_judgments(session, now),
        _runs(session),
        _worker_ages(session, now),
        _run_steps(session),
    ]


def _queue_depth(session: Session) -> Metric:
    family = GaugeMetricFamily(
        "verdict_rater_queue_depth",
        "Pairs of the project that still need judgments (not gold, not removed by moderation)",
        labels=["project"],
    )
    # The predicate as text, exactly the partial index's, so the planner can answer from it.
    open_pairs = (
        select(func.count())
        .select_from(ComparisonPair)
        .where(ComparisonPair.project_id == Project.id, text(OPEN_PAIR_PREDICATE))
        .scalar_subquery()
    )
    for slug, depth in session.execute(select(Project.slug, open_pairs).order_by(Project.slug)):
        family.add_metric([slug], depth)
    return family


def _recent_judgments(session: Session, now: datetime) -> Metric:
    family = GaugeMetricFamily(
        "verdict_judgments_last_minute",
        f"Judgments stored in the project in the last {JUDGMENT_WINDOW_S} s (judgments per minute)",
        labels=["project"],
    )
    since = now - timedelta(seconds=JUDGMENT_WINDOW_S)
    recent = (
        select(func.count())
        .select_from(Judgment)
        .where(Judgment.project_id == Project.id, Judgment.created_at >= since)
        .scalar_subquery()
    )
    for slug, count in session.execute(select(Project.slug, recent).order_by(Project.slug)):
        family.add_metric([slug], count)
    return family


def _runs(session: Session) -> Metric:
    family = GaugeMetricFamily("verdict_runs", "Runs by kind and status", labels=["kind", "status"])
    rows = session.execute(
        select(Run.kind, Run.status, func.count())
        .group_by(Run.kind, Run.status)
        .order_by(Run.kind, Run.status)
    )
    for kind, status, count in rows:
        family.add_metric([kind, status], count)
    return family


def _worker_ages(session: Session, now: datetime) -> Metric:
    family = GaugeMetricFamily(
        "verdict_worker_heartbeat_age_seconds",
        "Seconds since the worker last wrote its presence row, per queue it consumes",
        labels=["worker", "queue"],
    )
    for name, queue, age in sorted(heartbeat_ages(session, now=now)):
        family.add_metric([name, queue], age)
    return family


def _run_steps(session: Session) -> Metric:
    family = CounterMetricFamily(
        "verdict_run_steps",
        "Work done by each running run (optimizer steps for reward, PPO and DPO; prompts for"
        " generation); rate() is its step rate",
        labels=["kind", "run"],
    )
    rows = session.execute(
        select(Run.kind, Run.id, Run.progress_done).where(Run.status == "running").order_by(Run.id)
    )
    for kind, run_id, done in rows:
        family.add_metric([kind, str(run_id)], done)
    return family
