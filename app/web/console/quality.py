"""Console page: a project's data quality, and excluding a rater's work from training.

    GET  /admin/projects/{slug}/quality                            figures and raters (reader)
    POST /admin/projects/{slug}/quality/raters/{user_id}/exclude   reason required
    POST /admin/projects/{slug}/quality/raters/{user_id}/lift      reason required

The figures are `app.services.quality`'s (the same the quality API answers); the actions are
`app.services.exclusions`' (audited there). A refused action (no reason, already excluded)
re-renders the page with the reason at the rater's row and the refusal's status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from sqlalchemy.orm import Session
from starlette.responses import Response

from app.api.deps import SessionDep
from app.models import Project, RaterExclusion, User
from app.services import exclusions, quality
from app.services.errors import InvalidInput, ServiceError
from app.web.console.common import Admin, ProjectPage, Reader, console_route, done, page

router = APIRouter(prefix="/admin")

FormText = Annotated[str, Form()]

# The rater table's orders: key -> (column label, sort key, biggest first). None sorts last.
SORTS: dict[str, tuple[str, Callable[[quality.RaterQuality], Any], bool]] = {
    "attention": ("Attention", lambda r: (len(r.outliers), r.judgments), True),
    "judgments": ("Judgments", lambda r: r.judgments, True),
    "time": ("Median time", lambda r: r.median_active_ms, False),
    "agreement": ("Agreement", lambda r: r.agreement, False),
    "gold": ("Gold", lambda r: r.gold_accuracy, False),
    "left": (
        "Left side",
        lambda r: None if r.left.share is None else abs(r.left.share - 0.5),
        True,
    ),
    "ties": ("Ties", lambda r: r.tie_rate, True),
    "reliability": ("Reliability", lambda r: r.reliability, False),
}


def _sorted(raters: list[quality.RaterQuality], sort: str) -> list[quality.RaterQuality]:
    """The raters in the order `sort` names (unknown: the service's, highlighted first)."""
    if sort not in SORTS or sort == "attention":
        return raters
    _, key, descending = SORTS[sort]
    known = [r for r in raters if key(r) is not None]
    missing = [r for r in raters if key(r) is None]
    return sorted(known, key=key, reverse=descending) + missing


def _quality(
    request: Request,
    session: Session,
    user: User,
    project: Project,
    *,
    sort: str = "attention",
    status_code: int = 200,
    refusal: str | None = None,
    refused_user_id: int | None = None,
    reason: str = "",
) -> Response:
    report = quality.quality_report(session, project)
    context = {
        "tab": "quality",
        "report": report,
        "figures": report.project.figures,
        "raters": _sorted(report.raters.raters, sort),
        "sort": sort if sort in SORTS else "attention",
        "sorts": {key: label for key, (label, _, _) in SORTS.items()},
        "cycles_listed": quality.CYCLES_LISTED,
        "thresholds": {
            "agreement_gap": quality.AGREEMENT_GAP,
            "fast_fraction": quality.FAST_FRACTION,
            "gold_min": quality.GOLD_MIN_ACCURACY,
            "reliability_min": quality.RELIABILITY_MIN,
            "tie_max": quality.TIE_RATE_MAX,
        },
        "refusal": refusal,
        "refused_user_id": refused_user_id,
        "reason": reason,
    }
    return page(
        request, "console/quality/quality.html", user, context, section="project",
        project=project, status_code=status_code,
    )  # fmt: skip


@console_route(router, "GET", "/projects/{slug}/quality", access="reader")
def quality_page(
    request: Request, session: SessionDep, user: Reader, project: ProjectPage, sort: str = ""
) -> Response:
    return _quality(request, session, user, project, sort=sort or "attention")


def _act(
    request: Request,
    session: Session,
    user: User,
    project: Project,
    user_id: int,
    reason: str,
    action: Callable[[], RaterExclusion],
    message: Callable[[str], str],
) -> Response:
    """Exclude or lift: done with a message, or the page with the refusal at the rater's row."""
    try:
        action()
    except ServiceError as exc:
        text = exc.message
        if isinstance(exc, InvalidInput) and exc.errors:
            text = exc.errors[0].message
        return _quality(
            request, session, user, project, status_code=exc.status_code, refusal=text,
            refused_user_id=user_id, reason=reason,
        )  # fmt: skip
    rater = session.get(User, user_id)
    who = rater.email if rater is not None else f"user {user_id}"
    return done(request, f"/admin/projects/{project.slug}/quality#rater-{user_id}", message(who))


@console_route(router, "POST", "/projects/{slug}/quality/raters/{user_id}/exclude", access="admin")
def exclude(
    request: Request,
    user_id: int,
    session: SessionDep,
    user: Admin,
    project: ProjectPage,
    reason: FormText = "",
) -> Response:
    return _act(
        request, session, user, project, user_id, reason,
        lambda: exclusions.exclude_rater(session, project, user_id, reason=reason, actor=user),
        lambda who: f"{who}'s judgments are excluded from training: snapshots taken from now on"
        " leave them out, also those they make later, until the exclusion is lifted.",
    )  # fmt: skip


@console_route(router, "POST", "/projects/{slug}/quality/raters/{user_id}/lift", access="admin")
def lift(
    request: Request,
    user_id: int,
    session: SessionDep,
    user: Admin,
    project: ProjectPage,
    reason: FormText = "",
) -> Response:
    return _act(
        request, session, user, project, user_id, reason,
        lambda: exclusions.lift_exclusion(session, project, user_id, reason=reason, actor=user),
        lambda who: f"{who}'s judgments count for training again in snapshots taken from now on.",
    )  # fmt: skip
