"""Quality metrics against hand-computed examples: per-rater agreement, position bias, time,
gold, rates and outliers; the project's α, clear-majority share, preference cycles and weeks;
the edge cases (no judgments, a rater with no overlap, a pair judged once, all ties)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.models import ComparisonPair, Judgment, Project, Prompt, Response, User
from app.services import exclusions, quality
from tests.conftest import Factory


def judge(
    factory: Factory,
    pair: ComparisonPair,
    rater: User | None,
    choice: str,
    strength: int | None = 1,
    **fields: Any,
) -> Judgment:
    """A judgment as the rating page stores it (strength only on decisive choices)."""
    factory.session.commit()
    row = Judgment(
        project_id=pair.project_id,
        pair_id=pair.id,
        rater_id=rater.id if rater else None,
        choice=choice,
        strength=strength if choice in ("a", "b") else None,
        **fields,
    )
    factory.session.add(row)
    pair.judgment_count += 1
    factory.session.commit()
    return row


def prompt_with(factory: Factory, project: Project, n: int) -> tuple[Prompt, list[Response]]:
    """A prompt with `n` responses (for cycles, which need three or more)."""
    s = factory.session
    s.commit()
    prompt = Prompt(project_id=project.id, text="Which is best?", source="test")
    s.add(prompt)
    s.flush()
    responses = [Response(prompt_id=prompt.id, text=f"answer {i}") for i in range(n)]
    s.add_all(responses)
    s.commit()
    return prompt, responses


def pair_of(factory: Factory, project: Project, a: Response, b: Response) -> ComparisonPair:
    s = factory.session
    pair = ComparisonPair(
        project_id=project.id, prompt_id=a.prompt_id, response_a_id=a.id, response_b_id=b.id
    )
    s.add(pair)
    s.commit()
    return pair


def by_email(rows: list[quality.RaterQuality]) -> dict[str, quality.RaterQuality]:
    return {r.email: r for r in rows}


def test_no_judgments_at_all(factory: Factory, session: Session) -> None:
    project = factory.project("empty")
    factory.pair(project)
    report = quality.quality_report(session, project)
    assert report.raters.raters == []
    f = report.project.figures
    assert (f.judgments, f.raters, f.pairs, f.pairs_judged_twice) == (0, 0, 0, 0)
    assert f.alpha is None and f.alpha_note == "no pair has two judgments on the scale"
    assert f.clear_majority is None and f.left.share is None
    assert (f.cycles, f.prompts_checked) == (0, 0)
    assert report.project.weeks == [] and report.project.cycles == []
    assert (report.raters.median_agreement, report.raters.median_active_ms) == (None, None)


def test_ordinal_alpha_matches_a_hand_computed_example() -> None:
    """Four pairs' values on the 1..5 scale: {4, 5}, {2, 2}, {3, 4} and {1} (judged once: not
    pairable, so it drops out).

    Coincidences o_ck (each unit adds its ordered value pairs / (m_u − 1), m_u = 2):
    o_45 = o_54 = 1, o_22 = 2, o_34 = o_43 = 1. Marginals n_2 = 2, n_3 = 1, n_4 = 2, n_5 = 1,
    n = 6. Ordinal distance δ²_ck = (Σ_{g=c..k} n_g − (n_c + n_k)/2)²:
    δ²_23 = δ²_34 = δ²_45 = 1.5² = 2.25, δ²_24 = (5 − 2)² = 9, δ²_35 = (4 − 1)² = 9,
    δ²_25 = (6 − 1.5)² = 20.25.
    D_o = Σ o_ck δ²_ck / n = (2·2.25 + 2·2.25) / 6 = 1.5.
    D_e = Σ_{c≠k} n_c n_k δ²_ck / (n (n − 1))
        = 2 (2·1·2.25 + 2·2·9 + 2·1·20.25 + 1·2·2.25 + 1·1·9 + 2·1·2.25) / 30 = 198 / 30 = 6.6.
    α = 1 − D_o / D_e = 1 − 1.5 / 6.6 = 17/22 ≈ 0.7727.
    """
    alpha, pairable, note = quality.ordinal_alpha([[4, 5], [2, 2], [3, 4], [1]])
    assert alpha == pytest.approx(17 / 22, abs=1e-12)
    assert (pairable, note) == (3, "")


def test_alpha_from_judgments_uses_the_scale_and_leaves_both_bad_out(
    factory: Factory, session: Session
) -> None:
    """The same example as judgments: a better (4) and a much better (5); b better twice (2, 2)
    and a both-bad that is no point on the scale; a tie (3) and a better (4); b much better (1)
    once."""
    project = factory.project("alpha")
    r1, r2, r3 = factory.user(), factory.user(), factory.user()
    p1, p2, p3, p4 = (factory.pair(project, prompt=f"q{i}") for i in range(4))
    judge(factory, p1, r1, "a", 1)
    judge(factory, p1, r2, "a", 2)
    judge(factory, p2, r1, "b", 1)
    judge(factory, p2, r2, "b", 1)
    judge(factory, p2, r3, "both_bad")
    judge(factory, p3, r1, "tie")
    judge(factory, p3, r2, "a", 1)
    judge(factory, p4, r1, "b", 2)
    f = quality.project_quality(session, project).figures
    assert f.alpha == pytest.approx(17 / 22, abs=1e-12)
    assert f.alpha_pairs == 3
    # Judged twice: p1, p2, p3. A choice held by more than half: p1 (a: 2/2, strength aside)
    # and p2 (b: 2/3); p3 is 1 tie, 1 a.
    assert (f.pairs, f.pairs_judged_twice, f.clear_majority_pairs) == (4, 3, 2)
    assert f.clear_majority == pytest.approx(2 / 3)


def test_rater_figures_by_hand(factory: Factory, session: Session) -> None:
    """Four raters on six pairs.

        pair  r1        r2        r3        r4
        p1    a (2)     a         b
        p2    tie       tie       tie
        p3    a         b
        p4    b                                       judged once
        p5                                  a         r4's only pair: no overlap
        p6              both_bad  both_bad

    r1: shares p1, p2, p3. The others' choices: p1 {a, b} (no majority: not counted), p2 {tie,
    tie} → tie (agrees), p3 {b} → b (disagrees): 1 of 2. r2: p1 {a, b} none, p2 tie (agrees),
    p3 {a} (disagrees), p6 {both_bad} (agrees): 2 of 3. r3: p1 {a, a} → a (disagrees), p2 tie
    (agrees), p6 both_bad (agrees): 2 of 3. r4: shares nothing, agreement None.
    """
    project = factory.project("raters")
    r1, r2, r3, r4 = (factory.user(email=f"r{i}@example.com") for i in range(1, 5))
    p1, p2, p3, p4, p5, p6 = (factory.pair(project, prompt=f"q{i}") for i in range(6))
    # r1's decisive judgments: left side won on p1 (a shown left, chose a) and p4 (b left,
    # chose b), the right side on p3 (b left, chose a): 2 of 3 left.
    judge(factory, p1, r1, "a", 2, shown_left="a", active_ms=4000)
    judge(factory, p2, r1, "tie", shown_left="a", gold_correct=True)
    judge(factory, p3, r1, "a", 1, shown_left="b", active_ms=1000, gold_correct=False)
    judge(factory, p4, r1, "b", 1, shown_left="b", active_ms=2000, flags=["broken"])
    judge(factory, p1, r2, "a", 1, shown_left="b")
    judge(factory, p2, r2, "tie")
    judge(factory, p3, r2, "b", 1)  # side unknown: not in the position statistic
    judge(factory, p6, r2, "both_bad", flags=["unsafe", "broken"])
    judge(factory, p1, r3, "b", 1, shown_left="a")
    judge(factory, p2, r3, "tie")
    judge(factory, p6, r3, "both_bad")
    judge(factory, p5, r4, "a", 1, shown_left="a")
    # Neither an imported judgment nor one without a rater is anyone's work.
    judge(factory, p5, None, "b", 1, source="hh-rlhf")

    rows = by_email(quality.rater_quality(session, project).raters)
    assert set(rows) == {"r1@example.com", "r2@example.com", "r3@example.com", "r4@example.com"}
    one = rows["r1@example.com"]
    assert (one.judgments, one.shared_pairs, one.consensus_pairs, one.agreed) == (4, 3, 2, 1)
    assert one.agreement == 0.5
    # active_ms 4000, null, 1000, 2000: three timed; sorted 1000, 2000, 4000; median 2000;
    # p10 at position 0.1 × 2 = 0.2: 1000 + 0.2 × (2000 − 1000) = 1200.
    assert (one.timed, one.median_active_ms, one.p10_active_ms) == (3, 2000.0, 1200.0)
    assert (one.gold_judgments, one.gold_correct, one.gold_accuracy) == (2, 1, 0.5)
    # Wilson 95 % for 2 of 3, z = 1.96: centre (2/3 + z²/6)/(1 + z²/3) = 0.5731, half-width
    # z/(1 + z²/3)·√(2/27 + z²/36) = 0.3654: [0.2077, 0.9385], which holds 0.5: not biased.
    assert (one.left.k, one.left.n) == (2, 3)
    assert one.left.low == pytest.approx(0.2077, abs=1e-4)
    assert one.left.high == pytest.approx(0.9385, abs=1e-4)
    assert not one.position_biased
    assert (one.ties, one.tie_rate, one.both_bad, one.both_bad_rate) == (1, 0.25, 0, 0.0)
    assert (one.flagged, one.flag_rate) == (1, 0.25)

    two = rows["r2@example.com"]
    assert (two.shared_pairs, two.consensus_pairs, two.agreed) == (4, 3, 2)
    assert two.agreement == pytest.approx(2 / 3)
    assert (two.left.k, two.left.n) == (0, 1)  # p1: b shown left, chose a
    assert (two.timed, two.median_active_ms, two.p10_active_ms) == (0, None, None)
    assert (two.gold_judgments, two.gold_accuracy) == (0, None)
    assert (two.both_bad, two.flagged) == (1, 1)

    three = rows["r3@example.com"]
    assert (three.shared_pairs, three.consensus_pairs, three.agreed) == (3, 3, 2)

    four = rows["r4@example.com"]
    assert (four.judgments, four.shared_pairs, four.consensus_pairs) == (1, 0, 0)
    assert four.agreement is None
    assert four.reliability_votes == 0  # its one vote is on a pair nobody else judged

    # Too few figures for any outlier: no rater has MIN_CONSENSUS_PAIRS pairs with a consensus.
    assert all(r.outliers == [] for r in rows.values())
    assert not any(r.excluded for r in rows.values())

    f = quality.project_quality(session, project).figures
    assert (f.judgments, f.raters, f.pairs, f.pairs_judged_twice) == (12, 4, 6, 4)
    # p1 a 2 of 3, p2 tie 3 of 3, p6 both-bad 2 of 2 have a majority; p3 (a, b) has not.
    assert (f.clear_majority_pairs, f.clear_majority) == (3, 0.75)
    # Left won: r1 2 of 3, r2 0 of 1, r3 on p1 (a left, chose b) no, r4 yes: 3 of 6.
    assert (f.left.k, f.left.n) == (3, 6)
    assert (f.gold_judgments, f.gold_correct) == (2, 1)


def test_all_ties(factory: Factory, session: Session) -> None:
    project = factory.project("ties")
    raters = [factory.user() for _ in range(3)]
    for i in range(2):
        pair = factory.pair(project, prompt=f"q{i}")
        for rater in raters:
            judge(factory, pair, rater, "tie")
    report = quality.quality_report(session, project)
    f = report.project.figures
    assert f.alpha is None
    assert f.alpha_note == "every judgment has the same value: agreement by chance is total"
    assert f.alpha_pairs == 2
    assert (f.clear_majority_pairs, f.clear_majority) == (2, 1.0)
    assert f.left.n == 0 and f.left.share is None
    for r in report.raters.raters:
        assert (r.agreement, r.tie_rate, r.left.n, r.position_biased) == (1.0, 1.0, 0, False)
        assert r.reliability_votes == 0


def test_preference_cycles_among_a_prompts_responses(factory: Factory, session: Session) -> None:
    """Prompt 1: x > y (2 votes to 1), y > z, and z > x through a pair stored as (z, x): a
    cycle. Prompt 2: u > v, v > w, u > w: transitive. Prompt 3: two responses only, not
    checked. Prompt 4: three responses, but p > q and r vs q split 1–1: no edge, no cycle."""
    project = factory.project("cycles")
    r1, r2, r3 = factory.user(), factory.user(), factory.user()
    one, (x, y, z) = prompt_with(factory, project, 3)
    xy, yz, zx = (pair_of(factory, project, *ends) for ends in ((x, y), (y, z), (z, x)))
    judge(factory, xy, r1, "a")
    judge(factory, xy, r2, "a")
    judge(factory, xy, r3, "b")
    judge(factory, yz, r1, "a")
    judge(factory, yz, r2, "tie")  # no vote
    judge(factory, zx, r1, "a", 2)
    _, (u, v, w) = prompt_with(factory, project, 3)
    judge(factory, pair_of(factory, project, u, v), r1, "a")
    judge(factory, pair_of(factory, project, v, w), r1, "a")
    judge(factory, pair_of(factory, project, w, u), r1, "b")
    _, (s, t) = prompt_with(factory, project, 2)
    judge(factory, pair_of(factory, project, s, t), r1, "a")
    _, (p, q, r) = prompt_with(factory, project, 3)
    judge(factory, pair_of(factory, project, p, q), r1, "a")
    rq = pair_of(factory, project, r, q)
    judge(factory, rq, r1, "a")
    judge(factory, rq, r2, "b")

    result = quality.project_quality(session, project)
    assert result.figures.cycles == 1
    assert result.figures.prompts_checked == 2  # prompts 1 and 2; prompt 4 has one edge only
    (cycle,) = result.cycles
    assert cycle.prompt_id == one.id
    assert cycle.response_ids == (x.id, y.id, z.id)
    assert cycle.pair_ids == ((xy.id,), (yz.id,), (zx.id,))


def test_weekly_figures_from_each_weeks_judgments(factory: Factory, session: Session) -> None:
    """Week 2026-W48 (Mon 23 Nov): p1 judged a, a by two raters (α undefined: one value; a
    clear majority). Week 2026-W49: p1 judged b by a third rater (once that week: no pair
    judged twice), p2 judged a and b (no majority; its values 4 and 2 are the only pairable ones:
    n = 2, o_24 = o_42 = 1, n_2 = n_4 = 1, δ²_24 = (2 − 1)² = 1, D_o = (1 + 1)/2 = 1,
    D_e = 2·1·1·1/(2·1) = 1: α = 1 − 1/1 = 0)."""
    project = factory.project("weeks")
    r1, r2, r3 = factory.user(), factory.user(), factory.user()
    p1, p2 = factory.pair(project, prompt="q1"), factory.pair(project, prompt="q2")
    monday = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    wednesday = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    judge(factory, p1, r1, "a", created_at=monday)
    judge(factory, p1, r2, "a", created_at=monday)
    judge(factory, p1, r3, "b", created_at=wednesday)
    judge(factory, p2, r1, "a", created_at=wednesday)
    judge(factory, p2, r2, "b", created_at=wednesday)

    weeks = quality.project_quality(session, project).weeks
    assert [(w.week, w.starts.isoformat()) for w in weeks] == [
        ("2026-W48", "2026-11-23"),
        ("2026-W49", "2026-11-30"),
    ]
    first, second = weeks[0].figures, weeks[1].figures
    assert (first.judgments, first.raters, first.pairs_judged_twice, first.clear_majority) == (
        2, 2, 1, 1.0,
    )  # fmt: skip
    assert first.alpha is None
    assert (second.judgments, second.raters, second.pairs, second.pairs_judged_twice) == (
        3, 3, 2, 1,
    )  # fmt: skip
    assert second.clear_majority == 0.0
    assert second.alpha == pytest.approx(0.0, abs=1e-12)


def test_outliers_name_the_spammer_and_say_why(factory: Factory, session: Session) -> None:
    """Three careful raters pick a (the better answer) on 12 pairs in about 10 s; a spammer
    always clicks the left side, which is a on half the pairs, in 2 s, and gets 4 of 8 gold pairs
    right (Wilson 95 % [0.215, 0.785], wholly below 0.8).

    Spammer: left 12 of 12, Wilson 95 % [0.758, 1.0] excludes 0.5. Agreement: the others are
    unanimous (a) on every pair: 6 of 12 = 50 %; each careful rater's others are two a and the
    spammer: a is a majority, 12 of 12. Project median agreement of (1, 1, 1, 0.5) = 1.0, and
    0.5 < 1.0 − 0.2. Median times (10 s, 10 s, 10 s, 2 s): median 10 s; 2 s < 0.33 × 10 s.
    """
    project = factory.project("outliers")
    careful = [factory.user(email=f"careful{i}@example.com") for i in range(3)]
    spammer = factory.user(email="spammer@example.com")
    for i in range(12):
        pair = factory.pair(project, prompt=f"q{i}")
        left = "ab"[i % 2]
        gold = {"gold_correct": left == "a"} if i < 8 else {}
        for rater in careful:
            judge(factory, pair, rater, "a", shown_left=left, active_ms=10_000)
        judge(factory, pair, spammer, left, shown_left=left, active_ms=2_000, **gold)

    admin = factory.user("admin")
    exclusions.exclude_rater(session, project, spammer.id, reason="clicks left", actor=admin)
    session.commit()

    report = quality.quality_report(session, project)
    raters = report.raters.raters
    assert raters[0].email == "spammer@example.com"  # highlighted first
    assert (report.raters.median_agreement, report.raters.median_active_ms) == (1.0, 10_000.0)
    spam = raters[0]
    reasons = {o.code: o.reason for o in spam.outliers}
    assert reasons["position_bias"] == (
        "picks the left side 100 % of the time (95 % CI 76–100 %, 12 decisive judgments)"
    )
    assert reasons["low_agreement"] == (
        "agrees with the others on 50 % of 12 shared pairs, project median 100 %"
    )
    assert reasons["fast"] == "median 2.0 s per judgment, project median 10 s"
    assert reasons["gold"] == "gold accuracy 4/8 (95 % CI 22–78 %)"
    # EM over unanimous careful raters puts the spammer near a coin flip.
    assert spam.reliability is not None and spam.reliability < quality.RELIABILITY_MIN
    assert "reliability" in reasons
    assert (spam.excluded, spam.excluded_reason) == (True, "clicks left")
    for r in raters[1:]:
        assert r.outliers == [] and not r.excluded
        assert r.agreement == 1.0
        assert r.reliability is not None and r.reliability > 0.8


def test_a_right_side_bias_and_many_ties_are_named(factory: Factory, session: Session) -> None:
    """A rater who picks the right side on 10 of 10 decisive judgments, and calls 11 of 21
    pairs a tie."""
    project = factory.project("right")
    rater = factory.user(email="righty@example.com")
    for i in range(21):
        pair = factory.pair(project, prompt=f"q{i}")
        if i < 10:
            judge(factory, pair, rater, "ab"[i % 2], shown_left="ba"[i % 2])
        else:
            judge(factory, pair, rater, "tie")
    (row,) = quality.rater_quality(session, project).raters
    reasons = {o.code: o.reason for o in row.outliers}
    # Wilson for 0 of 10 left: [0, 0.2775]; as the right side: [0.7225, 1].
    assert reasons == {
        "position_bias": "picks the right side 100 % of the time (95 % CI 72–100 %,"
        " 10 decisive judgments)",
        "ties": "calls 52 % of pairs a tie",
    }


def test_quantile_and_wilson_edges() -> None:
    assert quality.quantile([], 0.5) is None
    assert quality.quantile([7.0], 0.1) == 7.0
    assert quality.quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert quality.wilson(0, 0) == quality.Share(0, 0, None, None, None)
    assert quality.majority(["a", "b"]) is None
    assert quality.majority(["a", "a", "b"]) == "a"
