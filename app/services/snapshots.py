"""Dataset snapshots: the immutable set of judgments a training run used, and how those
judgments become preference pairs.

A snapshot stores the ids of the judgments it used, the config that chose them and a SHA-256 of
their content (choice, strength, flags, and the prompt and response texts). Nothing ever updates a
snapshot row; `load_examples` recomputes the hash and refuses a snapshot whose data changed, so a
reward model can always be traced to exactly what it learned from.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from app.kinds.data import PreferenceExample, SnapshotConfig
from app.models import (
    ComparisonPair,
    DatasetSnapshot,
    Judgment,
    Project,
    Prompt,
    RaterExclusion,
    Response,
    Run,
)
from app.services import audit, reliability
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound
from app.services.prompts import prompt_messages


@dataclass(frozen=True)
class _Row:
    judgment: Judgment
    pair: ComparisonPair
    prompt: Prompt
    a: Response
    b: Response


def _config_filter(config: SnapshotConfig) -> list[Any]:
    """SQL: the judgments `config` chooses (choices, gold, sources), before governance."""
    clauses: list[Any] = [
        Judgment.choice.in_(("a", "b", "tie") if config.ties == "soft" else ("a", "b"))
    ]
    if not config.include_gold:
        clauses.append(ComparisonPair.gold_choice.is_(None))
    if config.sources == "raters":
        clauses.append(Judgment.source == "rater")
    elif config.sources == "imports":
        clauses.append(Judgment.source != "rater")
    return clauses


def _rater_excluded() -> ColumnElement[bool]:
    """SQL: the judgment's rater has a live exclusion in the judgment's project
    (`services/exclusions.py`); imported judgments (no rater) never match."""
    return exists().where(
        RaterExclusion.project_id == Judgment.project_id,
        RaterExclusion.rater_id == Judgment.rater_id,
        RaterExclusion.lifted_at.is_(None),
    )


def _pair_moderated_out() -> ColumnElement[bool]:
    """SQL: moderation took the judgment's pair out of training (excluded, or removed from
    rating; `services/moderation.py`)."""
    return or_(
        ComparisonPair.training_excluded_at.is_not(None),
        ComparisonPair.rating_removed_at.is_not(None),
    )


def _usable_filter(config: SnapshotConfig) -> list[Any]:
    """SQL clauses (on Judgment joined to its ComparisonPair): the judgments a snapshot with
    this config uses. Also leaves out the judgments of raters excluded in the project, past and
    future ones alike while the exclusion is live, and those of pairs moderation excluded or
    removed; the auto-trigger's counter and the exports read the same clauses."""
    return [*_config_filter(config), ~_rater_excluded(), ~_pair_moderated_out()]


def _left_out(session: Session, project: Project, config: SnapshotConfig) -> dict[str, Any]:
    """What governance left out of a snapshot with this config, for its stats: judgments of
    moderated pairs first, then the judgments of excluded raters on the other pairs, so the two
    counts add up to everything left out (one query)."""
    moderated = _pair_moderated_out()
    excluded = _rater_excluded()
    row = session.execute(
        select(
            func.count(Judgment.id).filter(moderated),
            func.count(func.distinct(Judgment.pair_id)).filter(moderated),
            func.count(Judgment.id).filter(~moderated, excluded),
            func.count(func.distinct(Judgment.rater_id)).filter(~moderated, excluded),
        )
        .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
        .where(Judgment.project_id == project.id, *_config_filter(config))
    ).one()
    return {
        "moderation": {"judgments": row[0] or 0, "pairs": row[1] or 0},
        "raters": {"judgments": row[2] or 0, "raters": row[3] or 0},
    }


def _rows(session: Session, project_id: int, where: list[Any]) -> list[_Row]:
    resp_a = aliased(Response)
    resp_b = aliased(Response)
    query = (
        select(Judgment, ComparisonPair, Prompt, resp_a, resp_b)
        .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
        .join(Prompt, ComparisonPair.prompt_id == Prompt.id)
        .join(resp_a, ComparisonPair.response_a_id == resp_a.id)
        .join(resp_b, ComparisonPair.response_b_id == resp_b.id)
        .where(Judgment.project_id == project_id, *where)
        .order_by(Judgment.id)
    )
    return [_Row(*row) for row in session.execute(query).all()]


def _is_unsafe(judgment: Judgment) -> bool:
    return "unsafe" in (judgment.flags or [])


def content_hash(rows: Iterable[_Row], config: SnapshotConfig) -> str:
    """SHA-256 of everything a training run reads from these judgments, and the config (read
    once, in order: the exports stream a snapshot's rows through it batch by batch)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config.model_dump(), sort_keys=True).encode())
    for r in rows:
        record = [
            r.judgment.id, r.pair.id, r.judgment.choice, r.judgment.strength,
            sorted(r.judgment.flags or []), r.prompt.id, prompt_messages(r.prompt),
            r.a.id, r.a.text, r.b.id, r.b.text,
        ]  # fmt: skip
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def usable_judgment_count(
    session: Session,
    project: Project,
    config: SnapshotConfig,
    after_id: int = 0,
    *,
    at_most: int | None = None,
) -> int:
    """How many judgments with id > `after_id` a snapshot with this config would use; with
    `at_most`, counting stops there (the answer is then min(count, at_most))."""
    usable = (
        select(Judgment.id)
        .join(ComparisonPair, Judgment.pair_id == ComparisonPair.id)
        .where(Judgment.project_id == project.id, Judgment.id > after_id, *_usable_filter(config))
    )
    if at_most is not None:
        usable = usable.limit(at_most)
    return session.scalar(select(func.count()).select_from(usable.subquery())) or 0


def latest_snapshot(session: Session, project: Project) -> DatasetSnapshot | None:
    return session.scalar(
        select(DatasetSnapshot)
        .where(DatasetSnapshot.project_id == project.id)
        .order_by(DatasetSnapshot.id.desc())
        .limit(1)
    )


def create_snapshot(
    session: Session,
    project: Project,
    config: SnapshotConfig | None = None,
    *,
    actor_id: int | None = None,
    run_id: int | None = None,
) -> DatasetSnapshot:
    """Freeze the project's usable judgments (under `config`) into a new snapshot. Audited,
    with the person who asked for it or the training run that needed it."""
    config = config or SnapshotConfig()
    rows = _rows(session, project.id, _usable_filter(config))
    if config.unsafe == "exclude":
        rows = [r for r in rows if not _is_unsafe(r.judgment)]
    if not rows:
        raise InvalidInput(
            "no usable judgments to snapshot yet (ties, both-bad and gold excluded, and the"
            " judgments of excluded raters and moderated pairs)"
        )
    all_counts = Counter(
        session.scalars(select(Judgment.choice).where(Judgment.project_id == project.id))
    )
    snapshot = DatasetSnapshot(
        project_id=project.id,
        judgment_ids=[r.judgment.id for r in rows],
        content_hash=content_hash(rows, config),
        config=config.model_dump(),
        stats={
            "judgments": len(rows),
            "pairs": len({r.pair.id for r in rows}),
            "prompts": len({r.prompt.id for r in rows}),
            "project_choices": dict(all_counts),  # both_bad is counted here, never trained on
            "unsafe_flagged": sum(_is_unsafe(r.judgment) for r in rows),
            "excluded": _left_out(session, project, config),
            **aggregation_stats(rows, config),
        },
        max_judgment_id=max(r.judgment.id for r in rows),
    )
    session.add(snapshot)
    session.flush()
    audit.record(
        session, "snapshot.create", actor_id=actor_id, project_id=project.id,
        target=("snapshot", snapshot.id), run_id=run_id, judgments=snapshot.stats["judgments"],
        pairs=snapshot.stats["pairs"],
    )  # fmt: skip
    return snapshot


def check_run_snapshot(session: Session, project: Project, snapshot_id: int | None) -> None:
    """For a run config naming `snapshot_id`: 422 at `config.snapshot_id` unless it is one of
    the project's snapshots."""
    if snapshot_id is None:
        return
    snapshot = session.get(DatasetSnapshot, snapshot_id)
    if snapshot is None or snapshot.project_id != project.id:
        raise InvalidInput(
            f"snapshot {snapshot_id} is not a snapshot of project {project.slug}",
            [FieldError(None, "config.snapshot_id", "unknown snapshot")],
        )


def get_snapshot(session: Session, snapshot_id: int) -> DatasetSnapshot:
    snapshot = session.get(DatasetSnapshot, snapshot_id)
    if snapshot is None:
        raise NotFound(f"dataset snapshot {snapshot_id} not found")
    return snapshot


def load_examples(session: Session, snapshot: DatasetSnapshot) -> list[PreferenceExample]:
    """The snapshot's training pairs, after checking its content hash still matches."""
    config = SnapshotConfig.model_validate(snapshot.config)
    ids = list(snapshot.judgment_ids)
    rows: list[_Row] = []
    for start in range(0, len(ids), 500):
        rows.extend(
            _rows(session, snapshot.project_id, [Judgment.id.in_(ids[start : start + 500])])
        )
    if len(rows) != len(ids) or content_hash(rows, config) != snapshot.content_hash:
        raise Conflict(
            f"dataset snapshot {snapshot.id} no longer matches its judgments (rows were deleted"
            " or changed); create a new snapshot"
        )
    return to_examples(rows, config)


def to_examples(
    rows: Iterable[_Row],
    config: SnapshotConfig,
    *,
    estimate: reliability.ReliabilityEstimate | None = None,
) -> list[PreferenceExample]:
    """Judgments → preference pairs under `config` (a, b are the pair's responses).

    `config.aggregate` decides how several judgments of one pair combine: "separate" makes one
    example per judgment, "majority" one per pair (`_majority`), "reliability" one soft-labelled
    example per pair (`_reliability_examples`) from `estimate`, by default the reliability model
    fitted to these rows' own decisive votes; a caller that feeds the rows in batches (an export)
    passes the estimate of all of them, so every batch is labelled alike.
    """
    rows = list(rows)
    if config.aggregate == "reliability":
        return _reliability_examples(rows, config, estimate or reliability_estimate(rows))
    margins = _margins(config)
    if config.aggregate == "majority":
        rows = _majority(rows)
    examples = []
    for r in rows:
        messages = prompt_messages(r.prompt)
        group = f"prompt:{r.prompt.id}"
        pair = f"pair:{r.pair.id}"
        choice = r.judgment.choice
        if choice == "tie":
            examples.append(PreferenceExample(messages, r.a.text, r.b.text, 0.0, 0.5, group, pair))
            continue
        chosen, rejected = (r.a, r.b) if choice == "a" else (r.b, r.a)
        margin = margins.get(r.judgment.strength or 1, 0.0)
        examples.append(
            PreferenceExample(messages, chosen.text, rejected.text, margin, 1.0, group, pair)
        )
    return examples


def _margins(config: SnapshotConfig) -> dict[int, float]:
    return {int(k): v for k, v in config.margin_by_strength.items()}


def _majority(rows: list[_Row]) -> list[_Row]:
    """One row per pair: the most common choice (a tie between a and b becomes a tie)."""
    by_pair: dict[int, list[_Row]] = defaultdict(list)
    for r in rows:
        by_pair[r.pair.id].append(r)
    out = []
    for group in by_pair.values():
        votes = Counter(r.judgment.choice for r in group)
        if votes["a"] == votes["b"]:
            if votes["tie"] == 0 and votes["a"] == 0:
                continue
            pick = next((r for r in group if r.judgment.choice == "tie"), None)
            if pick is None:
                continue  # a split vote with ties excluded: no majority to learn from
        else:
            winner = "a" if votes["a"] > votes["b"] else "b"
            pick = max(
                (r for r in group if r.judgment.choice == winner),
                key=lambda r: r.judgment.strength or 1,
            )
        out.append(pick)
    return out


def vote_rater(rater_id: int | None, source: str) -> int:
    """Who a judgment's vote counts as in the reliability model: the rater's user id, or, for an
    imported judgment (no rater), its source as one rater of its own — a negative id derived from
    the source's name, stable across snapshots and never a user id. An import is one process
    with one error rate, and an imported pair is judged once by it, so the source's accuracy
    rests on the pairs raters judged too (none: the prior's 0.75)."""
    if rater_id is not None:
        return rater_id
    return -1 - int.from_bytes(hashlib.sha256(source.encode()).digest()[:6], "big")


def reliability_estimate(rows: Iterable[_Row]) -> reliability.ReliabilityEstimate:
    """The reliability model fitted to these judgments' decisive votes (ties and both-bad are
    not votes)."""
    return reliability.estimate(
        reliability.Vote(
            r.pair.id,
            vote_rater(r.judgment.rater_id, r.judgment.source),
            r.judgment.choice,  # type: ignore[arg-type]  # "a" or "b", filtered below
        )
        for r in rows
        if r.judgment.choice in ("a", "b")
    )


def _reliability_examples(
    rows: list[_Row], config: SnapshotConfig, estimate: reliability.ReliabilityEstimate
) -> list[PreferenceExample]:
    """One example per pair, in the order of the pair's first row; its chosen side is the one
    more likely better and its label that probability:

    * p, the posterior P(a is better) of the pair's decisive votes, each weighted by its rater's
      estimated reliability (`services/reliability.py`);
    * with `ties="soft"`, each tie judgment counts as one more opinion of 0.5: the label is the
      mean of p over the decisive votes and 0.5 over the ties, (n_decisive·p + n_ties·0.5) /
      (n_decisive + n_ties), so a pair of ties alone is a 0.5 soft label as under "separate";
    * the margin is the mean of `margin_by_strength` over the decisive judgments that chose the
      winning side (none did, e.g. an adversarial rater's lone vote: 0).

    A pair whose label is exactly 0.5 without any tie (a split between equally trusted raters)
    is left out, as "majority" leaves a split out: it says nothing about which side is better,
    and a 0.5 label would teach that the two are equal.
    """
    margins = _margins(config)
    by_pair: dict[int, list[_Row]] = defaultdict(list)
    for r in rows:
        by_pair[r.pair.id].append(r)
    examples = []
    for pair_id, group in by_pair.items():
        decisive = [r for r in group if r.judgment.choice in ("a", "b")]
        ties = len(group) - len(decisive)
        p_a = estimate.p_a[pair_id] if decisive else 0.5
        p_a = (len(decisive) * p_a + ties * 0.5) / (len(decisive) + ties)
        if p_a == 0.5 and not ties:
            continue
        first = group[0]
        winner = "a" if p_a >= 0.5 else "b"
        chosen, rejected = (first.a, first.b) if winner == "a" else (first.b, first.a)
        agreeing = [
            margins.get(r.judgment.strength or 1, 0.0)
            for r in decisive
            if r.judgment.choice == winner
        ]
        examples.append(
            PreferenceExample(
                prompt_messages(first.prompt),
                chosen.text,
                rejected.text,
                sum(agreeing) / len(agreeing) if agreeing else 0.0,
                max(p_a, 1.0 - p_a),
                f"prompt:{first.prompt.id}",
                f"pair:{pair_id}",
            )
        )
    return examples


def aggregation_stats(rows: Iterable[_Row], config: SnapshotConfig) -> dict[str, Any]:
    """For a snapshot's stats: the aggregation its config chose and how many training examples
    its judgments make under it (fewer than the judgments when it keeps one per pair)."""
    return {"aggregate": config.aggregate, "examples": len(to_examples(rows, config))}


@dataclass(frozen=True)
class SnapshotSummary:
    """A snapshot as a list shows it: never its judgment ids, which may run to a million."""

    id: int
    content_hash: str
    stats: dict[str, Any]
    config: dict[str, Any]
    created_at: Any


def snapshot_summaries(
    session: Session, project: Project, limit: int = 20
) -> list[SnapshotSummary]:
    """The project's newest snapshots, read without their judgment ids."""
    rows = session.execute(
        select(
            DatasetSnapshot.id, DatasetSnapshot.content_hash, DatasetSnapshot.stats,
            DatasetSnapshot.config, DatasetSnapshot.created_at,
        )
        .where(DatasetSnapshot.project_id == project.id)
        .order_by(DatasetSnapshot.id.desc())
        .limit(limit)
    )  # fmt: skip
    return [SnapshotSummary(*row) for row in rows]


def list_snapshots(session: Session, project: Project) -> list[DatasetSnapshot]:
    return list(
        session.scalars(
            select(DatasetSnapshot)
            .where(DatasetSnapshot.project_id == project.id)
            .order_by(DatasetSnapshot.id)
        )
    )


def snapshot_for_run(
    session: Session,
    project: Project,
    run: Run,
    snapshot_id: int | None,
    config: SnapshotConfig,
) -> tuple[DatasetSnapshot, list[PreferenceExample]]:
    """The snapshot a training run trains on, and its pairs.

    A resumed run keeps the snapshot it started with; otherwise the one its config names, or a
    new one of the project's judgments. The run row records it (the caller commits before
    training starts).
    """
    if run.snapshot_id is not None:
        snapshot = get_snapshot(session, run.snapshot_id)
    elif snapshot_id is not None:
        snapshot = get_snapshot(session, snapshot_id)
    else:
        snapshot = create_snapshot(session, project, config, run_id=run.id)
    run.snapshot_id = snapshot.id
    return snapshot, load_examples(session, snapshot)
