"""Assignment invariants, single-threaded on both backends and under real concurrency."""

from __future__ import annotations

import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import timedelta
from typing import TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.core.db import make_engine, make_sessionmaker, unit_of_work
from app.models import Assignment, Base, ComparisonPair, Judgment, Project, User, utcnow
from app.services import assignment as svc
from app.services import judgments
from app.services.errors import Conflict, InvalidInput, NotFound
from tests.conftest import Factory


def count(factory: Factory, model: type[Base]) -> int:
    """Rows now (ending the test session's read snapshot first)."""
    factory.session.rollback()
    return factory.count(model)


T = TypeVar("T")
VOTE = judgments.JudgmentInput(choice="a", strength=1)


def leases_per_pair(session: Session) -> Counter[int]:
    session.rollback()  # a new snapshot: test sessions are deferred
    session.expire_all()
    return Counter(session.scalars(sa.select(Assignment.pair_id).where(svc.is_live(utcnow()))))


def test_next_leases_a_pair_and_returns_the_same_one_while_live(factory: Factory) -> None:
    project = factory.project(lease_ttl_s=120)
    rater = factory.user()
    pair = factory.pair(project)
    first = svc.next_assignment(factory.session, project, rater)
    factory.session.commit()
    assert first is not None and first.pair_id == pair.id
    assert first.status == "leased" and first.shown_left in ("a", "b")
    assert first.expires_at - first.leased_at == timedelta(seconds=120)
    assert first.pair.prompt.text == "A question?"  # content is loaded for rendering
    again = svc.next_assignment(factory.session, project, rater)
    factory.session.commit()
    assert again is not None and again.id == first.id
    assert count(factory, Assignment) == 1


def test_order_fewest_judgments_then_priority_then_oldest(factory: Factory) -> None:
    project = factory.project(gold_rate=0.0, overlap=5)
    busy = factory.pair(project, judgment_count=2, priority=9)
    old = factory.pair(project, priority=1)
    urgent = factory.pair(project, priority=5)
    newer = factory.pair(project, priority=1)
    rater = factory.user()
    picks = []
    for _ in range(4):
        got = svc.next_assignment(factory.session, project, rater)
        factory.session.commit()
        assert got is not None
        picks.append(got.pair_id)
        svc.skip_assignment(factory.session, got.id, rater, "next please")
        factory.session.commit()
    assert picks == [urgent.id, old.id, newer.id, busy.id]
    assert svc.next_assignment(factory.session, project, rater) is None


def test_a_rater_never_gets_a_pair_twice_and_skips_never_return(factory: Factory) -> None:
    project = factory.project()
    rater = factory.user()
    pairs = [factory.pair(project) for _ in range(3)]
    seen = []
    first = svc.next_assignment(factory.session, project, rater)
    factory.session.commit()
    assert first is not None
    svc.skip_assignment(factory.session, first.id, rater, "cannot judge")
    factory.session.commit()
    seen.append(first.pair_id)
    while (got := svc.next_assignment(factory.session, project, rater)) is not None:
        seen.append(got.pair_id)
        judgments.submit(factory.session, got.id, rater, VOTE)
        factory.session.commit()
    assert sorted(seen) == sorted(p.id for p in pairs)
    assert count(factory, Assignment) == 3


def test_full_pairs_are_not_assigned(factory: Factory) -> None:
    project = factory.project(overlap=2)
    factory.pair(project)
    raters = [factory.user() for _ in range(3)]
    assert svc.next_assignment(factory.session, project, raters[0]) is not None
    assert svc.next_assignment(factory.session, project, raters[1]) is not None
    assert svc.next_assignment(factory.session, project, raters[2]) is None


def test_expired_lease_returns_the_pair_to_the_pool(factory: Factory) -> None:
    project = factory.project(overlap=1, lease_ttl_s=60)
    pair = factory.pair(project)
    slow, other = factory.user(), factory.user()
    t0 = utcnow()
    held = svc.next_assignment(factory.session, project, slow, now=t0)
    factory.session.commit()
    assert held is not None
    assert svc.next_assignment(factory.session, project, other, now=t0) is None
    later = t0 + timedelta(seconds=61)
    # treated as dead by the query even before the sweep runs
    got = svc.next_assignment(factory.session, project, other, now=later)
    factory.session.commit()
    assert got is not None and got.pair_id == pair.id
    # the slow rater never gets the same pair again
    assert svc.next_assignment(factory.session, project, slow, now=later) is None


def test_release_expired_leases_marks_only_dead_leases(factory: Factory) -> None:
    project = factory.project(lease_ttl_s=60)
    for _ in range(3):
        factory.pair(project)
    t0 = utcnow()
    old = svc.next_assignment(factory.session, project, factory.user(), now=t0 - timedelta(hours=1))
    factory.session.commit()
    fresh = svc.next_assignment(factory.session, project, factory.user(), now=t0)
    factory.session.commit()
    done_rater = factory.user()
    done = svc.next_assignment(factory.session, project, done_rater, now=t0 - timedelta(hours=1))
    factory.session.commit()
    assert old and fresh and done
    judgments.submit(factory.session, done.id, done_rater, VOTE, now=t0 - timedelta(minutes=59))
    factory.session.commit()
    assert svc.release_expired_leases(factory.session, now=t0) == 1
    factory.session.commit()
    factory.session.expire_all()
    statuses = {a.id: a.status for a in factory.session.scalars(sa.select(Assignment)).all()}
    assert statuses == {old.id: "expired", fresh.id: "leased", done.id: "submitted"}
    assert svc.release_expired_leases(factory.session, now=t0) == 0


def test_gold_pairs_interleave_at_the_rate_and_ignore_overlap(factory: Factory) -> None:
    project = factory.project(gold_rate=1.0, overlap=1)
    standard = factory.pair(project)
    gold = factory.pair(project, gold_choice="a")
    raters = [factory.user() for _ in range(3)]
    got = [svc.next_assignment(factory.session, project, r) for r in raters]
    # gold first for everyone (rate 1.0), not capped by overlap 1
    assert [g.pair_id for g in got if g] == [gold.id] * 3
    for rater, a in zip(raters, got, strict=True):
        assert a is not None
        judgments.submit(factory.session, a.id, rater, VOTE)
        factory.session.commit()
    after = [svc.next_assignment(factory.session, project, r) for r in raters]
    # then the standard pair, to one rater only (overlap 1)
    assert [a.pair_id for a in after if a] == [standard.id]

    never = factory.project(gold_rate=0.0)
    factory.pair(never, gold_choice="b")
    plain = factory.pair(never)
    rater = factory.user()
    first = svc.next_assignment(factory.session, never, rater)
    factory.session.commit()
    assert first is not None and first.pair_id == plain.id


def test_gold_rate_is_respected_on_average(factory: Factory) -> None:
    project = factory.project(gold_rate=0.25, overlap=1)
    for _ in range(40):
        factory.pair(project, gold_choice="a")
        factory.pair(project)
    rater = factory.user()
    rng = random.Random(7)
    kinds = []
    for _ in range(40):
        got = svc.next_assignment(factory.session, project, rater, rng=rng)
        factory.session.commit()
        assert got is not None
        kinds.append(got.pair.gold_choice is not None)
        svc.skip_assignment(factory.session, got.id, rater, "sampling")
        factory.session.commit()
    assert 4 <= sum(kinds) <= 17  # 10 expected; a seeded draw, so this is deterministic


def test_counts_done_today_and_left(factory: Factory) -> None:
    project = factory.project(overlap=1)
    for _ in range(3):
        factory.pair(project)
    rater = factory.user()
    assert svc.rater_counts(factory.session, project, rater) == svc.RaterCounts(0, 3)
    got = svc.next_assignment(factory.session, project, rater)
    factory.session.commit()
    assert got is not None
    assert svc.rater_counts(factory.session, project, rater) == svc.RaterCounts(0, 3)
    judgments.submit(factory.session, got.id, rater, VOTE)
    factory.session.commit()
    assert svc.rater_counts(factory.session, project, rater) == svc.RaterCounts(1, 2)
    other = factory.user()
    # the judged pair is full (overlap 1), so only two are left for another rater
    assert svc.rater_counts(factory.session, project, other) == svc.RaterCounts(0, 2)


def test_skip_rules(factory: Factory) -> None:
    project = factory.project()
    factory.pair(project)
    factory.pair(project)
    rater, stranger = factory.user(), factory.user()
    got = svc.next_assignment(factory.session, project, rater)
    factory.session.commit()
    assert got is not None
    with pytest.raises(InvalidInput):
        svc.skip_assignment(factory.session, got.id, rater, "   ")
    with pytest.raises(NotFound):
        svc.skip_assignment(factory.session, got.id, stranger, "not mine")
    skipped = svc.skip_assignment(factory.session, got.id, rater, "off topic")
    factory.session.commit()
    assert skipped.status == "skipped" and skipped.skip_reason == "off topic"
    again = svc.skip_assignment(factory.session, got.id, rater, "again")
    factory.session.commit()
    assert again.skip_reason == "off topic"
    second = svc.next_assignment(factory.session, project, rater)
    factory.session.commit()
    assert second is not None
    judgments.submit(factory.session, second.id, rater, VOTE)
    factory.session.commit()
    with pytest.raises(Conflict):
        svc.skip_assignment(factory.session, second.id, rater, "too late")


# --- concurrency -----------------------------------------------------------------------------


@pytest.fixture
def threaded_sessions(db_url: str) -> Iterator[Callable[[], AbstractContextManager[Session]]]:
    """Units of work for worker threads (each commits when its block ends, as a request does),
    with a pool large enough that 50 threads really hold 50 connections at once on PostgreSQL."""
    engine = make_engine(db_url, pool_size=55, max_overflow=0) if "postgresql" in db_url else None
    if engine is None:
        engine = make_engine(db_url)
    factory = make_sessionmaker(engine)
    yield lambda: unit_of_work(factory)
    engine.dispose()


def run_together(n: int, work: Callable[[int], T]) -> list[T]:
    """Start `n` calls at the same moment (a barrier) in `n` threads; re-raise any failure."""
    barrier = threading.Barrier(n)

    def call(i: int) -> T:
        barrier.wait(timeout=30)
        return work(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(call, range(n)))


def _setup(factory: Factory, raters: int, pairs: int = 20) -> tuple[Project, list[User]]:
    project = factory.project(overlap=3, gold_rate=0.0, lease_ttl_s=600)
    for _ in range(pairs):
        factory.pair(project)
    return project, many_raters(factory.session, raters)


def many_raters(session: Session, n: int) -> list[User]:
    """Raters without paying for an Argon2 hash each (nobody logs in as them)."""
    rows = [
        User(email=f"load{i}-{uuid.uuid4().hex[:8]}@example.com", password_hash="x", role="rater")
        for i in range(n)
    ]
    session.add_all(rows)
    session.commit()
    return rows


def _check_invariants(session: Session) -> None:
    session.rollback()  # a new snapshot: test sessions are deferred
    session.expire_all()
    per_pair = leases_per_pair(session)
    judged = Counter(session.scalars(sa.select(Judgment.pair_id)))
    for pair in session.scalars(sa.select(ComparisonPair)):
        assert per_pair[pair.id] + judged[pair.id] <= pair.required_judgments, pair.id
        assert pair.judgment_count == judged[pair.id]
    twice = session.execute(
        sa.select(Assignment.pair_id, Assignment.rater_id)
        .group_by(Assignment.pair_id, Assignment.rater_id)
        .having(sa.func.count() > 1)
    ).all()
    assert twice == []


def test_fifty_concurrent_next_calls_never_over_assign(
    factory: Factory, threaded_sessions: Callable[[], AbstractContextManager[Session]]
) -> None:
    # 70 raters, 60 places (20 pairs x overlap 3): 60 leases, 10 told "nothing left".
    project, raters = _setup(factory, raters=70)

    def work(i: int) -> int | None:
        with threaded_sessions() as s:
            got = svc.next_assignment(s, s.get(Project, project.id), s.get(User, raters[i].id))
            s.commit()
            return got.pair_id if got else None

    results = run_together(50, work) + run_together(20, lambda i: work(50 + i))
    assert sum(r is not None for r in results) == 60
    assert Counter(r for r in results if r is not None) == {
        pid: 3 for pid in factory.session.scalars(sa.select(ComparisonPair.id))
    }
    _check_invariants(factory.session)


def test_concurrent_raters_working_through_the_queue(
    factory: Factory, threaded_sessions: Callable[[], AbstractContextManager[Session]]
) -> None:
    # Each of 50 raters loops next -> submit until nothing is left, all at once.
    project, raters = _setup(factory, raters=50)

    def work(i: int) -> int:
        done = 0
        with threaded_sessions() as s:
            p, me = s.get(Project, project.id), s.get(User, raters[i].id)
            assert p is not None and me is not None
            # One transaction per call, as each API request is.
            while (got := svc.next_assignment(s, p, me)) is not None:
                s.commit()
                judgments.submit(s, got.id, me, VOTE)
                s.commit()
                done += 1
        return done

    assert sum(run_together(50, work)) == 60
    _check_invariants(factory.session)
    counts = factory.session.scalars(sa.select(ComparisonPair.judgment_count)).all()
    assert counts == [3] * 20


def test_one_rater_calling_next_concurrently_gets_one_lease(
    factory: Factory, threaded_sessions: Callable[[], AbstractContextManager[Session]]
) -> None:
    project, (rater,) = _setup(factory, raters=1)

    def work(i: int) -> int | None:
        with threaded_sessions() as s:
            got = svc.next_assignment(s, s.get(Project, project.id), s.get(User, rater.id))
            s.commit()
            return got.id if got else None

    ids = run_together(10, work)
    assert len(set(ids)) == 1 and ids[0] is not None
    assert count(factory, Assignment) == 1


def test_duplicate_concurrent_submits_store_one_row(
    factory: Factory, threaded_sessions: Callable[[], AbstractContextManager[Session]]
) -> None:
    project, (rater,) = _setup(factory, raters=1, pairs=1)
    got = svc.next_assignment(factory.session, project, rater)
    factory.session.commit()
    assert got is not None
    vote = judgments.JudgmentInput(choice="b", strength=2, rationale="clearer", flags=["broken"])

    def work(i: int) -> tuple[int, str, int | None]:
        with threaded_sessions() as s:
            me = s.get(User, rater.id)
            assert me is not None
            j = judgments.submit(s, got.id, me, vote)
            s.commit()
            return (j.id, j.choice, j.strength)

    answers = run_together(8, work)
    assert len(set(answers)) == 1
    assert count(factory, Judgment) == 1
    factory.session.rollback()  # a new snapshot: test sessions are deferred
    factory.session.expire_all()
    pair = factory.session.get(ComparisonPair, got.pair_id)
    assert pair is not None and pair.judgment_count == 1
