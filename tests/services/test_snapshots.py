"""Dataset snapshots: which judgments become training pairs, immutability, the automatic
reward-run trigger (threshold, never two at once)."""

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import make_engine, make_sessionmaker
from app.ml.preferences import split_by_prompt
from app.models import ComparisonPair, Judgment, Project, Response, Run, User
from app.services import reliability, reward_runs, snapshots
from app.services.errors import Conflict, InvalidInput
from tests.conftest import Factory


def judge(
    factory: Factory,
    pair: ComparisonPair,
    rater: User,
    choice: str,
    strength: int | None = 1,
    flags: list[str] | None = None,
) -> Judgment:
    factory.session.commit()
    row = Judgment(
        project_id=pair.project_id,
        pair_id=pair.id,
        rater_id=rater.id,
        choice=choice,
        strength=strength if choice in ("a", "b") else None,
        flags=flags or [],
    )
    factory.session.add(row)
    pair.judgment_count += 1
    factory.session.commit()
    return row


@pytest.fixture
def project(factory: Factory) -> Project:
    return factory.project(
        "snap", reward_retrain_threshold=3, loop_reward_config={"train_mode": "lora"}
    )


def test_choices_become_pairs_with_margins_and_exclusions(
    factory: Factory, session: Session, project: Project
) -> None:
    r1, r2 = factory.user("rater"), factory.user("rater")
    p1 = factory.pair(project, ("good", "bad"), prompt="q1")
    p2 = factory.pair(project, ("left", "right"), prompt="q2")
    p3 = factory.pair(project, ("x", "y"), prompt="q3")
    gold = factory.pair(project, ("g1", "g2"), prompt="q4", gold_choice="a")
    judge(factory, p1, r1, "a", 2)
    judge(factory, p1, r2, "a", 1)
    judge(factory, p2, r1, "b", 1, flags=["unsafe"])
    judge(factory, p2, r2, "tie")
    judge(factory, p3, r1, "both_bad")
    judge(factory, gold, r1, "a", 1)

    snap = snapshots.create_snapshot(session, project)
    session.commit()
    assert len(snap.judgment_ids) == 3  # tie, both-bad and gold excluded by default
    assert snap.stats["project_choices"]["both_bad"] == 1
    examples = snapshots.load_examples(session, snap)
    assert [(e.chosen, e.rejected, e.margin, e.label) for e in examples] == [
        ("good", "bad", 1.0, 1.0),
        ("good", "bad", 0.0, 1.0),
        ("right", "left", 0.0, 1.0),
    ]
    assert examples[0].prompt == [{"role": "user", "content": "q1"}]

    soft = snapshots.create_snapshot(
        session, project, snapshots.SnapshotConfig(ties="soft", unsafe="exclude")
    )
    labels = [(e.chosen, e.label) for e in snapshots.load_examples(session, soft)]
    assert labels == [("good", 1.0), ("good", 1.0), ("left", 0.5)]

    majority = snapshots.create_snapshot(
        session, project, snapshots.SnapshotConfig(aggregate="majority")
    )
    assert [e.margin for e in snapshots.load_examples(session, majority)] == [1.0, 0.0]


def test_snapshot_is_immutable_and_detects_changed_data(
    factory: Factory, session: Session, project: Project
) -> None:
    rater = factory.user("rater")
    pair = factory.pair(project, ("a1", "b1"))
    judge(factory, pair, rater, "a")
    first = snapshots.create_snapshot(session, project)
    session.commit()
    ids, digest = list(first.judgment_ids), first.content_hash

    later = factory.pair(project, ("a2", "b2"), prompt="another")
    judge(factory, later, rater, "b")
    second = snapshots.create_snapshot(session, project)
    session.commit()
    session.refresh(first)
    assert (first.judgment_ids, first.content_hash) == (ids, digest)
    assert len(second.judgment_ids) == 2 and second.content_hash != digest
    assert len(snapshots.load_examples(session, first)) == 1

    response = session.get(Response, pair.response_a_id)
    assert response is not None
    response.text = "edited after the snapshot"
    session.commit()
    with pytest.raises(Conflict, match="no longer matches"):
        snapshots.load_examples(session, first)


def test_empty_snapshot_is_refused(session: Session, project: Project) -> None:
    with pytest.raises(InvalidInput, match="no usable judgments"):
        snapshots.create_snapshot(session, project)


def test_split_by_prompt_keeps_each_prompt_on_one_side(
    factory: Factory, session: Session, project: Project
) -> None:
    raters = [factory.user("rater") for _ in range(3)]
    for i in range(10):
        pair = factory.pair(project, (f"a{i}", f"b{i}"), prompt=f"prompt {i}")
        for rater in raters:
            judge(factory, pair, rater, "a")
    examples = snapshots.load_examples(session, snapshots.create_snapshot(session, project))
    train, val = split_by_prompt(examples, 0.3, seed=1)
    assert {e.group for e in train}.isdisjoint({e.group for e in val})
    assert len(train) + len(val) == 30 and 6 <= len(val) <= 12
    assert split_by_prompt(examples, 0.3, seed=1) == (train, val)


def test_trigger_waits_for_the_threshold_then_starts_one_run(
    factory: Factory, session: Session, project: Project, settings: Settings, db_url: str
) -> None:
    # A broker nobody consumes: the run rows are what this test is about.
    settings = settings.model_copy(update={"broker_url": "memory://"})
    rater = factory.user("rater")
    for i in range(2):
        judge(factory, factory.pair(project, (f"a{i}", f"b{i}"), prompt=f"p{i}"), rater, "a")
    assert reward_runs.maybe_trigger_reward_run(session, project, settings) is None
    judge(factory, factory.pair(project, ("a9", "b9"), prompt="p9"), rater, "b")

    # The app's own engine: on SQLite its transactions begin IMMEDIATE, as in production.
    engine = make_engine(db_url)
    make = make_sessionmaker(engine)
    barrier = threading.Barrier(4)
    started: list[Run | None] = []

    def trigger() -> None:
        with make() as s:
            target = s.get(Project, project.id)
            assert target is not None
            s.commit()  # on SQLite, holding the transaction would hold the write lock
            barrier.wait()
            started.append(reward_runs.maybe_trigger_reward_run(s, target, settings))
            s.commit()

    threads = [threading.Thread(target=trigger) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    assert len(started) == 4
    assert sum(r is not None for r in started) == 1
    assert factory.count(Run) == 1
    run = session.scalar(sa.select(Run))
    assert run is not None and (run.kind, run.status, run.trigger) == ("reward", "queued", "auto")
    assert run.config["train_mode"] == "lora"  # the project's loop_reward_config


def imported(factory: Factory, pair: ComparisonPair, choice: str, source: str) -> Judgment:
    """A judgment as `verdict import` stores it: no rater, its source instead."""
    factory.session.commit()
    row = Judgment(
        project_id=pair.project_id, pair_id=pair.id, rater_id=None, source=source,
        choice=choice, strength=1, flags=[],
    )  # fmt: skip
    factory.session.add(row)
    pair.judgment_count += 1
    factory.session.commit()
    return row


def test_reliability_labels_by_hand_when_no_pair_is_shared(
    factory: Factory, session: Session, project: Project
) -> None:
    """No pair has two decisive votes, so every rater sits at the prior's accuracy 0.75 and a
    lone vote's pair gets P(its side is better) = 0.75. With ties="soft" a tie counts as one
    opinion of 0.5: p4, a vote for a and a tie, is (0.75 + 0.5) / 2 = 0.625; p3, a tie alone,
    is 0.5. Margins: p1's "much better" (2) asks 1.0."""
    r1, r2 = factory.user("rater"), factory.user("rater")
    p1 = factory.pair(project, ("a1", "b1"), prompt="q1")
    p2 = factory.pair(project, ("a2", "b2"), prompt="q2")
    p3 = factory.pair(project, ("a3", "b3"), prompt="q3")
    p4 = factory.pair(project, ("a4", "b4"), prompt="q4")
    judge(factory, p1, r1, "a", 2)
    judge(factory, p2, r2, "b", 1)
    judge(factory, p3, r1, "tie")
    judge(factory, p4, r2, "a", 1)
    judge(factory, p4, r1, "tie")

    config = snapshots.SnapshotConfig(aggregate="reliability", ties="soft")
    snap = snapshots.create_snapshot(session, project, config)
    session.commit()
    examples = snapshots.load_examples(session, snap)
    assert [(e.chosen, e.rejected, e.label, e.margin, e.pair) for e in examples] == [
        ("a1", "b1", 0.75, 1.0, f"pair:{p1.id}"),
        ("b2", "a2", 0.75, 0.0, f"pair:{p2.id}"),
        ("a3", "b3", 0.5, 0.0, f"pair:{p3.id}"),
        ("a4", "b4", pytest.approx(0.625), 0.0, f"pair:{p4.id}"),
    ]
    assert [e.group for e in examples] == [f"prompt:{p.prompt_id}" for p in (p1, p2, p3, p4)]

    hard = snapshots.SnapshotConfig(aggregate="reliability")
    labels = [(e.chosen, e.label) for e in snapshots.load_examples(
        session, snapshots.create_snapshot(session, project, hard)
    )]  # fmt: skip
    assert labels == [("a1", 0.75), ("b2", 0.75), ("a4", 0.75)]


def test_reliability_weighs_raters_by_the_model(
    factory: Factory, session: Session, project: Project
) -> None:
    """Three raters on p1 (a much better, a better, b), two on p2 (b, b), one on p3 (a). The
    labels are the model's posteriors (`reliability.estimate`, tested by hand in
    tests/services/test_reliability.py) oriented to the likelier side; p1's margin is the mean
    over its two votes for a, (1.0 + 0.0) / 2, p2's over its two for b, (0.0 + 1.0) / 2."""
    r1, r2, r3 = (factory.user("rater") for _ in range(3))
    p1 = factory.pair(project, ("a1", "b1"), prompt="q1")
    p2 = factory.pair(project, ("a2", "b2"), prompt="q2")
    p3 = factory.pair(project, ("a3", "b3"), prompt="q3")
    judge(factory, p1, r1, "a", 2)
    judge(factory, p1, r2, "a", 1)
    judge(factory, p1, r3, "b", 1)
    judge(factory, p2, r1, "b", 1)
    judge(factory, p2, r2, "b", 2)
    judge(factory, p3, r3, "a", 1)
    config = snapshots.SnapshotConfig(aggregate="reliability")
    rows = snapshots._rows(session, project.id, snapshots._usable_filter(config))
    est = reliability.estimate(
        [
            reliability.Vote(p1.id, r1.id, "a"), reliability.Vote(p1.id, r2.id, "a"),
            reliability.Vote(p1.id, r3.id, "b"), reliability.Vote(p2.id, r1.id, "b"),
            reliability.Vote(p2.id, r2.id, "b"), reliability.Vote(p3.id, r3.id, "a"),
        ]
    )  # fmt: skip
    assert snapshots.reliability_estimate(rows) == est
    examples = snapshots.to_examples(rows, config)
    assert [(e.chosen, e.label, e.margin) for e in examples] == [
        ("a1", pytest.approx(est.p_a[p1.id]), 0.5),
        ("b2", pytest.approx(1 - est.p_a[p2.id]), 0.5),
        ("a3", pytest.approx(est.accuracy[r3.id]), 0.0),
    ]
    assert est.accuracy[r1.id] > est.accuracy[r3.id] and examples[0].label > 0.8

    # Given an estimate (an export passes the whole snapshot's), the labels follow it: a pair
    # at exactly 0.5 with no tie is left out; a lone vote for a by a rater estimated adversarial
    # makes b the chosen side, with no margin (nobody chose b).
    given = reliability.ReliabilityEstimate(
        accuracy={}, votes={}, p_a={p1.id: 0.5, p2.id: 0.9, p3.id: 0.2}, iterations=1,
        converged=True,
    )  # fmt: skip
    examples = snapshots.to_examples(rows, config, estimate=given)
    assert [(e.chosen, e.label, e.margin) for e in examples] == [
        ("a2", 0.9, 0.0),
        ("b3", 0.8, 0.0),
    ]


def test_imported_judgments_count_as_one_rater_per_source(
    factory: Factory, session: Session, project: Project
) -> None:
    """An imported pair is judged once, by its source: the prior's 0.75 unless raters judged
    the same pairs. Its source's id in the model is negative (never a user's) and stable."""
    rater = factory.user("rater")
    alone = factory.pair(project, ("chosen", "rejected"), prompt="q1")
    imported(factory, alone, "a", "import:hh")
    key = snapshots.vote_rater(None, "import:hh")
    assert key < 0 and key == snapshots.vote_rater(None, "import:hh")
    assert key != snapshots.vote_rater(None, "import:other")
    assert snapshots.vote_rater(rater.id, "rater") == rater.id

    config = snapshots.SnapshotConfig(aggregate="reliability")
    rows = snapshots._rows(session, project.id, snapshots._usable_filter(config))
    assert [(e.chosen, e.label) for e in snapshots.to_examples(rows, config)] == [("chosen", 0.75)]
    assert snapshots.reliability_estimate(rows).accuracy == {key: 0.75}


def test_aggregation_stats_count_examples_against_judgments(
    factory: Factory, session: Session, project: Project
) -> None:
    """Three raters on one pair and one on another: four judgments make four examples one per
    judgment, two one per pair."""
    raters = [factory.user("rater") for _ in range(3)]
    shared = factory.pair(project, ("a1", "b1"), prompt="q1")
    for rater, choice in zip(raters, "aab", strict=True):
        judge(factory, shared, rater, choice)
    judge(factory, factory.pair(project, ("a2", "b2"), prompt="q2"), raters[0], "b")
    rows = snapshots._rows(
        session, project.id, snapshots._usable_filter(snapshots.SnapshotConfig())
    )
    assert len(rows) == 4
    for aggregate, examples in (("separate", 4), ("majority", 2), ("reliability", 2)):
        config = snapshots.SnapshotConfig(aggregate=aggregate)  # type: ignore[arg-type]
        assert snapshots.aggregation_stats(rows, config) == {
            "aggregate": aggregate,
            "examples": examples,
        }
    separate = snapshots.to_examples(rows, snapshots.SnapshotConfig())
    assert [e.pair for e in separate] == [f"pair:{shared.id}"] * 3 + [f"pair:{rows[3].pair.id}"]
