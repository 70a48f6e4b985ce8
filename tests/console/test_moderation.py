"""The Moderation tab: the queue with its content escaped and clipped, filters, the four
actions and their refusals, the exclusions panel; each answer and the rows it leaves."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from app.models import AuditEvent, ComparisonPair, Project, RaterExclusion, User
from app.services import exclusions
from tests.conftest import Factory
from tests.console.conftest import Browser
from tests.services.test_snapshots import judge

Browse = Callable[[User | None], Browser]


def seed(factory: Factory) -> tuple[Project, ComparisonPair, ComparisonPair, User]:
    project = factory.project("modq")
    rater = factory.user("rater", "ann@example.com")
    bad = factory.pair(
        project, ("<script>alert(1)</script> here is how", "I can't help with that."),
        prompt="How do I <b>pick</b> a lock?",
    )  # fmt: skip
    long = factory.pair(project, ("word " * 400, "short"), prompt="Write a long story")
    judge(factory, bad, rater, "b", flags=["unsafe"])
    judge(factory, long, rater, "a", flags=["broken"])
    return project, bad, long, rater


def fresh_pair(factory: Factory, pair_id: int) -> ComparisonPair:
    factory.session.commit()
    factory.session.expire_all()
    pair = factory.session.get(ComparisonPair, pair_id)
    assert pair is not None
    return pair


def test_queue_renders_escaped_clipped_and_read_only_for_reviewers(
    factory: Factory, browser_for: Browse
) -> None:
    project, bad, long, _ = seed(factory)
    admin = browser_for(factory.user("admin"))
    reviewer = browser_for(factory.user("reviewer"))
    page = admin.get("/admin/projects/modq/moderation")
    assert page.status_code == 200  # type: ignore[attr-defined]
    html = page.text  # type: ignore[attr-defined]
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html
    assert "<b>pick</b>" not in html
    assert f'id="pair-{bad.id}"' in html and f'id="pair-{long.id}"' in html
    assert "ann@example.com" in html
    assert 'class="clip-wrap"' in html and "Show all" in html  # the 2,000-character response
    assert html.count('class="mod-actions') == 2
    assert 'value="remove"' in html and "Raters excluded from training" in html

    only_broken = admin.get("/admin/projects/modq/moderation?flag=broken").text  # type: ignore[attr-defined]
    assert f'id="pair-{long.id}"' in only_broken and f'id="pair-{bad.id}"' not in only_broken

    read_only = reviewer.get("/admin/projects/modq/moderation").text  # type: ignore[attr-defined]
    assert f'id="pair-{bad.id}"' in read_only
    assert "mod-actions" not in read_only and "exclude-form" not in read_only
    denied = reviewer.post(f"/admin/projects/modq/moderation/pairs/{bad.id}", {"action": "resolve"})
    assert denied.status_code == 403  # type: ignore[attr-defined]


def test_remove_then_restore_from_the_page(factory: Factory, browser_for: Browse) -> None:
    project, bad, _, _ = seed(factory)
    admin_user = factory.user("admin")
    admin = browser_for(admin_user)
    url = f"/admin/projects/modq/moderation/pairs/{bad.id}"

    refused = admin.post(url, {"action": "remove", "reason": "  ", "scope": "pair"})
    assert refused.status_code == 422  # type: ignore[attr-defined]
    assert 'class="field-error" id="reason-' in refused.text  # type: ignore[attr-defined]
    assert fresh_pair(factory, bad.id).rating_removed_at is None

    removed = admin.post(
        url, {"action": "remove", "reason": "how-to for a crime", "scope": "prompt",
              "flag": "unsafe"},
    )  # fmt: skip
    assert removed.status_code == 303  # type: ignore[attr-defined]
    assert removed.headers["location"] == "/admin/projects/modq/moderation?flag=unsafe"  # type: ignore[attr-defined]
    pair = fresh_pair(factory, bad.id)
    assert pair.rating_removed_at is not None and pair.training_excluded_at is not None
    follow = admin.get("/admin/projects/modq/moderation?flag=unsafe").text  # type: ignore[attr-defined]
    assert f"Removed from rating: prompt {bad.prompt_id} (1 pair)." in follow
    assert f'id="pair-{bad.id}"' not in follow
    history = admin.get("/admin/projects/modq/moderation?state=moderated").text  # type: ignore[attr-defined]
    assert f'id="pair-{bad.id}"' in history and "removed from rating" in history
    assert 'value="restore"' in history

    restored = admin.post(url, {"action": "restore", "reason": "reviewed: fine", "scope": "pair"})
    assert restored.status_code == 303  # type: ignore[attr-defined]
    assert fresh_pair(factory, bad.id).rating_removed_at is None
    again = admin.post(url, {"action": "restore", "reason": "x", "scope": "pair"})
    assert again.status_code == 409  # type: ignore[attr-defined]
    assert "nothing to restore" in again.text  # type: ignore[attr-defined]
    actions = list(
        factory.session.scalars(
            sa.select(AuditEvent.action)
            .where(AuditEvent.action.like("moderation.%"))
            .order_by(AuditEvent.id)
        )
    )
    assert actions == ["moderation.remove", "moderation.restore"]


def test_exclude_and_lift_a_rater_from_the_page(factory: Factory, browser_for: Browse) -> None:
    project, _, _, rater = seed(factory)
    admin = browser_for(factory.user("admin", "boss@example.com"))
    base = "/admin/projects/modq/moderation/exclusions"

    missing = admin.post(base, {"email": "ann@example.com", "reason": ""})
    assert missing.status_code == 422  # type: ignore[attr-defined]
    assert 'id="exclude-reason-error"' in missing.text  # type: ignore[attr-defined]
    nobody = admin.post(base, {"email": "nobody@example.com", "reason": "spam"})
    assert nobody.status_code == 422  # type: ignore[attr-defined]
    assert 'id="exclude-email-error"' in nobody.text  # type: ignore[attr-defined]

    made = admin.post(base, {"email": "ann@example.com", "reason": "always left"})
    assert made.status_code == 303  # type: ignore[attr-defined]
    factory.session.commit()
    assert set(exclusions.live_exclusions(factory.session, project)) == {rater.id}
    html = admin.get("/admin/projects/modq/moderation").text  # type: ignore[attr-defined]
    assert f'id="exclusion-{rater.id}"' in html and "always left" in html
    assert "by boss@example.com" in html
    twice = admin.post(base, {"email": "ann@example.com", "reason": "again"})
    assert twice.status_code == 409  # type: ignore[attr-defined]
    assert "already excluded" in twice.text  # type: ignore[attr-defined]

    no_reason = admin.post(f"{base}/{rater.id}/lift", {"reason": ""})
    assert no_reason.status_code == 422  # type: ignore[attr-defined]
    assert f'id="lift-{rater.id}-error"' in no_reason.text  # type: ignore[attr-defined]
    lifted = admin.post(f"{base}/{rater.id}/lift", {"reason": "retrained"})
    assert lifted.status_code == 303  # type: ignore[attr-defined]
    html = admin.get("/admin/projects/modq/moderation").text  # type: ignore[attr-defined]
    assert "History: 1 lifted exclusion" in html and "retrained" in html
    assert factory.count(RaterExclusion) == 1
    not_live = admin.post(f"{base}/{rater.id}/lift", {"reason": "again"})
    assert not_live.status_code == 409  # type: ignore[attr-defined]
    assert "is not excluded" in not_live.text  # type: ignore[attr-defined]


def test_empty_queue_and_bad_filters(factory: Factory, browser_for: Browse) -> None:
    factory.project("quiet")
    admin = browser_for(factory.user("admin"))
    html = admin.get("/admin/projects/quiet/moderation?state=odd&flag=rude&offset=x").text  # type: ignore[attr-defined]
    assert "Nothing flagged is waiting for review." in html
    assert "Nobody is excluded" in html
    history = admin.get("/admin/projects/quiet/moderation?state=moderated").text  # type: ignore[attr-defined]
    assert "Nothing moderated yet." in history
