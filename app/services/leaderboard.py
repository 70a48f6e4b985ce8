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

Games are exchangeable, so everything is computed from their counts per (first, second, score)
— one grouped query, a few rows per pair of versions — and a bootstrap round is a multinomial
draw of those counts. The counts of settled judgments are kept per project in the process
(`version_game_counts`), so the console's versions page does not re-read every judgment.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, aliased, load_only

from app.models import ComparisonPair, Judgment, ModelVersion, Project, Response, utcnow

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


@dataclass(frozen=True)
class Cells:
    """Games grouped by (first, second, score): the leaderboard's sufficient statistics.

    Games are exchangeable, so a fit over the cells with their counts as weights is the fit over
    the games, and resampling games with replacement is a multinomial draw of cell counts: the
    work of a fit and of each bootstrap round grows with the number of version pairs, not with
    the number of judgments."""

    first: np.ndarray  # player index of each cell's first version
    second: np.ndarray
    score: np.ndarray
    count: np.ndarray

    @property
    def games(self) -> int:
        return int(self.count.sum())


def _cells(counts: Iterable[tuple[int, int, float, int]], index: dict[int, int]) -> Cells:
    rows = [(index[a], index[b], s, n) for a, b, s, n in counts if n > 0]
    return Cells(
        first=np.array([r[0] for r in rows], dtype=int),
        second=np.array([r[1] for r in rows], dtype=int),
        score=np.array([r[2] for r in rows], dtype=float),
        count=np.array([r[3] for r in rows], dtype=float),
    )


def _fit(cells: Cells, weight: np.ndarray, n: int, l2: float, iterations: int) -> np.ndarray:
    """Newton's method on Σ w·(s·log σ(Δ) + (1 − s)·log σ(−Δ)) − λ/2·Σθ² (θ mean-centred)."""
    theta = np.zeros(n)
    first, second = cells.first, cells.second
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(theta[first] - theta[second])))
        residual = weight * (cells.score - p)
        grad = -l2 * theta
        np.add.at(grad, first, residual)
        np.add.at(grad, second, -residual)
        curvature = weight * p * (1.0 - p)
        hess = -l2 * np.eye(n)
        np.add.at(hess, (first, first), -curvature)
        np.add.at(hess, (second, second), -curvature)
        np.add.at(hess, (first, second), curvature)
        np.add.at(hess, (second, first), curvature)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if float(np.max(np.abs(step))) < 1e-10:
            break
    return theta - theta.mean()


def fit_bradley_terry(
    games: Sequence[Game], players: Sequence[int], l2: float = 0.01, iterations: int = 50
) -> dict[int, float]:
    """Bradley–Terry strengths θ (natural log scale, mean 0) of `players` from `games`.

    Newton's method on the penalised log-likelihood Σ s·log σ(Δ) + (1 − s)·log σ(−Δ) − λ/2·Σθ²;
    the problem is concave, so a few iterations converge from θ = 0."""
    if not players:
        return {}
    index = {p: i for i, p in enumerate(players)}
    cells = _cells(_tally(games), index)
    theta = _fit(cells, cells.count, len(players), l2, iterations)
    return {p: float(theta[index[p]]) for p in players}


def to_rating(theta: float) -> float:
    """A Bradley–Terry strength on the Elo scale (400 points = 10:1 odds)."""
    return BASE_RATING + SCALE * theta


def _tally(games: Iterable[Game]) -> list[tuple[int, int, float, int]]:
    grouped = Counter((g.first, g.second, g.score) for g in games)
    return [(a, b, s, n) for (a, b, s), n in grouped.items()]


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
    return standings_of_counts(_tally(games), versions, bootstrap=bootstrap, seed=seed, l2=l2)


def standings_of_counts(
    counts: Sequence[tuple[int, int, float, int]],
    versions: dict[int, ModelVersion] | None = None,
    *,
    bootstrap: int = 200,
    seed: int = 0,
    l2: float = 0.01,
) -> list[Standing]:
    """`standings` from games already counted per (first, second, score) — what
    `version_game_counts` reads with one grouped query. Deterministic for a given seed."""
    players = sorted({c[0] for c in counts if c[3] > 0} | {c[1] for c in counts if c[3] > 0})
    if not players:
        return []
    index = {p: i for i, p in enumerate(players)}
    cells = _cells(counts, index)
    n = len(players)
    point = _fit(cells, cells.count, n, l2, 50)
    # Each round resamples the games with replacement: multinomial counts over the cells.
    rng = np.random.default_rng(seed)
    total = cells.games
    share = cells.count / total
    rounds = np.array(
        [_fit(cells, rng.multinomial(total, share), n, l2, 50) for _ in range(bootstrap)]
    )
    wins, losses, ties = np.zeros(n, dtype=int), np.zeros(n, dtype=int), np.zeros(n, dtype=int)
    for a, b, s, c in zip(cells.first, cells.second, cells.score, cells.count, strict=True):
        if s == 0.5:
            ties[a] += int(c)
            ties[b] += int(c)
        else:
            winner, loser = (a, b) if s == 1.0 else (b, a)
            wins[winner] += int(c)
            losses[loser] += int(c)
    out = []
    for p, i in index.items():
        played = int(wins[i] + losses[i] + ties[i])
        if bootstrap:
            low, high = np.percentile(rounds[:, i], [2.5, 97.5])
        else:
            low = high = point[i]
        version = (versions or {}).get(p)
        out.append(
            Standing(
                version_id=p,
                version=version.version if version else -1,
                name=version.name if version else str(p),
                status=version.status if version else "",
                games=played,
                wins=int(wins[i]),
                losses=int(losses[i]),
                ties=int(ties[i]),
                win_rate=float(wins[i] + 0.5 * ties[i]) / played if played else 0.0,
                rating=to_rating(float(point[i])),
                ci_low=to_rating(float(low)),
                ci_high=to_rating(float(high)),
            )
        )
    return sorted(out, key=lambda s: -s.rating)


CHOICE_SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5}


def _version_eval_judgments(project: Project, *columns: Any) -> Select[Any]:
    resp_a, resp_b = aliased(Response), aliased(Response)
    first, second = resp_a.model_version_id, resp_b.model_version_id
    return (
        select(*columns, Judgment.choice, first, second)
        .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
        .join(resp_a, ComparisonPair.response_a_id == resp_a.id)
        .join(resp_b, ComparisonPair.response_b_id == resp_b.id)
        .where(
            ComparisonPair.project_id == project.id,
            ComparisonPair.kind == "version_eval",
            Judgment.choice.in_(tuple(CHOICE_SCORE)),
            first.is_not(None),
            second.is_not(None),
            first != second,
        )
    )


def version_games(session: Session, project: Project) -> list[Game]:
    """Every judgment of a `version_eval` pair of the project, as a game between versions."""
    rows = session.execute(_version_eval_judgments(project, Judgment.id).order_by(Judgment.id))
    return [Game(a, b, CHOICE_SCORE[choice]) for _, choice, a, b in rows]


Cell = tuple[int, int, float]  # (first version, second version, score)

# Judgments are never changed once written (a gold answer marks them, it does not change their
# choice), so the counts of those older than SETTLE_S are kept per project in this process and
# only the newer ones are read again: the versions page stays fast as judgments pile up. A
# judgment's transaction commits within moments of its `created_at`, far sooner than this.
SETTLE_S = 120.0
_MAX_PROJECTS = 64


@dataclass(frozen=True)
class _Settled:
    until: datetime  # every version_eval judgment created before this is counted
    counts: Counter[Cell]


_settled: OrderedDict[tuple[str, int, datetime], _Settled] = OrderedDict()
_settled_lock = threading.Lock()


def _count(
    session: Session, project: Project, since: datetime | None, until: datetime | None
) -> Counter[Cell]:
    query = _version_eval_judgments(project, func.count())
    query = query.group_by(*list(query.selected_columns)[1:])
    if since is not None or until is not None:
        query = query.where(Judgment.project_id == project.id)  # the (project, created_at) index
    if since is not None:
        query = query.where(Judgment.created_at >= since)
    if until is not None:
        query = query.where(Judgment.created_at < until)
    out: Counter[Cell] = Counter()
    for n, choice, a, b in session.execute(query):
        out[(a, b, CHOICE_SCORE[choice])] += int(n)
    return out


def version_game_counts(
    session: Session, project: Project, *, now: datetime | None = None
) -> list[tuple[int, int, float, int]]:
    """The project's `version_eval` games counted per (first, second, score): a few rows per
    pair of versions however many judgments there are.

    Two grouped queries over recent judgments: those created in the last `SETTLE_S` seconds,
    and those settled since this process last counted the project (on its first look, all)."""
    now = now or utcnow()
    boundary = now - timedelta(seconds=SETTLE_S)
    key = (str(session.get_bind().engine.url), project.id, project.created_at)
    with _settled_lock:
        settled = _settled.get(key)
        if settled is None or boundary < settled.until:  # first look, or the clock went back
            settled = _Settled(boundary, _count(session, project, None, boundary))
        elif boundary > settled.until:
            more = _count(session, project, settled.until, boundary)
            settled = _Settled(boundary, settled.counts + more)
        _settled[key] = settled
        _settled.move_to_end(key)
        while len(_settled) > _MAX_PROJECTS:
            _settled.popitem(last=False)
    counts = settled.counts + _count(session, project, boundary, None)
    return [(a, b, score, n) for (a, b, score), n in sorted(counts.items())]


def project_leaderboard(
    session: Session, project: Project, *, bootstrap: int = 200, seed: int = 0
) -> dict[str, Any]:
    """The project's policy leaderboard from human `version_eval` judgments."""
    counts = version_game_counts(session, project)
    ids = sorted({c[0] for c in counts} | {c[1] for c in counts})
    versions = {
        v.id: v
        for v in session.scalars(
            select(ModelVersion)
            .where(ModelVersion.id.in_(ids or [0]))
            # The names only: a version's metrics carry its evaluation samples.
            .options(load_only(ModelVersion.version, ModelVersion.name, ModelVersion.status))
        )
    }
    table = standings_of_counts(counts, versions, bootstrap=bootstrap, seed=seed)
    return {
        "games": sum(c[3] for c in counts),
        "bootstrap": bootstrap,
        "seed": seed,
        "versions": [asdict(s) for s in table],
    }
