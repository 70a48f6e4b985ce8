"""Exports: each format's exact rows on a small hand-built project, snapshot exports that are
byte-identical and exactly what was trained on, pseudonyms, spreadsheet-safe CSV, parameter
checks, batching that never splits a pair, and round trips through the importer."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.kinds.data import SnapshotConfig
from app.models import ComparisonPair, Judgment, Project, RaterExclusion, User
from app.services import exports, imports, snapshots
from app.services.errors import Conflict, InvalidInput
from tests.conftest import Factory

SECRET = "test-secret-key-" + "x" * 32
T0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)


def judge(
    factory: Factory,
    pair: ComparisonPair,
    rater: User,
    choice: str,
    strength: int | None = 1,
    *,
    day: int = 1,
    **fields: Any,
) -> Judgment:
    factory.session.commit()
    row = Judgment(
        project_id=pair.project_id,
        pair_id=pair.id,
        rater_id=rater.id,
        choice=choice,
        strength=strength if choice in ("a", "b") else None,
        created_at=T0.replace(day=day),
        **fields,
    )
    factory.session.add(row)
    pair.judgment_count += 1
    factory.session.commit()
    return row


def export(session: Session, project: Project, fmt: str, **params: Any) -> bytes:
    plan = exports.prepare_export(session, project, fmt, secret_key=SECRET, **params)
    session.commit()
    return b"".join(exports.stream_export(session, plan))


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines()]


class Built:
    """The hand-built project: two raters on four pairs (one gold), and what they chose."""

    def __init__(self, factory: Factory) -> None:
        self.project = factory.project("exp")
        self.r1 = factory.user("rater", "ann@example.com")
        self.r2 = factory.user("rater", "bob@example.com")
        self.p1 = factory.pair(self.project, ("good", "bad"), prompt="q1")
        self.p2 = factory.pair(self.project, ("left", "right"), prompt="q2")
        self.p3 = factory.pair(self.project, ("x", "y"), prompt="q3")
        self.gold = factory.pair(self.project, ("g1", "g2"), prompt="q4", gold_choice="a")
        self.j1 = judge(
            factory, self.p1, self.r1, "a", 2, day=1, shown_left="b", active_ms=4000,
            time_on_task_ms=5200, aspects={"helpful": "a"}, rationale="=1+1, clearly",
        )  # fmt: skip
        self.j2 = judge(factory, self.p1, self.r2, "a", 1, day=2, flags=["unsafe"])
        self.j3 = judge(factory, self.p2, self.r1, "b", 1, day=3)
        self.j4 = judge(factory, self.p2, self.r2, "tie", day=4)
        self.j5 = judge(factory, self.p3, self.r1, "both_bad", day=5)
        self.j6 = judge(factory, self.gold, self.r1, "a", 1, day=6, gold_correct=True)


@pytest.fixture
def built(factory: Factory) -> Built:
    return Built(factory)


def q(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def test_trl_is_the_default_snapshots_examples(session: Session, built: Built) -> None:
    rows = jsonl(export(session, built.project, "trl"))
    p1, p2 = built.p1.id, built.p2.id
    assert rows == [
        {"id": f"pair:{p1}/0", "snapshot": None, "prompt": q("q1"), "chosen": answer("good"),
         "rejected": answer("bad"), "margin": 1.0, "label": 1.0},
        {"id": f"pair:{p1}/1", "snapshot": None, "prompt": q("q1"), "chosen": answer("good"),
         "rejected": answer("bad"), "margin": 0.0, "label": 1.0},
        {"id": f"pair:{p2}/0", "snapshot": None, "prompt": q("q2"), "chosen": answer("right"),
         "rejected": answer("left"), "margin": 0.0, "label": 1.0},
    ]  # fmt: skip


def test_hh_transcripts(session: Session, built: Built) -> None:
    rows = jsonl(export(session, built.project, "hh"))
    one = {
        "chosen": "\n\nHuman: q1\n\nAssistant: good",
        "rejected": "\n\nHuman: q1\n\nAssistant: bad",
    }
    two = {
        "chosen": "\n\nHuman: q2\n\nAssistant: right",
        "rejected": "\n\nHuman: q2\n\nAssistant: left",
    }
    assert rows == [one, one, two]


def test_hh_transcript_of_a_conversation_with_a_system_turn() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Weather?"},
    ]
    text = exports.hh_transcript(messages)
    assert text == "\n\nHuman: Be brief.\n\nHi\n\nAssistant: Hello.\n\nHuman: Weather?"
    assert imports.parse_hh_transcript(text)[1:] == messages[2:]


def test_raw_jsonl_has_every_judgment_with_its_details(session: Session, built: Built) -> None:
    rows = jsonl(export(session, built.project, "raw-jsonl"))
    assert [r["judgment_id"] for r in rows] == [
        built.j1.id, built.j2.id, built.j3.id, built.j4.id, built.j5.id, built.j6.id
    ]  # fmt: skip
    a, b = built.p1.response_a_id, built.p1.response_b_id
    assert rows[0] == {
        "judgment_id": built.j1.id, "created_at": "2026-11-01T09:00:00+00:00",
        "pair_id": built.p1.id, "prompt_id": built.p1.prompt_id, "rater": "ann@example.com",
        "source": "rater", "choice": "a", "strength": 2, "aspects": {"helpful": "a"},
        "rationale": "=1+1, clearly", "flags": [], "active_ms": 4000, "time_on_task_ms": 5200,
        "shown_left": "b", "response_a_id": a, "response_a_model_version_id": None,
        "response_a_model_version": None, "response_a_model_name": "m1", "response_b_id": b,
        "response_b_model_version_id": None, "response_b_model_version": None,
        "response_b_model_name": "m2", "gold_choice": None, "gold_correct": None,
    }  # fmt: skip
    assert rows[1]["flags"] == ["unsafe"] and rows[1]["rater"] == "bob@example.com"
    assert (rows[3]["choice"], rows[3]["strength"]) == ("tie", None)
    assert (rows[5]["gold_choice"], rows[5]["gold_correct"]) == ("a", True)


def test_raw_csv_is_spreadsheet_safe(session: Session, factory: Factory, built: Built) -> None:
    judge(
        factory, built.p3, built.r2, "a", 1, day=7,
        rationale='@SUM(A1), then "quoted",\nnext line', aspects={"tone": "-2+3"},
    )  # fmt: skip
    data = export(session, built.project, "raw-csv")
    assert data.startswith("\ufeff".encode())
    text = data.decode("utf-8-sig")
    assert text.splitlines()[0].split(",") == list(exports.RAW_COLUMNS)
    assert "\r\n" in text and text.endswith("\r\n")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert len(rows) == 7
    assert rows[0]["rationale"] == "'=1+1, clearly"  # a formula, neutralised
    assert rows[0]["aspects"] == '{"helpful":"a"}'  # nested fields as JSON text
    assert rows[0]["strength"] == "2" and rows[0]["gold_correct"] == ""
    assert rows[5]["gold_correct"] == "true"
    assert rows[6]["rationale"] == '\'@SUM(A1), then "quoted",\nnext line'
    assert rows[6]["aspects"] == '{"tone":"-2+3"}'  # JSON text starts with {: not a formula
    assert [exports.csv_cell(v) for v in ("-1", "+1", "\tx", "\rx", "a=b", 5, None)] == [
        "'-1", "'+1", "'\tx", "'\rx", "a=b", "5", ""
    ]  # fmt: skip


def test_pseudonyms_are_stable_within_an_export_and_follow_the_salt(
    session: Session, built: Built
) -> None:
    def raters(**params: Any) -> list[str]:
        return [r["rater"] for r in jsonl(export(session, built.project, "raw-jsonl", **params))]

    default = raters(pseudonymize=True)
    ann = exports.pseudonym(
        exports.prepare_export(
            session, built.project, "raw-jsonl", pseudonymize=True, secret_key=SECRET
        ).pseudonym_key,
        built.r1.id,
    )
    assert default == [ann, default[1], ann, default[1], ann, ann]
    assert default[1] != ann and ann.startswith("rater-") and len(ann) == 22
    assert "ann@example.com" not in json.dumps(default)
    assert raters(pseudonymize=True) == default  # repeatable without a salt
    salted = raters(pseudonymize=True, salt="study-7")
    assert salted == raters(pseudonymize=True, salt="study-7")
    assert set(salted).isdisjoint(default)
    assert salted[0] == exports.pseudonym(b"study-7", built.r1.id)
    assert set(raters(pseudonymize=True, since="2026-11-02")).isdisjoint(default)


def test_snapshot_export_is_byte_identical_and_what_a_run_trains_on(
    session: Session, factory: Factory, built: Built
) -> None:
    snap = snapshots.create_snapshot(session, built.project, SnapshotConfig(ties="soft"))
    session.commit()
    first = export(session, built.project, "trl", snapshot_id=snap.id)
    judge(factory, built.p3, built.r2, "a", 2, day=9)  # after the snapshot: not in it
    assert export(session, built.project, "trl", snapshot_id=snap.id) == first
    rows = jsonl(first)
    assert {r["snapshot"] for r in rows} == {snap.id}
    trained = snapshots.load_examples(session, snap)
    assert sorted((json.dumps(r["prompt"]), r["chosen"][0]["content"], r["rejected"][0]["content"],
                   r["margin"], r["label"]) for r in rows) == sorted(
        (json.dumps(e.prompt), e.chosen, e.rejected, e.margin, e.label) for e in trained
    )  # fmt: skip
    assert [r["label"] for r in rows].count(0.5) == 1  # the tie, as a soft label
    raw = jsonl(export(session, built.project, "raw-jsonl", snapshot_id=snap.id))
    assert [r["judgment_id"] for r in raw] == sorted(snap.judgment_ids)
    assert export(session, built.project, "raw-csv", snapshot_id=snap.id) == export(
        session, built.project, "raw-csv", snapshot_id=snap.id
    )
    # A tie has no chosen side in HH-RLHF: left out there.
    assert len(jsonl(export(session, built.project, "hh", snapshot_id=snap.id))) == len(rows) - 1


def test_a_snapshot_whose_judgments_changed_is_refused(
    session: Session, factory: Factory, built: Built
) -> None:
    snap = snapshots.create_snapshot(session, built.project)
    session.commit()
    j = session.get(Judgment, built.j3.id)
    assert j is not None
    j.choice = "a"
    session.commit()
    with pytest.raises(Conflict, match="no longer matches"):
        exports.prepare_export(session, built.project, "trl", snapshot_id=snap.id, secret_key="k")


def test_date_range_selects_judgments_by_when_they_were_made(
    session: Session, built: Built
) -> None:
    raw = jsonl(export(session, built.project, "raw-jsonl", since="2026-11-02", until="2026-11-04"))
    assert [r["judgment_id"] for r in raw] == [built.j2.id, built.j3.id]
    trl = jsonl(export(session, built.project, "trl", since="2026-11-02T00:00:00Z"))
    assert [r["id"] for r in trl] == [f"pair:{built.p1.id}/0", f"pair:{built.p2.id}/0"]
    assert trl[0]["margin"] == 0.0  # j2 (strength 1); j1 is before the range
    assert export(session, built.project, "trl", until="2026-11-01T09:00:00") == b""


def test_exclusions_and_moderation_leave_the_current_state(session: Session, built: Built) -> None:
    session.add(RaterExclusion(project_id=built.project.id, rater_id=built.r2.id, reason="spam"))
    pair = session.get(ComparisonPair, built.p2.id)
    assert pair is not None
    pair.training_excluded_at = T0
    session.commit()
    assert [r["id"] for r in jsonl(export(session, built.project, "trl"))] == [
        f"pair:{built.p1.id}/0"
    ]
    assert len(jsonl(export(session, built.project, "raw-jsonl"))) == 6  # raw: every judgment


@pytest.mark.parametrize(
    ("fmt", "params", "field", "message"),
    [
        ("parquet", {}, "format", "unknown export format 'parquet'; use one of trl, hh, raw"),
        ("trl", {"snapshot_id": 999}, "snapshot", "999 is not a snapshot of project exp"),
        ("trl", {"since": "2026-11-05", "until": "2026-11-05"}, "since", "earlier than until"),
        ("trl", {"since": "yesterday"}, "since", "'yesterday' is not an ISO 8601 date"),
        ("trl", {"until": "2026-13-01"}, "until", "is not an ISO 8601 date"),
        ("raw-csv", {"salt": "s"}, "salt", "ask for pseudonymize too"),
        ("hh", {"pseudonymize": True}, "pseudonymize", "the hh format names no raters"),
    ],
)
def test_bad_parameters_name_the_parameter(
    session: Session, built: Built, fmt: str, params: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        exports.prepare_export(session, built.project, fmt, secret_key=SECRET, **params)
    assert [e.field for e in info.value.errors] == [field]


def test_a_snapshot_of_another_project_or_with_dates_is_refused(
    session: Session, factory: Factory, built: Built
) -> None:
    other = factory.project("other")
    pair = factory.pair(other, ("o1", "o2"))
    judge(factory, pair, built.r1, "a")
    theirs = snapshots.create_snapshot(session, other)
    ours = snapshots.create_snapshot(session, built.project)
    session.commit()
    with pytest.raises(InvalidInput, match="is not a snapshot of project exp"):
        exports.prepare_export(session, built.project, "trl", snapshot_id=theirs.id, secret_key="k")
    with pytest.raises(InvalidInput, match="exported whole") as info:
        exports.prepare_export(
            session, built.project, "trl", snapshot_id=ours.id, until="2026-11-03", secret_key="k"
        )
    assert info.value.errors[0].field == "until"


def test_batches_never_split_a_pair(
    session: Session, factory: Factory, built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    r3 = factory.user("rater")
    judge(factory, built.p1, r3, "b", 1, day=8)
    judge(factory, built.p2, r3, "b", 2, day=8)
    config = SnapshotConfig(aggregate="majority")
    snap = snapshots.create_snapshot(session, built.project, config)
    session.commit()
    whole = export(session, built.project, "trl", snapshot_id=snap.id)
    monkeypatch.setattr(exports, "BATCH", 1)
    assert export(session, built.project, "trl", snapshot_id=snap.id) == whole
    rows = jsonl(whole)
    # Majority: p1 is a, a, b → good over bad (the strongest a: margin 1.0); p2 is b, b → right.
    assert [(r["chosen"][0]["content"], r["margin"]) for r in rows] == [
        ("good", 1.0), ("right", 1.0)
    ]  # fmt: skip
    raw_whole = jsonl(export(session, built.project, "raw-jsonl"))
    assert len(raw_whole) == 8 and len({r["judgment_id"] for r in raw_whole}) == 8


def test_reliability_labels_are_the_whole_snapshots_in_any_batch_size(
    session: Session, factory: Factory, built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    r3 = factory.user("rater")
    judge(factory, built.p1, r3, "b", 1, day=8)
    judge(factory, built.p2, r3, "b", 2, day=8)
    judge(factory, built.p3, r3, "a", 1, day=8)
    judge(factory, built.p3, built.r2, "a", 2, day=8)
    snap = snapshots.create_snapshot(
        session, built.project, SnapshotConfig(aggregate="reliability")
    )
    session.commit()
    trained = sorted(
        (e.chosen, e.rejected, e.margin, e.label) for e in snapshots.load_examples(session, snap)
    )
    assert len(trained) == 3 and any(0.5 < label < 1.0 for *_, label in trained)
    monkeypatch.setattr(exports, "BATCH", 1)  # one pair a batch: the estimate must be global
    rows = jsonl(export(session, built.project, "trl", snapshot_id=snap.id))
    exported = sorted(
        (r["chosen"][0]["content"], r["rejected"][0]["content"], r["margin"], r["label"])
        for r in rows
    )
    assert exported == trained


def store(session: Session, project: Project, data: bytes, fmt: str) -> None:
    records, skipped = imports.parse_preferences(data, fmt, 1000, 1 << 20)  # type: ignore[arg-type]
    assert skipped == []
    imports.store_preferences(session, project, records, source="roundtrip")
    session.commit()


def comparisons(session: Session, project: Project) -> list[tuple[str, str, str]]:
    plan = exports.prepare_export(session, project, "trl", secret_key=SECRET)
    rows = jsonl(b"".join(exports.stream_export(session, plan)))
    return sorted(
        (json.dumps(r["prompt"]), r["chosen"][0]["content"], r["rejected"][0]["content"])
        for r in rows
    )


@pytest.mark.parametrize(("fmt", "import_as"), [("trl", "auto"), ("hh", "hh-rlhf")])
def test_round_trip_through_the_importer(
    session: Session, factory: Factory, built: Built, fmt: str, import_as: str
) -> None:
    assert exports.FORMATS[fmt].imports_as is not None
    conversation = factory.pair(built.project, ("Sure: 4.", "No."), prompt="ignored")
    prompt = conversation.prompt
    prompt.text = None
    prompt.messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "Why?"},
        {"role": "user", "content": "Just say it, please."},
    ]
    session.commit()
    judge(factory, conversation, built.r2, "a", 2, day=8)
    # Distinct comparisons: the importer stores the same two answers to a prompt once.
    source = sorted(set(comparisons(session, built.project)))
    target = factory.project("copy")
    store(session, target, export(session, built.project, fmt), import_as)
    assert comparisons(session, target) == source
