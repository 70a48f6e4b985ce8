"""Leaderboard math against hand-computed cases, and games read from version_eval judgments."""

import math

import pytest
from sqlalchemy.orm import Session

from app.models import ComparisonPair, Judgment, ModelVersion, Prompt, Response
from app.services import leaderboard
from app.services.leaderboard import Game, fit_bradley_terry, standings
from tests.conftest import Factory

A, B, C = 1, 2, 3


def test_three_wins_in_four_give_odds_of_three() -> None:
    # MLE of P(A beats B) is 3/4, so theta_A - theta_B = ln 3; mean-centred: +-ln(3)/2.
    games = [Game(A, B, 1.0)] * 3 + [Game(A, B, 0.0)]
    theta = fit_bradley_terry(games, [A, B], l2=1e-9)
    assert theta[A] - theta[B] == pytest.approx(math.log(3), abs=1e-6)
    assert theta[A] + theta[B] == pytest.approx(0.0, abs=1e-9)
    # On the Elo scale: 400 * log10(3) = 190.85 points apart, centred on 1000.
    table = {s.version_id: s for s in standings(games, bootstrap=0, l2=1e-9)}
    assert table[A].rating - table[B].rating == pytest.approx(400 * math.log10(3), abs=1e-3)
    assert table[A].rating == pytest.approx(1000 + 200 * math.log10(3), abs=1e-3)
    assert (table[A].wins, table[A].losses, table[A].games, table[A].win_rate) == (3, 1, 4, 0.75)
    assert (table[B].wins, table[B].losses, table[B].win_rate) == (1, 3, 0.25)


def test_ties_count_half_and_an_even_record_rates_equal() -> None:
    games = [Game(A, B, 0.5), Game(A, B, 1.0), Game(B, A, 1.0)]
    table = {s.version_id: s for s in standings(games, bootstrap=0)}
    assert table[A].win_rate == table[B].win_rate == 0.5
    assert table[A].ties == table[B].ties == 1
    assert table[A].rating == pytest.approx(1000.0, abs=1e-9)
    assert table[B].rating == pytest.approx(1000.0, abs=1e-9)


def test_clear_winner_rates_highest_and_a_sweep_stays_finite() -> None:
    games = [Game(A, B, 1.0)] * 6 + [Game(B, C, 1.0)] * 6 + [Game(A, C, 1.0)] * 6
    table = standings(games, bootstrap=0)
    assert [s.version_id for s in table] == [A, B, C]
    assert all(math.isfinite(s.rating) for s in table)
    # The prior (l2) is what keeps an undefeated version finite; with a weaker prior it rises.
    weak = {s.version_id: s.rating for s in standings(games, bootstrap=0, l2=1e-4)}
    assert weak[A] > table[0].rating


def test_bootstrap_intervals_contain_the_estimate_and_are_seeded() -> None:
    games = [Game(A, B, 1.0)] * 14 + [Game(A, B, 0.0)] * 6 + [Game(B, C, 1.0)] * 12
    games += [Game(B, C, 0.0)] * 8 + [Game(A, C, 0.5)] * 4
    first = standings(games, bootstrap=300, seed=7)
    again = standings(games, bootstrap=300, seed=7)
    other = standings(games, bootstrap=300, seed=8)
    assert first == again
    assert [(s.ci_low, s.ci_high) for s in first] != [(s.ci_low, s.ci_high) for s in other]
    for s in first:
        assert s.ci_low < s.rating < s.ci_high
    assert first[0].version_id == A and first[0].ci_low > first[-1].ci_high - 400


def test_no_games_no_rows() -> None:
    assert standings([], bootstrap=10) == []


def _version(session: Session, project_id: int, number: int) -> ModelVersion:
    row = ModelVersion(
        project_id=project_id, kind="policy", version=number, name=f"policy v{number}",
        base_model="tiny", status="archived",
    )  # fmt: skip
    session.add(row)
    session.flush()
    return row


def test_games_come_from_version_eval_judgments_only(session: Session, factory: Factory) -> None:
    project = factory.project(overlap=1)
    rater = factory.user("rater")
    v0, v1 = _version(session, project.id, 0), _version(session, project.id, 1)
    prompt = Prompt(project_id=project.id, text="q", source="test")
    session.add(prompt)
    session.flush()

    def pair(kind: str, first: ModelVersion | None, second: ModelVersion | None, choice: str):
        a = Response(
            prompt_id=prompt.id, text=f"a{kind}{choice}", model_version_id=first and first.id
        )
        b = Response(
            prompt_id=prompt.id, text=f"b{kind}{choice}", model_version_id=second and second.id
        )
        session.add_all([a, b])
        session.flush()
        row = ComparisonPair(
            project_id=project.id, prompt_id=prompt.id, response_a_id=a.id, response_b_id=b.id,
            required_judgments=1, judgment_count=1, kind=kind,
        )  # fmt: skip
        session.add(row)
        session.flush()
        strength = 1 if choice in ("a", "b") else None
        session.add(
            Judgment(project_id=project.id, pair_id=row.id, rater_id=rater.id, choice=choice,
                     strength=strength)
        )  # fmt: skip

    pair("version_eval", v1, v0, "a")  # v1 wins
    pair("version_eval", v0, v1, "b")  # v1 wins
    pair("version_eval", v0, v1, "tie")
    pair("version_eval", v1, v0, "both_bad")  # says nothing about which is better
    pair("standard", v1, v0, "b")  # not a version comparison
    pair("version_eval", v1, None, "b")  # an uploaded response has no version
    session.commit()

    games = leaderboard.version_games(session, project)
    assert sorted((g.first, g.second, g.score) for g in games) == sorted(
        [(v1.id, v0.id, 1.0), (v0.id, v1.id, 0.0), (v0.id, v1.id, 0.5)]
    )
    board = leaderboard.project_leaderboard(session, project, bootstrap=50, seed=1)
    assert board["games"] == 3
    top, bottom = board["versions"]
    assert (top["version_id"], top["wins"], top["ties"], top["win_rate"]) == (v1.id, 2, 1, 5 / 6)
    assert (bottom["version_id"], bottom["losses"], bottom["name"]) == (v0.id, 2, "policy v0")
    assert top["rating"] > bottom["rating"]
