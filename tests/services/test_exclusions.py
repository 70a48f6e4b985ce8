"""Rater exclusions: reason required, one live exclusion per rater, audited; snapshots taken
afterwards leave the rater's judgments out (past and future) and say so; lifting lets them
back in; earlier snapshots are unchanged."""

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.core.db import make_engine, make_sessionmaker
from app.kinds.data import SnapshotConfig
from app.models import AuditEvent, Project, RaterExclusion, User
from app.services import exclusions, projects, snapshots, users
from app.services.errors import Conflict, InvalidInput
from tests.conftest import Factory
from tests.services.test_snapshots import judge


@pytest.fixture
def project(factory: Factory) -> Project:
    return factory.project("excl")


def test_exclude_requires_a_reason_and_a_known_user(
    factory: Factory, session: Session, project: Project
) -> None:
    admin, rater = factory.user("admin"), factory.user("rater")
    with pytest.raises(InvalidInput) as err:
        exclusions.exclude_rater(session, project, rater.id, reason="  ", actor=admin)
    assert [e.field for e in err.value.errors] == ["reason"]
    with pytest.raises(InvalidInput) as err:
        exclusions.exclude_rater(session, project, 999_999, reason="spam", actor=admin)
    assert [e.field for e in err.value.errors] == ["rater_id"]
    session.rollback()
    assert factory.count(RaterExclusion) == 0


def test_exclude_then_lift_is_audited_and_kept_as_history(
    factory: Factory, session: Session, project: Project
) -> None:
    admin, rater = factory.user("admin"), factory.user("rater", "spam@example.com")
    row = exclusions.exclude_rater(
        session, project, rater.id, reason="always picks the left side", actor=admin
    )
    session.commit()
    assert set(exclusions.live_exclusions(session, project)) == {rater.id}
    with pytest.raises(Conflict, match="already excluded.*always picks the left side"):
        exclusions.exclude_rater(session, project, rater.id, reason="again", actor=admin)
    session.rollback()

    lifted = exclusions.lift_exclusion(
        session, project, rater.id, reason="retrained on the guidelines", actor=admin
    )
    session.commit()
    assert lifted.id == row.id and lifted.lifted_at is not None
    assert lifted.lifted_by_id == admin.id
    assert exclusions.live_exclusions(session, project) == {}
    with pytest.raises(Conflict, match="not excluded"):
        exclusions.lift_exclusion(session, project, rater.id, reason="x", actor=admin)
    session.rollback()

    # Excluded again later: a second row; the history lists both, newest first.
    exclusions.exclude_rater(session, project, rater.id, reason="relapsed", actor=admin)
    session.commit()
    history = exclusions.exclusion_history(session, project)
    assert [(h.exclusion.reason, h.live) for h in history] == [
        ("relapsed", True),
        ("always picks the left side", False),
    ]
    assert history[1].rater_email == "spam@example.com"
    assert history[1].created_by_email == admin.email == history[1].lifted_by_email

    events = session.scalars(
        sa.select(AuditEvent).where(AuditEvent.action.like("rater.%")).order_by(AuditEvent.id)
    ).all()
    assert [(e.action, e.actor_id, e.project_id, e.target_type, e.target_id) for e in events] == [
        ("rater.exclude", admin.id, project.id, "user", rater.id),
        ("rater.include", admin.id, project.id, "user", rater.id),
        ("rater.exclude", admin.id, project.id, "user", rater.id),
    ]
    assert [e.data["reason"] for e in events] == [
        "always picks the left side",
        "retrained on the guidelines",
        "relapsed",
    ]


def test_exclusions_are_per_project(factory: Factory, session: Session, project: Project) -> None:
    admin, rater = factory.user("admin"), factory.user("rater")
    other = factory.project("other")
    exclusions.exclude_rater(session, project, rater.id, reason="spam", actor=admin)
    session.commit()
    assert exclusions.live_exclusions(session, other) == {}
    # A user who has never rated may be excluded too (pre-emptively).
    exclusions.exclude_rater(session, other, rater.id, reason="spams elsewhere", actor=admin)
    session.commit()
    assert set(exclusions.live_exclusions(session, other)) == {rater.id}


def test_snapshots_leave_an_excluded_raters_judgments_out_and_say_so(
    factory: Factory, session: Session, project: Project
) -> None:
    admin = factory.user("admin")
    good, spam = factory.user("rater"), factory.user("rater")
    p1 = factory.pair(project, ("a1", "b1"), prompt="q1")
    p2 = factory.pair(project, ("a2", "b2"), prompt="q2")
    p3 = factory.pair(project, ("a3", "b3"), prompt="q3")
    g1 = judge(factory, p1, good, "a")
    judge(factory, p1, spam, "b")
    g2 = judge(factory, p2, good, "b")
    judge(factory, p2, spam, "a")
    judge(factory, p3, spam, "tie")  # not usable anyway: not counted as left out
    before = snapshots.create_snapshot(session, project)
    session.commit()
    assert before.stats["judgments"] == 4
    assert before.stats["excluded"] == {
        "moderation": {"judgments": 0, "pairs": 0},
        "raters": {"judgments": 0, "raters": 0},
    }
    config = SnapshotConfig()
    assert snapshots.usable_judgment_count(session, project, config) == 4

    exclusions.exclude_rater(session, project, spam.id, reason="spam", actor=admin)
    session.commit()
    # A judgment the rater makes after the exclusion is left out too.
    judge(factory, factory.pair(project, ("a4", "b4"), prompt="q4"), spam, "a")
    assert snapshots.usable_judgment_count(session, project, config) == 2
    after = snapshots.create_snapshot(session, project)
    session.commit()
    assert list(after.judgment_ids) == [g1.id, g2.id]
    assert after.stats["excluded"]["raters"] == {"judgments": 3, "raters": 1}

    # The earlier snapshot is unchanged and still loads all four.
    assert len(snapshots.load_examples(session, before)) == 4

    exclusions.lift_exclusion(session, project, spam.id, reason="fixed", actor=admin)
    session.commit()
    back = snapshots.create_snapshot(session, project)
    session.commit()
    assert back.stats["judgments"] == 5
    assert back.stats["excluded"]["raters"] == {"judgments": 0, "raters": 0}
    assert snapshots.usable_judgment_count(session, project, config) == 5


def test_only_excluded_judgments_left_is_a_clear_refusal(
    factory: Factory, session: Session, project: Project
) -> None:
    admin, spam = factory.user("admin"), factory.user("rater")
    judge(factory, factory.pair(project), spam, "a")
    exclusions.exclude_rater(session, project, spam.id, reason="spam", actor=admin)
    session.commit()
    with pytest.raises(InvalidInput, match="excluded raters"):
        snapshots.create_snapshot(session, project)


def test_two_admins_excluding_at_once_make_one_row(pg_only_url: str) -> None:
    """PostgreSQL, two sessions: the second one's read misses the first one's uncommitted row,
    its insert waits on the partial unique index, and once the first commits it gets a
    Conflict naming the first admin's reason, not a 500."""
    engine = make_engine(pg_only_url)
    maker = make_sessionmaker(engine)
    try:
        with maker() as setup:
            project = projects.create_project(setup, "race", "Race")
            a1 = users.create_user(setup, "a1@example.com", "long enough", "admin")
            a2 = users.create_user(setup, "a2@example.com", "long enough", "admin")
            rater = users.create_user(setup, "r@example.com", "long enough", "rater")
            setup.commit()
            ids = (project.id, a1.id, a2.id, rater.id)
        first, second = maker(), maker()
        exclusions.exclude_rater(
            first, first.get_one(Project, ids[0]), ids[3], reason="first",
            actor=first.get_one(User, ids[1]),
        )  # fmt: skip
        outcome: dict[str, str] = {}

        def exclude_too() -> None:
            try:
                exclusions.exclude_rater(
                    second, second.get_one(Project, ids[0]), ids[3], reason="second",
                    actor=second.get_one(User, ids[2]),
                )  # fmt: skip
                second.commit()
                outcome["second"] = "excluded"
            except Conflict as exc:
                second.rollback()
                outcome["second"] = exc.message

        thread = threading.Thread(target=exclude_too)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()  # waiting on the unique index for the first insert
        first.commit()
        thread.join(10)
        assert "already excluded" in outcome["second"] and "first" in outcome["second"]
        first.close()
        second.close()
        with maker() as check:
            rows = check.scalars(sa.select(RaterExclusion)).all()
            assert [r.reason for r in rows] == ["first"]
    finally:
        engine.dispose()
