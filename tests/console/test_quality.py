"""The Quality tab: the project's figures and the rater table with outliers in words, the
exclude / lift round trip (rows, audit events, what the page says after), refusals at the row,
read-only reviewers, escaped reasons, and a page that reads in a fixed number of statements."""

from __future__ import annotations

import re
from collections.abc import Callable

import sqlalchemy as sa
from fastapi import FastAPI

from app.models import AuditEvent, ComparisonPair, Judgment, Project, RaterExclusion, User
from tests.conftest import Factory
from tests.console.conftest import Browser, counted_statements

Browse = Callable[[User | None], Browser]


def _spam_scene(factory: Factory, pairs: int = 12) -> tuple[Project, list[User], User]:
    """Three careful raters who pick a, and a spammer who picks the left side fast."""
    project = factory.project("quality")
    careful = [factory.user(email=f"careful{i}@example.com") for i in range(3)]
    spammer = factory.user(email="spammer@example.com")
    s = factory.session
    for i in range(pairs):
        pair = factory.pair(project, prompt=f"q{i}")
        left = "ab"[i % 2]
        for rater in careful:
            s.add(_judgment(pair, rater, "a", left, 10_000))
        s.add(_judgment(pair, spammer, left, left, 1_500))
        s.commit()
    return project, careful, spammer


def _judgment(pair: ComparisonPair, rater: User, choice: str, left: str, ms: int) -> Judgment:
    return Judgment(
        project_id=pair.project_id, pair_id=pair.id, rater_id=rater.id, choice=choice,
        strength=1, shown_left=left, active_ms=ms,
    )  # fmt: skip


def _row(html: str, user: User) -> str:
    match = re.search(rf'<tbody id="rater-{user.id}".*?</tbody>', html, re.S)
    assert match is not None, f"no row for {user.email}"
    return match.group(0)


def test_page_shows_figures_and_the_spammer_first_with_reasons(
    factory: Factory, browser_for: Browse
) -> None:
    project, careful, spammer = _spam_scene(factory)
    admin = browser_for(factory.user("admin"))
    page = admin.get(f"/admin/projects/{project.slug}/quality")
    assert page.status_code == 200  # type: ignore[attr-defined]
    html = page.text  # type: ignore[attr-defined]
    assert 'aria-current="page">Quality</a>' in html
    assert "48 rater judgments by 4 raters on 12 pairs" in html
    assert "Krippendorff" in html and "By week" in html
    rows = re.findall(r'<tbody id="rater-(\d+)"', html)
    assert rows[0] == str(spammer.id)  # highlighted first
    spam = _row(html, spammer)
    assert 'class="rater outlier"' in spam
    assert "picks the left side 100 % of the time (95 % CI 76–100 %, 12 decisive judgments)" in spam
    assert "agrees with the others on 50 % of 12 shared pairs, project median 100 %" in spam
    assert "median 1.5 s per judgment, project median 10 s" in spam
    assert "Exclude from training" in spam
    for rater in careful:
        assert "outlier" not in _row(html, rater)

    ordered = admin.get(f"/admin/projects/{project.slug}/quality?sort=agreement").text  # type: ignore[attr-defined]
    assert re.findall(r'<tbody id="rater-(\d+)"', ordered)[-1] != str(spammer.id)
    assert re.findall(r'<tbody id="rater-(\d+)"', ordered)[0] == str(spammer.id)  # lowest first


def test_exclude_then_lift_round_trip(factory: Factory, browser_for: Browse, app: FastAPI) -> None:
    project, _, spammer = _spam_scene(factory, pairs=6)
    admin_user = factory.user("admin")
    admin = browser_for(admin_user)
    base = f"/admin/projects/{project.slug}/quality/raters/{spammer.id}"

    refused = admin.post(f"{base}/exclude", {"reason": "  "})
    assert refused.status_code == 422  # type: ignore[attr-defined]
    row = _row(refused.text, spammer)  # type: ignore[attr-defined]
    assert "say why" in row and "<details" in row and " open>" in row
    assert factory.count(RaterExclusion) == 0

    answer = admin.post(f"{base}/exclude", {"reason": "clicks <left> every time"})
    assert answer.status_code == 303  # type: ignore[attr-defined]
    location = answer.headers["location"]  # type: ignore[attr-defined]
    assert location == f"/admin/projects/{project.slug}/quality#rater-{spammer.id}"
    factory.session.commit()
    (exclusion,) = factory.session.scalars(sa.select(RaterExclusion)).all()
    assert (exclusion.rater_id, exclusion.created_by_id, exclusion.lifted_at) == (
        spammer.id, admin_user.id, None,
    )  # fmt: skip
    html = admin.get(f"/admin/projects/{project.slug}/quality").text  # type: ignore[attr-defined]
    assert "spammer@example.com&#39;s judgments are excluded from training" in html
    row = _row(html, spammer)
    assert "excluded" in row and "Lift exclusion" in row
    assert "clicks &lt;left&gt; every time" in row and "<left>" not in row

    again = admin.post(f"{base}/exclude", {"reason": "twice"})
    assert again.status_code == 409  # type: ignore[attr-defined]
    assert "already excluded" in _row(again.text, spammer)  # type: ignore[attr-defined]

    lifted = admin.post(f"{base}/lift", {"reason": "retrained"})
    assert lifted.status_code == 303  # type: ignore[attr-defined]
    factory.session.commit()
    factory.session.expire_all()
    assert factory.session.get(RaterExclusion, exclusion.id).lift_reason == "retrained"  # type: ignore[union-attr]
    actions = [
        (e.action, e.actor_id, e.target_id, e.data["reason"])
        for e in factory.session.scalars(sa.select(AuditEvent).order_by(AuditEvent.id))
        if e.action.startswith("rater.")
    ]
    assert actions == [
        ("rater.exclude", admin_user.id, spammer.id, "clicks <left> every time"),
        ("rater.include", admin_user.id, spammer.id, "retrained"),
    ]
    row = _row(admin.get(f"/admin/projects/{project.slug}/quality").text, spammer)  # type: ignore[attr-defined]
    assert "Exclude from training" in row and "badge failed" not in row

    not_excluded = admin.post(f"{base}/lift", {"reason": "again"})
    assert not_excluded.status_code == 409  # type: ignore[attr-defined]

    # Someone with no row on the page: the refusal is shown above the table.
    nobody = admin.post(
        f"/admin/projects/{project.slug}/quality/raters/999999/exclude", {"reason": "x"}
    )
    assert nobody.status_code == 422  # type: ignore[attr-defined]
    assert '<p class="flash bad" role="alert">no such user</p>' in nobody.text  # type: ignore[attr-defined]


def test_reviewer_reads_without_forms_and_an_empty_project(
    factory: Factory, browser_for: Browse
) -> None:
    project, _, spammer = _spam_scene(factory, pairs=2)
    factory.project("nothing-yet")
    reviewer = browser_for(factory.user("reviewer"))
    html = reviewer.get(f"/admin/projects/{project.slug}/quality").text  # type: ignore[attr-defined]
    assert "Exclude from training" not in html and "<form" not in _row(html, spammer)
    empty = reviewer.get("/admin/projects/nothing-yet/quality")
    assert empty.status_code == 200  # type: ignore[attr-defined]
    assert "No rater has judged a pair of this project yet." in empty.text  # type: ignore[attr-defined]
    assert "no pair has two judgments on the scale" in empty.text  # type: ignore[attr-defined]


def test_page_reads_in_a_fixed_number_of_statements(
    factory: Factory, browser_for: Browse, app: FastAPI
) -> None:
    project, _, _ = _spam_scene(factory, pairs=3)
    admin = browser_for(factory.user("admin"))
    path = f"/admin/projects/{project.slug}/quality"
    with counted_statements(app.state.engine) as few:
        assert admin.get(path).status_code == 200  # type: ignore[attr-defined]
    for i in range(3):  # more raters and pairs
        extra = factory.user()
        pair = factory.pair(project, prompt=f"more {i}")
        factory.session.add(_judgment(pair, extra, "b", "a", 5000))
        factory.session.commit()
    with counted_statements(app.state.engine) as many:
        assert admin.get(path).status_code == 200  # type: ignore[attr-defined]
    assert len(many) == len(few)
