"""Data quality: how well each rater rates, and how consistent a project's judgments are.

Everything here is computed from rater judgments only (`source == "rater"`, a rater id set):
imported judgments carry a source, not a person, and are never a rater's work. Every rater
judgment of the project counts, whatever later happened to it (an excluded rater, a moderated
pair): these figures describe the data as it was collected, which is what an admin judges a
rater by. The figures are read in three queries (the judgments with their pairs, the raters'
emails, the live exclusions), then computed in memory.

Definitions (the console page and the API's field descriptions say the same):

* **Agreement** with the leave-one-out consensus: for a rater's judgment of a pair, the
  consensus is the choice (`a`, `b`, `tie` or `both_bad`) held by more than half of the *other*
  raters' judgments of that pair; strength is ignored (`a` strongly and `a` slightly agree), a
  tie agrees only with a tie consensus and both-bad only with a both-bad one. A pair the rater
  shares with others whose choices have no such majority (one `a`, one `b`) counts as shared but
  not in the agreement. Agreement = agreeing judgments / judgments on pairs with a consensus.
* **Position bias**: among the rater's decisive (`a`/`b`) judgments whose shown side is known,
  the share where the response shown on the left won, with a Wilson score 95 % interval
  (Wilson rather than Clopper–Pearson: it is not conservative, so it flags a real bias on fewer
  judgments, and it stays inside [0, 1]). The rater is flagged when the interval excludes 0.5.
* **Active time**: median and 10th percentile (linear interpolation between order statistics)
  of `active_ms` over the judgments that have one; a null (an old client, a judgment made
  through the API without timing) is left out, and `timed` says how many had a value.
* **Krippendorff's α**, ordinal, on the 5-point scale b much better = 1, b better = 2, tie = 3,
  a better = 4, a much better = 5; a both-bad judgment is not a point on that scale and is left
  out of α (it is in the clear-majority share). Units are pairs; a pair with fewer than two
  values on the scale is not pairable and does not count. α is undefined (None) when no pair
  has two values, or when every value is the same (no expected disagreement: all ties).
* **Clear majority**: among pairs judged at least twice, the share where one choice (`a`, `b`,
  `tie`, `both_bad`) is held by more than half of the pair's judgments.
* **Preference cycles**: each pair's judgments give a direction, the response with more
  decisive votes (none on equal votes; ties and both-bad do not vote), summed over the pairs that
  compare the same two responses. Among a prompt's responses, a cycle is three responses with
  A > B, B > C and C > A.
* **Weekly figures** use the judgments made in each ISO week (of their `created_at`) alone, so
  a pair whose judgments span two weeks adds to each week only the judgments made in it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from statistics import median
from typing import NamedTuple

import krippendorff
import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ComparisonPair, Judgment, Project, RaterExclusion, User
from app.services import exclusions, reliability

# Outlier thresholds. A rater is highlighted with the reason in words when any of these holds.
# Position bias: the Wilson 95 % interval of the left-side share excludes 0.5.
Z_95 = 1.959963984540054
# Agreement: this far (absolute share) below the project's median agreement, on at least
# MIN_CONSENSUS_PAIRS pairs with a consensus of the others.
AGREEMENT_GAP = 0.20
MIN_CONSENSUS_PAIRS = 5
# Speed: a median active time under this fraction of the project's median (the median of the
# raters' medians, over raters with MIN_TIMED timed judgments; needs two such raters).
FAST_FRACTION = 0.33
MIN_TIMED = 5
# Gold: on at least MIN_GOLD gold judgments, accuracy whose Wilson 95 % interval lies wholly
# below GOLD_MIN_ACCURACY, i.e. confidently worse than it. (A bare "under 70 %" flags one careful
# rater in ten on six gold pairs by bad luck; 2 of 8 or 1 of 4 are flagged, 3 of 6 is not.)
GOLD_MIN_ACCURACY = 0.80
MIN_GOLD = 3
# Reliability: estimated accuracy under RELIABILITY_MIN on at least MIN_RELIABILITY_VOTES
# decisive votes (a rater who always picks one screen side scores about 0.5: sides are random).
RELIABILITY_MIN = 0.65
MIN_RELIABILITY_VOTES = 10
# Ties: more than TIE_RATE_MAX of at least MIN_TIE_JUDGMENTS judgments are ties.
TIE_RATE_MAX = 0.50
MIN_TIE_JUDGMENTS = 10
# How many preference cycles a report lists (all are counted).
CYCLES_LISTED = 100

SCALE = {("b", 2): 1, ("b", 1): 2, ("tie", None): 3, ("a", 1): 4, ("a", 2): 5}
SCALE_DOMAIN = [1, 2, 3, 4, 5]


class _J(NamedTuple):
    """One rater judgment with the pair columns the metrics need (a tuple: a large project
    has a million of them, and a tuple is built several times faster than a dataclass)."""

    id: int
    pair_id: int
    rater_id: int
    choice: str
    strength: int | None
    shown_left: str | None
    active_ms: int | None
    gold_correct: bool | None
    flags: list[str]
    created_at: datetime
    prompt_id: int
    response_a_id: int
    response_b_id: int


@dataclass(frozen=True)
class Share:
    """`k` of `n`, with the Wilson score 95 % interval of k/n (all None when n is 0)."""

    k: int
    n: int
    share: float | None
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Outlier:
    """Why a rater is highlighted: a stable code and the reason in words."""

    code: str
    reason: str


@dataclass(frozen=True)
class RaterQuality:
    """One rater's figures in one project (see the module docstring for the definitions)."""

    rater_id: int
    email: str
    judgments: int
    timed: int
    median_active_ms: float | None
    p10_active_ms: float | None
    shared_pairs: int
    consensus_pairs: int
    agreed: int
    agreement: float | None
    gold_judgments: int
    gold_correct: int
    gold_accuracy: float | None
    left: Share
    position_biased: bool
    ties: int
    tie_rate: float
    both_bad: int
    both_bad_rate: float
    flagged: int
    flag_rate: float
    reliability: float | None
    reliability_votes: int
    excluded: bool
    excluded_reason: str | None
    excluded_at: datetime | None
    outliers: list[Outlier]


@dataclass(frozen=True)
class Cycle:
    """Three responses to one prompt whose aggregated preferences go round: first > second >
    third > first. `pair_ids` are the pairs behind each of the three preferences."""

    prompt_id: int
    response_ids: tuple[int, int, int]
    pair_ids: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Figures:
    """The project-level figures of a set of judgments (the whole project, or one week)."""

    judgments: int
    raters: int
    pairs: int
    pairs_judged_twice: int
    clear_majority_pairs: int
    clear_majority: float | None
    alpha: float | None
    alpha_pairs: int
    alpha_note: str
    left: Share
    gold_judgments: int
    gold_correct: int
    cycles: int
    prompts_checked: int


@dataclass(frozen=True)
class Week:
    """One ISO week's figures, from the judgments made that week."""

    week: str
    starts: date
    figures: Figures


@dataclass(frozen=True)
class ProjectQuality:
    """A project's agreement, majority and cycle figures, overall and per week."""

    figures: Figures
    cycles: list[Cycle]
    weeks: list[Week]


@dataclass(frozen=True)
class RaterReport:
    """Every rater's figures, highlighted raters first, and the project medians the
    agreement and speed outliers are measured against."""

    raters: list[RaterQuality]
    median_agreement: float | None
    median_active_ms: float | None


@dataclass(frozen=True)
class QualityReport:
    """Both views, computed from one read of the judgments (the console page shows both)."""

    project: ProjectQuality
    raters: RaterReport


# Small statistics ---------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z_95) -> Share:
    """`k` successes in `n` trials with the Wilson score interval (95 % by default)."""
    if n == 0:
        return Share(k, n, None, None, None)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Share(k, n, p, max(0.0, centre - half), min(1.0, centre + half))


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile by linear interpolation between order statistics (numpy's default):
    position q·(n − 1) in the sorted values. None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def majority(choices: Iterable[str]) -> str | None:
    """The choice held by more than half of `choices`, or None when none is."""
    counts = Counter(choices)
    total = sum(counts.values())
    for choice, n in counts.items():
        if 2 * n > total:
            return choice
    return None


def ordinal_alpha(values_by_pair: Iterable[Sequence[int]]) -> tuple[float | None, int, str]:
    """Krippendorff's α (ordinal) over pairs' 1..5 values: (α, pairable pairs, why undefined).

    Uses the `krippendorff` package on a pairs × values count matrix, which stays small for
    any number of raters (a raters × pairs matrix would not)."""
    rows = []
    used: set[int] = set()
    for values in values_by_pair:
        if len(values) < 2:
            continue
        counts = Counter(values)
        rows.append([counts.get(v, 0) for v in SCALE_DOMAIN])
        used.update(values)
    if not rows:
        return None, 0, "no pair has two judgments on the scale"
    if len(used) == 1:
        return None, len(rows), "every judgment has the same value: agreement by chance is total"
    alpha = krippendorff.alpha(
        value_counts=np.array(rows), value_domain=SCALE_DOMAIN, level_of_measurement="ordinal"
    )
    return float(alpha), len(rows), ""


# Reading ------------------------------------------------------------------------------------


def _judgments(session: Session, project: Project) -> list[_J]:
    """Every rater judgment of the project with its pair's prompt and responses, in id order."""
    query = (
        select(
            Judgment.id, Judgment.pair_id, Judgment.rater_id, Judgment.choice, Judgment.strength,
            Judgment.shown_left, Judgment.active_ms, Judgment.gold_correct, Judgment.flags,
            Judgment.created_at, ComparisonPair.prompt_id, ComparisonPair.response_a_id,
            ComparisonPair.response_b_id,
        )
        .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
        .where(
            Judgment.project_id == project.id,
            Judgment.source == "rater",
            Judgment.rater_id.is_not(None),
        )
        .order_by(Judgment.id)
    )  # fmt: skip
    return [_J._make(row) for row in session.execute(query)]  # rater_id is not null here


# Project figures ----------------------------------------------------------------------------


def _cycles(judgments: Sequence[_J]) -> tuple[list[Cycle], int]:
    """Every preference cycle among each prompt's responses, and how many prompts had three
    or more responses with aggregated preferences between them."""
    # Decisive votes per unordered response pair (lower id first): [votes for lower, higher].
    votes: dict[tuple[int, int, int], list[int]] = defaultdict(lambda: [0, 0])
    pairs_of: dict[tuple[int, int, int], set[int]] = defaultdict(set)
    for j in judgments:
        if j.choice not in ("a", "b"):
            continue
        winner, loser = (
            (j.response_a_id, j.response_b_id)
            if j.choice == "a"
            else (j.response_b_id, j.response_a_id)
        )
        lo, hi = min(winner, loser), max(winner, loser)
        votes[(j.prompt_id, lo, hi)][0 if winner == lo else 1] += 1
        pairs_of[(j.prompt_id, lo, hi)].add(j.pair_id)
    beats: dict[int, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    edge_pairs: dict[tuple[int, int], tuple[int, ...]] = {}
    for (prompt_id, lo, hi), (for_lo, for_hi) in votes.items():
        if for_lo == for_hi:
            continue
        winner, loser = (lo, hi) if for_lo > for_hi else (hi, lo)
        beats[prompt_id][winner].add(loser)
        edge_pairs[(winner, loser)] = tuple(sorted(pairs_of[(prompt_id, lo, hi)]))
    cycles = []
    checked = 0
    for prompt_id in sorted(beats):
        graph = beats[prompt_id]
        responses = set(graph) | {r for losers in graph.values() for r in losers}
        if len(responses) < 3:
            continue
        checked += 1
        # Each 3-cycle once: from its smallest response, the other two larger.
        for a in sorted(graph):
            for b in sorted(graph[a]):
                if b < a:
                    continue
                for c in sorted(graph.get(b, ())):
                    if c > a and a in graph.get(c, ()):
                        cycles.append(
                            Cycle(
                                prompt_id,
                                (a, b, c),
                                (edge_pairs[(a, b)], edge_pairs[(b, c)], edge_pairs[(c, a)]),
                            )
                        )
    return cycles, checked


def _figures(judgments: Sequence[_J]) -> tuple[Figures, list[Cycle]]:
    """The project-level figures of these judgments, and every cycle among them."""
    by_pair: dict[int, list[_J]] = defaultdict(list)
    for j in judgments:
        by_pair[j.pair_id].append(j)
    judged_twice = [group for group in by_pair.values() if len(group) >= 2]
    clear = sum(majority(j.choice for j in group) is not None for group in judged_twice)
    alpha, alpha_pairs, note = ordinal_alpha(
        [SCALE[(j.choice, j.strength)] for j in group if j.choice != "both_bad"]
        for group in by_pair.values()
    )
    decisive = [j for j in judgments if j.choice in ("a", "b") and j.shown_left is not None]
    gold = [j for j in judgments if j.gold_correct is not None]
    cycles, checked = _cycles(judgments)
    figures = Figures(
        judgments=len(judgments),
        raters=len({j.rater_id for j in judgments}),
        pairs=len(by_pair),
        pairs_judged_twice=len(judged_twice),
        clear_majority_pairs=clear,
        clear_majority=clear / len(judged_twice) if judged_twice else None,
        alpha=alpha,
        alpha_pairs=alpha_pairs,
        alpha_note=note,
        left=wilson(sum(j.choice == j.shown_left for j in decisive), len(decisive)),
        gold_judgments=len(gold),
        gold_correct=sum(bool(j.gold_correct) for j in gold),
        cycles=len(cycles),
        prompts_checked=checked,
    )
    return figures, cycles


def _project(judgments: Sequence[_J]) -> ProjectQuality:
    """The figures of all the judgments, then of each ISO week's alone."""
    figures, cycles = _figures(judgments)
    by_week: dict[tuple[int, int], list[_J]] = defaultdict(list)
    for j in judgments:
        iso = j.created_at.isocalendar()
        by_week[(iso.year, iso.week)].append(j)
    weeks = [
        Week(f"{year}-W{week:02d}", date.fromisocalendar(year, week, 1), _figures(group)[0])
        for (year, week), group in sorted(by_week.items())
    ]
    return ProjectQuality(figures, cycles[:CYCLES_LISTED], weeks)


# Rater figures ------------------------------------------------------------------------------


def _seconds(ms: float) -> str:
    s = ms / 1000
    return f"{s:.1f} s" if s < 9.95 else f"{s:.0f} s"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _raters(session: Session, project: Project, judgments: Sequence[_J]) -> RaterReport:
    """Every rater's figures, the medians the outliers are measured against, the outliers."""
    by_rater: dict[int, list[_J]] = defaultdict(list)
    choices_by_pair: dict[int, Counter[str]] = defaultdict(Counter)
    for j in judgments:
        by_rater[j.rater_id].append(j)
        choices_by_pair[j.pair_id][j.choice] += 1
    emails = dict(session.execute(select(User.id, User.email).where(User.id.in_(by_rater))).all())
    live = exclusions.live_exclusions(session, project)
    estimate = reliability.estimate(
        reliability.Vote(item=j.pair_id, rater=j.rater_id, choice=j.choice)  # type: ignore[arg-type]
        for j in judgments
        if j.choice in ("a", "b")
    )

    rows = [
        _rater(rater_id, own, choices_by_pair, emails, live.get(rater_id), estimate)
        for rater_id, own in by_rater.items()
    ]
    agreements = [
        r.agreement
        for r in rows
        if r.agreement is not None and r.consensus_pairs >= MIN_CONSENSUS_PAIRS
    ]
    speeds = [
        r.median_active_ms for r in rows if r.median_active_ms is not None and r.timed >= MIN_TIMED
    ]
    medians: dict[str, float | None] = {
        "agreement": median(agreements) if agreements else None,
        "median_active_ms": median(speeds) if len(speeds) >= 2 else None,
    }
    out = [replace(r, outliers=_outliers(r, medians)) for r in rows]
    # Highlighted raters first (most reasons first), then the most judgments.
    out.sort(key=lambda r: (-len(r.outliers), -r.judgments, r.email))
    return RaterReport(out, medians["agreement"], medians["median_active_ms"])


def _rater(
    rater_id: int,
    own: Sequence[_J],
    choices_by_pair: dict[int, Counter[str]],
    emails: dict[int, str],
    exclusion: RaterExclusion | None,
    estimate: reliability.ReliabilityEstimate,
) -> RaterQuality:
    """One rater's figures, before the outliers (which need every rater's)."""
    shared = consensus = agreed = 0
    for j in own:
        # The others' choices: the pair's counts less this judgment (a rater judges a pair once).
        counts = choices_by_pair[j.pair_id]
        others = sum(counts.values()) - 1
        if others == 0:
            continue
        shared += 1
        verdict = next((c for c, n in counts.items() if 2 * (n - (c == j.choice)) > others), None)
        if verdict is not None:
            consensus += 1
            agreed += j.choice == verdict
    times = [float(j.active_ms) for j in own if j.active_ms is not None]
    decisive = [j for j in own if j.choice in ("a", "b") and j.shown_left is not None]
    left = wilson(sum(j.choice == j.shown_left for j in decisive), len(decisive))
    gold = [j for j in own if j.gold_correct is not None]
    gold_correct = sum(bool(j.gold_correct) for j in gold)
    n = len(own)
    ties = sum(j.choice == "tie" for j in own)
    both_bad = sum(j.choice == "both_bad" for j in own)
    flagged = sum(bool(j.flags) for j in own)
    return RaterQuality(
        rater_id=rater_id,
        email=emails.get(rater_id, f"user {rater_id}"),
        judgments=n,
        timed=len(times),
        median_active_ms=quantile(times, 0.5),
        p10_active_ms=quantile(times, 0.1),
        shared_pairs=shared,
        consensus_pairs=consensus,
        agreed=agreed,
        agreement=agreed / consensus if consensus else None,
        gold_judgments=len(gold),
        gold_correct=gold_correct,
        gold_accuracy=gold_correct / len(gold) if gold else None,
        left=left,
        position_biased=left.low is not None and not (left.low <= 0.5 <= (left.high or 0)),
        ties=ties,
        tie_rate=ties / n,
        both_bad=both_bad,
        both_bad_rate=both_bad / n,
        flagged=flagged,
        flag_rate=flagged / n,
        reliability=estimate.accuracy.get(rater_id),
        reliability_votes=estimate.votes.get(rater_id, 0),
        excluded=exclusion is not None,
        excluded_reason=exclusion.reason if exclusion else None,
        excluded_at=exclusion.created_at if exclusion else None,
        outliers=[],
    )


def _outliers(r: RaterQuality, medians: dict[str, float | None]) -> list[Outlier]:
    """The reasons, in words, that a rater stands out (thresholds: the module's constants)."""
    found = []
    if r.position_biased and r.left.share is not None:
        side, share = ("left", r.left.share) if r.left.share > 0.5 else ("right", 1 - r.left.share)
        low, high = r.left.low or 0.0, r.left.high or 0.0
        if side == "right":
            low, high = 1 - high, 1 - low
        found.append(
            Outlier(
                "position_bias",
                f"picks the {side} side {_pct(share)} of the time (95 % CI"
                f" {100 * low:.0f}–{100 * high:.0f} %, {r.left.n} decisive judgments)",
            )
        )
    typical = medians["agreement"]
    if (
        r.agreement is not None
        and typical is not None
        and r.consensus_pairs >= MIN_CONSENSUS_PAIRS
        and r.agreement < typical - AGREEMENT_GAP
    ):
        found.append(
            Outlier(
                "low_agreement",
                f"agrees with the others on {_pct(r.agreement)} of {r.consensus_pairs} shared"
                f" pairs, project median {_pct(typical)}",
            )
        )
    speed = medians["median_active_ms"]
    if (
        r.median_active_ms is not None
        and speed is not None
        and r.timed >= MIN_TIMED
        and r.median_active_ms < FAST_FRACTION * speed
    ):
        found.append(
            Outlier(
                "fast",
                f"median {_seconds(r.median_active_ms)} per judgment, project median"
                f" {_seconds(speed)}",
            )
        )
    gold = wilson(r.gold_correct, r.gold_judgments)
    if r.gold_judgments >= MIN_GOLD and gold.high is not None and gold.high < GOLD_MIN_ACCURACY:
        found.append(
            Outlier(
                "gold",
                f"gold accuracy {r.gold_correct}/{r.gold_judgments} (95 % CI"
                f" {100 * (gold.low or 0):.0f}–{100 * gold.high:.0f} %)",
            )
        )
    if (
        r.reliability is not None
        and r.reliability_votes >= MIN_RELIABILITY_VOTES
        and r.reliability < RELIABILITY_MIN
    ):
        found.append(
            Outlier(
                "reliability",
                f"estimated to pick the better response {_pct(r.reliability)} of the time"
                f" ({r.reliability_votes} decisive votes)",
            )
        )
    if r.judgments >= MIN_TIE_JUDGMENTS and r.tie_rate > TIE_RATE_MAX:
        found.append(Outlier("ties", f"calls {_pct(r.tie_rate)} of pairs a tie"))
    return found


# Public -------------------------------------------------------------------------------------


def rater_quality(session: Session, project: Project) -> RaterReport:
    """Each rater's figures in the project, highlighted raters first."""
    return _raters(session, project, _judgments(session, project))


def project_quality(session: Session, project: Project) -> ProjectQuality:
    """The project's α, clear-majority share and preference cycles, overall and per week."""
    return _project(_judgments(session, project))


def quality_report(session: Session, project: Project) -> QualityReport:
    """Both views from one read of the judgments."""
    judgments = _judgments(session, project)
    return QualityReport(_project(judgments), _raters(session, project, judgments))
