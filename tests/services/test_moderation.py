"""The moderation queue (open and moderated pairs, flag filter, pages, who flagged and when)
and its actions (resolve, exclude, remove, restore on a pair, a prompt or a response): what
each does to snapshots and to the rater queue, and the audit log."""

from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.kinds.data import SnapshotConfig
from app.models import AuditEvent, ComparisonPair, Project, Prompt, Response, User, utcnow
from app.services import assignment, moderation, snapshots
from app.services.errors import Conflict, InvalidInput, NotFound
from tests.conftest import Factory
from tests.services.test_snapshots import judge


@pytest.fixture
def project(factory: Factory) -> Project:
    return factory.project("mod", overlap=3)


def pair_ids(page: moderation.ModerationPage) -> list[int]:
    return [item.pair.id for item in page.items]


def test_queue_lists_flagged_pairs_with_content_and_who_flagged(
    factory: Factory, session: Session, project: Project
) -> None:
    r1 = factory.user("rater", "ann@example.com")
    r2 = factory.user("rater", "bob@example.com")
    clean = factory.pair(project, ("fine", "also fine"), prompt="q0")
    unsafe = factory.pair(project, ("how to pick a lock", "no"), prompt="q1")
    pii = factory.pair(project, ("call 555-0100", "hello"), prompt="q2")
    judge(factory, clean, r1, "a")
    j1 = judge(factory, unsafe, r1, "b", flags=["unsafe"])
    j2 = judge(factory, unsafe, r2, "b", flags=["broken", "unsafe"])
    j3 = judge(factory, pii, r1, "tie", flags=["personal_data"])

    page = moderation.queue(session, project)
    # The most recently flagged first; the clean pair is not in the queue.
    assert pair_ids(page) == [pii.id, unsafe.id]
    assert page.total == 2 and page.next_offset is None
    assert page.open_by_flag == {"unsafe": 1, "personal_data": 1, "broken": 1}
    item = page.items[1]
    assert item.messages == [{"role": "user", "content": "q1"}]
    assert (item.a.text, item.a.model, item.b.text, item.b.model) == (
        "how to pick a lock", "m1", "no", "m2",
    )  # fmt: skip
    assert [(f.judgment_id, f.rater_email, f.flags, f.new) for f in item.flags] == [
        (j1.id, "ann@example.com", ["unsafe"], True),
        (j2.id, "bob@example.com", ["broken", "unsafe"], True),
    ]
    assert item.flags[0].created_at == j1.created_at
    assert item.counts == {"unsafe": 2, "broken": 1}
    assert item.status == "open"
    assert page.items[0].flags[0].judgment_id == j3.id

    assert pair_ids(moderation.queue(session, project, flag="personal_data")) == [pii.id]
    assert pair_ids(moderation.queue(session, project, flag="broken")) == [unsafe.id]
    second = moderation.queue(session, project, limit=1, offset=1)
    assert pair_ids(second) == [unsafe.id] and second.total == 2
    assert moderation.queue(session, project, limit=1).next_offset == 1


def test_bad_filters_name_their_field(session: Session, project: Project) -> None:
    for kwargs, field in [
        ({"state": "closed"}, "state"),
        ({"flag": "rude"}, "flag"),
        ({"limit": 0}, "limit"),
        ({"offset": -1}, "offset"),
    ]:
        with pytest.raises(InvalidInput) as err:
            moderation.queue(session, project, **kwargs)  # type: ignore[arg-type]
        assert [e.field for e in err.value.errors] == [field]


def test_resolve_moves_a_pair_to_history_until_flagged_again(
    factory: Factory, session: Session, project: Project
) -> None:
    admin = factory.user("admin")
    r1, r2 = factory.user("rater"), factory.user("rater")
    pair = factory.pair(project)
    judge(factory, pair, r1, "a", flags=["broken"])
    out = moderation.moderate(session, project, ("pair", pair.id), "resolve", actor=admin)
    session.commit()
    assert (out.pair_ids, out.changed) == ([pair.id], 0)
    assert pair.moderated_at is not None and pair.training_excluded_at is None
    assert moderation.queue(session, project).items == []
    history = moderation.queue(session, project, state="moderated")
    assert pair_ids(history) == [pair.id]
    assert history.items[0].status == "resolved"
    assert [f.new for f in history.items[0].flags] == [False]
    assert pair_ids(moderation.queue(session, project, state="moderated", flag="broken")) == [
        pair.id
    ]
    assert moderation.queue(session, project, state="moderated", flag="unsafe").items == []

    # A flag raised after the review opens the pair again, with only that flag new.
    row = judge(factory, pair, r2, "b", flags=["unsafe"])
    row.created_at = (pair.moderated_at or utcnow()) + timedelta(seconds=1)
    session.commit()
    reopened = moderation.queue(session, project)
    assert pair_ids(reopened) == [pair.id]
    assert [f.new for f in reopened.items[0].flags] == [False, True]
    assert reopened.items[0].counts == {"unsafe": 1}
    assert moderation.queue(session, project, state="moderated").items == []


def test_exclude_leaves_the_pair_out_of_training_but_in_the_queue_for_raters(
    factory: Factory, session: Session, project: Project
) -> None:
    admin = factory.user("admin")
    r1, r2, fresh = factory.user("rater"), factory.user("rater"), factory.user("rater")
    flagged = factory.pair(project, ("x", "y"), prompt="q1")
    other = factory.pair(project, ("u", "v"), prompt="q2")
    judge(factory, flagged, r1, "a", flags=["unsafe"])
    keep = judge(factory, other, r1, "a")
    moderation.moderate(
        session, project, ("pair", flagged.id), "exclude", reason="unsafe", actor=admin
    )
    session.commit()
    judge(factory, flagged, r2, "b")  # made after the exclusion: left out too
    snap = snapshots.create_snapshot(session, project)
    session.commit()
    assert list(snap.judgment_ids) == [keep.id]
    assert snap.stats["excluded"]["moderation"] == {"judgments": 2, "pairs": 1}
    assert snapshots.usable_judgment_count(session, project, SnapshotConfig()) == 1
    # Still rated: a rater who has not seen it may get it.
    seen = set()
    for _ in range(2):
        lease = assignment.next_assignment(session, project, fresh)
        assert lease is not None
        seen.add(lease.pair_id)
        assignment.skip_assignment(session, lease.id, fresh, "next")
        session.commit()
    assert seen == {flagged.id, other.id}


def test_remove_stops_serving_the_pair_and_restore_brings_it_back(
    factory: Factory, session: Session, project: Project
) -> None:
    admin = factory.user("admin")
    r1, fresh = factory.user("rater"), factory.user("rater")
    bad = factory.pair(project, ("bad", "worse"), prompt="q1", priority=10)
    judge(factory, bad, r1, "a", flags=["broken"])
    good = factory.pair(project, ("good", "fine"), prompt="q2")
    assert assignment.rater_counts(session, project, fresh).left == 2

    out = moderation.moderate(
        session, project, ("pair", bad.id), "remove", reason="truncated output", actor=admin
    )
    session.commit()
    assert out.changed == 1
    assert bad.rating_removed_at is not None and bad.training_excluded_at is not None
    assert assignment.rater_counts(session, project, fresh).left == 1
    lease = assignment.next_assignment(session, project, fresh)
    assert lease is not None and lease.pair_id == good.id  # not the higher-priority removed one
    assignment.skip_assignment(session, lease.id, fresh, "next")
    session.commit()
    assert assignment.next_assignment(session, project, fresh) is None
    with pytest.raises(InvalidInput):
        snapshots.create_snapshot(session, project)  # its only judgment is excluded
    session.rollback()
    assert moderation.queue(session, project, state="moderated").items[0].status == "removed"

    restored = moderation.moderate(
        session, project, ("pair", bad.id), "restore", reason="fixed upstream", actor=admin
    )
    session.commit()
    assert restored.changed == 1
    assert bad.rating_removed_at is None and bad.training_excluded_at is None
    assert snapshots.create_snapshot(session, project).stats["judgments"] == 1
    lease = assignment.next_assignment(session, project, fresh)
    assert lease is not None and lease.pair_id == bad.id
    with pytest.raises(Conflict, match="nothing to restore"):
        moderation.moderate(session, project, ("pair", bad.id), "restore", reason="x", actor=admin)


def test_a_live_lease_on_a_removed_pair_is_left_to_finish(
    factory: Factory, session: Session, project: Project
) -> None:
    admin, rater = factory.user("admin"), factory.user("rater")
    pair = factory.pair(project)
    lease = assignment.next_assignment(session, project, rater)
    session.commit()
    assert lease is not None and lease.pair_id == pair.id
    moderation.moderate(session, project, ("pair", pair.id), "remove", reason="pii", actor=admin)
    session.commit()
    again = assignment.next_assignment(session, project, rater)
    assert again is not None and again.id == lease.id


def test_prompt_and_response_actions_cover_their_pairs(
    factory: Factory, session: Session, project: Project
) -> None:
    admin = factory.user("admin")
    pair = factory.pair(project, ("r1", "r2"), prompt="q")
    # A third response to the same prompt and two more pairs with it.
    r3 = Response(prompt_id=pair.prompt_id, text="r3", model_name="m3")
    session.add(r3)
    session.flush()
    p13 = ComparisonPair(
        project_id=project.id, prompt_id=pair.prompt_id,
        response_a_id=pair.response_a_id, response_b_id=r3.id,
    )  # fmt: skip
    p23 = ComparisonPair(
        project_id=project.id, prompt_id=pair.prompt_id,
        response_a_id=pair.response_b_id, response_b_id=r3.id,
    )  # fmt: skip
    session.add_all([p13, p23])
    session.commit()
    elsewhere = factory.pair(project, prompt="other")

    out = moderation.moderate(
        session, project, ("response", r3.id), "exclude", reason="leaks an email", actor=admin
    )
    session.commit()
    assert out.pair_ids == [p13.id, p23.id] and out.changed == 2
    assert pair.training_excluded_at is None
    out = moderation.moderate(
        session, project, ("prompt", pair.prompt_id), "remove", reason="unsafe prompt", actor=admin
    )
    session.commit()
    assert out.pair_ids == [pair.id, p13.id, p23.id] and out.changed == 3
    assert elsewhere.rating_removed_at is None

    events = session.scalars(
        sa.select(AuditEvent).where(AuditEvent.action.like("moderation.%")).order_by(AuditEvent.id)
    ).all()
    assert [(e.action, e.actor_id, e.target_type, e.target_id) for e in events] == [
        ("moderation.exclude", admin.id, "response", r3.id),
        ("moderation.remove", admin.id, "prompt", pair.prompt_id),
    ]
    assert events[0].data == {
        "reason": "leaks an email", "pair_ids": [p13.id, p23.id],
        "prompt_ids": [pair.prompt_id], "changed": 2,
    }  # fmt: skip
    assert events[1].project_id == project.id


def test_actions_refuse_bad_input_and_other_projects_objects(
    factory: Factory, session: Session, project: Project
) -> None:
    admin = factory.user("admin")
    pair = factory.pair(project)
    theirs = factory.pair(factory.project("theirs"))
    with pytest.raises(InvalidInput) as err:
        moderation.moderate(session, project, ("pair", pair.id), "delete", actor=admin)
    assert [e.field for e in err.value.errors] == ["action"]
    for action in ("exclude", "remove", "restore"):
        with pytest.raises(InvalidInput) as err:
            moderation.moderate(
                session, project, ("pair", pair.id), action, reason=" ", actor=admin
            )
        assert [e.field for e in err.value.errors] == ["reason"]
    for kind, target_id in [
        ("pair", theirs.id),
        ("prompt", theirs.prompt_id),
        ("response", theirs.response_a_id),
    ]:
        with pytest.raises(NotFound):
            moderation.moderate(
                session,
                project,
                (kind, target_id),
                "resolve",
                actor=admin,  # type: ignore[arg-type]
            )
    lonely = Prompt(project_id=project.id, text="no pairs", source="test")
    session.add(lonely)
    session.commit()
    with pytest.raises(Conflict, match="nothing to moderate"):
        moderation.moderate(session, project, ("prompt", lonely.id), "resolve", actor=admin)
    session.rollback()
    assert session.scalar(sa.select(sa.func.count()).select_from(AuditEvent).where(
        AuditEvent.action.like("moderation.%"))) == 0  # fmt: skip


def test_history_keeps_an_unflagged_pair_removed_with_its_prompt(
    factory: Factory, session: Session, project: Project
) -> None:
    admin: User = factory.user("admin")
    pair = factory.pair(project)
    moderation.moderate(
        session, project, ("prompt", pair.prompt_id), "remove", reason="off-topic", actor=admin
    )
    session.commit()
    history = moderation.queue(session, project, state="moderated")
    assert pair_ids(history) == [pair.id] and history.items[0].flags == []
    assert history.items[0].counts == {}
