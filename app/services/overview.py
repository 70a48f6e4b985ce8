"""The console's overview: every project's loop state at a glance, and what needs attention.

Each figure is one grouped query over all projects (not one query per project), so the page
costs the same dozen statements for one project or fifty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.kinds.data import SnapshotConfig
from app.models import (
    ComparisonPair,
    DatasetSnapshot,
    Judgment,
    ModelVersion,
    Project,
    Prompt,
    Run,
    utcnow,
)
from app.services import snapshots
from app.services.projects import project_settings

# A failed run stays on the attention list this long after it ended.
RECENT_FAILURES = timedelta(days=7)


@dataclass
class Attention:
    """One thing an admin should look at, said in words, with where to look."""

    message: str
    href: str
    severity: str = "warn"  # "warn" or "bad"


@dataclass
class ProjectState:
    """One project's loop at a glance."""

    project: Project
    prompts: int = 0
    pairs_waiting: int = 0
    judgments_today: int = 0
    until_retrain: int = 0
    retrain_threshold: int = 0
    auto_mode: bool = False
    active_policy: ModelVersion | None = None
    active_reward: ModelVersion | None = None
    running: int = 0
    queued: int = 0
    last_promotion: datetime | None = None
    attention: list[Attention] = field(default_factory=list)


def project_states(
    session: Session,
    settings: Settings,
    *,
    only: Project | None = None,
    now: datetime | None = None,
) -> list[ProjectState]:
    """Every project's state (or only that of `only`), in project order, with its attention
    items."""
    now = now or utcnow()
    projects = (
        [only] if only is not None else list(session.scalars(select(Project).order_by(Project.id)))
    )
    states = {p.id: ProjectState(project=p) for p in projects}
    if not states:
        return []
    ids = list(states)

    for pid, n in session.execute(
        select(Prompt.project_id, func.count())
        .where(Prompt.project_id.in_(ids))
        .group_by(Prompt.project_id)
    ):
        states[pid].prompts = n
    open_pairs = select(ComparisonPair.project_id, func.count()).where(
        ComparisonPair.project_id.in_(ids),
        ComparisonPair.gold_choice.is_(None),
        ComparisonPair.rating_removed_at.is_(None),
        ComparisonPair.judgment_count < ComparisonPair.required_judgments,
    )
    for pid, n in session.execute(open_pairs.group_by(ComparisonPair.project_id)):
        states[pid].pairs_waiting = n
    start_of_day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    for pid, n in session.execute(
        select(Judgment.project_id, func.count())
        .where(Judgment.project_id.in_(ids), Judgment.created_at >= start_of_day)
        .group_by(Judgment.project_id)
    ):
        states[pid].judgments_today = n
    for version in session.scalars(
        select(ModelVersion).where(
            ModelVersion.project_id.in_(ids), ModelVersion.status == "active"
        )
    ):
        state = states[version.project_id]
        if version.kind == "policy":
            state.active_policy = version
        else:
            state.active_reward = version
    for pid, last in session.execute(
        select(ModelVersion.project_id, func.max(ModelVersion.promoted_at))
        .where(ModelVersion.project_id.in_(ids), ModelVersion.version > 0)
        .group_by(ModelVersion.project_id)
    ):
        states[pid].last_promotion = last
    for pid, status, n in session.execute(
        select(Run.project_id, Run.status, func.count())
        .where(Run.project_id.in_(ids), Run.status.in_(("queued", "running")))
        .group_by(Run.project_id, Run.status)
    ):
        setattr(states[pid], status, n)
    _retrain_counts(session, states)
    _attention(session, settings, states, now)
    return [states[p.id] for p in projects]


def _retrain_counts(session: Session, states: dict[int, ProjectState]) -> None:
    """Judgments each project still needs before the automatic reward trigger fires: the
    trigger's own count (new usable judgments since the last snapshot), capped at the
    threshold so a project with a million judgments costs no more than one with a few."""
    last_ids = dict(
        session.execute(
            select(DatasetSnapshot.project_id, func.max(DatasetSnapshot.max_judgment_id))
            .where(DatasetSnapshot.project_id.in_(states))
            .group_by(DatasetSnapshot.project_id)
        ).all()
    )
    for pid, state in states.items():
        ps = project_settings(state.project)
        state.auto_mode = ps.auto_mode
        state.retrain_threshold = ps.reward_retrain_threshold
        new = snapshots.usable_judgment_count(
            session, state.project, SnapshotConfig(), after_id=last_ids.get(pid) or 0,
            at_most=ps.reward_retrain_threshold,
        )  # fmt: skip
        state.until_retrain = max(0, ps.reward_retrain_threshold - new)


def _attention(
    session: Session, settings: Settings, states: dict[int, ProjectState], now: datetime
) -> None:
    """Failed runs of the last days, runs whose worker went silent, runs waiting with nobody
    to take them, and projects whose raters have nothing to judge."""
    for run in session.scalars(
        select(Run)
        .where(
            Run.project_id.in_(states),
            Run.status == "failed",
            Run.finished_at >= now - RECENT_FAILURES,
        )
        .order_by(Run.id.desc())
    ):
        states[run.project_id].attention.append(
            Attention(
                f"{run.kind} run {run.id} failed: {_first_line(run.error)}",
                f"/admin/runs/{run.id}",
                "bad",
            )
        )
    silent = now - timedelta(seconds=settings.worker_heartbeat_timeout_s)
    for run in session.scalars(
        select(Run).where(
            Run.project_id.in_(states),
            Run.status == "running",
            or_(Run.heartbeat_at.is_(None), Run.heartbeat_at < silent),
        )
    ):
        states[run.project_id].attention.append(
            Attention(
                f"{run.kind} run {run.id}: its worker ({run.worker}) has not been heard from"
                f" since {run.heartbeat_at:%H:%M} UTC; the reaper will requeue or fail it",
                f"/admin/runs/{run.id}",
                "bad",
            )
        )
    waiting = now - timedelta(seconds=settings.resend_queued_after_s)
    for run in session.scalars(select(Run).where(Run.status == "queued", Run.created_at < waiting)):
        states[run.project_id].attention.append(
            Attention(
                f"{run.kind} run {run.id} has waited since {run.created_at:%H:%M} UTC: is a"
                f" worker running (`verdict worker`)?",
                f"/admin/runs/{run.id}",
            )
        )
    for state in states.values():
        generating = state.running + state.queued > 0
        if state.prompts and not state.pairs_waiting and not generating:
            state.attention.append(
                Attention(
                    "raters have nothing to judge: every pair is done; upload prompts or"
                    " generate answers",
                    f"/admin/projects/{state.project.slug}/data",
                )
            )


def _first_line(text: str | None) -> str:
    line = (text or "no error recorded").strip().splitlines()[0]
    return line if len(line) <= 160 else line[:157] + "..."


def project_state(session: Session, settings: Settings, project: Project) -> ProjectState:
    """One project's state, as the overview shows it."""
    (state,) = project_states(session, settings, only=project)
    return state
