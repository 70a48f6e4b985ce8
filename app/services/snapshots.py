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
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from app.kinds.data import PreferenceExample, SnapshotConfig
from app.models import ComparisonPair, DatasetSnapshot, Judgment, Project, Prompt, Response, Run
from app.services.errors import Conflict, FieldError, InvalidInput, NotFound
from app.services.prompts import prompt_messages


@dataclass(frozen=True)
class _Row:
    judgment: Judgment
    pair: ComparisonPair
    prompt: Prompt
    a: Response
    b: Response


def _usable_filter(config: SnapshotConfig) -> list[Any]:
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


def content_hash(rows: list[_Row], config: SnapshotConfig) -> str:
    """SHA-256 of everything a training run reads from these judgments, and the config."""
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
    session: Session, project: Project, config: SnapshotConfig | None = None
) -> DatasetSnapshot:
    """Freeze the project's usable judgments (under `config`) into a new snapshot."""
    config = config or SnapshotConfig()
    rows = _rows(session, project.id, _usable_filter(config))
    if config.unsafe == "exclude":
        rows = [r for r in rows if not _is_unsafe(r.judgment)]
    if not rows:
        raise InvalidInput("no usable judgments to snapshot yet (ties, both-bad and gold excluded)")
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
        },
        max_judgment_id=max(r.judgment.id for r in rows),
    )
    session.add(snapshot)
    session.flush()
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


def to_examples(rows: list[_Row], config: SnapshotConfig) -> list[PreferenceExample]:
    """Judgments → preference pairs under `config` (a, b are the pair's responses)."""
    margins = {int(k): v for k, v in config.margin_by_strength.items()}
    if config.aggregate == "majority":
        rows = _majority(rows)
    examples = []
    for r in rows:
        messages = prompt_messages(r.prompt)
        group = f"prompt:{r.prompt.id}"
        choice = r.judgment.choice
        if choice == "tie":
            examples.append(PreferenceExample(messages, r.a.text, r.b.text, 0.0, 0.5, group))
            continue
        chosen, rejected = (r.a, r.b) if choice == "a" else (r.b, r.a)
        margin = margins.get(r.judgment.strength or 1, 0.0)
        examples.append(PreferenceExample(messages, chosen.text, rejected.text, margin, 1.0, group))
    return examples


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
        snapshot = create_snapshot(session, project, config)
    run.snapshot_id = snapshot.id
    return snapshot, load_examples(session, snapshot)
