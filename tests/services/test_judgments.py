"""Judgment rules: validation, screen-to-pair conversion, late submits, idempotency, gold."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from app.models import Assignment, Base, ComparisonPair, Judgment, utcnow
from app.services import assignment as svc
from app.services import judgments
from app.services.errors import Conflict, InvalidInput, NotFound
from app.services.judgments import JudgmentInput, from_screen
from app.services.projects import ProjectSettings
from tests.conftest import Factory


def count(factory: Factory, model: type[Base]) -> int:
    """Rows now (ending the test session's read snapshot first)."""
    factory.session.rollback()
    return factory.count(model)


SETTINGS = ProjectSettings()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (JudgmentInput(choice="left"), "choice"),
        (JudgmentInput(choice="a"), "strength"),
        (JudgmentInput(choice="b", strength=3), "strength"),
        (JudgmentInput(choice="tie", strength=1), "strength"),
        (JudgmentInput(choice="tie", aspects={"speed": "a"}), "aspects.speed"),
        (JudgmentInput(choice="tie", aspects={"honesty": "left"}), "aspects.honesty"),
        (JudgmentInput(choice="tie", flags=["spam"]), "flags"),
        (JudgmentInput(choice="tie", rationale="x" * 10_001), "rationale"),
        (JudgmentInput(choice="tie", active_ms=-1), "active_ms"),
    ],
)
def test_validate_rejects(data: JudgmentInput, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        judgments.validate(data, SETTINGS)
    assert [e.field for e in info.value.errors] == [field]


def test_validate_requires_rationale_when_the_project_does() -> None:
    strict = ProjectSettings(require_rationale=True)
    with pytest.raises(InvalidInput):
        judgments.validate(JudgmentInput(choice="tie", rationale="   "), strict)
    ok = judgments.validate(JudgmentInput(choice="tie", rationale=" because "), strict)
    assert ok.rationale == "because"


def test_validate_normalizes() -> None:
    ok = judgments.validate(
        JudgmentInput(choice="both_bad", flags=["unsafe", "broken", "unsafe"]), SETTINGS
    )
    assert ok.flags == ["broken", "unsafe"] and ok.strength is None


@pytest.mark.parametrize(
    ("shown_left", "scale", "choice", "strength"),
    [
        ("a", 1, "a", 2),
        ("a", 2, "a", 1),
        ("a", 3, "tie", None),
        ("a", 4, "b", 1),
        ("a", 5, "b", 2),
        ("b", 1, "b", 2),
        ("b", 4, "a", 1),
        ("b", 0, "both_bad", None),
    ],
)
def test_from_screen_maps_sides_to_the_pair(
    shown_left: str, scale: int, choice: str, strength: int | None
) -> None:
    got = from_screen(shown_left, scale, aspects={"honesty": "left", "helpfulness": "tie"})
    assert (got.choice, got.strength) == (choice, strength)
    assert got.aspects == {"honesty": shown_left, "helpfulness": "tie"}


def test_from_screen_rejects_unknown_scale() -> None:
    with pytest.raises(InvalidInput):
        from_screen("a", 7)


def test_submit_stores_judgment_and_counts(factory: Factory) -> None:
    project = factory.project()
    pair = factory.pair(project)
    rater = factory.user()
    t0 = utcnow()
    a = svc.next_assignment(factory.session, project, rater, now=t0)
    factory.session.commit()
    assert a is not None
    data = JudgmentInput(
        choice="b", strength=2, aspects={"honesty": "b"}, rationale="r", flags=["unsafe"],
        active_ms=99_999,
    )  # fmt: skip
    j = judgments.submit(factory.session, a.id, rater, data, now=t0 + timedelta(seconds=12))
    factory.session.commit()
    assert (j.choice, j.strength, j.aspects, j.flags) == ("b", 2, {"honesty": "b"}, ["unsafe"])
    assert j.time_on_task_ms == 12_000
    assert j.active_ms == 12_000  # cannot exceed the time the lease was held
    assert j.shown_left == a.shown_left and j.gold_correct is None
    factory.session.rollback()  # a new snapshot: test sessions are deferred
    factory.session.expire_all()
    assert factory.session.get(ComparisonPair, pair.id).judgment_count == 1  # type: ignore[union-attr]
    assert factory.session.get(Assignment, a.id).status == "submitted"  # type: ignore[union-attr]


def test_submit_twice_is_idempotent_and_a_different_answer_conflicts(factory: Factory) -> None:
    project = factory.project()
    factory.pair(project)
    rater = factory.user()
    a = svc.next_assignment(factory.session, project, rater)
    factory.session.commit()
    assert a is not None
    first = judgments.submit(factory.session, a.id, rater, JudgmentInput(choice="tie"))
    factory.session.commit()
    again = judgments.submit(factory.session, a.id, rater, JudgmentInput(choice="tie", active_ms=5))
    factory.session.commit()
    assert again.id == first.id
    with pytest.raises(Conflict):
        judgments.submit(factory.session, a.id, rater, JudgmentInput(choice="a", strength=1))
    assert count(factory, Judgment) == 1


def test_submit_to_someone_elses_or_skipped_assignment(factory: Factory) -> None:
    project = factory.project()
    factory.pair(project)
    rater, other = factory.user(), factory.user()
    a = svc.next_assignment(factory.session, project, rater)
    factory.session.commit()
    assert a is not None
    with pytest.raises(NotFound):
        judgments.submit(factory.session, a.id, other, JudgmentInput(choice="tie"))
    svc.skip_assignment(factory.session, a.id, rater, "no")
    factory.session.commit()
    with pytest.raises(Conflict):
        judgments.submit(factory.session, a.id, rater, JudgmentInput(choice="tie"))
    assert count(factory, Judgment) == 0


def test_late_submit_is_stored_while_the_pair_has_room(factory: Factory) -> None:
    project = factory.project(overlap=2, lease_ttl_s=60)
    factory.pair(project)
    slow = factory.user()
    t0 = utcnow()
    a = svc.next_assignment(factory.session, project, slow, now=t0)
    factory.session.commit()
    assert a is not None
    svc.release_expired_leases(factory.session, now=t0 + timedelta(minutes=5))
    factory.session.commit()
    j = judgments.submit(
        factory.session, a.id, slow, JudgmentInput(choice="tie"), now=t0 + timedelta(minutes=5)
    )
    assert j.time_on_task_ms == 300_000


def test_late_submit_after_the_pair_filled_up_is_refused(factory: Factory) -> None:
    project = factory.project(overlap=1, lease_ttl_s=60)
    pair = factory.pair(project)
    slow, quick = factory.user(), factory.user()
    t0 = utcnow()
    late = svc.next_assignment(factory.session, project, slow, now=t0)
    factory.session.commit()
    later = t0 + timedelta(minutes=2)
    taken = svc.next_assignment(factory.session, project, quick, now=later)
    factory.session.commit()
    assert late is not None and taken is not None and taken.pair_id == pair.id
    # the quick rater holds a live lease: the slow one's late answer would over-fill the pair
    with pytest.raises(Conflict, match="ran out"):
        judgments.submit(factory.session, late.id, slow, JudgmentInput(choice="tie"), now=later)
    judgments.submit(factory.session, taken.id, quick, JudgmentInput(choice="tie"), now=later)
    factory.session.commit()
    with pytest.raises(Conflict, match="ran out"):
        judgments.submit(factory.session, late.id, slow, JudgmentInput(choice="tie"), now=later)
    assert count(factory, Judgment) == 1


def test_gold_correct_is_recorded_and_recomputed(factory: Factory) -> None:
    project = factory.project(gold_rate=1.0)
    pair = factory.pair(project, gold_choice="a")
    right, wrong = factory.user(), factory.user()
    for rater, choice in ((right, "a"), (wrong, "b")):
        a = svc.next_assignment(factory.session, project, rater)
        factory.session.commit()
        assert a is not None
        judgments.submit(factory.session, a.id, rater, JudgmentInput(choice=choice, strength=1))
        factory.session.commit()
    rows = dict(factory.session.execute(sa.select(Judgment.rater_id, Judgment.gold_correct)).all())
    assert rows == {right.id: True, wrong.id: False}
    judgments.set_gold(factory.session, pair.id, "b")
    factory.session.commit()
    factory.session.rollback()  # a new snapshot: test sessions are deferred
    factory.session.expire_all()
    rows = dict(factory.session.execute(sa.select(Judgment.rater_id, Judgment.gold_correct)).all())
    assert rows == {right.id: False, wrong.id: True}
    judgments.set_gold(factory.session, pair.id, None)
    factory.session.commit()
    factory.session.rollback()  # a new snapshot: test sessions are deferred
    factory.session.expire_all()
    assert set(factory.session.scalars(sa.select(Judgment.gold_correct))) == {None}
    with pytest.raises(InvalidInput):
        judgments.set_gold(factory.session, pair.id, "left")
    with pytest.raises(NotFound):
        judgments.set_gold(factory.session, 999_999, "a")
