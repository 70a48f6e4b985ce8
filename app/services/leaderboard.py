"""Human evaluation of policy versions from `version_eval` pairs (new policy vs previous one).

Every judgment of a `version_eval` pair is one game between the two versions whose responses it
compared: `a`/`b` is a win, `tie` counts half to each side, `both_bad` says nothing about which is
better and is left out. From the games:

* each version's human win rate, (wins + ties/2) / games;
* a Bradley–Terry rating, P(i beats j) = σ(θ_i − θ_j), fitted by Newton's method on the
  log-likelihood with a weak L2 prior (λ, default 0.01) so that a version that won every game
  still gets a finite rating; shown on the Elo scale, 1000 + 400·θ/ln 10 with mean θ = 0 (as
  public chatbot leaderboards show theirs);
* 95 % intervals from a seeded bootstrap over games (percentiles 2.5 and 97.5 of the refitted
  ratings).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from app.models import ComparisonPair, Judgment, ModelVersion, Project, Response

SCALE = 400.0 / math.log(10.0)
BASE_RATING = 1000.0


@dataclass(frozen=True)
class Game:
    """One judgment between two versions: `score` is 1 when `first` won, 0 when `second` did,
    0.5 for a tie."""

    first: int
    second: int
    score: float


@dataclass
class Standing:
    version_id: int
    version: int
    name: str
    status: str
    games: int
    wins: int
    losses: int
    ties: int
    win_rate: float
    rating: float
    ci_low: float
    ci_high: float


def fit_bradley_terry(
    games: Sequence[Game], players: Sequence[int], l2: float = 0.01, iterations: int = 50
) -> dict[int, float]:
    """Bradley–Terry strengths θ (natural log scale, mean 0) of `players` from `games`.

    Newton's method on the penalised log-likelihood Σ s·log σ(Δ) + (1 − s)·log σ(−Δ) − λ/2·Σθ²;
    the problem is concave, so a few iterations converge from θ = 0."""
    index = {p: i for i, p in enumerate(players)}
    n = len(players)
    theta = np.zeros(n)
    if n == 0:
        return {}
    first = np.array([index[g.first] for g in games], dtype=int)
    second = np.array([index[g.second] for g in games], dtype=int)
    score = np.array([g.score for g in games], dtype=float)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(theta[first] - theta[second])))
        residual = score - p
        grad = -l2 * theta
        np.add.at(grad, first, residual)
        np.add.at(grad, second, -residual)
        weight = p * (1.0 - p)
        hess = -l2 * np.eye(n)
        np.add.at(hess, (first, first), -weight)
        np.add.at(hess, (second, second), -weight)
        np.add.at(hess, (first, second), weight)
        np.add.at(hess, (second, first), weight)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    theta = theta - theta.mean()
    return {p: float(theta[index[p]]) for p in players}


def to_rating(theta: float) -> float:
    """A Bradley–Terry strength on the Elo scale (400 points = 10:1 odds)."""
    return BASE_RATING + SCALE * theta


def standings(
    games: Sequence[Game],
    versions: dict[int, ModelVersion] | None = None,
    *,
    bootstrap: int = 200,
    seed: int = 0,
    l2: float = 0.01,
) -> list[Standing]:
    """Win rates, ratings and bootstrap 95 % intervals of every version that played, best
    first. Deterministic for a given seed."""
    players = sorted({g.first for g in games} | {g.second for g in games})
    if not players:
        return []
    point = fit_bradley_terry(games, players, l2)
    samples: dict[int, list[float]] = defaultdict(list)
    rng = np.random.default_rng(seed)
    for _ in range(bootstrap):
        picked = rng.integers(0, len(games), size=len(games))
        resampled = [games[i] for i in picked]
        fitted = fit_bradley_terry(resampled, players, l2)
        for p in players:
            samples[p].append(fitted[p])
    tally: dict[int, list[int]] = {p: [0, 0, 0] for p in players}  # wins, losses, ties
    for g in games:
        if g.score == 0.5:
            tally[g.first][2] += 1
            tally[g.second][2] += 1
        else:
            winner, loser = (g.first, g.second) if g.score == 1.0 else (g.second, g.first)
            tally[winner][0] += 1
            tally[loser][1] += 1
    out = []
    for p in players:
        wins, losses, ties = tally[p]
        n = wins + losses + ties
        low, high = np.percentile(samples[p], [2.5, 97.5]) if bootstrap else (point[p], point[p])
        version = (versions or {}).get(p)
        out.append(
            Standing(
                version_id=p,
                version=version.version if version else -1,
                name=version.name if version else str(p),
                status=version.status if version else "",
                games=n,
                wins=wins,
                losses=losses,
                ties=ties,
                win_rate=(wins + 0.5 * ties) / n if n else 0.0,
                rating=to_rating(point[p]),
                ci_low=to_rating(float(low)),
                ci_high=to_rating(float(high)),
            )
        )
    return sorted(out, key=lambda s: -s.rating)


def version_games(session: Session, project: Project) -> list[Game]:
    """Every judgment of a `version_eval` pair of the project, as a game between versions."""
    resp_a, resp_b = aliased(Response), aliased(Response)
    rows = session.execute(
        select(Judgment.choice, resp_a.model_version_id, resp_b.model_version_id)
        .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
        .join(resp_a, ComparisonPair.response_a_id == resp_a.id)
        .join(resp_b, ComparisonPair.response_b_id == resp_b.id)
        .where(
            ComparisonPair.project_id == project.id,
            ComparisonPair.kind == "version_eval",
            Judgment.choice.in_(("a", "b", "tie")),
            resp_a.model_version_id.is_not(None),
            resp_b.model_version_id.is_not(None),
        )
        .order_by(Judgment.id)
    )
    games = []
    for choice, a, b in rows:
        if a is None or b is None or a == b:
            continue
        games.append(Game(a, b, {"a": 1.0, "b": 0.0, "tie": 0.5}[choice]))
    return games


def project_leaderboard(
    session: Session, project: Project, *, bootstrap: int = 200, seed: int = 0
) -> dict[str, Any]:
    """The project's policy leaderboard from human `version_eval` judgments."""
    games = version_games(session, project)
    ids = sorted({g.first for g in games} | {g.second for g in games})
    versions = {
        v.id: v
        for v in session.scalars(select(ModelVersion).where(ModelVersion.id.in_(ids or [0])))
    }
    table = standings(games, versions, bootstrap=bootstrap, seed=seed)
    return {
        "games": len(games),
        "bootstrap": bootstrap,
        "seed": seed,
        "versions": [asdict(s) for s in table],
    }
